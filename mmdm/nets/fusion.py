"""Cross-modal dynamic fusion module ``eps_theta^0`` (eq. 4 of the paper):

    x0_hat = eps_theta^0(x0_hat^1..M, x^1..M, t)

following the authors' design, generalised from three fixed modalities to any
``M >= 2``:

1. for every modality ``m``, a mixing block reads
   ``cat(x0_hat^m, x^j for j != m in index order)`` (``M * window`` channels:
   the branch's own prediction and the OTHER sources) and outputs ``window``
   channels;
2. the ``M`` results are concatenated (``M * window`` channels) and mixed by a
   second mixing block to ``window`` channels;
3. a :class:`TimeUNet` conditioned on ``t`` maps these ``window`` mixed
   channels (its only input) to the cooperative prediction ``x0_hat``
   directly (no residual added around it).

Mixing blocks (``FusionConfig.mixer``): ``"authors"`` (default) is the authors'
Restormer block :class:`mmdm.nets.resunet.DenseRestormerBlock` ``(M*window ->
window)`` with GroupNorm of ``window`` groups and dense convolutions (8,495
parameters for 3 x 5 -> 5); ``"restormer"`` is this project's earlier
:class:`RestormerMixer` (3x3 conv, an original Restormer block, 1x1 conv). The
authors' fusion UNet is the openai/BBDM UNet with 32 channels, mult (1, 4, 8),
2 residual blocks per level, no attention, no resampling convolutions, and the
time embedding shared with the branches (12,293,349 parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from mmdm.config import ConfigError
from mmdm.nets.embeddings import TimeEmbedding
from mmdm.nets.restormer import LAYERNORM_TYPES, TransformerBlock, check_spatial_size
from mmdm.nets.resunet import ATTENTION_KINDS, DenseRestormerBlock
from mmdm.nets.unet import TimeUNet, UNetConfig

MIXERS = ("authors", "restormer")


def authors_fusion_unet() -> UNetConfig:
    """The authors' fusion UNet: openai/BBDM layout, 32 channels, mult (1, 4, 8), 2 res blocks,
    GroupNorm 32, no attention, ``conv_resample=False``."""
    return UNetConfig(base=32, mult=(1, 4, 8), num_res_blocks=2, groups=32, attention=False, conv_resample=False)


@dataclass
class FusionConfig:
    """Size of the fusion module (defaults: the authors' configuration).

    ``mixer``: ``"authors"`` (dense Restormer block, GroupNorm of ``window`` groups;
    ``ffn_expansion`` must be a whole number, ``attention`` its softmax) or
    ``"restormer"`` (:class:`RestormerMixer`; uses ``heads``, ``bias``, ``layernorm``).
    """

    heads: int = 1                    # MDTA heads of the "restormer" mixers (must divide M * window)
    ffn_expansion: float = 4.0
    unet: UNetConfig = field(default_factory=authors_fusion_unet)
    bias: bool = False
    layernorm: str = "with_bias"
    mixer: str = "authors"
    attention: str = "global"         # softmax of the "authors" mixers: "global" | "row"

    def validate(self) -> None:
        if self.heads < 1:
            raise ConfigError(f"FusionConfig.heads must be >= 1, got {self.heads}")
        if self.layernorm not in LAYERNORM_TYPES:
            raise ConfigError(f"FusionConfig.layernorm: unknown '{self.layernorm}'; use one of {LAYERNORM_TYPES}")
        if self.mixer not in MIXERS:
            raise ConfigError(f"FusionConfig.mixer: unknown {self.mixer!r}; use one of {MIXERS}")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"FusionConfig.attention: unknown {self.attention!r}; use one of {ATTENTION_KINDS}")
        if self.mixer == "authors" and (self.ffn_expansion < 1 or not float(self.ffn_expansion).is_integer()):
            raise ConfigError(f"FusionConfig.ffn_expansion must be a whole number >= 1 for the 'authors' mixer, "
                              f"got {self.ffn_expansion}")
        self.unet.validate()


class RestormerMixer(nn.Module):
    """``3x3 conv (in -> in) -> Restormer TransformerBlock(in) -> 1x1 conv (in -> out)``."""

    def __init__(self, in_channels: int, out_channels: int, heads: int = 1, ffn_expansion: float = 4.0,
                 bias: bool = False, layernorm: str = "with_bias"):
        super().__init__()
        if in_channels % heads:
            raise ConfigError(f"fusion mixer: {in_channels} input channels cannot be split into {heads} heads; "
                              "choose FusionConfig.heads dividing n_modalities * window (e.g. 1)")
        self.conv_in = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.block = TransformerBlock(in_channels, heads, ffn_expansion, bias, layernorm)
        self.conv_out = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.block(self.conv_in(x)))


class CrossModalFusion(nn.Module):
    """Eq. (4): ``x0_hats[m], sources[m]`` ``(B, window, H, W)`` for ``m < M`` and ``t (B,)`` -> ``x0_hat``.

    ``time_embed``: a :class:`TimeEmbedding` shared with the branches (the authors'
    layout); None gives the fusion UNet its own.
    """

    def __init__(self, n_modalities: int, window: int, cfg: FusionConfig | None = None,
                 time_embed: TimeEmbedding | None = None):
        super().__init__()
        cfg = cfg or FusionConfig()
        cfg.validate()
        if n_modalities < 2:
            raise ConfigError(f"CrossModalFusion needs at least 2 modalities, got {n_modalities}; "
                              "a single modality needs no fusion (use its branch prediction directly)")
        if window < 1:
            raise ConfigError(f"CrossModalFusion: window must be >= 1 slice, got {window}")
        self.cfg, self.n_modalities, self.window = cfg, n_modalities, window
        cin = n_modalities * window
        self.per_modality = nn.ModuleList(self._mixer(cin) for _ in range(n_modalities))
        self.mix = self._mixer(cin)
        self.unet = TimeUNet(window, window, cfg.unet, time_embed=time_embed)

    def _mixer(self, cin: int) -> nn.Module:
        """One mixing block ``cin -> window`` of the configured kind."""
        cfg = self.cfg
        if cfg.mixer == "authors":
            return DenseRestormerBlock(cin, self.window, groups=self.window, expansion=int(cfg.ffn_expansion),
                                       attention=cfg.attention)
        return RestormerMixer(cin, self.window, heads=cfg.heads, ffn_expansion=cfg.ffn_expansion, bias=cfg.bias,
                              layernorm=cfg.layernorm)

    def forward(self, x0_hats: Sequence[Tensor], sources: Sequence[Tensor], t: Tensor) -> Tensor:
        m_count = self.n_modalities
        if len(x0_hats) != m_count or len(sources) != m_count:
            raise ValueError(f"CrossModalFusion was built for {m_count} modalities; got {len(x0_hats)} "
                             f"predictions and {len(sources)} sources")
        shape = tuple(x0_hats[0].shape)
        for name, seq in (("x0_hats", x0_hats), ("sources", sources)):
            for i, z in enumerate(seq):
                if z.ndim != 4 or z.shape[1] != self.window or tuple(z.shape) != shape:
                    raise ValueError(f"CrossModalFusion: {name}[{i}] has shape {tuple(z.shape)}; every input must "
                                     f"be (B, {self.window}, H, W) with the same B, H, W as x0_hats[0] {shape}")
        check_spatial_size(shape[2], shape[3], len(self.cfg.unet.mult), "CrossModalFusion")
        feats = [mixer(torch.cat([x0_hats[m]] + [sources[j] for j in range(m_count) if j != m], dim=1))
                 for m, mixer in enumerate(self.per_modality)]
        return self.unet(self.mix(torch.cat(feats, dim=1)), t)
