"""The pix2pix U-Net generator (Isola et al. 2017), written as explicit encoder/decoder lists.

Encoder level i (0 <= i < depth) is a 4x4 stride-2 convolution to
``c_i = base * min(2^i, 8)`` channels (C64-C128-C256-C512-C512-...), preceded by
LeakyReLU(0.2) and followed by a normalisation except at the outermost level
(no activation, no norm) and the innermost one (no norm). The decoder mirrors
it with ReLU + 4x4 stride-2 transposed convolutions; each decoder output is
concatenated with the encoder feature of the same resolution (the skip
connections); the outermost decoder maps to ``out_channels`` with tanh.
Dropout(0.5) follows the ``dropout_blocks`` decoder levels directly above the
innermost one, as in the official code (3 for its 8-level ``unet_256``).

Depth: the official ``unet_256`` halves a 256x256 image 8 times (to 1x1). The
study's windows are 288x320 (paper) or 96x112 (CPU runs), so the depth is a
config field and height and width must be multiples of ``2 ** depth``
(5 levels: 288x320 -> 9x10; 4 levels: 96x112 -> 6x7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmdm.nets.patchgan import NORMS, init_gan_weights, norm_layer


@dataclass
class Pix2PixUNetConfig:
    """``base``: channels of the first level (64 official); ``depth``: down-samplings;
    ``norm``: "batch" (official), "instance" or "none"; ``dropout``: rate in the
    ``dropout_blocks`` decoder levels above the innermost one (0 disables it)."""

    base: int = 64
    depth: int = 5
    norm: str = "batch"
    dropout: float = 0.5
    dropout_blocks: int = 3

    def validate(self) -> None:
        if self.depth < 2:
            raise ValueError(f"Pix2PixUNetConfig.depth must be >= 2 (got {self.depth})")
        if self.base < 1:
            raise ValueError(f"Pix2PixUNetConfig.base must be >= 1 (got {self.base})")
        if self.norm not in NORMS:
            raise ValueError(f"Pix2PixUNetConfig.norm: unknown normalisation {self.norm!r}; use one of {NORMS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Pix2PixUNetConfig.dropout must be in [0, 1), got {self.dropout}")


class Pix2PixUNet(nn.Module):
    """(B, in_channels, H, W) -> (B, out_channels, H, W) in [-1, 1]; H, W multiples of 2**depth."""

    def __init__(self, in_channels: int, out_channels: int, cfg: Pix2PixUNetConfig | None = None):
        super().__init__()
        cfg = cfg or Pix2PixUNetConfig()
        cfg.validate()
        self.cfg = cfg
        d = cfg.depth
        ch = [cfg.base * min(2 ** i, 8) for i in range(d)]
        bias = cfg.norm != "batch"
        self.down = nn.ModuleList()
        for i in range(d):
            if i == 0:
                self.down.append(nn.Conv2d(in_channels, ch[0], 4, 2, 1, bias=bias))
                continue
            layers: list[nn.Module] = [nn.LeakyReLU(0.2, True), nn.Conv2d(ch[i - 1], ch[i], 4, 2, 1, bias=bias)]
            if i < d - 1:
                layers.append(norm_layer(cfg.norm, ch[i]))
            self.down.append(nn.Sequential(*layers))
        # up[i] maps level i's features (plus skip, except innermost) to level i-1's resolution
        self.up = nn.ModuleList()
        dropout_levels = set(range(max(1, d - 1 - cfg.dropout_blocks), d - 1)) if cfg.dropout > 0 else set()
        self.dropout_levels = sorted(dropout_levels)
        for i in range(d):
            c_in = ch[i] if i == d - 1 else 2 * ch[i]
            if i == 0:
                self.up.append(nn.Sequential(nn.ReLU(True), nn.ConvTranspose2d(c_in, out_channels, 4, 2, 1), nn.Tanh()))
                continue
            layers = [nn.ReLU(True), nn.ConvTranspose2d(c_in, ch[i - 1], 4, 2, 1, bias=bias),
                      norm_layer(cfg.norm, ch[i - 1])]
            if i in dropout_levels:
                layers.append(nn.Dropout(cfg.dropout))
            self.up.append(nn.Sequential(*layers))
        self.spatial_multiple = 2 ** d
        init_gan_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        f = self.spatial_multiple
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"Pix2PixUNet: input is {x.shape[-2]}x{x.shape[-1]} pixels; height and width must be "
                             f"multiples of 2**depth = {f}: crop/pad the windows or lower the depth")
        skips = []
        for layer in self.down:
            x = layer(x)
            skips.append(x)
        h = self.up[-1](skips[-1])
        for i in range(len(self.up) - 2, -1, -1):
            h = self.up[i](torch.cat([h, skips[i]], dim=1))
        return h
