"""BBDM (Li et al., CVPR 2023): one Brownian bridge from the gated sources to TOF-MRA.

The comparison method of Table 1. The M source windows are merged into one
conditioning window ``y = gating(x^1..x^M)`` (:class:`mmdm.nets.gating.ModalityGating`,
the paper's "gating strategy"), and a single bridge (eq. (1)) runs between
the target ``x0`` and ``y``. The network (a time-conditioned UNet) reads
``cat(x_t, y)`` (2K channels) and outputs the objective (K channels).

The shared bridge code (:class:`mmdm.diffusion.BrownianBridge`,
:func:`mmdm.diffusion.sample_bridge`) does all the diffusion work; this module
only wires the gating and the network to it.

Official defaults (pixel-space template of the BBDM code): T = 1000, m_t
linear (0.001..0.999), max_var 1, objective "grad" (eq. (3):
``m_t (y - x0) + sqrt(delta_t) eps``), L1 loss, 200 skip steps with eta 1;
UNet with 128 channels, mult (1, 4, 8), 2 residual blocks per level,
attention only in the middle block (the configured attention resolutions
32/16/8 never match a down-sampling factor of a 3-level UNet), input
``cat(x_t, y)`` (``in_channels = 2 x channels``, condition_key
"SpatialRescaler" with an identity rescaler in pixel space); Adam lr 1e-4,
beta1 0.9, ReduceLROnPlateau; EMA decay 0.995 updated every 8 steps from
step 30k; batch 8.

How the gating is trained: ``y`` is a learnable function of the sources and
enters the loss three ways, as the bridge's endpoint inside ``x_t``, as the
concatenated condition, and inside the "grad" target ``x_t - x0``. Gradients
flow through all three (nothing is detached); because the gates are a convex
combination of the sources, the endpoint cannot collapse to a constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmdm.config import ConfigError
from mmdm.diffusion import BridgeConfig, BrownianBridge, randn_like, sample_bridge
from mmdm.methods.base import MAIN, Batch, GatedMethod, OptimConfig, register_method
from mmdm.optim import EMAConfig
from mmdm.nets import TimeUNet, UNetConfig
from mmdm.nets.gating import GatingConfig

LOSSES = ("l1", "l2")

#: Where this implementation departs from the official BBDM code, and why.
DEVIATIONS: list[str] = [
    "Multi-modal input: the official BBDM translates one image; here the bridge's source end is the gated "
    "combination of the M source windows (the MMDM paper's gating strategy for the baselines, "
    "mmdm.nets.gating), trained jointly with the UNet.",
    "2.5D: the network reads and predicts K = 5 adjacent slices as channels (the official code: RGB images).",
    "Loss: L1 on the objective, the official default (loss_type 'l1'); the BBDM paper writes an L2 norm. "
    "Set loss='l2' for the paper's version.",
    "Network: the study's TimeUNet (additive time embedding, strided-conv down- and nearest+conv "
    "up-sampling, single-head middle attention) instead of the openai UNet with scale-shift norm, "
    "resblock up/down and 8-head attention; widths and depth follow the official template.",
    "No ReduceLROnPlateau schedule: the shared engine uses a constant learning rate for every method.",
    "EMA: exposed as cfg.ema for the engine (decay 0.995 every 8 steps from step 30k, official); before the "
    "start step the average follows the weights, as in the official EMA.",
    "Skip steps come from the shared bridge sampler: exactly sample_steps network calls at rounded "
    "linspace(T-1, 1) then 0. The official code strides by (T-1) // (sample_steps-2) from T-1 and appends "
    "[1, 0]: for T = 1000 and 200 steps it visits 999, 994, ..., 4, 1, 0 (202 network calls).",
    "Batch size: the official template trains with batch 8; the study uses the MMDM paper's batch 4 for every "
    "method (a training-run setting, not part of this config).",
]


@dataclass
class BBDMConfig:
    """Everything that defines one BBDM model (defaults: the official pixel-space template).

    ``ema``: the weight average the engine should keep (keys of
    :class:`mmdm.optim.EMAConfig`: ``decay``, ``start_step``, ``every``)
    or None. ``loss``: ``"l1"`` (official code) or ``"l2"`` (BBDM paper).
    """

    sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")
    window: int = 5
    bridge: BridgeConfig = field(default_factory=lambda: BridgeConfig(objective="grad", sample_steps=200, eta=1.0))
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(base=128, mult=(1, 4, 8), num_res_blocks=2,
                                                                attention=True))
    gating: GatingConfig = field(default_factory=GatingConfig)
    loss: str = "l1"
    ema: EMAConfig | None = field(default_factory=lambda: EMAConfig(decay=0.995, start_step=30000, every=8))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.9, 0.999)))

    def validate(self) -> None:
        """Raise :class:`ConfigError` on settings BBDM cannot use."""
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise ConfigError(f"BBDMConfig.sources: give one or more distinct modality names, got {list(self.sources)}")
        if self.window < 1:
            raise ConfigError(f"BBDMConfig.window must be >= 1 slice, got {self.window}")
        if self.loss not in LOSSES:
            raise ConfigError(f"BBDMConfig.loss: unknown loss {self.loss!r}; use one of {LOSSES}")
        if self.ema is not None:
            self.ema.validate("BBDMConfig.ema")
        self.unet.validate()


def paper_config() -> BBDMConfig:
    """Official BBDM defaults with the MMDM paper's T = 1000 and 200 sampling steps."""
    return BBDMConfig()


