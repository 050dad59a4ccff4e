"""Pix2Pix (Isola et al., CVPR 2017): conditional GAN with a U-Net generator (Table 1 baseline).

Official defaults (junyanz/pytorch-CycleGAN-and-pix2pix, ``--model pix2pix``):
``unet_256`` generator (8 down-samplings, ngf 64, batch norm, dropout 0.5 in
three decoder levels), ``basic`` 70x70 PatchGAN discriminator conditioned on
``cat(input, output)`` (ndf 64, batch norm), vanilla GAN loss, L1 weight
lambda_L1 = 100, Adam lr 2e-4 betas (0.5, 0.999) for both networks, batch size
1, init N(0, 0.02). Each iteration runs G once, updates D on the detached fake,
then updates G with the updated D.

In the study (paper, section 3.1) the source modalities are fused into one
conditioning window by the learnable gating (:class:`mmdm.nets.gating.ModalityGating`);
G maps that K-slice window to the K-slice TOF-MRA window.

This module also holds :class:`ConditionalGAN`, the training protocol the
three adversarial baselines (Pix2Pix, ResViT, UNest) share: two optimiser
groups (``"discriminator"`` first, then ``"generator"``), the D loss on
detached fakes, the G loss = adversarial + lambda_L1 * L1 (+ method extras), and
reuse of the D step's generator output in the G step of the same batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdm.config import ConfigError
from mmdm.losses.adversarial import check_gan_mode, discriminator_loss, generator_adversarial_loss
from mmdm.methods.base import MAIN, Batch, OptimConfig, SynthesisMethod, register_method
from mmdm.nets.gating import GatingConfig, ModalityGating
from mmdm.nets.patchgan import PatchGAN, PatchGANConfig
from mmdm.nets.pix2pix_unet import Pix2PixUNet, Pix2PixUNetConfig

GROUPS = ("discriminator", "generator")

DEVIATIONS: list[str] = [
    "Pix2Pix: U-Net depth 5 (288x320 -> 9x10) in the paper configuration and 4 in the small one instead of "
    "unet_256's 8 down-samplings, which need 256x256 inputs; dropout stays on the 3 decoder levels above the "
    "innermost one (for depth 5 these include the 128- and 256-channel levels).",
    "Pix2Pix: the input is the gated fusion of the source windows (paper, section 3.1), K = 5 channels in and out "
    "(2.5D), instead of one 3-channel image.",
    "Pix2Pix: the PatchGAN uses instance norm by default (batch-size independent; the study trains with batch "
    "4); the official code uses batch norm with batch size 1. Set discriminator.norm='batch' to restore it.",
    "Pix2Pix: the discriminator's condition is the gated window, detached: the gates learn only through the "
    "generator's output, never by making the condition easier to judge.",
    "Pix2Pix (and the other GAN baselines): the generator step back-propagates into D's parameters too (the "
    "engine zeroes those gradients and does not step D); the official code switches D's requires_grad off "
    "instead: the same update, some extra compute.",
    "Pix2Pix: sample() runs the network in the module's current mode (the engine uses eval mode: dropout off, "
    "batch-norm running statistics); the official test script keeps train mode unless --eval is given.",
]


# ----------------------------------------------------------------------------
# the adversarial training protocol shared by Pix2Pix, ResViT and UNest


class ConditionalGAN(SynthesisMethod):
    """A paired conditional GAN: generator G (everything but ``self.discriminator``) and a PatchGAN D.

    Subclasses build ``self.discriminator`` and implement :meth:`generate`;
    optionally :meth:`extra_generator_losses`. A subclass with another objective (UNest's
    unpaired one) overrides ``_d_loss`` / ``_g_loss`` and :attr:`paired`; the protocol stays. The config must have the fields
    ``gan_mode``, ``real_label``, ``fake_label``, ``lambda_l1``, ``reuse_fake``,
    ``optim`` (G) and ``optim_d`` (D).

    Engine protocol (see ``mmdm.engine.train``): for each group of
    :meth:`optimizer_groups` in order, zero all grads, call
    ``training_losses(batch, generator, group=name)``, back-propagate ``"loss"``
    and step that group's optimiser. The ``"discriminator"`` call runs G and
    keeps its (non-detached) output; the following ``"generator"`` call on the
    same batch object reuses it if G's parameters have not changed since
    (``reuse_fake``), exactly like the official single forward per iteration.
    """

    discriminator: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self._cache: tuple[Any, ...] | None = None
        self._weights: Tensor | None = None  # the batch's vessel-emphasis map, set by training_losses

    @property
    def supports_emphasis(self) -> bool:  # type: ignore[override]
        """The emphasis weights the paired L1; an unpaired objective has no term to weight."""
        return self.paired

    # -- subclass API ---------------------------------------------------------
    def generate(self, ys: list[Tensor], target: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(fake (B, K, H, W), D's condition (B, C, H, W), extras for extra_generator_losses)``.

        ``target`` is given during training (e.g. UNest derives its foreground mask from it).
        """
        raise NotImplementedError

    def extra_generator_losses(self, extras: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """Weighted extra terms added to the generator loss (name -> scalar)."""
        return {}

    @property
    def paired(self) -> bool:
        """True when the objective compares G's output with the batch's own target (the L1 term)."""
        return True

    def objective(self) -> str:
        """The training objective of this instance, in one line (written into the run record)."""
        c = self.cfg
        return f"paired: {c.gan_mode} GAN, conditional PatchGAN + {c.lambda_l1:g} x L1 to the target"

    # -- optimisers -----------------------------------------------------------
    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("discriminator.")]

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"discriminator": D's parameters, "generator": all others}`` (D is stepped first)."""
        return {"discriminator": [p for p in self.discriminator.parameters() if p.requires_grad],
                "generator": self.generator_parameters()}

    def optim_configs(self) -> dict[str, OptimConfig]:
        """Optimiser settings keyed like :meth:`optimizer_groups`: ``cfg.optim_d`` (D), ``cfg.optim`` (G)."""
        return {"discriminator": self.cfg.optim_d, "generator": self.cfg.optim}

    # -- losses ---------------------------------------------------------------
    def _g_signature(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.generator_parameters())

    def _generate_for(self, batch: Batch, ys: list[Tensor], target: Tensor, reuse: bool):
        cache, self._cache = self._cache, None
        if reuse and cache is not None and cache[0] is batch and cache[1] == self._g_signature():
            return cache[2]
        return self.generate(ys, target)

    def _d_loss(self, cond: Tensor, fake: Tensor, target: Tensor, extras: dict[str, Tensor],
                update_pool: bool = False) -> dict[str, Tensor]:
        """D's loss on the detached fake (``extras`` and ``update_pool`` serve subclasses with
        several discriminators or a history of fakes, e.g. UNest's unpaired objective)."""
        c = self.cfg
        cond = cond.detach()
        loss, real, fk = discriminator_loss(self.discriminator(cond, target), self.discriminator(cond, fake.detach()),
                                            c.gan_mode, c.real_label, c.fake_label)
        return {"loss": loss, "loss_d_real": real.detach(), "loss_d_fake": fk.detach()}

    def _g_loss(self, cond: Tensor, fake: Tensor, target: Tensor, extras: dict[str, Tensor]) -> dict[str, Tensor]:
        c = self.cfg
        adv = generator_adversarial_loss(self.discriminator(cond.detach(), fake), c.gan_mode, c.real_label)
        l1 = self.pixel_loss(fake, target, self._weights, "l1")  # emphasis-weighted when set
        extra = self.extra_generator_losses(extras, target)
        steer = self.image_emphasis(fake, target)
        if steer is not None:
            extra["loss_steerable"] = c.lambda_l1 * steer
        total = adv + c.lambda_l1 * l1 + sum(extra.values(), torch.zeros((), device=fake.device))
        out = {"loss": total, "loss_g_gan": adv.detach(), "loss_l1": l1.detach()}
        out.update({k: v.detach() for k, v in extra.items()})
        out["mse"] = (fake.detach() - target).pow(2).mean()
        return out

    def training_losses(self, batch: Batch, generator: torch.Generator | None = None,
                        group: str = MAIN) -> dict[str, Tensor]:
        """Losses of one optimiser group (``generator``, the RNG, is unused: GANs draw no noise).

        * ``"discriminator"``: ``(GAN(D(c, x0), real) + GAN(D(c, G(c)), fake)) / 2`` on the
          detached fake; also logs the L1 of the fake.
        * ``"generator"``: ``GAN(D(c, G(c)), real) + lambda_L1 * |G(c) - x0|_1`` + extras.
        * ``"main"`` (the whole model; no optimiser steps it): the generator losses, plus ``loss_d``
          for logging (no graph through D).
        """
        if group not in (MAIN, *GROUPS):
            raise ValueError(f"{self.name}: unknown optimiser group {group!r}; use one of {GROUPS} or {MAIN!r}")
        target, ys = self.check_batch(batch)
        self._weights = self.emphasis_map(batch, target) if self.supports_emphasis else None
        if group == "discriminator":
            fake, cond, extras = self._generate_for(batch, ys, target, reuse=False)
            if self.cfg.reuse_fake and self.training and fake.requires_grad:
                self._cache = (batch, self._g_signature(), (fake, cond, extras))
            out = self._d_loss(cond, fake, target, extras, update_pool=self.training)
            if self.paired:  # a monitor only: D's loss does not contain it
                out["loss_l1"] = F.l1_loss(fake.detach(), target)
            return out
        fake, cond, extras = self._generate_for(batch, ys, target, reuse=group == "generator")
        out = self._g_loss(cond, fake, target, extras)
        if group == MAIN:
            with torch.no_grad():
                out["loss_d"] = self._d_loss(cond, fake, target, extras)["loss"]
        return out

    @torch.no_grad()
    def sample(self, sources: dict[str, Tensor], steps: int | None = None, eta: float | None = None,
               generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
        """One generator pass (``steps``/``eta``/``generator`` are ignored: no iterative sampling)."""
        self.check_sources(sources)
        fake, _, _ = self.generate(self.source_list(sources), None)
        return fake.clamp(-1.0, 1.0)

    def extra_repr(self) -> str:
        return f"sources={list(self.sources)}, window={self.window}, gan_mode={self.cfg.gan_mode}"


def validate_gan_fields(cfg: Any, where: str) -> None:
    """Checks shared by the GAN configs; raises :class:`ConfigError`."""
    if len(cfg.sources) < 1:
        raise ConfigError(f"{where}.sources: give at least one source modality")
    if len(set(cfg.sources)) != len(cfg.sources):
        raise ConfigError(f"{where}.sources: duplicate modality names in {list(cfg.sources)}")
    if cfg.window < 1:
        raise ConfigError(f"{where}.window must be >= 1 slice, got {cfg.window}")
    try:
        check_gan_mode(cfg.gan_mode)
    except ValueError as e:
        raise ConfigError(f"{where}.gan_mode: {e}") from None
    if cfg.lambda_l1 < 0:
        raise ConfigError(f"{where}.lambda_l1 must be >= 0, got {cfg.lambda_l1}")


# ----------------------------------------------------------------------------
# Pix2Pix


@dataclass
class Pix2PixConfig:
    """Pix2Pix in the study. ``reuse_fake``: reuse the D step's generator output in the G
    step (official: one G forward per iteration); False recomputes it."""

    sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")
    window: int = 5
    gating: GatingConfig = field(default_factory=GatingConfig)
    generator: Pix2PixUNetConfig = field(default_factory=Pix2PixUNetConfig)
    discriminator: PatchGANConfig = field(default_factory=PatchGANConfig)
    gan_mode: str = "vanilla"
    real_label: float = 1.0
    fake_label: float = 0.0
    lambda_l1: float = 100.0
    reuse_fake: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.5, 0.999)))
    optim_d: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.5, 0.999)))

    def validate(self) -> None:
        validate_gan_fields(self, "Pix2PixConfig")
        try:
            self.generator.validate()
            self.discriminator.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def paper_config() -> Pix2PixConfig:
    """Official sizes (ngf = ndf = 64, dropout 0.5, vanilla GAN, lambda_L1 100, Adam 2e-4 (0.5, 0.999))
    with a depth-5 U-Net for 288x320 windows."""
    return Pix2PixConfig()


