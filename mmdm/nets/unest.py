"""UNest generator (Phan et al., MICCAI 2024, "Structural attention"): a UNETR with structural attention.

Encoder: a ViT on ``patch_size`` x ``patch_size`` patch tokens (conv patch
embedding + learnable positional embedding). Every layer routes attention by a
foreground mask on the token grid (:func:`structural_masks`):

* a foreground token attends to **all foreground tokens** of the image (global
  attention restricted to the foreground);
* a background token attends only to the tokens of its **local window**
  (``window`` x ``window`` tokens; odd layers shift the window grid by
  ``window // 2``, as in Swin's shifted windows);

both paths are pre-norm multi-head attentions with their own weights; each
token keeps the output of its own path, then a shared pre-norm MLP follows
(``x + MLP(LN(x))``).

Mask head: convolutions on the token grid of the patch embedding predict the
foreground mask (logits, trained with BCE by the method). Routing uses a given
token mask (training) or the head's prediction thresholded at
``mask_threshold`` (official ``fth`` = 0.5) when none is given.

Decoder (UNETR): the hidden states of layers ``l * layers // n`` (n = log2(patch
size), l = 1..n-1) are projected and up-sampled to 1/2^l resolution
(transposed 2x2 convolutions + residual conv blocks), the input itself feeds a
full-resolution residual conv block, and the last layer's tokens are decoded
by up-sampling blocks (transposed conv, concatenation with the skip feature,
residual conv block) to full resolution; a reflection-padded ``out_kernel``
convolution and tanh give the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmdm.nets.patchgan import NORMS, init_gan_weights, norm_layer
from mmdm.nets.resvit import MLP, MultiHeadAttention, PositionalEmbedding2d


@dataclass
class UNestNetConfig:
    """Official defaults: patch 16, hidden 768, 4 layers (``--depth 4``), 12 heads, MLP 3072,
    dropout 0, local window 2 tokens, feature size 16, mask head (32, 64, 128),
    foreground threshold 0.5, output kernel 7, instance norm, no qkv bias."""

    patch_size: int = 16
    hidden: int = 768
    layers: int = 4
    heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.0
    window: int = 2
    shift_alternate: bool = True
    feature_size: int = 16
    mask_channels: tuple[int, ...] = (32, 64, 128)
    mask_threshold: float = 0.5
    out_kernel: int = 7
    pos_grid: tuple[int, int] = (18, 20)
    norm: str = "instance"
    qkv_bias: bool = False

    def validate(self) -> None:
        p = self.patch_size
        if p < 2 or p & (p - 1):
            raise ValueError(f"UNestNetConfig.patch_size must be a power of 2 >= 2 (UNETR up-sampling), got {p}")
        if self.hidden % self.heads:
            raise ValueError(f"UNestNetConfig: hidden {self.hidden} must be divisible by heads {self.heads}")
        if self.layers < 1 or self.window < 1:
            raise ValueError(f"UNestNetConfig: layers and window must be >= 1, got {self.layers}, {self.window}")
        if self.norm not in NORMS:
            raise ValueError(f"UNestNetConfig.norm: unknown normalisation {self.norm!r}; use one of {NORMS}")
        if self.out_kernel % 2 != 1:
            raise ValueError(f"UNestNetConfig.out_kernel must be odd, got {self.out_kernel}")


# ----------------------------------------------------------------------------
# structural attention


def window_ids(h: int, w: int, window: int, shift: int = 0, device: torch.device | None = None) -> Tensor:
    """Local-window index of each token of an h x w grid (row-major, (h*w,)).

    The window grid starts ``shift`` tokens in (Swin's shifted windows): token
    (r, c) is in window ``((r - shift) // window, (c - shift) // window)`` (floor
    division); windows at the border are partial, which gives the same groups as
    Swin's cyclic shift with its attention mask.
    """
    off = window - shift  # keeps the indices non-negative
    r = (torch.arange(h, device=device) + off) // window
    c = (torch.arange(w, device=device) + off) // window
    n_c = (w - 1 + off) // window + 1
    return (r[:, None] * n_c + c[None, :]).flatten()


def structural_masks(fg: Tensor, h: int, w: int, window: int, shift: int = 0) -> tuple[Tensor, Tensor]:
    """Boolean "may attend" masks for foreground tokens ``fg`` (B, h*w).

    Returns ``(global_allowed (B, 1, N, N), local_allowed (1, 1, N, N))``. A
    foreground query may attend to foreground keys only; a background query is
    unrestricted in the global mask (its global output is discarded, but every
    row needs one allowed key); the local mask allows keys in the same window.
    """
    fg = fg.bool()
    global_allowed = (fg[:, None, :] | ~fg[:, :, None])[:, None]
    ids = window_ids(h, w, window, shift, fg.device)
    local_allowed = (ids[:, None] == ids[None, :])[None, None]
    return global_allowed, local_allowed


class StructuralTransformerLayer(nn.Module):
    """``x + where(fg, MHSA_global(LN(x)), MHSA_local(LN(x)))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0, qkv_bias: bool = False):
        super().__init__()
        self.norm_global = nn.LayerNorm(dim)
        self.attn_global = MultiHeadAttention(dim, heads, dropout, dropout, qkv_bias)
        self.norm_local = nn.LayerNorm(dim)
        self.attn_local = MultiHeadAttention(dim, heads, dropout, dropout, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x: Tensor, fg: Tensor, global_allowed: Tensor, local_allowed: Tensor) -> Tensor:
        g = self.attn_global(self.norm_global(x), global_allowed)
        loc = self.attn_local(self.norm_local(x), local_allowed)
        x = x + torch.where(fg[..., None], g, loc)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------
