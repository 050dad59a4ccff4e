"""UNest (Phan et al., MICCAI 2024, "Structural attention"): a UNETR with foreground-routed attention.

Official defaults (HieuPhan33/MICCAI2024-UNest, ``structured_trans`` model with
``--netG unest``): generator in :mod:`mmdm.nets.unest` (patch 16, hidden 768,
4 layers, 12 heads, local window 2, feature size 16, 7x7 output convolution),
foreground masks from SAM (Segment Anything) max-pooled to the token grid and
given to the generators in training and testing, and the **unpaired** CycleGAN
objective: two generators ``G_A: A -> B`` and ``G_B: B -> A``, two
unconditional PatchGANs (``D_B`` judges domain B, ``D_A`` domain A), each D
trained on a history of 50 fakes (image pool), LSGAN with labels 0.9 / 0.1,
cycle L1 weights lambda_A = lambda_B = 10, identity L1 weight 0.5 (times the
cycle weight of the domain), and the mask heads of both generators trained
with BCE against their inputs' masks (lambda_seg 0.5); Adam lr 1e-4 betas
(0.5, 0.999) for both optimisers (``train_options.py``; 50 epochs, then 50 of
linear decay in the README's example).

The study's ``unest`` (objective ``"unpaired"``, the Table 1 row) follows that
objective with domain A = the gated source window (K slices; the paper's gating
strategy) and domain B = the TOF-MRA window::

    fake_B = G_A(A, m_A)     rec_A = G_B(fake_B, m_A)     (A -> B -> A)
    fake_A = G_B(B, m_B)     rec_B = G_A(fake_A, m_B)     (B -> A -> B)
    L_D = GAN(D_B(B), real) + GAN(D_B(pool(fake_B)), fake)  (halved) + the same for D_A on A
    L_G = GAN(D_B(fake_B), real) + GAN(D_A(fake_A), real)
          + lambda_A |rec_A - A|_1 + lambda_B |rec_B - B|_1
          + lambda_idt (lambda_B |G_A(B, m_B) - B|_1 + lambda_A |G_B(A, m_A) - A|_1)
          + lambda_mask (BCE(mask_A_hat, m_A) + BCE(mask_B_hat, m_B))

No term links a source window with its own target, so the pairing of the
study's batches is never used (tested: permuting the targets of a batch leaves
every loss unchanged). ``m_A`` / ``m_B`` are each generator input's own
foreground mask: SAM is not available offline, so a window is foreground where
any of its K slices exceeds ``fg_threshold`` (on the [-1, 1] scale), dilated by
``fg_dilation`` pixels, then max-pooled to the token grid. At inference routing
uses the gated sources' mask (``infer_mask="sources"``, as the official test
feeds the input's SAM mask) or the mask head's prediction (``"predicted"``).

The variant ``"paired"`` (the study's earlier UNest, kept as a labelled extra
row) trains one generator with the paired objective of the other GAN baselines:
LSGAN with a conditional PatchGAN + lambda_L1 (100) * L1 to the target +
lambda_mask (0.5) * mask BCE, routing by the target window's mask in training
(``train_mask="target"``) and by the mask head's prediction at inference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdm.config import ConfigError
from mmdm.losses.adversarial import discriminator_loss, generator_adversarial_loss
from mmdm.methods.base import OptimConfig, Variant, register_method
from mmdm.methods.pix2pix import ConditionalGAN, validate_gan_fields
from mmdm.nets.gating import GatingConfig, ModalityGating
from mmdm.nets.patchgan import PatchGAN, PatchGANConfig
from mmdm.nets.unest import UNestGenerator, UNestNetConfig

OBJECTIVES = ("unpaired", "paired")
MASK_SOURCES = ("target", "sources")
INFER_MASKS = ("predicted", "sources")

DEVIATIONS: list[str] = [
    "UNest: foreground masks are thresholded from the data (any slice above fg_threshold, dilated), not from "
    "SAM (Segment Anything; not available offline). Each generator's mask is that of its own input, as the "
    "official code feeds each input's SAM mask; at inference the gated sources' mask routes the attention.",
    "UNest: domain A of the CycleGAN is the gated fusion of the source windows (the MMDM paper's gating "
    "strategy; K = 5 channels in and out) instead of one image. The gates learn through the generators' "
    "inputs; as a target (cycle and identity L1, the source discriminator's real samples, the mask BCE) A is "
    "detached, so the gates cannot make the reconstruction easier by changing what is to be reconstructed.",
    "UNest: the study's batches are paired (same subject and slices), the official loader draws A and B "
    "independently; the unpaired objective never compares a source window with its own target (tested), so "
    "this changes only which unrelated samples share a batch, not the expected gradient.",
    "UNest: constant learning rate (the engine has no schedule) instead of the official linear decay over the "
    "second half of training; the step budget is the study's, not 100 epochs.",
    "UNest: mask weight lambda_seg = 0.5 (the code's default); the README's MR-to-CT example sets 1.",
    "UNest: local attention alternates unshifted / shifted (by window // 2) windows between layers, as the "
    "paper's shifted-window background attention describes; the official code has one unshifted window "
    "attention per layer. The local attention has no relative position bias.",
    "UNest: the mask head outputs logits trained with BCE-with-logits (the official applies a sigmoid then BCE: "
    "the same loss, numerically safer).",
    "UNest: the positional embedding is learned on an 18x20 token grid and bilinearly resized to other grids; "
    "the official code fixes the image size.",
    "UNest, variant 'paired' (build_method('unest', variant='paired'); not the published method): one "
    "generator trained with the paired objective of the other GAN baselines (LSGAN with a conditional "
    "PatchGAN + 100 * L1 to the target + 0.5 * mask BCE, Adam 2e-4), routing by the target window's mask in "
    "training and by the mask head's prediction at inference. It was the study's UNest before the unpaired "
    "objective was implemented.",
]


@dataclass
class UNestConfig:
    """UNest in the study; see :class:`mmdm.methods.pix2pix.Pix2PixConfig` for the shared GAN fields.

    ``objective``: ``"unpaired"`` (the published CycleGAN objective, the module docstring's
    L_G / L_D) or ``"paired"``; ``lambda_cycle_a`` / ``lambda_cycle_b``: weights of the
    A -> B -> A and B -> A -> B cycle L1 (official lambda_A, lambda_B); ``lambda_identity``:
    the identity L1's share of the cycle weight; ``pool_size``: fakes each discriminator keeps
    (0: none); ``lambda_l1``: the paired L1 weight (must be 0 when unpaired);
    ``fg_threshold``: intensity (on [-1, 1]) above which a pixel is foreground;
    ``fg_dilation``: pixels of dilation of that mask; ``lambda_mask``: weight of the mask BCE
    (per generator); ``train_mask`` / ``infer_mask``: see the module docstring.
    """

    sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")
    window: int = 5
    gating: GatingConfig = field(default_factory=GatingConfig)
    generator: UNestNetConfig = field(default_factory=UNestNetConfig)
    discriminator: PatchGANConfig = field(default_factory=PatchGANConfig)
    objective: str = "unpaired"
    gan_mode: str = "lsgan"
    real_label: float = 0.9
    fake_label: float = 0.1
    lambda_cycle_a: float = 10.0
    lambda_cycle_b: float = 10.0
    lambda_identity: float = 0.5
    pool_size: int = 50
    lambda_l1: float = 0.0
    lambda_mask: float = 0.5
    fg_threshold: float = -0.9
    fg_dilation: int = 2
    train_mask: str = "sources"
    infer_mask: str = "sources"
    reuse_fake: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.5, 0.999)))
    optim_d: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.5, 0.999)))

    def validate(self) -> None:
        validate_gan_fields(self, "UNestConfig")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"UNestConfig.objective: unknown objective {self.objective!r}; use one of {OBJECTIVES}")
        if self.train_mask not in MASK_SOURCES:
            raise ConfigError(f"UNestConfig.train_mask: unknown mask source {self.train_mask!r}; use one of "
                              f"{MASK_SOURCES}")
        if self.infer_mask not in INFER_MASKS:
            raise ConfigError(f"UNestConfig.infer_mask: unknown mask source {self.infer_mask!r}; use one of "
                              f"{INFER_MASKS}")
        if self.fg_dilation < 0 or self.lambda_mask < 0:
            raise ConfigError(f"UNestConfig: fg_dilation and lambda_mask must be >= 0, got {self.fg_dilation}, "
                              f"{self.lambda_mask}")
        if min(self.lambda_cycle_a, self.lambda_cycle_b, self.lambda_identity) < 0 or self.pool_size < 0:
            raise ConfigError("UNestConfig: lambda_cycle_a, lambda_cycle_b, lambda_identity and pool_size must be "
                              f">= 0, got {self.lambda_cycle_a}, {self.lambda_cycle_b}, {self.lambda_identity}, "
                              f"{self.pool_size}")
        if self.objective == "unpaired":
            if self.lambda_l1 != 0:
                raise ConfigError(f"UNestConfig: the unpaired objective has no paired L1 term, but lambda_l1 = "
                                  f"{self.lambda_l1}; set lambda_l1 = 0, or use variant 'paired'")
            if self.train_mask != "sources":
                raise ConfigError("UNestConfig: with the unpaired objective each generator routes by its own "
                                  "input's mask (train_mask 'sources'); the target's mask is a paired signal. "
                                  "Use variant 'paired' to route by the target")
        try:
            self.generator.validate()
            self.discriminator.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def paper_config() -> UNestConfig:
    """Official generator sizes (patch 16, hidden 768, 4 layers, 12 heads, window 2) and the official
    unpaired objective: LSGAN (labels 0.9 / 0.1), cycle 10 + 10, identity 0.5, mask BCE 0.5, pool 50,
    Adam 1e-4 (0.5, 0.999)."""
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


#: Objective presets applied on top of a named configuration: the published method and the study's
#: paired variant (the settings UNest had in the study before the unpaired objective).
VARIANTS: dict[str, Variant] = {
    "unpaired": Variant({"objective": "unpaired", "lambda_l1": 0.0, "train_mask": "sources", "infer_mask": "sources",
                         "optim": {"lr": 1e-4}, "optim_d": {"lr": 1e-4}}, "UNest (unpaired, the published objective)"),
    "paired": Variant({"objective": "paired", "lambda_l1": 100.0, "train_mask": "target", "infer_mask": "predicted",
                       "optim": {"lr": 2e-4}, "optim_d": {"lr": 2e-4}}, "UNest (paired variant)"),
}


def foreground_mask(window: Tensor, threshold: float, dilation: int) -> Tensor:
    """(B, 1, H, W) float mask: 1 where any slice of the (B, K, H, W) window exceeds ``threshold``,
    dilated by ``dilation`` pixels (square structuring element)."""
    mask = (window.amax(dim=1, keepdim=True) > threshold).float()
    if dilation > 0:
        mask = F.max_pool2d(mask, 2 * dilation + 1, stride=1, padding=dilation)
    return mask


class ImagePool(nn.Module):
    """A history of generated images for a discriminator (Shrivastava et al. 2017, as CycleGAN uses it).

    Until ``size`` images are stored, every queried image is stored and returned. Then each
    queried image is, with probability 1/2, returned as is, or swapped with a stored image
    chosen uniformly, which is returned instead. The stored images are a buffer, so a
    checkpoint carries them and a resumed run draws from the same history.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)
        self.register_buffer("images", torch.empty(0))

    def query(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The (B, ...) batch D sees in place of ``images`` (detached); updates the history."""
        dtype = images.dtype
        images = images.detach().float()  # the history is kept in fp32 (fakes made under bf16 autocast too)
        if self.size == 0:
            return images.to(dtype)
        if len(self.images) and self.images.shape[1:] != images.shape[1:]:
            raise ValueError(f"image pool: stored images have shape {tuple(self.images.shape[1:])}, the new ones "
                             f"{tuple(images.shape[1:])}; train with one window size (or set pool_size = 0)")
        device = generator.device if generator is not None else images.device
        out = []
        for img in images:
            n = len(self.images)
            if n < self.size:
                stored = self.images if n else img.new_empty((0, *img.shape))
                self.images = torch.cat([stored, img[None].clone()])
                out.append(img)
            elif float(torch.rand((), generator=generator, device=device)) > 0.5:
                j = int(torch.randint(self.size, (), generator=generator, device=device))
                out.append(self.images[j].clone())
                self.images[j] = img
            else:
                out.append(img)
        return torch.stack(out).to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch's signature
        stored = state_dict.get(prefix + "images")
        if stored is not None:  # the history's length varies: take the stored shape
            self.images = torch.empty_like(stored, device=self.images.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_method("unest")
class UNest(ConditionalGAN):
    """Gated sources -> structural-attention UNETR -> K-slice window (+ foreground mask logits).

    Unpaired objective: ``net`` is G_A (sources -> TOF), ``net_b`` is G_B (TOF -> sources),
    ``discriminator["target"]`` judges TOF windows and ``discriminator["source"]`` gated source
    windows. Paired variant: ``net`` and one conditional ``discriminator``.
    """

    config_class = UNestConfig
    #: ``build_method("unest", config="small", variant="paired")``; no variant (or ``"unpaired"``)
    #: is the published unpaired objective.
    named_configs = {"paper": paper_config, "small": small_config}
    display_name = "UNest"
    family = "GAN"
    table1 = 5
    variants = VARIANTS

    def __init__(self, cfg: UNestConfig | None = None):
        super().__init__()
        cfg = cfg or UNestConfig()
        cfg.validate()
        self.cfg = cfg
        self.sources = tuple(cfg.sources)
        self.window = k = cfg.window
        self.gating = ModalityGating(len(self.sources), k, cfg.gating)
        self.net = UNestGenerator(k, k, cfg.generator)
        if self.paired:
            self.discriminator = PatchGAN(2 * k, cfg.discriminator)
        else:
            self.net_b = UNestGenerator(k, k, cfg.generator)
            self.discriminator = nn.ModuleDict({"target": PatchGAN(k, cfg.discriminator),
                                                "source": PatchGAN(k, cfg.discriminator)})
            self.pools = nn.ModuleDict({"target": ImagePool(cfg.pool_size), "source": ImagePool(cfg.pool_size)})
        self.spatial_multiple = self.net.spatial_multiple

    @property
    def paired(self) -> bool:
        return self.cfg.objective == "paired"

    def objective(self) -> str:
        """The objective in one line (the run record keeps it)."""
        c = self.cfg
        if self.paired:
            return super().objective() + f" + {c.lambda_mask:g} x mask BCE"
        return (f"unpaired CycleGAN: {c.gan_mode} GAN (unconditional PatchGANs, pool {c.pool_size}) + cycle L1 "
                f"{c.lambda_cycle_a:g}/{c.lambda_cycle_b:g} + identity {c.lambda_identity:g} + "
                f"{c.lambda_mask:g} x mask BCE; no paired term")

    def token_mask(self, window: Tensor) -> Tensor:
        """Foreground of a (B, K, H, W) window on the token grid (B, 1, H/p, W/p): max-pooled pixel mask."""
        c = self.cfg
        return F.max_pool2d(foreground_mask(window, c.fg_threshold, c.fg_dilation), self.net.spatial_multiple)

    def generate(self, ys: list[Tensor], target: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        cond = self.gating(ys)
        if target is not None and not self.paired:
            return self._cycle(cond, target)
        if target is not None:
            mask = self.token_mask(target if self.cfg.train_mask == "target" else cond.detach())
        else:
            mask = self.token_mask(cond.detach()) if self.cfg.infer_mask == "sources" else None
        fake, logits = self.net(cond, mask)
        extras = {"mask_logits": logits} if mask is None else {"mask_logits": logits, "mask_target": mask}
        return fake, cond, extras

    def _cycle(self, real_a: Tensor, real_b: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Both cycles of the unpaired objective (the official forward): fake_B, rec_A, fake_A, rec_B."""
        mask_a, mask_b = self.token_mask(real_a.detach()), self.token_mask(real_b)
        fake_b, seg_a = self.net(real_a, mask_a)
        rec_a, _ = self.net_b(fake_b, mask_a)
        fake_a, seg_b = self.net_b(real_b, mask_b)
        rec_b, _ = self.net(fake_a, mask_b)
        extras = {"real_b": real_b, "mask_a": mask_a, "mask_b": mask_b, "seg_a": seg_a, "seg_b": seg_b,
                  "rec_a": rec_a, "fake_a": fake_a, "rec_b": rec_b}
        return fake_b, real_a, extras

    def extra_generator_losses(self, extras: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """Paired variant: ``lambda_mask * BCE(mask logits, token mask)`` (logged weighted, as ``loss_mask``)."""
        if "mask_target" not in extras:
            return {}
        bce = F.binary_cross_entropy_with_logits(extras["mask_logits"], extras["mask_target"])
        return {"loss_mask": self.cfg.lambda_mask * bce}

    # -- the unpaired objective -------------------------------------------------
    def _d_loss(self, cond: Tensor, fake: Tensor, target: Tensor, extras: dict[str, Tensor],
                generator: torch.Generator | None = None, update_pool: bool = False) -> dict[str, Tensor]:
        """Unpaired: ``L_D`` of the module docstring, each D on real windows of its domain and on
        (pooled, when ``update_pool``; ``generator`` draws the pools' choices) detached fakes; the
        two halved D losses are summed."""
        if self.paired:
            return super()._d_loss(cond, fake, target, extras, generator, update_pool)
        c, d = self.cfg, self.discriminator
        fake_b, fake_a = fake.detach(), extras["fake_a"].detach()
        if update_pool:
            fake_b = self.pools["target"].query(fake_b, generator)
            fake_a = self.pools["source"].query(fake_a, generator)
        loss_b, real, fk = discriminator_loss(d["target"](None, extras["real_b"]), d["target"](None, fake_b),
                                              c.gan_mode, c.real_label, c.fake_label)
        loss_a, _, _ = discriminator_loss(d["source"](None, cond.detach()), d["source"](None, fake_a),
                                          c.gan_mode, c.real_label, c.fake_label)
        return {"loss": loss_b + loss_a, "loss_d_target": loss_b.detach(), "loss_d_source": loss_a.detach(),
                "loss_d_real": real.detach(), "loss_d_fake": fk.detach()}  # real / fake: the TOF discriminator

    def _g_loss(self, cond: Tensor, fake: Tensor, target: Tensor, extras: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unpaired: ``L_G`` of the module docstring (adversarial both ways, cycle, identity, masks)."""
        if self.paired:
            return super()._g_loss(cond, fake, target, extras)
        c, d, e = self.cfg, self.discriminator, extras
        real_a, real_b = cond.detach(), e["real_b"]
        terms = {
            "loss_g_gan": generator_adversarial_loss(d["target"](None, fake), c.gan_mode, c.real_label),
            "loss_g_gan_source": generator_adversarial_loss(d["source"](None, e["fake_a"]), c.gan_mode, c.real_label),
            "loss_cycle_a": c.lambda_cycle_a * F.l1_loss(e["rec_a"], real_a),
            "loss_cycle_b": c.lambda_cycle_b * F.l1_loss(e["rec_b"], real_b),
        }
        if c.lambda_identity > 0:
            idt_b, _ = self.net(real_b, e["mask_b"])  # G_A should leave a TOF window as it is
            idt_a, _ = self.net_b(cond, e["mask_a"])  # G_B should leave a source window as it is
            terms["loss_idt_b"] = c.lambda_identity * c.lambda_cycle_b * F.l1_loss(idt_b, real_b)
            terms["loss_idt_a"] = c.lambda_identity * c.lambda_cycle_a * F.l1_loss(idt_a, real_a)
        if c.lambda_mask > 0:
            terms["loss_mask"] = c.lambda_mask * (F.binary_cross_entropy_with_logits(e["seg_a"], e["mask_a"])
                                                  + F.binary_cross_entropy_with_logits(e["seg_b"], e["mask_b"]))
        out = {"loss": sum(terms.values(), torch.zeros((), device=fake.device))}
        out.update({k: v.detach() for k, v in terms.items()})
        out["mse"] = (fake.detach() - target).pow(2).mean()  # a monitor only: not in the loss
        return out

    @torch.no_grad()
    def predict_mask(self, sources: dict[str, Tensor]) -> Tensor:
        """The mask head's foreground probability on the token grid (B, 1, H/p, W/p)."""
        self.check_sources(sources)
        cond = self.gating(self.source_list(sources))
        return torch.sigmoid(self.net.mask_head(self.net.patch_embed(cond)))

