"""Image panels the trainer writes to TensorBoard."""

from __future__ import annotations

import torch
from torch import Tensor


def _to_unit(x: Tensor) -> Tensor:
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


def window_panel(sources: dict[str, Tensor], prediction: Tensor, target: Tensor) -> Tensor:
    """A (1, rows*H, 2*W) image in [0, 1]: one row per source, then the prediction and
    the target; left the window's centre slice, right its MIP over the K slices."""
    rows = []
    for x in [*sources.values(), prediction, target]:
        x = _to_unit(x)  # (K, H, W)
        rows.append(torch.cat([x[x.shape[0] // 2], x.amax(0)], dim=1))
    return torch.cat(rows, dim=0)[None]


__all__ = ["window_panel"]
