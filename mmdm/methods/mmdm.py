"""MMDM: multi-modal Brownian-bridge diffusion with cross-modal fusion (paper section 2).

One class, :class:`MMDM`, covers every row of Tables 2 and 3:

* M modality-specific branches (section 2.1; the authors' dense-convolution
  ResUnet of Restormer blocks by default, ``branch_net="resunet"``, or the
  original Restormer's depthwise Restormer-UNet, ``"restormer"``). Branch
  ``m`` reads ``cat(x_t^m, x^m)`` (2K channels) and outputs the bridge
  objective (K channels; ``y - x0`` by default), turned into ``x0_hat^m``.
* The cross-modal dynamic fusion (eq. (4)) maps the M branch predictions and
  the M sources to the cooperative prediction ``x0_hat``.
* Training losses are on the M + 1 x0 predictions, each the hybrid loss
  (eq. (7)) or the plain MSE, combined by NAWS (eq. (11)) or summed.

Ablation variants (Table 2) are flags, never copies of the class:

==========  =========  ==========  ======================================
variant     use_mip    use_naws    paper row
==========  =========  ==========  ======================================
``base``    False      False       "MMDM": sum of the four MSEs
``mip``     True       False       "+L_MIP"
``naws``    False      True        "+NWAS"
``full``    True       True        "+NWAS, L_MIP" (= "Ours")
==========  =========  ==========  ======================================

Modality subsets (Table 3) are the ``sources`` field. Two named
configurations give the sizes: ``paper`` (the authors') and ``small`` (CPU).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mmdm.config import ConfigError
from mmdm.diffusion import SAMPLING_MODES, BridgeConfig, BrownianBridge, randn_like, sample_multibranch
from mmdm.losses import NAWS, hybrid_loss
from mmdm.methods.base import MAIN, Batch, OptimConfig, SynthesisMethod, Variant, register_method
from mmdm.nets import (
    CrossModalFusion,
    FusionConfig,
    ResUNet,
    ResUNetConfig,
    RestormerUNet,
    RestormerUNetConfig,
    TimeEmbedding,
)
from mmdm.nets.fusion import authors_fusion_unet

#: Where this implementation departs from the paper or the authors' public code, and why.
DEVIATIONS: list[str] = [
    "MDTA reshapes its attention output back in the order it was flattened; the authors' code flattens "
    "as (w h) but restores (h w), which transposes square images and scrambles non-square ones.",
    "The sampler adds Gaussian noise (the bridge posterior, eq. (2)); the authors' sampler draws uniform "
    "[0, 1) noise.",
    "NAWS uses each sample's own delta_t (eq. (11)); the authors' code uses the first sample's delta_t for "
    "the whole batch (flag naws_per_sample=False restores it).",
    "At inference each branch draws its own noise (flag sampling_shared_noise); the authors share one "
    "noise tensor across branches. In training one noise tensor is shared, as the authors do (shared_noise).",
    "The paper's sigma^2 in NAWS is parameterised as p^2 with p initialised to 1, as in the authors' code.",
    "The default m_t schedule is BBDM's linspace(0.001, 0.999) used by the authors' code; the paper's "
    "m_t = t/T is the schedule option 't_over_T' (they differ by at most 0.001 for T = 1000).",
    "The paper states 200 sampling steps and the authors' config 50; the 'paper' configuration uses 200.",
    "The authors' branch attention (one softmax over all C x C channel pairs of raw dot products) is "
    "computed in fp32 even under bf16 autocast: its logits are sums over every pixel of the window.",
    "fusion_residual (on in the CPU profiles, chosen by the validation sweep haze-fusion; off in the 'paper' "
    "configuration and profile): the fusion network predicts a correction added to the mean of the branch "
    "predictions, its last convolution initialised to zero so that training starts from that mean; the "
    "authors' fusion outputs x0_hat directly and, at a short budget, paints all-air windows grey.",
]

BRANCH_NETS = ("resunet", "restormer")

#: The ablation variants of Table 2 in the paper's row order: the MIP loss (eq. (7)) and NAWS (eq. (11))
#: switched on and off (the paper's rows "MMDM", "+L_MIP", "+NWAS", "+NWAS, L_MIP").
VARIANTS: dict[str, Variant] = {
    "base": Variant({"use_mip": False, "use_naws": False}, "MMDM (base)"),
    "mip": Variant({"use_mip": True, "use_naws": False}, "+L_MIP"),
    "naws": Variant({"use_mip": False, "use_naws": True}, "+NAWS"),
    "full": Variant({"use_mip": True, "use_naws": True}, "+NAWS, L_MIP (full)"),
}


@dataclass
class MMDMConfig:
    """Everything that defines one MMDM model (defaults: the paper's full model).

    ``shared_noise``: one noise tensor for all branches in training (the
    authors' code; False draws one per branch). ``sampling_shared_noise``: the
    same choice at inference (default False: independent noise per branch; the
    authors share it). ``sampling``: ``"coupled"`` (the paper, Fig. 1b) or
    ``"independent"`` (see :func:`mmdm.diffusion.sample_multibranch`).
    ``mip_gumbel``: Gumbel noise in the soft MIP (eq. (6); False is this
    project's noise-free option). ``mip_noise_scale``: the Gumbel draw's scale in the soft MIP
    (1: the paper's standard Gumbel; the sweeps measure smaller ones, as the standard draw is
    large next to intensities in [-1, 1]). ``naws_lr``: Adam's learning rate for NAWS's
    ``p_i`` (None: the model's, as the authors' code; the paper is silent). ``naws_per_sample``: delta_t of each sample in NAWS (the paper) instead of
    the first sample's (the authors' code).

    ``branch_net``: ``"resunet"`` (the authors' network, sized by ``resunet``) or
    ``"restormer"`` (the original Restormer's depthwise Restormer-UNet, sized by
    ``branch``). ``shared_time_embedding``: one time embedding for every branch
    and the fusion UNet (the authors' code) instead of one per network.

    ``fusion_residual``: eq. (4) as ``x0_hat = mean_m x0_hat^m + eps_theta^0(...)``, the
    fusion's last convolution initialised to zero (a deviation from the authors' fusion,
    which outputs ``x0_hat`` directly; False, the default, is theirs).
    """

    sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")
    window: int = 5
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    branch_net: str = "resunet"
    resunet: ResUNetConfig = field(default_factory=ResUNetConfig)
    branch: RestormerUNetConfig = field(default_factory=RestormerUNetConfig)
    shared_time_embedding: bool = True
    fusion: FusionConfig = field(default_factory=FusionConfig)
    use_mip: bool = True
    use_naws: bool = True
    mip_tau: float = 0.75
    mip_gumbel: bool = True
    mip_noise_scale: float = 1.0
    sampling: str = "coupled"
    shared_noise: bool = True
    sampling_shared_noise: bool = False
    naws_per_sample: bool = True
    naws_lr: float | None = None
    fusion_residual: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on settings MMDM cannot use."""
        if len(self.sources) < 2:
            raise ConfigError(f"MMDMConfig.sources: MMDM fuses at least 2 modalities, got {list(self.sources)}; "
                              "for one modality use a single-branch method (e.g. BBDM)")
        if len(set(self.sources)) != len(self.sources):
            raise ConfigError(f"MMDMConfig.sources: duplicate modality names in {list(self.sources)}")
        if self.window < 1:
            raise ConfigError(f"MMDMConfig.window must be >= 1 slice, got {self.window}")
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(f"MMDMConfig.sampling: unknown mode {self.sampling!r}; use one of {SAMPLING_MODES}")
        if self.mip_tau <= 0:
            raise ConfigError(f"MMDMConfig.mip_tau must be > 0, got {self.mip_tau}")
        if not self.mip_noise_scale >= 0:
            raise ConfigError(f"MMDMConfig.mip_noise_scale must be >= 0 (1: the paper's Gumbel noise), "
                              f"got {self.mip_noise_scale}")
        if self.naws_lr is not None and not self.naws_lr > 0:
            raise ConfigError(f"MMDMConfig.naws_lr must be > 0 or null (null: the model's learning rate), "
                              f"got {self.naws_lr}")
        if self.branch_net not in BRANCH_NETS:
            raise ConfigError(f"MMDMConfig.branch_net: unknown {self.branch_net!r}; use one of {BRANCH_NETS}")
        if self.shared_time_embedding:
            dims = {"branch": self.branch_config.time_embed_dim, "fusion UNet": self.fusion.unet.time_embed_dim}
            if len(set(dims.values())) != 1:
                raise ConfigError(f"MMDMConfig: a shared time embedding needs one width; got {dims}. Set the "
                                  "time_embed_dim values equal or shared_time_embedding: false")
        self.branch_config.validate()
        self.fusion.validate()

    @property
    def branch_config(self) -> ResUNetConfig | RestormerUNetConfig:
        """The size of the branch network in use (``resunet`` or ``branch``)."""
        return self.resunet if self.branch_net == "resunet" else self.branch

    @property
    def variant(self) -> str:
        """The Table 2 variant these flags correspond to."""
        flags = {"use_mip": self.use_mip, "use_naws": self.use_naws}
        return next(k for k, v in VARIANTS.items() if v.overrides == flags)


def paper_config() -> MMDMConfig:
    """The authors' network and objective (their public code where the paper is vague):
    branches = their dense-convolution ResUnet (base 8, mult 1,2,4,8; 2.37 M parameters
    each), fusion = dense Restormer mixing blocks + the openai/BBDM UNet (32, mult 1,4,8,
    2 res blocks, 12.29 M), one shared time embedding: 19.45 M parameters for three
    modalities. T = 1000, 200 sampling steps (paper; their config: 50), Adam lr 1e-4 betas
    (0.5, 0.999). The paper trains with batch 4 for 200 epochs; batch size belongs to the
    training run, not to this config."""
    return MMDMConfig(
        bridge=BridgeConfig(num_timesteps=1000, schedule="linear", objective="ysubx", sample_steps=200),
        branch_net="resunet",
        resunet=ResUNetConfig(base=8, mult=(1, 2, 4, 8), ffn_expansion=4, groups=8, attention="global"),
        shared_time_embedding=True,
        fusion=FusionConfig(mixer="authors", ffn_expansion=4, attention="global", unet=authors_fusion_unet()),
        optim=OptimConfig(lr=1e-4, betas=(0.5, 0.999)),
    )


def small_config() -> MMDMConfig:
    """CPU-sized, derived from :func:`paper_config` with the same structure: branches half as
    wide (base 4, GroupNorm 4 groups, GDFN expansion 2), the fusion UNet narrower and
    shallower (16, mult 1,2,4, one res block per level, GroupNorm 16), 20 sampling steps:
    1.30 M parameters and 3.9 GFLOP per 5-slice 96x112 window (paper: 19.45 M, 47.0)."""
    cfg = paper_config()
    cfg.bridge = dataclasses.replace(cfg.bridge, sample_steps=20)
    cfg.resunet = dataclasses.replace(cfg.resunet, base=4, groups=4, ffn_expansion=2)
    cfg.fusion = dataclasses.replace(cfg.fusion, unet=dataclasses.replace(
        cfg.fusion.unet, base=16, mult=(1, 2, 4), num_res_blocks=1, groups=16))
    return cfg


NAMED_CONFIGS = {"paper": paper_config, "small": small_config}


@register_method("mmdm")
class MMDM(SynthesisMethod):
    """The multi-modal diffusion model of the paper (Fig. 1) with all ablation switches."""

    config_class = MMDMConfig
    named_configs = NAMED_CONFIGS

    display_name = "MMDM (ours in the paper)"
    family = "bridge"
    table1 = 7
    variants = VARIANTS
    default_variant = "full"  # a named config is the full model unless a variant says otherwise


    def __init__(self, cfg: MMDMConfig | None = None):
        super().__init__()
        cfg = cfg or MMDMConfig()
        cfg.validate()
        self.cfg = cfg
        self.sources = tuple(cfg.sources)
        self.window = cfg.window
        k = cfg.window
        self.bridge = BrownianBridge(cfg.bridge)
        bc = cfg.branch_config
        # one time embedding for every network (the authors' layout), or one per network
        self.time_embed = TimeEmbedding(bc.time_freq_dim, bc.time_embed_dim) if cfg.shared_time_embedding else None
        if cfg.branch_net == "resunet":
            self.branches = nn.ModuleDict({m: ResUNet(2 * k, k, cfg.resunet, time_embed=self.time_embed)
                                           for m in self.sources})
        else:
            self.branches = nn.ModuleDict({m: RestormerUNet(2 * k, k, cfg.branch, time_embed=self.time_embed)
                                           for m in self.sources})
        self.fusion = CrossModalFusion(len(self.sources), k, cfg.fusion, time_embed=self.time_embed)
        if cfg.fusion_residual:  # the correction starts at zero: x0_hat starts as the branches' mean
            last = self.fusion.unet.out[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.naws = NAWS(len(self.sources), self.sources, per_sample=cfg.naws_per_sample) if cfg.use_naws else None
        self.spatial_multiple = math.lcm(2 ** (len(bc.mult) - 1), 2 ** (len(cfg.fusion.unet.mult) - 1))
        self._last: dict[str, Tensor] = {}

    sampling_modes = SAMPLING_MODES

    @property
    def variant(self) -> str:
        return self.cfg.variant

    def objective(self) -> str:
        """The objective in one line (the run record keeps it)."""
        c = self.cfg
        loss = "MSE + MIP (eq. 7)" if c.use_mip else "MSE"
        if c.use_mip and (c.mip_tau != 0.75 or c.mip_noise_scale != 1 or not c.mip_gumbel):
            loss += f" (tau {c.mip_tau:g}, Gumbel scale {c.mip_noise_scale if c.mip_gumbel else 0:g})"
        total = "NAWS-weighted (eq. 11)" if c.use_naws else "summed"
        if c.use_naws and c.naws_lr is not None:
            total += f", NAWS lr {c.naws_lr:g}"
        return f"Brownian bridge per source, '{c.bridge.objective}' -> x0; {loss} on fused and branch x0, {total}"

    def param_groups(self, group: str, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        """NAWS's ``p_i`` in a group of their own at ``cfg.naws_lr`` when it is set."""
        if self.naws is None or self.cfg.naws_lr is None:
            return super().param_groups(group, params)
        naws = {id(p) for p in self.naws.parameters()}
        rest = [p for p in params if id(p) not in naws]
        mine = [p for p in params if id(p) in naws]
        return [{"params": rest}, {"params": mine, "lr": float(self.cfg.naws_lr)}] if mine else [{"params": rest}]

    @property
    def sampling_mode(self) -> str:
        """``cfg.sampling``: ``"coupled"`` (the paper, Fig. 1b) or ``"independent"``."""
        return self.cfg.sampling

    @sampling_mode.setter
    def sampling_mode(self, mode: str) -> None:
        if mode not in SAMPLING_MODES:
            raise ValueError(f"unknown MMDM sampling mode {mode!r}; use one of {SAMPLING_MODES}")
        self.cfg.sampling = mode

    def branch_x0(self, modality: str, x_t: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """``x0_hat^m`` of one branch: network output -> x0 (``x^m - eps_theta^m`` for "ysubx")."""
        out = self.branches[modality](torch.cat([x_t, y], dim=1), t)
        return self.bridge.predict_x0(x_t, y, t, out)

    def fuse(self, x0_hats: Sequence[Tensor], ys: Sequence[Tensor], t: Tensor) -> Tensor:
        """The cooperative prediction ``x0_hat`` (eq. (4)); with ``fusion_residual`` the fusion's
        output is a correction to the mean of the branch predictions."""
        fused = self.fusion(x0_hats, ys, t)
        if self.cfg.fusion_residual:
            fused = fused + torch.stack(list(x0_hats), 0).mean(0)
        return fused

    def training_losses(self, batch: Batch, generator: torch.Generator | None = None,
                        group: str = MAIN) -> dict[str, Tensor]:
        """One training step's losses (Fig. 1a); MMDM has one optimiser group, ``"main"``.

        One t per sample uniform over [0, T); ``x_t^m`` from eq. (1) with one
        shared noise tensor (or one per branch); ``x0_hat^m`` from each branch,
        ``x0_hat`` from the fusion (eq. (4)); per prediction the hybrid loss
        (eq. (7)) or the MSE; total by NAWS (eq. (11)) or the plain sum.
        """
        self.check_group(group)
        x0, ys = self.check_batch(batch)
        cfg = self.cfg
        t = self.bridge.sample_timesteps(x0.shape[0], x0.device, generator)
        if cfg.shared_noise:
            noises = [randn_like(x0, generator)] * len(ys)
        else:
            noises = [randn_like(x0, generator) for _ in ys]
        preds = [self.branch_x0(m, self.bridge.q_sample(x0, y, t, e), y, t)
                 for m, y, e in zip(self.sources, ys, noises)]
        fused = self.fuse(preds, ys, t)
        # the pixel loss's map weighs the MSE part of every x0 loss; default: eq. (7) as published
        px = self.pixel_loss.bind(x0)
        hybrid = partial(hybrid_loss, use_mip=cfg.use_mip, tau=cfg.mip_tau, reduction="none", generator=generator,
                         gumbel=cfg.mip_gumbel, weights=px.weights, noise_scale=cfg.mip_noise_scale)

        def loss_fn(pred: Tensor, ref: Tensor) -> Tensor:
            steer = px.image_term(pred, ref, reduction="none")
            return hybrid(pred, ref) if steer is None else hybrid(pred, ref) + steer

        l0 = loss_fn(fused, x0)  # (B,)
        lm = torch.stack([loss_fn(p, x0) for p in preds], dim=1)  # (B, M)
        out: dict[str, Tensor] = {}
        if self.naws is not None:
            total, weights = self.naws(l0, lm, self.bridge.delta(t))
            self._last = {f"naws/{k}": v for k, v in weights.items()}
            self._last["naws/sigma2_fused"] = self.naws.p0.detach().pow(2)
            for i, m in enumerate(self.sources):
                self._last[f"naws/sigma2_{m}"] = self.naws.pm.detach()[i].pow(2)
        else:
            total = l0.mean() + lm.mean(0).sum()
        out["loss"] = total
        out["loss_fused"] = l0.detach().mean()
        for i, m in enumerate(self.sources):
            out[f"loss_{m}"] = lm[:, i].detach().mean()
        out["mse_fused"] = (fused.detach() - x0).pow(2).mean()
        return out

    def optim_configs(self) -> dict[str, OptimConfig]:
        """``{"main": cfg.optim}`` (the authors': Adam lr 1e-4, betas (0.5, 0.999))."""
        return {MAIN: self.cfg.optim}

    def log_scalars(self) -> dict[str, float]:
        """NAWS weights ``1/(2 a_i)``, ``C`` and ``sigma_i^2 = p_i^2`` of the last training step."""
        return {k: float(v) for k, v in self._last.items()}

    @torch.no_grad()
    def sample(self, sources: dict[str, Tensor], steps: int | None = None, eta: float | None = None,
               generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
        """Synthesise the target window with the multi-branch bridge sampler (Fig. 1b)."""
        self.check_sources(sources)
        ys = self.source_list(sources)

        def x0_fn(x_ts: list[Tensor], t: Tensor) -> list[Tensor]:
            return [self.branch_x0(m, x, y, t) for m, x, y in zip(self.sources, x_ts, ys)]

        return sample_multibranch(x0_fn, ys, self.bridge, steps=steps, eta=eta, mode=self.cfg.sampling,
                                  fuse_fn=self.fuse, generator=generator, progress=progress,
                                  shared_noise=self.cfg.sampling_shared_noise)

    def extra_repr(self) -> str:
        return f"variant={self.variant}, sources={list(self.sources)}, window={self.window}"

