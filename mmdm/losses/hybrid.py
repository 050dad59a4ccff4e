"""The hybrid loss of one prediction (paper eq. (7)): ``L_hyb = L_MIP + L_MSE``."""

from __future__ import annotations

import torch
from torch import Tensor

from mmdm.losses.emphasis import weighted_mse
from mmdm.losses.mip import _mse, mip_loss


def hybrid_loss(pred: Tensor, target: Tensor, use_mip: bool = True, tau: float = 0.75, dim: int = 1,
                reduction: str = "mean", generator: torch.Generator | None = None, gumbel: bool = True,
                weights: Tensor | None = None, noise_scale: float = 1.0) -> Tensor:
    """Eq. (7): ``MSE(pred, target) + L_MIP(pred, target)``, equal weights (as the authors' code).

    With ``use_mip=False`` only the MSE remains (the ablation "MMDM" base and
    "+NAWS" rows of Table 2). ``reduction="none"`` gives one value per sample
    (B,), which NAWS needs; ``"mean"`` gives the batch mean. ``gumbel``: see
    :func:`mmdm.losses.mip.mip_loss`, as ``noise_scale``. ``weights``: a vessel-emphasis map
    (:func:`mmdm.losses.emphasis.emphasis_weights`) on the MSE part only; the MIP
    term is left as the paper defines it.
    """
    if pred.shape != target.shape:
        raise ValueError(f"hybrid_loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                         "differ in shape")
    loss = _mse(pred, target, reduction) if weights is None else weighted_mse(pred, target, weights, reduction)
    if use_mip:
        loss = loss + mip_loss(pred, target, tau=tau, dim=dim, reduction=reduction, generator=generator,
                             gumbel=gumbel, noise_scale=noise_scale)
    return loss
