"""Restormer building blocks and the time-conditioned Restormer-UNet of the
modality-specific diffusion modules (paper Sec. 2.1; Zamir et al., CVPR 2022).

Each branch ``eps_theta^m`` predicts ``x^m - x_0`` from ``cat(x_t^m, x^m)``
(the objective after eq. 3), so that ``x0_hat^m = x^m - eps_theta^m``.

Blocks
------
- :class:`LayerNorm2d`: LayerNorm over the channels of every pixel, "with_bias"
  (standard) or "bias_free" (Restormer's variant: no mean subtraction in the
  numerator, no bias).
- :class:`MDTA`: multi-Dconv-head transposed attention. The attention matrix is
  over CHANNELS (``C/heads x C/heads`` per head), computed from query and key
  maps L2-normalised over the spatial dimension and scaled by a learnable
  per-head temperature. Unlike the authors' code, the attention output is
  reshaped back with the same (row-major ``h w``) pixel order it was flattened
  with, so non-square inputs (e.g. 96 x 112) are not scrambled.
- :class:`GDFN`: gated-Dconv feed-forward, ``GELU(x1) * x2``.
- :class:`TransformerBlock`: ``x + MDTA(LN(x))`` then ``x + GDFN(LN(x))``.

Restormer-UNet layout (all sizes from :class:`RestormerUNetConfig`)
-------------------------------------------------------------------
``input conv (in -> dim*mult[0])``; encoder level ``i``: time injection
(``SiLU -> Linear(time_embed_dim, C_i)`` added as a per-channel bias) then
``num_blocks[i]`` transformer blocks; between levels max-pool 2 + 1x1 conv
``C_i -> C_{i+1}`` (the authors' choice). Decoder level ``i`` (from the second
deepest up): nearest upsampling x2 + 3x3 conv ``C_{i+1} -> C_i``, concatenation
with the encoder skip, 1x1 conv ``2 C_i -> C_i``, time injection,
``num_blocks[i]`` transformer blocks. Output: 3x3 conv ``C_0 -> out``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdm.config import ConfigError
from mmdm.nets.embeddings import TimeEmbedding, broadcast_timesteps

LAYERNORM_TYPES = ("with_bias", "bias_free")


def check_spatial_size(h: int, w: int, levels: int, who: str) -> None:
    """Raise ``ValueError`` unless ``h`` and ``w`` are multiples of ``2 ** (levels - 1)``."""
    f = 2 ** (levels - 1)
    if h % f or w % f:
        raise ValueError(
            f"{who}: input size {h}x{w} is not supported; with {levels} levels height and width must be "
            f"multiples of {f} (e.g. {max(f, h // f * f)}x{max(f, w // f * f)}); crop or pad the input")


@dataclass
class RestormerUNetConfig:
    """Size of a Restormer-UNet branch (defaults: the authors' tiny configuration)."""

    dim: int = 8                                 # base channels (original Restormer: 48)
    mult: tuple[int, ...] = (1, 2, 4, 8)         # channel multiplier per level; downsample between levels
    num_blocks: tuple[int, ...] = (1, 1, 1, 1)   # transformer blocks per level (original: (4, 6, 6, 8))
    heads: tuple[int, ...] = (1, 1, 1, 1)        # attention heads per level (original: (1, 2, 4, 8))
    ffn_expansion: float = 4.0                   # GDFN expansion (authors 4; original Restormer 2.66)
    time_embed_dim: int = 128
    time_freq_dim: int = 32
    bias: bool = False                           # bias of the convolutions inside MDTA / GDFN
    layernorm: str = "with_bias"                 # "with_bias" | "bias_free"
    in_kernel: int = 1                           # input conv kernel: 1 (authors' code) or 3 (original Restormer)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on inconsistent sizes."""
        n = len(self.mult)
        if n < 1:
            raise ConfigError("RestormerUNetConfig.mult: give at least one level, e.g. (1, 2, 4, 8)")
        if len(self.num_blocks) != n or len(self.heads) != n:
            raise ConfigError(
                f"RestormerUNetConfig: mult, num_blocks and heads need one entry per level; got "
                f"{len(self.mult)}, {len(self.num_blocks)}, {len(self.heads)} entries")
        for i, (m, h) in enumerate(zip(self.mult, self.heads)):
            c = self.dim * m
            if m < 1 or h < 1 or c % h:
                raise ConfigError(
                    f"RestormerUNetConfig: level {i} has {c} channels (dim {self.dim} x mult {m}) and {h} heads; "
                    "the channel count must be a positive multiple of the number of heads")
        if any(b < 0 for b in self.num_blocks):
            raise ConfigError(f"RestormerUNetConfig.num_blocks must be >= 0, got {self.num_blocks}")
        if self.layernorm not in LAYERNORM_TYPES:
            raise ConfigError(f"RestormerUNetConfig.layernorm: unknown '{self.layernorm}'; use one of {LAYERNORM_TYPES}")
        if self.in_kernel not in (1, 3):
            raise ConfigError(f"RestormerUNetConfig.in_kernel must be 1 or 3, got {self.in_kernel}")
        if self.ffn_expansion <= 0:
            raise ConfigError(f"RestormerUNetConfig.ffn_expansion must be > 0, got {self.ffn_expansion}")


class LayerNorm2d(nn.Module):
    """LayerNorm over channels at every pixel of a ``(B, C, H, W)`` map.

    ``with_bias``: ``(x - mean) / sqrt(var + eps) * w + b``;
    ``bias_free`` (Restormer): ``x / sqrt(var + eps) * w``.
    """

    def __init__(self, dim: int, kind: str = "with_bias", eps: float = 1e-5):
        super().__init__()
        if kind not in LAYERNORM_TYPES:
            raise ValueError(f"LayerNorm2d: unknown kind '{kind}'; use one of {LAYERNORM_TYPES}")
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "with_bias" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is not None:
            y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return x * torch.rsqrt(var + self.eps) * self.weight[:, None, None]


def channel_attention(q: Tensor, k: Tensor, v: Tensor, temperature: Tensor, heads: int) -> Tensor:
    """Transposed (channel-wise) attention core of MDTA.

    ``q, k, v``: ``(B, C, H, W)``; ``temperature``: ``heads`` values (any shape
    with that many elements). Per head, with ``c = C / heads`` channels and the
    pixels flattened: ``A = softmax(T * qn kn^T)`` (``c x c``) with ``qn, kn``
    L2-normalised over pixels, output ``A v`` reshaped to ``(B, C, H, W)`` in the
    same pixel order. Permuting the pixels of ``q, k, v`` permutes the output
    identically.
    """
    b, c, h, w = q.shape
    if c % heads:
        raise ValueError(f"channel_attention: {c} channels cannot be split into {heads} heads")
    q, k, v = (z.reshape(b, heads, c // heads, h * w) for z in (q, k, v))
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature.reshape(1, heads, 1, 1)
    out = attn.softmax(dim=-1) @ v
    return out.reshape(b, c, h, w)


class MDTA(nn.Module):
    """Multi-Dconv-head transposed attention: ``1x1 qkv -> 3x3 depthwise -> channel attention -> 1x1``."""

    def __init__(self, dim: int, heads: int = 1, bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"MDTA: {dim} channels cannot be split into {heads} heads; choose heads dividing dim")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=bias)
        self.qkv_dw = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=bias)
        self.project = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv_dw(self.qkv(x)).chunk(3, dim=1)
        return self.project(channel_attention(q, k, v, self.temperature, self.heads))


class GDFN(nn.Module):
    """Gated-Dconv feed-forward: ``1x1 -> 3x3 depthwise -> GELU(x1) * x2 -> 1x1``."""

    def __init__(self, dim: int, expansion: float = 4.0, bias: bool = False):
        super().__init__()
        hidden = int(dim * expansion)
        if hidden < 1:
            raise ValueError(f"GDFN: expansion {expansion} gives no hidden channels for dim {dim}")
        self.project_in = nn.Conv2d(dim, 2 * hidden, 1, bias=bias)
        self.dw = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.dw(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    """Restormer block: ``x + MDTA(LN(x))``, then ``x + GDFN(LN(x))``."""

    def __init__(self, dim: int, heads: int = 1, ffn_expansion: float = 4.0, bias: bool = False,
                 layernorm: str = "with_bias"):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, layernorm)
        self.attn = MDTA(dim, heads, bias)
        self.norm2 = LayerNorm2d(dim, layernorm)
        self.ffn = GDFN(dim, ffn_expansion, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class _Level(nn.Module):
    """Time injection (per-channel bias) followed by a stack of transformer blocks."""

    def __init__(self, ch: int, n_blocks: int, heads: int, cfg: RestormerUNetConfig):
        super().__init__()
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(cfg.time_embed_dim, ch))
        self.blocks = nn.Sequential(*[TransformerBlock(ch, heads, cfg.ffn_expansion, cfg.bias, cfg.layernorm)
                                      for _ in range(n_blocks)])

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.blocks(x + self.time(temb)[:, :, None, None])


class RestormerUNet(nn.Module):
    """Time-conditioned Restormer-UNet: ``(B, in, H, W), t (B,) -> (B, out, H, W)``.

    ``H`` and ``W`` must be multiples of ``2 ** (len(cfg.mult) - 1)``. ``time_embed``: a
    :class:`TimeEmbedding` shared with other networks; None builds the network's own.
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: RestormerUNetConfig | None = None,
                 time_embed: TimeEmbedding | None = None):
        super().__init__()
        cfg = cfg or RestormerUNetConfig()
        cfg.validate()
        self.cfg, self.in_channels, self.out_channels = cfg, in_channels, out_channels
        chs = [cfg.dim * m for m in cfg.mult]
        self.levels = len(chs)
        self.time_embed = time_embed if time_embed is not None else TimeEmbedding(cfg.time_freq_dim,
                                                                                  cfg.time_embed_dim)
        self.conv_in = nn.Conv2d(in_channels, chs[0], cfg.in_kernel, padding=cfg.in_kernel // 2)
        self.encoder = nn.ModuleList(_Level(c, n, h, cfg) for c, n, h in zip(chs, cfg.num_blocks, cfg.heads))
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(chs[i], chs[i + 1], 1))
                                  for i in range(self.levels - 1))
        self.up = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(chs[i + 1], chs[i], 3, padding=1))
                                for i in range(self.levels - 1))
        self.reduce = nn.ModuleList(nn.Conv2d(2 * chs[i], chs[i], 1) for i in range(self.levels - 1))
        self.decoder = nn.ModuleList(_Level(chs[i], cfg.num_blocks[i], cfg.heads[i], cfg)
                                     for i in range(self.levels - 1))
        self.conv_out = nn.Conv2d(chs[0], out_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"RestormerUNet: expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        check_spatial_size(x.shape[2], x.shape[3], self.levels, "RestormerUNet")
        temb = self.time_embed(broadcast_timesteps(t, x.shape[0], x.device))
        h = self.conv_in(x)
        skips = []
        for i, level in enumerate(self.encoder):
            h = level(h, temb)
            if i < self.levels - 1:
                skips.append(h)
                h = self.down[i](h)
        for i in reversed(range(self.levels - 1)):
            h = self.reduce[i](torch.cat([self.up[i](h), skips[i]], dim=1))
            h = self.decoder[i](h, temb)
        return self.conv_out(h)