def small_config() -> Pix2PixConfig:
    """CPU size: U-Net base 16, depth 4 (96x112 -> 6x7), PatchGAN base 16, gating hidden 16."""
    cfg = paper_config()
    cfg.generator = dataclasses.replace(cfg.generator, base=16, depth=4)
    cfg.discriminator = dataclasses.replace(cfg.discriminator, base=16)
    cfg.gating = GatingConfig(hidden=16)
    return cfg


@register_method("pix2pix")
class Pix2Pix(ConditionalGAN):
    """Gated sources -> U-Net -> K-slice TOF-MRA window; conditional PatchGAN on (gated sources, output)."""

    config_class = Pix2PixConfig
    named_configs = {"paper": paper_config, "small": small_config}

    def __init__(self, cfg: Pix2PixConfig | None = None):
        super().__init__()
        cfg = cfg or Pix2PixConfig()
        cfg.validate()
        self.cfg = cfg
        self.sources = tuple(cfg.sources)
        self.window = k = cfg.window
        self.gating = ModalityGating(len(self.sources), k, cfg.gating)
        self.net = Pix2PixUNet(k, k, cfg.generator)
        self.discriminator = PatchGAN(2 * k, cfg.discriminator)
        self.spatial_multiple = self.net.spatial_multiple

    def generate(self, ys: list[Tensor], target: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        cond = self.gating(ys)
        return self.net(cond), cond, {}

