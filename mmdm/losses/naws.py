"""Noise-adaptive weighting strategy, NAWS (paper section 2.3, eqs. (8)-(11)).

Each of the M + 1 predictions gets a Gaussian likelihood (eqs. (8)-(9)): the
fused prediction with variance ``sigma_0^2`` (model bias only) and branch
``m`` with ``sigma_m^2 + delta_t`` (model bias plus the bridge noise of its
input x_t^m, the data bias). Following the authors' code the learnable
variances are parameterised as squares, ``sigma_i^2 = p_i^2``, with every
``p_i`` initialised to 1; so ``a_0 = p_0^2`` and ``a_m = p_m^2 + delta_t``.

Eq. (11), per sample ``s`` of the batch::

    total_s = L_0[s] / (2 a_0) + sum_m L_m[s] / (2 a_m[s]) + C[s]
    C[s]    = log(1 + a_0) + sum_m log(1 + a_m[s])

and the returned loss is the mean of ``total_s`` over the batch. With
``per_sample=True`` (default, the paper) ``a_m[s]`` uses each sample's own
``delta_t``; with ``per_sample=False`` every sample uses the first sample's
``delta_t``, which is what the authors' code does (it then equals
``L_0 / (2 a_0) + sum_m L_m / (2 a_m) + C`` with batch-mean losses).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class NAWS(nn.Module):
    """Learnable loss weighting of eq. (11) for one fused and ``n_modalities`` branch losses."""

    def __init__(self, n_modalities: int, names: Sequence[str] | None = None, per_sample: bool = True,
                 init: float = 1.0):
        super().__init__()
        if n_modalities < 1:
            raise ValueError(f"NAWS needs at least one modality branch, got n_modalities={n_modalities}")
        names = list(names) if names is not None else [f"m{i}" for i in range(n_modalities)]
        if len(names) != n_modalities:
            raise ValueError(f"NAWS: {len(names)} names given for {n_modalities} modalities")
        self.names = names
        self.per_sample = per_sample
        self.p0 = nn.Parameter(torch.tensor(float(init)))
        self.pm = nn.Parameter(torch.full((n_modalities,), float(init)))

    def forward(self, fused_loss: Tensor, branch_losses: Tensor, delta_t: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. (11): ``fused_loss`` (B,), ``branch_losses`` (B, M), ``delta_t`` (B,) -> (loss, weights).

        ``weights`` holds detached batch means of the effective weights
        ``1 / (2 a_i)`` (keys ``w_fused`` and ``w_<name>``) and of ``C`` (``C``).
        """
        if fused_loss.ndim != 1:
            raise ValueError(f"NAWS expects per-sample fused losses of shape (B,), got {tuple(fused_loss.shape)}")
        b = fused_loss.shape[0]
        if branch_losses.shape != (b, self.pm.numel()):
            raise ValueError(f"NAWS expects branch losses of shape (B, M) = ({b}, {self.pm.numel()}), "
                             f"got {tuple(branch_losses.shape)}")
        delta = delta_t.reshape(-1).to(device=fused_loss.device, dtype=fused_loss.dtype)
        if delta.shape[0] != b:
            raise ValueError(f"NAWS expects one delta_t per sample ({b}), got {delta.shape[0]}")
        if not self.per_sample:
            delta = delta[:1].expand(b)
        a0 = self.p0.pow(2)
        am = self.pm.pow(2)[None, :] + delta[:, None]  # (B, M)
        w0 = 0.5 / a0
        wm = 0.5 / am
        c = torch.log1p(a0) + torch.log1p(am).sum(1)  # (B,)
        per_sample = w0 * fused_loss + (wm * branch_losses).sum(1) + c
        weights = {"w_fused": w0.detach().expand(b).mean(), "C": c.detach().mean()}
        for i, name in enumerate(self.names):
            weights[f"w_{name}"] = wm[:, i].detach().mean()
        return per_sample.mean(), weights

    def extra_repr(self) -> str:
        return f"modalities={self.names}, per_sample={self.per_sample}"
