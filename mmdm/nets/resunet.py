"""The authors' modality-specific branch network (paper Sec. 2.1, "each built on
Restormer-UNet"), as their public code builds it: a ``ResUnet`` of Restormer
blocks with DENSE 3x3 convolutions, GroupNorm, a time-embedding residual block
after every encoder stage, max-pool down-sampling and a decoder head with nearest
up-sampling and skip concatenation.

Written from the facts in ``shared/reference/reference-implementations.md``
("The authors' branch and fusion blocks, exactly"); the code is this project's.
With the authors' sizes (``base`` 8, ``mult`` (1, 2, 4, 8), GDFN expansion 4,
GroupNorm 8 groups, 5-slice windows) a branch has 2,368,709 parameters
(encoder 1,897,368, head 471,341) besides the shared 128-d time embedding.

Blocks
------
- :class:`DenseMDTA` (channels ``c``): ``GroupNorm(g)``; q, k, v each a 1x1 conv
  then a dense 3x3 conv ``c -> c``; channel attention ``softmax(q k^T) v`` over the
  ``c x c`` channel pairs (pixels flattened). ``attention="global"`` (the
  authors): ONE softmax over all ``c^2`` entries of the raw dot products, no
  normalisation of q and k, no temperature. ``attention="row"``: the original
  Restormer's per-row softmax of L2-normalised q, k scaled by a learnable
  temperature. Output: 1x1 conv, plus the residual. The attention is computed in
  fp32 even under autocast: its logits are sums over every pixel of the window.
  The reshape back keeps the pixel order it flattened with (the authors' code
  restores ``(h w)`` from ``(w h)``; listed as a deviation).
- :class:`DenseGDFN`: ``GroupNorm(g)``; two paths 1x1 ``c -> e c`` then dense 3x3
  ``e c -> e c``; ``GELU(path 1) * path 2``; 1x1 ``e c -> c``; plus the residual.
- :class:`DenseRestormerBlock` ``(c_in -> c_out, g)``: 1x1 conv ``c_in -> c_out``,
  then :class:`DenseMDTA` and :class:`DenseGDFN` (each with its own residual).
  Also the cross-modal fusion's mixing block (``g`` = window).
- :class:`TimeResBlock` ``(c)``: ``GELU -> 3x3 conv -> GroupNorm -> + Linear(GELU(temb))
  -> GELU -> 3x3 conv -> GroupNorm``; no skip around it.

Branch layout (:class:`ResUNet`, channels ``C_i = base * mult[i]``)
-----------------------------------------------------------------
encoder: 1x1 conv ``in -> C_0``; stage ``i = 0..L-2``: ``Block(C_i -> C_{i+1})``,
2x2 max-pool, ``TimeResBlock(C_{i+1})``; every stage output is kept (``C_{i+1}``
channels at ``1/2^{i+1}`` resolution). Head: from the deepest output up,
``Block(2 C_{i+1} or C_{L-1} -> C_i)`` and nearest x2 up-sampling, concatenated
with the next-shallower stage output, ...; finally ``Block(C_0 -> C_0)`` and a 1x1
conv ``C_0 -> out``.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdm.config import ConfigError
from mmdm.nets.embeddings import TimeEmbedding, broadcast_timesteps
from mmdm.nets.restormer import check_spatial_size

ATTENTION_KINDS = ("global", "row")


@dataclass
class ResUNetConfig:
    """Size of the authors' branch network (defaults: their configuration, ``model_c`` 8)."""

    base: int = 8                                # the authors' model_c
    mult: tuple[int, ...] = (1, 2, 4, 8)         # C_i = base * mult[i]; L - 1 down-sampling stages
    ffn_expansion: int = 4                       # GDFN expansion
    groups: int = 8                              # GroupNorm groups of every block (the authors: model_c)
    attention: str = "global"                    # "global" (authors: one softmax over C^2) | "row" (Restormer)
    time_embed_dim: int = 128
    time_freq_dim: int = 32

    def validate(self) -> None:
        """Raise :class:`ConfigError` on sizes the network cannot use."""
        if len(self.mult) < 2:
            raise ConfigError(f"ResUNetConfig.mult: give at least two levels, e.g. (1, 2, 4, 8); got {self.mult}")
        if self.base < 1 or any(m < 1 for m in self.mult) or self.ffn_expansion < 1 or self.groups < 1:
            raise ConfigError("ResUNetConfig: base, mult, ffn_expansion and groups must be >= 1; got "
                              f"base={self.base}, mult={self.mult}, ffn_expansion={self.ffn_expansion}, "
                              f"groups={self.groups}")
        for c in (self.base * m for m in self.mult):
            if c % self.groups:
                raise ConfigError(f"ResUNetConfig: {c} channels (base {self.base} x mult) cannot be split into "
                                  f"{self.groups} GroupNorm groups; choose groups dividing every width")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"ResUNetConfig.attention: unknown {self.attention!r}; use one of {ATTENTION_KINDS}")


