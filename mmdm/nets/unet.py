"""Time-conditioned residual UNet (DDPM / BBDM style).

Used as the last stage of the cross-modal fusion module (eq. 4) and by the
single-network baselines. Layout (sizes from :class:`UNetConfig`):

- ``conv_in`` 3x3: ``in -> base``;
- encoder level ``i`` (``C_i = base * mult[i]``): ``num_res_blocks`` residual
  blocks, every block output kept as a skip; between levels a stride-2 3x3 conv
  (``conv_resample``) or a parameter-free 2x2 average pool (the openai/BBDM UNet
  with ``conv_resample=False``, as in the authors' fusion UNet);
- middle: residual block, optional single-head self-attention over pixels
  (``attention=True``), residual block;
- decoder level ``i`` (deepest first): ``num_res_blocks + 1`` residual blocks,
  each consuming one skip by concatenation; nearest x2 upsampling, followed by a
  3x3 conv when ``conv_resample``, between levels;
- output: GroupNorm -> SiLU -> 3x3 conv ``base -> out``.

A residual block is ``GN -> SiLU -> conv3x3 -> + Linear(SiLU(temb)) -> GN ->
SiLU -> dropout -> conv3x3`` plus a (1x1 when the width changes) shortcut.
No BatchNorm: outputs do not depend on the batch composition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdm.config import ConfigError
from mmdm.nets.embeddings import TimeEmbedding, broadcast_timesteps
from mmdm.nets.restormer import check_spatial_size


@dataclass
class UNetConfig:
    """Size of a :class:`TimeUNet` (defaults: the authors' fusion UNet)."""

    base: int = 32
    mult: tuple[int, ...] = (1, 4, 8)
    num_res_blocks: int = 2
    time_embed_dim: int = 128
    time_freq_dim: int = 32
    dropout: float = 0.0
    attention: bool = False          # self-attention in the middle (lowest-resolution) block
    groups: int = 8                  # GroupNorm groups (reduced to a divisor of the width if needed)
    conv_resample: bool = True       # stride-2 conv down / conv after up; False: avg-pool / plain nearest

    def validate(self) -> None:
        if not self.mult or any(m < 1 for m in self.mult):
            raise ConfigError(f"UNetConfig.mult: give positive multipliers, one per level; got {self.mult}")
        if self.base < 1 or self.num_res_blocks < 1 or self.groups < 1:
            raise ConfigError(f"UNetConfig: base, num_res_blocks and groups must be >= 1; got "
                              f"{self.base}, {self.num_res_blocks}, {self.groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")


def group_norm(ch: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count ``<= groups`` that divides ``ch``."""
    return nn.GroupNorm(math.gcd(ch, groups), ch)


class ResBlock(nn.Module):
    """Residual block with the time embedding added after the first convolution."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(cin, groups), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, cout))
        self.out_layers = nn.Sequential(group_norm(cout, groups), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.time(temb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map (residual)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-2, -1).unbind(1)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-2, -1).reshape(b, c, h, w))


class TimeUNet(nn.Module):
    """Time-conditioned residual UNet: ``(B, in, H, W), t (B,) -> (B, out, H, W)``.

    ``H`` and ``W`` must be multiples of ``2 ** (len(cfg.mult) - 1)``. ``time_embed``: a
    :class:`TimeEmbedding` shared with other networks (its output width must be
    ``cfg.time_embed_dim``); None builds the UNet's own.
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig | None = None,
                 time_embed: TimeEmbedding | None = None):
        super().__init__()
        cfg = cfg or UNetConfig()
        cfg.validate()
        self.cfg, self.in_channels, self.out_channels = cfg, in_channels, out_channels
        g, td = cfg.groups, cfg.time_embed_dim
        chs = [cfg.base * m for m in cfg.mult]
        self.levels = len(chs)
        self.time_embed = time_embed if time_embed is not None else TimeEmbedding(cfg.time_freq_dim, td)
        self.conv_in = nn.Conv2d(in_channels, cfg.base, 3, padding=1)

        self.down_blocks = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_chs = [cfg.base]
        ch = cfg.base
        for i, c in enumerate(chs):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, c, td, g, cfg.dropout))
                ch = c
                skip_chs.append(ch)
            self.down_blocks.append(blocks)
            if i < self.levels - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1) if cfg.conv_resample
                                       else nn.AvgPool2d(2))
                skip_chs.append(ch)

        self.mid1 = ResBlock(ch, ch, td, g, cfg.dropout)
        self.mid_attn = SelfAttention(ch, g) if cfg.attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, td, g, cfg.dropout)

        self.up_blocks = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(self.levels)):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch + skip_chs.pop(), chs[i], td, g, cfg.dropout))
                ch = chs[i]
            self.up_blocks.append(blocks)
            if i > 0:
                up = [nn.Upsample(scale_factor=2, mode="nearest")]
                if cfg.conv_resample:
                    up.append(nn.Conv2d(ch, ch, 3, padding=1))
                self.upsample.append(nn.Sequential(*up))
        assert not skip_chs
        self.out = nn.Sequential(group_norm(ch, g), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"TimeUNet: expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        check_spatial_size(x.shape[2], x.shape[3], self.levels, "TimeUNet")
        temb = self.time_embed(broadcast_timesteps(t, x.shape[0], x.device))
        h = self.conv_in(x)
        skips = [h]
        for i, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, temb)
                skips.append(h)
            if i < self.levels - 1:
                h = self.downsample[i](h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for j, blocks in enumerate(self.up_blocks):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
            if j < self.levels - 1:
                h = self.upsample[j](h)
        return self.out(h)
