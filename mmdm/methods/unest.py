"""UNest (Phan et al., MICCAI 2024, "Structural attention"): a UNETR with foreground-routed attention.

Official defaults (HieuPhan33/MICCAI2024-UNest, ``structured_trans`` model with
``--netG unest``): generator in :mod:`mmdm.nets.unest` (patch 16, hidden 768,
4 layers, 12 heads, local window 2, feature size 16, 7x7 output convolution),
foreground masks from SAM (Segment Anything) max-pooled to the token grid and
given to the generator in training and testing, the mask head trained with BCE
(lambda_seg 0.5), an unpaired CycleGAN objective (two generators, cycle and
identity losses, unconditional PatchGAN discriminators), GAN labels 0.9 / 0.1,
Adam lr 2e-4 betas (0.5, 0.999).

In the study (paired data, paper section 3.1) the gated source window is the
input, and the objective is the paired one of the other GAN baselines:
LSGAN with a conditional PatchGAN + lambda_L1 (100) * L1 + lambda_mask (0.5) *
mask BCE. Foreground masks come from the data instead of SAM: a window is
foreground where any of its K slices exceeds ``fg_threshold`` (on the [-1, 1]
scale), dilated by ``fg_dilation`` pixels, then max-pooled to the token grid.
Routing and the BCE target use the mask of the target window in training
(``train_mask="target"``) or of the gated sources (``"sources"``); at
inference routing uses the mask head's prediction (``infer_mask="predicted"``)
or the gated sources' mask (``"sources"``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdm.config import ConfigError
from mmdm.methods.base import OptimConfig, register_method
from mmdm.methods.pix2pix import ConditionalGAN, validate_gan_fields
from mmdm.nets.gating import GatingConfig, ModalityGating
from mmdm.nets.patchgan import PatchGAN, PatchGANConfig
from mmdm.nets.unest import UNestGenerator, UNestNetConfig

MASK_SOURCES = ("target", "sources")
INFER_MASKS = ("predicted", "sources")

DEVIATIONS: list[str] = [
    "UNest: foreground masks are thresholded from the data (any slice above fg_threshold, dilated), not from "
    "SAM (not available offline). Training routes by the target window's mask; inference by the mask head's "
    "prediction (the official code feeds the SAM mask of the input at test time too).",
    "UNest: paired objective (LSGAN with a conditional PatchGAN + 100 * L1 + 0.5 * mask BCE) instead of the "
    "official unpaired CycleGAN objective with cycle and identity losses; the GAN labels 0.9 / 0.1 are kept.",
    "UNest: local attention alternates unshifted / shifted (by window // 2) windows between layers, as the "
    "paper's shifted-window background attention describes; the official code has one unshifted window "
    "attention per layer. The local attention has no relative position bias.",
    "UNest: the mask head outputs logits trained with BCE-with-logits (the official applies a sigmoid then BCE: "
    "the same loss, numerically safer).",
    "UNest: the positional embedding is learned on an 18x20 token grid and bilinearly resized to other grids; "
    "the official code fixes the image size.",
    "UNest: input is the gated fusion of the source windows (K = 5 channels in and out) instead of one image.",
]


@dataclass
class UNestConfig:
    """UNest in the study; see :class:`mmdm.methods.pix2pix.Pix2PixConfig` for the shared GAN fields.

    ``fg_threshold``: intensity (on [-1, 1]) above which a pixel is foreground;
    ``fg_dilation``: pixels of dilation of that mask; ``lambda_mask``: weight of
    the mask BCE; ``train_mask`` / ``infer_mask``: see the module docstring.
    """

    sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")
    window: int = 5
    gating: GatingConfig = field(default_factory=GatingConfig)
    generator: UNestNetConfig = field(default_factory=UNestNetConfig)
    discriminator: PatchGANConfig = field(default_factory=PatchGANConfig)
    gan_mode: str = "lsgan"
    real_label: float = 0.9
    fake_label: float = 0.1
    lambda_l1: float = 100.0
    lambda_mask: float = 0.5
    fg_threshold: float = -0.9
    fg_dilation: int = 2
    train_mask: str = "target"
    infer_mask: str = "predicted"
    reuse_fake: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.5, 0.999)))
    optim_d: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.5, 0.999)))

    def validate(self) -> None:
        validate_gan_fields(self, "UNestConfig")
        if self.train_mask not in MASK_SOURCES:
            raise ConfigError(f"UNestConfig.train_mask: unknown mask source {self.train_mask!r}; use one of "
                              f"{MASK_SOURCES}")
        if self.infer_mask not in INFER_MASKS:
            raise ConfigError(f"UNestConfig.infer_mask: unknown mask source {self.infer_mask!r}; use one of "
                              f"{INFER_MASKS}")
        if self.fg_dilation < 0 or self.lambda_mask < 0:
            raise ConfigError(f"UNestConfig: fg_dilation and lambda_mask must be >= 0, got {self.fg_dilation}, "
                              f"{self.lambda_mask}")
        try:
            self.generator.validate()
            self.discriminator.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def paper_config() -> UNestConfig:
    """Official generator sizes (patch 16, hidden 768, 4 layers, 12 heads, window 2), LSGAN with labels
    0.9 / 0.1, lambda_L1 100, lambda_mask 0.5, Adam 2e-4 (0.5, 0.999)."""
    return UNestConfig()


def small_config() -> UNestConfig:
    """CPU size: patch 8, hidden 32, 2 layers, 4 heads, MLP 64, feature size 8, mask head (16, 16),
    token grid 12x14 (96x112 windows), PatchGAN base 16, gating hidden 16."""
    cfg = paper_config()
    cfg.generator = dataclasses.replace(cfg.generator, patch_size=8, hidden=32, layers=2, heads=4, mlp_dim=64,
                                        feature_size=8, mask_channels=(16, 16), pos_grid=(12, 14))
    cfg.discriminator = dataclasses.replace(cfg.discriminator, base=16)
    cfg.gating = GatingConfig(hidden=16)
    return cfg


def foreground_mask(window: Tensor, threshold: float, dilation: int) -> Tensor:
    """(B, 1, H, W) float mask: 1 where any slice of the (B, K, H, W) window exceeds ``threshold``,
    dilated by ``dilation`` pixels (square structuring element)."""
    mask = (window.amax(dim=1, keepdim=True) > threshold).float()
    if dilation > 0:
        mask = F.max_pool2d(mask, 2 * dilation + 1, stride=1, padding=dilation)
    return mask


@register_method("unest")
class UNest(ConditionalGAN):
    """Gated sources -> structural-attention UNETR -> K-slice window (+ foreground mask logits)."""

    config_class = UNestConfig
    named_configs = {"paper": paper_config, "small": small_config}

    def __init__(self, cfg: UNestConfig | None = None):
        super().__init__()
        cfg = cfg or UNestConfig()
        cfg.validate()
        self.cfg = cfg
        self.sources = tuple(cfg.sources)
        self.window = k = cfg.window
        self.gating = ModalityGating(len(self.sources), k, cfg.gating)
        self.net = UNestGenerator(k, k, cfg.generator)
        self.discriminator = PatchGAN(2 * k, cfg.discriminator)
        self.spatial_multiple = self.net.spatial_multiple

    def token_mask(self, window: Tensor) -> Tensor:
        """Foreground of a (B, K, H, W) window on the token grid (B, 1, H/p, W/p): max-pooled pixel mask."""
        c = self.cfg
        return F.max_pool2d(foreground_mask(window, c.fg_threshold, c.fg_dilation), self.net.spatial_multiple)

    def generate(self, ys: list[Tensor], target: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        cond = self.gating(ys)
        if target is not None:
            mask = self.token_mask(target if self.cfg.train_mask == "target" else cond.detach())
        else:
            mask = self.token_mask(cond.detach()) if self.cfg.infer_mask == "sources" else None
        fake, logits = self.net(cond, mask)
        extras = {"mask_logits": logits} if mask is None else {"mask_logits": logits, "mask_target": mask}
        return fake, cond, extras

    def extra_generator_losses(self, extras: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """``lambda_mask * BCE(mask logits, token mask)`` (logged weighted, as ``loss_mask``)."""
        if "mask_target" not in extras:
            return {}
        bce = F.binary_cross_entropy_with_logits(extras["mask_logits"], extras["mask_target"])
        return {"loss_mask": self.cfg.lambda_mask * bce}

    @torch.no_grad()
    def predict_mask(self, sources: dict[str, Tensor]) -> Tensor:
        """The mask head's foreground probability on the token grid (B, 1, H/p, W/p)."""
        self.check_sources(sources)
        cond = self.gating(self.source_list(sources))
        return torch.sigmoid(self.net.mask_head(self.net.patch_embed(cond)))

