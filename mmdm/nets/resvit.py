"""ResViT generator (Dalmaz et al., IEEE TMI 2022) and the ViT pieces the GAN baselines share.

Generator: a CNN encoder (reflection-padded 7x7 convolution to ``base``
channels, two 3x3 stride-2 convolutions to ``4 base``), an information
bottleneck of ``n_blocks`` aggregated residual transformer (ART) blocks at 1/4
resolution, and a CNN decoder (two 3x3 stride-2 transposed convolutions, a
reflection-padded 7x7 convolution, tanh). Normalisation: batch norm (official).

ART block (a residual CNN block, optionally preceded by a transformer path):

    t = up(ViT(embed(down(x))))                  transformer path (only in some blocks)
    x = CC(cat(t, x))                            channel compression back to 4 base channels
    x = x + conv-norm-ReLU-conv-norm(x)          residual CNN block

``down``: two 3x3 stride-2 convolutions (to ``vit_channels``); ``embed``: 1x1
patch embedding to ``hidden`` + learnable positional embedding; ``ViT``: pre-norm
transformer layers (multi-head self-attention + GELU MLP) and a final
LayerNorm; ``up``: two stride-2 transposed convolutions back to 4 base
channels; ``CC``: a residual block (two 3x3 conv + BN with a 1x1 conv + BN
shortcut, then ReLU). As in the official code (9 blocks, transformers in blocks
1 and 6), **one** ViT encoder is shared by all transformer blocks, while each of
them has its own down/up-sampling, embedding and compression layers.

Positional embedding: official ResViT fixes it to the training image size
(16x16 tokens for 256x256). Here it is learned on ``pos_grid`` tokens and
bilinearly resized when the token grid differs (e.g. CPU windows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdm.nets.patchgan import NORMS, init_gan_weights, norm_layer


# ----------------------------------------------------------------------------
# ViT parts (also used by UNest)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product self-attention over tokens (B, N, C).

    ``allowed`` (bool, broadcastable to (B, heads, N, N)): True where query i may
    attend to key j; every query needs at least one allowed key.
    """

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0, proj_dropout: float = 0.0,
                 qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention: hidden size {dim} is not divisible by {heads} heads; choose heads "
                             "that divide the hidden size")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: Tensor, allowed: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class MLP(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerLayer(nn.Module):
    """Pre-norm ViT layer: ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiHeadAttention(dim, heads, attn_dropout, attn_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PositionalEmbedding2d(nn.Module):
    """Learnable positional embedding on a ``grid`` of tokens, bilinearly resized to other grids."""

    def __init__(self, dim: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = tuple(grid)
        self.weight = nn.Parameter(torch.zeros(1, dim, *self.grid))

    def forward(self, h: int, w: int) -> Tensor:
        """(1, h * w, dim) embedding for an h x w token grid (row-major)."""
        pe = self.weight
        if (h, w) != self.grid:
            pe = F.interpolate(pe, size=(h, w), mode="bilinear", align_corners=False)
        return pe.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------
# ResViT


@dataclass
class ResViTNetConfig:
    """Official: base 64, 9 ART blocks with the (shared) transformer in blocks 1 and 6
    (0-based 0 and 5), transformer path channels (512, 1024), ViT-B/16 (hidden 768,
    12 layers, 12 heads, MLP 3072, dropout 0.1, attention dropout 0), batch norm."""

    base: int = 64
    n_blocks: int = 9
    transformer_blocks: tuple[int, ...] = (0, 5)
    vit_channels: tuple[int, int] = (512, 1024)
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.1
    attn_dropout: float = 0.0
    pos_grid: tuple[int, int] = (18, 20)
    norm: str = "batch"

    def validate(self) -> None:
        if self.n_blocks < 1 or self.base < 1:
            raise ValueError(f"ResViTNetConfig: n_blocks and base must be >= 1, got {self.n_blocks}, {self.base}")
        bad = [i for i in self.transformer_blocks if not 0 <= i < self.n_blocks]
        if bad:
            raise ValueError(f"ResViTNetConfig.transformer_blocks {list(self.transformer_blocks)}: indices {bad} are "
                             f"outside 0..{self.n_blocks - 1} (0-based ART block indices)")
        if self.hidden % self.heads:
            raise ValueError(f"ResViTNetConfig: hidden {self.hidden} must be divisible by heads {self.heads}")
        if self.norm not in NORMS:
            raise ValueError(f"ResViTNetConfig.norm: unknown normalisation {self.norm!r}; use one of {NORMS}")


def _conv_norm_relu(c_in: int, c_out: int, norm: str, stride: int = 1, transposed: bool = False) -> list[nn.Module]:
    bias = norm != "batch"
    conv = (nn.ConvTranspose2d(c_in, c_out, 3, 2, 1, output_padding=1, bias=bias) if transposed
            else nn.Conv2d(c_in, c_out, 3, stride, 1, bias=bias))
    return [conv, norm_layer(norm, c_out), nn.ReLU(True)]


class ResnetBlock(nn.Module):
    """``x + [reflect-pad, conv3x3, norm, ReLU, reflect-pad, conv3x3, norm](x)``."""

    def __init__(self, dim: int, norm: str):
        super().__init__()
        bias = norm != "batch"
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm_layer(norm, dim),
                                   nn.ReLU(True), nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias),
                                   norm_layer(norm, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ChannelCompression(nn.Module):
    """Residual compression ``ReLU(conv-norm-ReLU-conv-norm(x) + conv1x1-norm(x))`` from c_in to c_out channels."""

    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        bias = norm != "batch"
        self.block = nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=bias), norm_layer(norm, c_out), nn.ReLU(True),
                                   nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias), norm_layer(norm, c_out))
        self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=bias), norm_layer(norm, c_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.block(x) + self.skip(x))


class ViTEncoder(nn.Module):
    """Transformer layers + final LayerNorm on tokens (B, N, hidden)."""

    def __init__(self, cfg: ResViTNetConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg.hidden, cfg.heads, cfg.mlp_dim, cfg.dropout,
                                                     cfg.attn_dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class ARTBlock(nn.Module):
    """One aggregated residual transformer block; the transformer path exists if ``with_transformer``."""

    def __init__(self, cfg: ResViTNetConfig, with_transformer: bool):
        super().__init__()
        c = 4 * cfg.base
        n = cfg.norm
        self.with_transformer = with_transformer
        if with_transformer:
            c1, c2 = cfg.vit_channels
            self.down = nn.Sequential(*_conv_norm_relu(c, c1, n, stride=2), *_conv_norm_relu(c1, c2, n, stride=2))
            self.embed = nn.Conv2d(c2, cfg.hidden, 1)
            self.pos = PositionalEmbedding2d(cfg.hidden, cfg.pos_grid)
            self.embed_drop = nn.Dropout(cfg.dropout)
            self.up = nn.Sequential(*_conv_norm_relu(cfg.hidden, c1, n, transposed=True),
                                    *_conv_norm_relu(c1, c, n, transposed=True))
            self.compress = ChannelCompression(2 * c, c, n)
        self.residual = ResnetBlock(c, n)

    def forward(self, x: Tensor, transformer: nn.Module | None = None) -> Tensor:
        if self.with_transformer:
            if transformer is None:
                raise ValueError("this ART block has a transformer path: pass the shared ViT encoder")
            z = self.embed(self.down(x))
            b, ch, h, w = z.shape
            tokens = self.embed_drop(z.flatten(2).transpose(1, 2) + self.pos(h, w))
            t = transformer(tokens).transpose(1, 2).reshape(b, ch, h, w)
            x = self.compress(torch.cat([self.up(t), x], dim=1))
        return self.residual(x)


class ResViTGenerator(nn.Module):
    """(B, in_channels, H, W) -> (B, out_channels, H, W) in [-1, 1]; H, W multiples of 16."""

    spatial_multiple = 16

    def __init__(self, in_channels: int, out_channels: int, cfg: ResViTNetConfig | None = None):
        super().__init__()
        cfg = cfg or ResViTNetConfig()
        cfg.validate()
        self.cfg = cfg
        g, n = cfg.base, cfg.norm
        bias = n != "batch"
        self.encoder = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_channels, g, 7, bias=bias), norm_layer(n, g),
                                     nn.ReLU(True), *_conv_norm_relu(g, 2 * g, n, stride=2),
                                     *_conv_norm_relu(2 * g, 4 * g, n, stride=2))
        self.transformer = ViTEncoder(cfg)  # one encoder, shared by every transformer ART block
        self.blocks = nn.ModuleList(ARTBlock(cfg, i in cfg.transformer_blocks) for i in range(cfg.n_blocks))
        self.decoder = nn.Sequential(*_conv_norm_relu(4 * g, 2 * g, n, transposed=True),
                                     *_conv_norm_relu(2 * g, g, n, transposed=True), nn.ReflectionPad2d(3),
                                     nn.Conv2d(g, out_channels, 7), nn.Tanh())
        init_gan_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        f = self.spatial_multiple
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"ResViT: input is {x.shape[-2]}x{x.shape[-1]} pixels; height and width must be "
                             f"multiples of {f} (2 encoder + 2 transformer-path down-samplings): crop or pad")
        x = self.encoder(x)
        for block in self.blocks:
            x = block(x, self.transformer if block.with_transformer else None)
        return self.decoder(x)
