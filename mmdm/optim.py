"""Optimiser and weight-average settings: what a method declares and the engine applies.

Neutral ground between :mod:`mmdm.methods` (which declare these settings,
following each method's official code) and :mod:`mmdm.engine` (which builds
the Adam optimisers and the exponential moving average from them). Neither
side reads the other's configuration objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmdm.config import ConfigError


@dataclass
class OptimConfig:
    """Optimiser settings of one optimiser group (Adam; defaults: the authors' MMDM code).

    ``grad_clip``: maximum global gradient norm, or None for no clipping.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (BBDM: decay 0.995 from step 30k;
    MMDM's authors: none). Before ``start_step`` the average is reset to the weights;
    from it on, every ``every`` steps, ``shadow <- decay * shadow + (1 - decay) * weights``."""

    decay: float = 0.995
    start_step: int = 30000
    every: int = 1

    def validate(self, where: str = "EMAConfig") -> None:
        """Raise :class:`ConfigError` unless ``0 < decay < 1`` and ``every >= 1``."""
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"{where}.decay must be in (0, 1), got {self.decay}")
        if self.every < 1:
            raise ConfigError(f"{where}.every must be >= 1 step, got {self.every}")


__all__ = ["EMAConfig", "OptimConfig"]
