"""Learnable multi-modal gating: how the comparison methods see several sources.

The paper: "ResViT incorporates multi-modal inputs, whereas we employ a gating
strategy to integrate multi-modal data as input for other comparison methods."
It does not say which gating. This module is the study's choice, used by every
baseline except ResViT:

    logits = conv3x3(SiLU(conv3x3(cat(x^1, ..., x^M))))      (B, M*K, H, W)
    g      = softmax over m of logits.view(B, M, K, H, W)     per modality, pixel and slice
    out    = sum_m g_m * x^m                                  (B, K, H, W)

The last convolution starts at zero, so training starts from the plain mean of
the modalities. Gates are a convex combination: they sum to one over the
modalities at every pixel, so the output stays in the sources' intensity range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn


@dataclass
class GatingConfig:
    hidden: int = 32  # channels of the gate network's hidden layer
    kernel: int = 3


class ModalityGating(nn.Module):
    """Fuse M source windows (B, K, H, W) into one conditioning window with softmax gates."""

    def __init__(self, n_modalities: int, window: int, cfg: GatingConfig | None = None):
        super().__init__()
        cfg = cfg or GatingConfig()
        if n_modalities < 1:
            raise ValueError("gating needs at least one source modality")
        self.n_modalities, self.window = n_modalities, window
        c = n_modalities * window
        pad = cfg.kernel // 2
        self.net = nn.Sequential(nn.Conv2d(c, cfg.hidden, cfg.kernel, padding=pad), nn.SiLU(),
                                 nn.Conv2d(cfg.hidden, c, cfg.kernel, padding=pad))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def gates(self, sources: Sequence[Tensor]) -> Tensor:
        """Softmax gates (B, M, K, H, W); they sum to 1 over M."""
        if len(sources) != self.n_modalities:
            raise ValueError(f"the gating module was built for {self.n_modalities} source modalities but got "
                             f"{len(sources)}; build the method with the same sources as the data you feed it")
        for i, s in enumerate(sources):
            if s.ndim != 4 or s.shape[1] != self.window:
                raise ValueError(f"gating input {i} has shape {tuple(s.shape)}; expected (B, {self.window}, H, W)")
        x = torch.cat(list(sources), dim=1)
        b, _, h, w = x.shape
        return torch.softmax(self.net(x).view(b, self.n_modalities, self.window, h, w), dim=1)

    def forward(self, sources: Sequence[Tensor]) -> Tensor:
        g = self.gates(sources)
        return (g * torch.stack(list(sources), dim=1)).sum(dim=1)
