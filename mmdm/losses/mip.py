"""The MIP loss along the slice axis of a 2.5D window (paper section 2.2, eqs. (5)-(6)).

A window of N adjacent slices (N = K = 5 in the paper) is projected
cumulatively: projection ``i`` is the maximum of slices ``0..i`` (eq. (5)).
The target side uses the hard maximum; the prediction side uses a
Gumbel-softmax relaxation (eq. (6)) so that gradients reach every slice, not
only the arg-max. The loss compares both directions: projecting from the
first slice and from the last slice (the paper's ``x^r_MIP``).

Reading of eq. (6) used here (the printed formula is garbled): for every
``i``, a softmax over the slices ``j = 0..i`` of ``(x_j + g_j) / tau``, with one
Gumbel draw ``g`` per voxel and slice shared by all ``i``, gives weights that
sum to 1; projection ``i`` is the weighted sum of those slices. As ``tau -> 0``
the weights become one-hot on the noisy arg-max.

The whole-volume axial MIP used for evaluation is not this; it lives in
:mod:`mmdm.metrics`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_dim(x: Tensor, dim: int) -> int:
    if x.ndim < 1:
        raise ValueError("the MIP needs a tensor with a slice axis, got a scalar")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"slice axis dim={dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.ndim


def cumulative_max(x: Tensor, dim: int = 1, reverse: bool = False) -> Tensor:
    """Hard cumulative MIP along ``dim`` (eq. (5)).

    Slice ``i`` of the result is ``max(x[0..i])``; with ``reverse=True`` it is
    ``max(x[i..N-1])`` (the projection from the other end, returned in the
    original slice order).
    """
    dim = _check_dim(x, dim)
    if reverse:
        return torch.cummax(x.flip(dim), dim).values.flip(dim)
    return torch.cummax(x, dim).values


def gumbel_noise(shape: torch.Size | tuple[int, ...], like: Tensor,
                 generator: torch.Generator | None = None, eps: float = 1e-20) -> Tensor:
    """Standard Gumbel noise ``-log(-log(u + eps) + eps)``, ``u ~ U(0, 1)`` (eq. (6)).

    Drawn in float32 (float64 for float64 inputs) so that ``eps = 1e-20`` is
    representable, on the generator's device, then cast to ``like``.
    """
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    g = -torch.log(-torch.log(u + eps) + eps)
    return g.to(device=like.device, dtype=like.dtype)


def gumbel_cumulative_mip(x: Tensor, tau: float = 0.75, dim: int = 1, reverse: bool = False,
                          generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """Soft cumulative MIP with Gumbel-softmax weights (eq. (6)).

    ``out[i] = sum_{j<=i} softmax_j((x_j + g_j) / tau) x_j`` along ``dim``
    (``j >= i`` with ``reverse=True``). ``noise`` may supply the Gumbel draw
    ``g`` (shaped like ``x``); otherwise it is drawn with ``generator``.
    Computed as a running softmax along ``dim`` (one pass over the slices).
    """
    if tau <= 0:
        raise ValueError(f"the Gumbel-softmax temperature tau must be > 0, got {tau}")
    dim = _check_dim(x, dim)
    n = x.shape[dim]
    g = gumbel_noise(x.shape, x, generator) if noise is None else noise
    if g.shape != x.shape:
        raise ValueError(f"Gumbel noise of shape {tuple(g.shape)} does not match x of shape {tuple(x.shape)}")
    # The softmax over j <= i (j >= i reversed) for every i at once, as a running ("online")
    # softmax along the slices: with m the running maximum of the logits l_j seen so far,
    # s = sum exp(l_j - m) and a = sum exp(l_j - m) x_j, out_i = a / s. Equal to the masked N x N
    # softmax up to rounding, and it touches each slice once. m only keeps exp() in range (it
    # cancels in a / s), so it carries no gradient.
    logits = (x + g) / tau
    order = range(n - 1, -1, -1) if reverse else range(n)
    outs: list[Tensor] = [x] * n
    m = s = a = None
    for i in order:
        li, xi = logits.select(dim, i), x.select(dim, i)
        if m is None:
            m = li.detach()
            s = torch.exp(li - m)  # 1, with the gradient of slice i's weight in the later rows
            a = s * xi
        else:
            m_new = torch.maximum(m, li.detach())
            decay, e = torch.exp(m - m_new), torch.exp(li - m_new)
            s, a, m = s * decay + e, a * decay + e * xi, m_new
        outs[i] = a / s
    return torch.stack(outs, dim)


def _mse(a: Tensor, b: Tensor, reduction: str) -> Tensor:
    err = (a - b).pow(2)
    if reduction == "mean":
        return err.mean()
    if reduction == "none":
        return err.flatten(1).mean(1) if err.ndim > 1 else err
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'none' (per-sample, shape (B,))")


def mip_loss(pred: Tensor, target: Tensor, tau: float = 0.75, dim: int = 1, reduction: str = "mean",
             generator: torch.Generator | None = None, gumbel: bool = True, noise_scale: float = 1.0) -> Tensor:
    """``L_MIP`` (section 2.2): MSE of the forward plus MSE of the reverse cumulative MIP.

    The prediction is projected with :func:`gumbel_cumulative_mip` (independent
    Gumbel draws for the two directions), the target with :func:`cumulative_max`.
    ``reduction="none"`` returns one value per sample (mean over all other axes).

    Note: the Gumbel noise has unit scale while intensities lie in [-1, 1], so
    the noisy soft maximum often picks a slice that is not the brightest; hence
    ``L_MIP(x, x) > 0`` in expectation and its minimiser is not ``pred = target``
    exactly. ``gumbel=False`` drops the noise (plain softmax relaxation), an
    option the paper does not have; ``noise_scale`` multiplies the standard
    Gumbel draw (1: the paper; 0 equals ``gumbel=False``), so the noise can be
    set against the intensity range without changing ``tau``.
    """
    if not noise_scale >= 0:
        raise ValueError(f"mip_loss: noise_scale must be >= 0, got {noise_scale}")
    if pred.shape != target.shape:
        raise ValueError(f"mip_loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    total = None
    for rev in (False, True):
        if not gumbel or noise_scale == 0:
            noise = torch.zeros_like(pred)
        else:
            noise = gumbel_noise(pred.shape, pred, generator)
            noise = noise if noise_scale == 1 else noise * noise_scale
        soft = gumbel_cumulative_mip(pred, tau, dim, reverse=rev, generator=generator, noise=noise)
        hard = cumulative_max(target, dim, reverse=rev)
        term = _mse(soft, hard, reduction)
        total = term if total is None else total + term
    return total