def global_channel_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T) v`` with ONE softmax over all ``C x C`` entries (the authors' MDTA).

    ``q, k, v``: ``(B, C, H, W)``; returns ``(B, C, H, W)``. Entry ``(i, j)`` of
    the logits is the dot product over all pixels of channel ``i`` of ``q`` with
    channel ``j`` of ``k``; output channel ``i`` is ``sum_j A_ij v_j``.
    """
    b, c, h, w = q.shape
    q, k, v = (z.reshape(b, c, h * w).float() for z in (q, k, v))
    logits = q @ k.transpose(1, 2)                                   # (B, C, C)
    attn = logits.reshape(b, c * c).softmax(dim=-1).reshape(b, c, c)
    return (attn @ v).reshape(b, c, h, w)


def row_channel_attention(q: Tensor, k: Tensor, v: Tensor, temperature: Tensor) -> Tensor:
    """The original Restormer's single-head channel attention: per-row softmax of the
    L2-normalised (over pixels) ``q k^T`` scaled by ``temperature``; ``(B, C, H, W)``."""
    b, c, h, w = q.shape
    q, k, v = (z.reshape(b, c, h * w).float() for z in (q, k, v))
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(1, 2) * temperature.float()
    return (logits.softmax(dim=-1) @ v).reshape(b, c, h, w)


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """A region where autocast is off on ``device_type`` (a no-op where autocast does not exist, e.g. meta)."""
    if device_type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _conv_pair(c_in: int, c_out: int) -> nn.Sequential:
    """1x1 conv ``c_in -> c_out`` then a dense 3x3 conv ``c_out -> c_out`` (both with bias)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.Conv2d(c_out, c_out, 3, padding=1))


_FUSE = [True]


@contextlib.contextmanager
def unfused_conv_pairs() -> Iterator[None]:
    """Within the block, :func:`conv_pairs` runs every pair as its two convolutions (the reference
    the fused form is tested against, and the authors' FLOP count)."""
    _FUSE.append(False)
    try:
        yield
    finally:
        _FUSE.pop()


def _edge_index(n: int) -> Tensor:
    """Row (or column) ``i`` of an ``n``-long axis -> its row in a ``min(n, 3)``-long edge pattern:
    0 for the first, the last for the last, 1 in between."""
    idx = torch.ones(n, dtype=torch.long)
    idx[0], idx[-1] = 0, min(n, 3) - 1
    return idx


def _compose(pairs: Sequence[nn.Sequential], h: int, w: int) -> tuple[Tensor, Tensor]:
    """The composed 3x3 weight of :func:`conv_pairs` and its bias on a ``min(h, 3) x min(w, 3)`` image."""
    with no_autocast(pairs[0][0].weight.device.type):
        weights, biases = [], []
        for p in pairs:
            c1, c3 = p[0], p[1]
            dt = torch.promote_types(c1.weight.dtype, torch.float32)       # fp32, or fp64 weights as they are
            w1 = c1.weight.to(dt).flatten(1)                               # (m, i)
            w3 = c3.weight.to(dt)                                           # (o, m, 3, 3)
            weights.append(torch.einsum("omuv,mi->oiuv", w3, w1))
            b1 = c1.bias.to(dt).view(1, -1, 1, 1).expand(1, -1, min(h, 3), min(w, 3))
            biases.append(F.conv2d(b1, w3, c3.bias.to(dt), padding=1)[0])   # (o, <=3, <=3)
        return torch.cat(weights), torch.cat(biases)


#: Composed weights kept between calls while gradients are off (sampling calls every network tens of
#: times per window with the same weights), per first pair of a :func:`conv_pairs` call.
_COMPOSED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, Tensor, Tensor]] = weakref.WeakKeyDictionary()


def _weights_stamp(pairs: Sequence[nn.Sequential], h: int, w: int) -> tuple[Any, ...]:
    """What the composed weights depend on: the pairs, the edge pattern's size, and every weight and
    bias tensor's storage and version counter (which any in-place change -- an optimiser step,
    ``load_state_dict``, an EMA swap -- advances)."""
    tensors = [t for p in pairs for conv in (p[0], p[1]) for t in (conv.weight, conv.bias)]
    return (tuple(id(p) for p in pairs), min(h, 3), min(w, 3),
            tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))


