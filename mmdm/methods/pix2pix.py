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
groups (``"discriminator"`` first, then ``"generator"``), one generator pass
per step, the D loss on the detached fake, then the G loss = adversarial +
lambda_L1 * L1 (+ method extras) with the updated D (:meth:`ConditionalGAN.train_step`,
as CycleGAN's ``optimize_parameters``).
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
from mmdm.methods.base import MAIN, Batch, OptimConfig, StepContext, SynthesisMethod, register_method
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


class _Fake:
    """The generator's output of one training step, handed from D's forward pass to G's. It is an
    argument of both passes, never an output, so DistributedDataParallel does not trace it."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: tuple[Tensor, Tensor, dict[str, Tensor]] | None = None


class ConditionalGAN(SynthesisMethod):
    """A paired conditional GAN: generator G (everything but ``self.discriminator``) and a PatchGAN D.

    Subclasses build ``self.discriminator`` and implement :meth:`generate`;
    optionally :meth:`extra_generator_losses`. A subclass with another objective (UNest's
    unpaired one) overrides ``_d_loss`` / ``_g_loss`` and :attr:`paired`; the protocol stays. The config must have the fields
    ``gan_mode``, ``real_label``, ``fake_label``, ``lambda_l1``, ``reuse_fake``,
    ``optim`` (G) and ``optim_d`` (D).

    Training step (:meth:`train_step`): G runs once; D's loss on the detached fake
    is back-propagated and D steps; then G's loss, scored by the updated D on the same
    fake (``reuse_fake``; False: G runs again), is back-propagated and G steps.
    """

    discriminator: nn.Module

    @property
    def uses_pixel_loss(self) -> bool:  # type: ignore[override]
        """The pixel loss is the paired L1; an unpaired objective has no term that compares G's
        output with its own target."""
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
    def _d_loss(self, cond: Tensor, fake: Tensor, target: Tensor, extras: dict[str, Tensor],
                generator: torch.Generator | None = None, update_pool: bool = False) -> dict[str, Tensor]:
        """D's loss on the detached fake (``extras``, ``generator`` and ``update_pool`` serve subclasses
        with several discriminators or a history of fakes, e.g. UNest's unpaired objective)."""
        c = self.cfg
        cond = cond.detach()
        loss, real, fk = discriminator_loss(self.discriminator(cond, target), self.discriminator(cond, fake.detach()),
                                            c.gan_mode, c.real_label, c.fake_label)
        return {"loss": loss, "loss_d_real": real.detach(), "loss_d_fake": fk.detach()}

    def _g_loss(self, cond: Tensor, fake: Tensor, target: Tensor, extras: dict[str, Tensor]) -> dict[str, Tensor]:
        c = self.cfg
        px = self.pixel_loss.bind(target)
        adv = generator_adversarial_loss(self.discriminator(cond.detach(), fake), c.gan_mode, c.real_label)
        l1 = px(fake, target, "l1")
        extra = self.extra_generator_losses(extras, target)
        steer = px.image_term(fake, target)
        if steer is not None:
            extra["loss_steerable"] = c.lambda_l1 * steer
        total = adv + c.lambda_l1 * l1 + sum(extra.values(), torch.zeros((), device=fake.device))
        out = {"loss": total, "loss_g_gan": adv.detach(), "loss_l1": l1.detach()}
        out.update({k: v.detach() for k, v in extra.items()})
        out["mse"] = (fake.detach() - target).pow(2).mean()
        return out

    def discriminator_losses(self, batch: Batch, generator: torch.Generator | None = None,
                             carry: _Fake | None = None) -> dict[str, Tensor]:
        """D's losses: ``(GAN(D(c, x0), real) + GAN(D(c, G(c)), fake)) / 2`` on the detached fake
        (in training mode the image pools, if any, are updated); also logs the L1 of the fake.
        G's output is kept in ``carry`` for the generator's step."""
        target, ys = self.check_batch(batch)
        fake, cond, extras = self.generate(ys, target)
        if carry is not None and self.cfg.reuse_fake:
            carry.value = (fake, cond, extras)
        out = self._d_loss(cond, fake, target, extras, generator, update_pool=self.training)
        if self.paired:  # a monitor only: D's loss does not contain it
            out["loss_l1"] = F.l1_loss(fake.detach(), target)
        return out

    def generator_losses(self, batch: Batch, carry: _Fake | None = None) -> dict[str, Tensor]:
        """G's losses: ``GAN(D(c, G(c)), real) + lambda_L1 * |G(c) - x0|_1`` + extras, on the fake in
        ``carry`` (the discriminator's step's) when there is one, else on a new generator pass."""
        target, ys = self.check_batch(batch)
        fake, cond, extras = carry.value if carry is not None and carry.value is not None else self.generate(ys, target)
        return self._g_loss(cond, fake, target, extras)

    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        """One step of both groups (CycleGAN's ``optimize_parameters``): G once, D steps on the
        detached fake, then G steps against the updated D."""
        carry = _Fake()
        ctx.zero_grad()
        with ctx.autocast():
            d_out = ctx.run(self.discriminator_losses, batch, ctx.generator, carry)
        logs = ctx.optimize("discriminator", d_out)
        with ctx.autocast():
            g_out = ctx.run(self.generator_losses, batch, carry)
        logs.update(ctx.optimize("generator", g_out))
        return logs

    def training_losses(self, batch: Batch, generator: torch.Generator | None = None,
                        group: str = MAIN) -> dict[str, Tensor]:
        """Losses of one group, each from its own generator pass (``generator``: the RNG of the image pools).

        * ``"discriminator"``: :meth:`discriminator_losses`;
        * ``"generator"``: :meth:`generator_losses`;
        * ``"main"`` (the whole model, e.g. validation): the generator's objective, plus ``loss_d``
          (no graph through D, no pool update).
        """
        if group not in (MAIN, *GROUPS):
            raise ValueError(f"{self.name}: unknown optimiser group {group!r}; use one of {GROUPS} or {MAIN!r}")
        if group == "discriminator":
            return self.discriminator_losses(batch, generator)
        if group == "generator":
            return self.generator_losses(batch)
        target, ys = self.check_batch(batch)
        fake, cond, extras = self.generate(ys, target)
        out = self._g_loss(cond, fake, target, extras)
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
    """Pix2Pix in the study. ``reuse_fake``: the G step scores the D step's generator output
    (official: one G forward per iteration); False runs G again."""

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
    display_name = "Pix2Pix"
    family = "GAN"
    table1 = 1

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

