"""ResViT (Dalmaz et al., IEEE TMI 2022): residual vision transformer GAN (Table 1 baseline).

Official defaults (icon-lab/ResViT, ``resvit_many``): generator described in
:mod:`mmdm.nets.resvit` (ngf 64, 9 ART blocks, transformer in blocks 1 and 6
with shared weights, R50+ViT-B/16 sizes: hidden 768, 12 layers, 12 heads),
conditional 70x70 PatchGAN on ``cat(sources, output)`` (batch norm), LSGAN
loss + lambda_A = 100 times L1, Adam lr 2e-4 betas (0.5, 0.999), init
N(0, 0.02). The official recipe trains in two stages: a pure-CNN "Res-CNN"
(50 + 50 epochs), then ResViT initialised from it and from ImageNet weights of
ViT-B/16, fine-tuned with lr 1e-3.

ResViT is the one Table 1 method that "incorporates multi-modal inputs"
(paper, section 3.1): all M source windows are stacked as M*K input channels,
no gating; the official code hard-wires two inputs, this class takes any M.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmdm.config import ConfigError
from mmdm.methods.base import OptimConfig, register_method
from mmdm.methods.pix2pix import ConditionalGAN, validate_gan_fields
from mmdm.nets.patchgan import PatchGAN, PatchGANConfig
from mmdm.nets.resvit import ResViTGenerator, ResViTNetConfig

DEVIATIONS: list[str] = [
    "ResViT: trained from scratch in one stage. The official recipe pre-trains a Res-CNN and initialises the ViT "
    "from ImageNet-pre-trained R50+ViT-B/16 weights, which are not available offline.",
    "ResViT: the positional embedding is learned on an 18x20 token grid (288x320 windows) and bilinearly resized "
    "to other grids (CPU windows); the official code fixes it to the training size and assumes square grids.",
    "ResViT: any number M of source modalities, stacked as M*K input channels (2.5D, K = 5); the official code "
    "hard-wires the modalities and predicts one slice.",
    "ResViT: the PatchGAN uses instance norm by default (batch-size independent); official: batch norm.",
]


@dataclass
class ResViTConfig:
    """ResViT in the study; see :class:`mmdm.methods.pix2pix.Pix2PixConfig` for the shared GAN fields."""

    sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")
    window: int = 5
    generator: ResViTNetConfig = field(default_factory=ResViTNetConfig)
    discriminator: PatchGANConfig = field(default_factory=PatchGANConfig)
    gan_mode: str = "lsgan"
    real_label: float = 1.0
    fake_label: float = 0.0
    lambda_l1: float = 100.0
    reuse_fake: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.5, 0.999)))
    optim_d: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.5, 0.999)))

    def validate(self) -> None:
        validate_gan_fields(self, "ResViTConfig")
        try:
            self.generator.validate()
            self.discriminator.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def paper_config() -> ResViTConfig:
    """Official sizes: ngf 64, 9 ART blocks (shared ViT-B/16-sized transformer in blocks 1 and 6),
    LSGAN + 100 L1, Adam 2e-4 (0.5, 0.999)."""
    return ResViTConfig()


def small_config() -> ResViTConfig:
    """CPU size: ngf 8, transformer path (32, 64) channels, ViT hidden 32 / 2 layers / 4 heads / MLP 64,
    token grid for 96x112 windows (6x7), PatchGAN base 16."""
    cfg = paper_config()
    cfg.generator = dataclasses.replace(cfg.generator, base=8, vit_channels=(32, 64), hidden=32, layers=2, heads=4,
                                        mlp_dim=64, pos_grid=(6, 7))
    cfg.discriminator = dataclasses.replace(cfg.discriminator, base=16)
    return cfg


@register_method("resvit")
class ResViT(ConditionalGAN):
    """cat(all source windows) -> ResViT generator -> K-slice window; PatchGAN on (sources, output)."""

    config_class = ResViTConfig
    named_configs = {"paper": paper_config, "small": small_config}
    display_name = "ResViT"
    family = "GAN"
    table1 = 3
    spatial_multiple = ResViTGenerator.spatial_multiple

    def __init__(self, cfg: ResViTConfig | None = None):
        super().__init__()
        cfg = cfg or ResViTConfig()
        cfg.validate()
        self.cfg = cfg
        self.sources = tuple(cfg.sources)
        self.window = k = cfg.window
        m = len(self.sources)
        self.net = ResViTGenerator(m * k, k, cfg.generator)
        self.discriminator = PatchGAN(m * k + k, cfg.discriminator)

    def generate(self, ys: list[Tensor], target: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        cond = torch.cat(ys, dim=1)
        return self.net(cond), cond, {}

