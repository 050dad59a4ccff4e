"""Diffusion-timestep embedding shared by every network of the study.

The timestep ``t`` of the Brownian bridge (eqs. 1-3 of the paper, ``t`` in
``[0, T)`` step units) enters each network as a sinusoidal code followed by a
two-layer MLP, as in DDPM / BBDM and in the authors' MMDM code:
``sinusoidal(freq_dim) -> Linear(freq_dim, embed_dim) -> SiLU -> Linear(embed_dim, embed_dim)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal code of timesteps ``t`` (shape ``(B,)``) -> ``(B, dim)``.

    With ``half = dim // 2`` and frequencies ``f_i = max_period ** (-i / half)``
    for ``i = 0..half-1``, the code is ``[cos(t f_0..f_{half-1}), sin(t f_0..f_{half-1})]``
    (the guided-diffusion / BBDM ordering); an odd ``dim`` gets one trailing zero.
    ``t`` may be integer or float and is used in step units (not rescaled to [0, 1]).
    """
    if dim < 2:
        raise ValueError(f"timestep_embedding: dim must be >= 2, got {dim}")
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: expected t of shape (B,), got {tuple(t.shape)}; "
                         "pass one timestep per sample")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


def broadcast_timesteps(t: Tensor | int | float, batch: int, device: torch.device) -> Tensor:
    """Return ``t`` as a ``(batch,)`` tensor; a scalar is repeated, a wrong length raises."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"expected one timestep per sample, t of shape ({batch},); got {tuple(t.shape)}")
    return t


class TimeEmbedding(nn.Module):
    """``sinusoidal(freq_dim) -> Linear -> SiLU -> Linear(embed_dim)``; ``(B,) -> (B, embed_dim)``."""

    def __init__(self, freq_dim: int = 32, embed_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))