def _composed(pairs: Sequence[nn.Sequential], h: int, w: int) -> tuple[Tensor, Tensor]:
    """:func:`_compose`, reused from the last call of the same pairs while gradients are off and
    nothing it depends on (:func:`_weights_stamp`) has changed; with gradients on, made afresh (so
    that they reach the parameters)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _compose(pairs, h, w)
    stamp = _weights_stamp(pairs, h, w)
    hit = _COMPOSED.get(pairs[0])
    if hit is None or hit[0] != stamp:
        hit = (stamp, *_compose(pairs, h, w))
        _COMPOSED[pairs[0]] = hit
    return hit[1], hit[2]


def conv_pairs(pairs: Sequence[nn.Sequential], x: Tensor) -> Tensor:
    """``cat([pair(x) for pair in pairs], dim=1)`` for :func:`_conv_pair` pairs reading the same ``x``.

    Fused (the default): a 1x1 conv ``W1 x + b1`` followed by a zero-padded 3x3 conv ``W3`` is one
    3x3 conv of ``x`` with the composed weight ``W3[:, :, u, v] @ W1`` (``x``'s zero padding is the
    1x1 output's padding but for ``b1``), plus a bias that is ``b3 + sum_uv W3[:, :, u, v] b1``
    inside and lacks the taps that fall off the image on the first and last rows and columns.
    That bias depends only on whether a pixel lies on the first, a middle or the last row and
    column, so it is computed on a 3x3 image; the inner value is the convolution's bias and the
    border rows and columns get the difference added. The result equals the two convolutions up
    to floating-point rounding; for the GDFN's ``c -> 4c`` pairs it costs ``36 c^2`` instead of
    ``148 c^2`` multiply-adds per pixel. With gradients on, the composed weight is made (fp32) from the
    parameters at every call, so gradients reach ``W1, b1, W3, b3`` as through the two convolutions;
    with gradients off it is kept until a parameter changes (:func:`_composed`).
    """
    if not _FUSE[-1]:
        return torch.cat([p(x) for p in pairs], dim=1)
    h, w = x.shape[-2:]
    weight, edge = _composed(pairs, h, w)
    if h < 3 or w < 3:  # no inner pixels to speak of: the whole bias map
        bias = edge[:, _edge_index(h).to(x.device)][:, :, _edge_index(w).to(x.device)]
        out = F.conv2d(x, weight.to(x.dtype), None, padding=1)
        return out + bias.to(out.dtype)
    out = F.conv2d(x, weight.to(x.dtype), edge[:, 1, 1].to(x.dtype), padding=1)
    diff = (edge - edge[:, 1:2, 1:2]).to(out.dtype)                         # 0 at [1, 1]
    cols = _edge_index(w).to(x.device)
    return _AddBorder.apply(out, diff[:, 0, cols], diff[:, 2, cols], diff[:, 1, 0:1], diff[:, 1, 2:3])


class _AddBorder(torch.autograd.Function):
    """``out`` (B, O, H, W) plus ``top``/``bottom`` (O, W) on its first/last row and ``left``/``right``
    (O, 1) on its first/last column between them, in place. Autograd's own in-place ops on views
    would copy the whole gradient once per view; here the gradient passes through untouched and
    the four corrections get its sums over the batch on their rows and columns."""

    @staticmethod
    def forward(ctx, out: Tensor, top: Tensor, bottom: Tensor, left: Tensor, right: Tensor) -> Tensor:
        ctx.mark_dirty(out)
        out[:, :, 0, :] += top
        out[:, :, -1, :] += bottom
        out[:, :, 1:-1, 0] += left
        out[:, :, 1:-1, -1] += right
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return (g, g[:, :, 0, :].sum(0), g[:, :, -1, :].sum(0), g[:, :, 1:-1, 0].sum((0, 2)).unsqueeze(1),
                g[:, :, 1:-1, -1].sum((0, 2)).unsqueeze(1))


class DenseMDTA(nn.Module):
    """The authors' MDTA: dense 3x3 q/k/v convolutions, channel attention, 1x1 out, residual."""

    def __init__(self, c: int, groups: int, attention: str = "global"):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ConfigError(f"DenseMDTA: unknown attention {attention!r}; use one of {ATTENTION_KINDS}")
        self.attention = attention
        self.norm = nn.GroupNorm(groups, c)
        self.q, self.k, self.v = _conv_pair(c, c), _conv_pair(c, c), _conv_pair(c, c)
        self.temperature = nn.Parameter(torch.ones(1)) if attention == "row" else None
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = conv_pairs((self.q, self.k, self.v), h).chunk(3, dim=1)
        # fp32 on purpose: the logits sum over every pixel and saturate the softmax in bf16
        with no_autocast(x.device.type):
            if self.temperature is None:
                a = global_channel_attention(q, k, v)
            else:
                a = row_channel_attention(q, k, v, self.temperature)
        return x + self.out(a.to(v.dtype))


class DenseGDFN(nn.Module):
    """The authors' GDFN: two 1x1 + dense 3x3 paths of ``e c`` channels, gated by GELU, 1x1 back, residual."""

    def __init__(self, c: int, groups: int, expansion: int = 4):
        super().__init__()
        hidden = c * expansion
        self.norm = nn.GroupNorm(groups, c)
        self.gate, self.value = _conv_pair(c, hidden), _conv_pair(c, hidden)
        self.out = nn.Conv2d(hidden, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = conv_pairs((self.gate, self.value), self.norm(x)).chunk(2, dim=1)
        return x + self.out(F.gelu(gate) * value)


class DenseRestormerBlock(nn.Module):
    """``(c_in -> c_out)``: 1x1 conv, then :class:`DenseMDTA` and :class:`DenseGDFN` at ``c_out``."""

    def __init__(self, c_in: int, c_out: int, groups: int, expansion: int = 4, attention: str = "global"):
        super().__init__()
        if c_out % groups:
            raise ConfigError(f"DenseRestormerBlock: {c_out} output channels cannot be split into {groups} "
                              "GroupNorm groups")
        self.proj = nn.Conv2d(c_in, c_out, 1)
        self.attn = DenseMDTA(c_out, groups, attention)
        self.ffn = DenseGDFN(c_out, groups, expansion)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(self.attn(self.proj(x)))


class TimeResBlock(nn.Module):
    """``GELU -> conv3x3 -> GN -> + Linear(GELU(temb)) -> GELU -> conv3x3 -> GN`` (no skip)."""

    def __init__(self, c: int, groups: int, temb_dim: int):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c)
        self.time = nn.Linear(temb_dim, c)
        self.conv2, self.norm2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.norm1(self.conv1(F.gelu(x))) + self.time(F.gelu(temb))[:, :, None, None]
        return self.norm2(self.conv2(F.gelu(h)))


class ResUNet(nn.Module):
    """The authors' branch: ``(B, in, H, W), t (B,) -> (B, out, H, W)``.

    ``time_embed``: a :class:`TimeEmbedding` shared with other networks (the
    authors share one across all branches and the fusion UNet); None builds one.
    ``H`` and ``W`` must be multiples of ``2 ** (len(cfg.mult) - 1)``.
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: ResUNetConfig | None = None,
                 time_embed: TimeEmbedding | None = None):
        super().__init__()
        cfg = cfg or ResUNetConfig()
        cfg.validate()
        self.cfg, self.in_channels, self.out_channels = cfg, in_channels, out_channels
        self.time_embed = time_embed if time_embed is not None else TimeEmbedding(cfg.time_freq_dim,
                                                                                  cfg.time_embed_dim)
        chs = [cfg.base * m for m in cfg.mult]
        self.levels = len(chs)
        block = dict(groups=cfg.groups, expansion=cfg.ffn_expansion, attention=cfg.attention)
        self.conv_in = nn.Conv2d(in_channels, chs[0], 1)
        self.enc_blocks = nn.ModuleList(DenseRestormerBlock(chs[i], chs[i + 1], **block)
                                        for i in range(self.levels - 1))
        self.enc_time = nn.ModuleList(TimeResBlock(chs[i + 1], cfg.groups, cfg.time_embed_dim)
                                      for i in range(self.levels - 1))
        # head: deepest stage C_{L-1} -> C_{L-2}; then (2 C_i -> C_{i-1}) after each concatenation
        head_in = [chs[-1]] + [2 * chs[i] for i in range(self.levels - 2, 0, -1)]
        head_out = [chs[i] for i in range(self.levels - 2, -1, -1)]
        self.head_blocks = nn.ModuleList(DenseRestormerBlock(ci, co, **block) for ci, co in zip(head_in, head_out))
        self.final_block = DenseRestormerBlock(chs[0], chs[0], **block)
        self.conv_out = nn.Conv2d(chs[0], out_channels, 1)

    def encoder_modules(self) -> list[nn.Module]:
        """The encoder's modules (for per-part parameter counts)."""
        return [self.conv_in, self.enc_blocks, self.enc_time]

    def head_modules(self) -> list[nn.Module]:
        """The decoder head's modules (for per-part parameter counts)."""
        return [self.head_blocks, self.final_block, self.conv_out]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResUNet: expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        check_spatial_size(x.shape[2], x.shape[3], self.levels, "ResUNet")
        temb = self.time_embed(broadcast_timesteps(t, x.shape[0], x.device))
        h = self.conv_in(x)
        skips = []
        for block, time in zip(self.enc_blocks, self.enc_time):
            h = time(F.max_pool2d(block(h), 2), temb)
            skips.append(h)
        h = skips.pop()
        for i, block in enumerate(self.head_blocks):
            h = F.interpolate(block(h), scale_factor=2, mode="nearest")
            if skips:
                h = torch.cat([h, skips.pop()], dim=1)
        return self.conv_out(self.final_block(h))