def small_config() -> BBDMConfig:
    """CPU size: UNet 16 channels, mult (1, 2, 4), one residual block per level,
    20 sampling steps, EMA from step 100 (updated every step)."""
    return BBDMConfig(
        bridge=BridgeConfig(objective="grad", sample_steps=20, eta=1.0),
        unet=UNetConfig(base=16, mult=(1, 2, 4), num_res_blocks=1, attention=True),
        gating=GatingConfig(hidden=16),
        ema=EMAConfig(decay=0.995, start_step=100, every=1),
    )


@register_method("bbdm")
class BBDM(GatedMethod):
    """Gated multi-modal input -> one Brownian bridge -> TOF-MRA window."""

    config_class = BBDMConfig
    named_configs = {"paper": paper_config, "small": small_config}

    def __init__(self, cfg: BBDMConfig | None = None):
        super().__init__()
        k = self._setup_gated(cfg or BBDMConfig())
        cfg = self.cfg
        self.bridge = BrownianBridge(cfg.bridge)
        self.net = TimeUNet(2 * k, k, cfg.unet)

    def predict_x0(self, x_t: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """Network output -> x0 prediction (``x_t - out`` for "grad")."""
        return self.bridge.predict_x0(x_t, y, t, self.net(torch.cat([x_t, y], dim=1), t))

    def training_losses(self, batch: Batch, generator: torch.Generator | None = None,
                        group: str = MAIN) -> dict[str, Tensor]:
        """BBDM's loss: ``|| objective - net(cat(x_t, y), t) ||`` (L1 or L2; eq. (3) for "grad"),
        one uniform t per sample, ``x_t`` from eq. (1)."""
        self.check_group(group)
        x0, _ = self.check_batch(batch)
        y = self.condition(batch["sources"])
        t = self.bridge.sample_timesteps(x0.shape[0], x0.device, generator)
        noise = randn_like(x0, generator)
        x_t = self.bridge.q_sample(x0, y, t, noise)
        target = self.bridge.objective(x0, y, t, noise)
        out = self.net(torch.cat([x_t, y], dim=1), t)
        # the emphasis map of x0 weights the objective's pixels (none: the published loss)
        loss = self.pixel_loss(out, target, self.emphasis_map(batch, x0), "l1" if self.cfg.loss == "l1" else "mse")
        logs: dict[str, Tensor] = {}
        if self.emphasis.kind == "steerable":
            steer = self.image_emphasis(self.bridge.predict_x0(x_t, y, t, out), x0)
            if steer is not None:
                loss, logs["loss_steerable"] = loss + steer, steer.detach()
        with torch.no_grad():
            x0_hat = self.bridge.predict_x0(x_t, y, t, out)
            mse_x0 = (x0_hat - x0).pow(2).mean()
        return {"loss": loss, "mse_x0": mse_x0, **logs}

    def objective(self) -> str:
        """The objective in one line (the run record keeps it)."""
        b = self.cfg.bridge
        return f"Brownian bridge, '{b.objective}' prediction, {self.cfg.loss.upper()} loss, T = {b.num_timesteps}"

    @torch.no_grad()
    def sample(self, sources: dict[str, Tensor], steps: int | None = None, eta: float | None = None,
               generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
        """Reverse the bridge from ``x_T = y`` (the gated sources) with the shared skip-step sampler."""
        self.check_sources(sources)
        y = self.condition(sources)
        return sample_bridge(lambda x, t: self.predict_x0(x, y, t), y, self.bridge, steps=steps, eta=eta,
                             generator=generator, progress=progress)

    def extra_repr(self) -> str:
        return f"sources={list(self.sources)}, window={self.window}, loss={self.cfg.loss}"

