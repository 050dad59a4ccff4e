"""Exponential moving average of a method's weights (the average BBDM, DDPM and RDDM keep).

Kept by hand rather than with ``ema-pytorch`` (0.8.3 read): that library ramps
the decay up (``1 - (1 + n / inv_gamma) ** -power``, capped at ``beta``) and
counts its own steps (a plain copy while ``step <= update_after_step``), so no
setting of it gives the constant-decay average of the official BBDM/DDPM/RDDM
code that the committed runs kept; it also deep-copies the whole model. The
shadow here is a tensor dict updated in place with ``lerp_``, checkpointed in
the trainer state, so a resumed run's average is bit-identical (tested).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from mmdm.optim import EMAConfig


class EMA:
    """Shadow copy of the floating-point parameters and buffers (BBDM-style).

    At step ``s`` (every ``cfg.every`` steps): before ``cfg.start_step`` the shadow is reset to the
    weights, from it on ``shadow <- decay * shadow + (1 - decay) * weights``. A buffer whose shape
    changes during training (a growing history of fakes, e.g. UNest's image pools) is copied, not
    averaged.
    """

    def __init__(self, model: nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step % self.cfg.every:
            return
        for k, v in model.state_dict().items():
            if k not in self.shadow:
                continue
            if self.shadow[k].shape != v.shape:
                self.shadow[k] = v.detach().clone()
            elif step < self.cfg.start_step:
                self.shadow[k].copy_(v)
            else:
                self.shadow[k].lerp_(v.detach(), 1.0 - self.cfg.decay)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` with the averaged weights inside the block and its own weights restored after
        (bit for bit), e.g. to validate what evaluation will use (it loads the average)."""
        state = model.state_dict()
        saved = {k: state[k].detach().clone() for k in self.shadow if k in state and state[k].shape == self.shadow[k].shape}
        with torch.no_grad():
            for k, v in saved.items():
                state[k].copy_(self.shadow[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    state[k].copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, v in state.items():
            if self.shadow[k].shape != v.shape:
                self.shadow[k] = v.detach().clone().to(self.shadow[k].device)
            else:
                self.shadow[k].copy_(v)


__all__ = ["EMA", "EMAConfig"]