# UNETR blocks


class ResConvBlock(nn.Module):
    """``LeakyReLU(conv-norm-LeakyReLU-conv-norm(x) + shortcut(x))``; shortcut = 1x1 conv + norm if channels change."""

    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), norm_layer(norm, c_out),
                                   nn.LeakyReLU(0.01, True), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                                   norm_layer(norm, c_out))
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), norm_layer(norm, c_out))
                     if c_in != c_out else nn.Identity())
        self.act = nn.LeakyReLU(0.01, True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.block(x) + self.skip(x))


def _up(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(c_in, c_out, 2, 2, bias=False)


class ProjectionUp(nn.Module):
    """Tokens (B, hidden, h, w) -> (B, c, h * 2^n, w * 2^n): one up-sampling, then n-1 x (up-sampling + res block)."""

    def __init__(self, hidden: int, c: int, n: int, norm: str):
        super().__init__()
        layers: list[nn.Module] = [_up(hidden, c)]
        for _ in range(n - 1):
            layers += [_up(c, c), ResConvBlock(c, c, norm)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class UpBlock(nn.Module):
    """Up-sample x2, concatenate the skip feature, residual conv block."""

    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        self.up = _up(c_in, c_out)
        self.block = ResConvBlock(2 * c_out, c_out, norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class UNestGenerator(nn.Module):
    """(B, in_channels, H, W) -> (output (B, out_channels, H, W) in [-1, 1], mask logits (B, 1, H/p, W/p))."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNestNetConfig | None = None):
        super().__init__()
        cfg = cfg or UNestNetConfig()
        cfg.validate()
        self.cfg = cfg
        p, hid, fs, nm = cfg.patch_size, cfg.hidden, cfg.feature_size, cfg.norm
        self.levels = int(math.log2(p))
        self.spatial_multiple = p
        self.patch_embed = nn.Conv2d(in_channels, hid, p, p)
        self.pos = PositionalEmbedding2d(hid, cfg.pos_grid)
        self.embed_drop = nn.Dropout(cfg.dropout)
        chans = [hid, *cfg.mask_channels]
        head: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            head += [nn.Conv2d(a, b, 3, 1, 1), norm_layer(nm, b), nn.LeakyReLU(0.01, True)]
        head.append(nn.Conv2d(chans[-1], 1, 1))
        self.mask_head = nn.Sequential(*head)
        self.layers = nn.ModuleList(StructuralTransformerLayer(hid, cfg.heads, cfg.mlp_dim, cfg.dropout, cfg.qkv_bias)
                                    for _ in range(cfg.layers))
        self.shifts = [cfg.window // 2 if (cfg.shift_alternate and i % 2) else 0 for i in range(cfg.layers)]
        self.norm = nn.LayerNorm(hid)
        n = self.levels
        #: hidden-state index feeding the skip at 1/2^l resolution, l = 1..n-1
        self.skip_layers = [(lv * cfg.layers) // n for lv in range(1, n)]
        self.stem = ResConvBlock(in_channels, fs, nm)
        self.skips = nn.ModuleList(ProjectionUp(hid, fs * 2 ** lv, n - lv, nm) for lv in range(1, n))
        self.ups = nn.ModuleList(UpBlock(hid if lv == n - 1 else fs * 2 ** (lv + 1), fs * 2 ** lv, nm)
                                 for lv in range(n - 1, -1, -1))
        k = cfg.out_kernel
        self.out = nn.Sequential(nn.ReflectionPad2d(k // 2), nn.Conv2d(fs, out_channels, k), nn.Tanh())
        init_gan_weights(self)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``token_mask`` (B, 1, H/p, W/p), 1 = foreground; None routes by the mask head's prediction."""
        p = self.spatial_multiple
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"UNest: input is {x.shape[-2]}x{x.shape[-1]} pixels; height and width must be "
                             f"multiples of the patch size {p}: crop/pad the windows or change patch_size")
        z = self.patch_embed(x)
        b, c, h, w = z.shape
        mask_logits = self.mask_head(z)
        if token_mask is None:
            token_mask = (torch.sigmoid(mask_logits) > self.cfg.mask_threshold).float()
        elif token_mask.shape != (b, 1, h, w):
            raise ValueError(f"UNest: token mask has shape {tuple(token_mask.shape)}, expected {(b, 1, h, w)} "
                             "(the patch-token grid)")
        fg = token_mask.detach().flatten(1) > 0.5
        tokens = self.embed_drop(z.flatten(2).transpose(1, 2) + self.pos(h, w))
        masks = {s: structural_masks(fg, h, w, self.cfg.window, s) for s in set(self.shifts)}
        hidden = []
        for layer, s in zip(self.layers, self.shifts):
            tokens = layer(tokens, fg, *masks[s])
            hidden.append(tokens)

        def grid(t: Tensor) -> Tensor:
            return t.transpose(1, 2).reshape(b, c, h, w)

        skips = [self.stem(x)] + [proj(grid(hidden[i])) for proj, i in zip(self.skips, self.skip_layers)]
        y = grid(self.norm(tokens))
        for up, skip in zip(self.ups, reversed(skips)):
            y = up(y, skip)
        return self.out(y), mask_logits
