"""The conditional PatchGAN discriminator (Isola et al. 2017) shared by the GAN baselines.

``n_layers`` stride-2 4x4 convolutions (channels ``base * min(2^i, 8)``), one
stride-1 4x4 convolution and a final 4x4 convolution to one score per patch;
LeakyReLU(0.2) after every convolution except the last, a normalisation after
every convolution except the first and the last. With ``n_layers = 3`` each
score sees a 70x70 pixel patch (:func:`receptive_field`). The discriminator is
conditional: its input is ``cat(condition, image)``, so it judges whether the
image fits the condition.

Normalisation: the official pix2pix code uses batch norm (trained with batch
size 1, where it behaves like instance norm). The study's default is instance
norm, which does not depend on the batch size (4 in the paper, 1 to 8 in the
study's runs); ``norm="batch"`` restores the official choice.

:func:`init_gan_weights` is the pix2pix code base's initialisation (weights
N(0, 0.02), biases 0, norm scales N(1, 0.02)), used by all three GAN baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

NORMS = ("batch", "instance", "none")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Batch norm (affine, running statistics), instance norm (no affine, no running
    statistics: the pix2pix code base's settings) or the identity."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}; use one of {NORMS}")


def init_gan_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Convolution / linear weights ~ N(0, std), biases 0; norm scales ~ N(1, std), shifts 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)
    return module


@dataclass
class PatchGANConfig:
    """``base``: channels of the first layer (64 official); ``n_layers``: stride-2
    convolutions (3 gives the 70x70 PatchGAN); ``norm``: see the module docstring."""

    base: int = 64
    n_layers: int = 3
    norm: str = "instance"

    def validate(self) -> None:
        if self.base < 1 or self.n_layers < 1:
            raise ValueError(f"PatchGANConfig: base and n_layers must be >= 1, got {self.base}, {self.n_layers}")
        if self.norm not in NORMS:
            raise ValueError(f"PatchGANConfig.norm: unknown normalisation {self.norm!r}; use one of {NORMS}")


def layer_geometry(n_layers: int) -> list[tuple[int, int]]:
    """(kernel, stride) of every convolution of the PatchGAN, input to output."""
    return [(4, 2)] * n_layers + [(4, 1), (4, 1)]


def receptive_field(n_layers: int) -> int:
    """Side of the input patch one output score sees: r <- (r - 1) * stride + kernel, output to input."""
    r = 1
    for k, s in reversed(layer_geometry(n_layers)):
        r = (r - 1) * s + k
    return r


class PatchGAN(nn.Module):
    """Scores (B, 1, H', W') for ``cat(condition, image)`` with ``in_channels`` channels in all."""

    def __init__(self, in_channels: int, cfg: PatchGANConfig | None = None):
        super().__init__()
        cfg = cfg or PatchGANConfig()
        cfg.validate()
        self.cfg = cfg
        bias = cfg.norm != "batch"  # batch norm has its own shift
        layers: list[nn.Module] = [nn.Conv2d(in_channels, cfg.base, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = cfg.base
        for i in range(1, cfg.n_layers + 1):
            out = cfg.base * min(2 ** i, 8)
            stride = 2 if i < cfg.n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=bias), norm_layer(cfg.norm, out), nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        init_gan_weights(self)

    @property
    def min_size(self) -> int:
        """Smallest input side for which the normalised stride-1 layer sees more than one pixel
        (instance norm needs that): ``3 * 2 ** n_layers`` (24 for the 70x70 PatchGAN)."""
        return 3 * 2 ** self.cfg.n_layers

    def forward(self, condition: Tensor | None, image: Tensor) -> Tensor:
        x = image if condition is None else torch.cat([condition, image], dim=1)
        if self.cfg.norm == "instance" and min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"PatchGAN: input is {x.shape[-2]}x{x.shape[-1]} pixels but instance norm with "
                             f"n_layers={self.cfg.n_layers} needs at least {self.min_size}x{self.min_size}; use "
                             "larger windows, a smaller discriminator.n_layers, or discriminator.norm='none'")
        return self.net(x)
