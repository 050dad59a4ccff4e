"""What every diffusion process of the study shares: integer timesteps
``t = 0 .. T-1`` that index per-step schedule tables, and uniform training
timesteps. :class:`BrownianBridge`, :class:`GaussianDiffusion` and
:class:`ResidualDiffusion` derive from :class:`ScheduledProcess`."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ScheduledProcess(nn.Module):
    """Base class; subclasses set ``self.cfg`` with a ``num_timesteps`` field."""

    @property
    def num_timesteps(self) -> int:
        return self.cfg.num_timesteps

    def _lookup(self, table: Tensor, t: Tensor | int, like: Tensor | None) -> Tensor:
        """``table[t]`` per sample: (B,), or shaped (B, 1, ..., 1) to broadcast against ``like``."""
        if not torch.is_tensor(t):
            t = torch.tensor([int(t)])
        if t.is_floating_point():
            raise TypeError(f"timesteps must be integers in [0, {self.num_timesteps}), got a {t.dtype} tensor")
        v = table[t.to(device=table.device, dtype=torch.long).reshape(-1)]
        if like is None:
            return v
        v = v.to(device=like.device, dtype=like.dtype)
        if v.numel() == 1 and like.shape[0] != 1:
            v = v.expand(like.shape[0])
        return v.reshape(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
        """One training timestep per sample, uniform over [0, T) (integer tensor (B,))."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t
