"""The Brownian bridge diffusion process (paper section 2.1, eqs. (1)-(3)).

The forward marginal of the bridge between a target ``x0`` (TOF-MRA) and a
source ``y`` (one MR modality) is eq. (1)::

    q(x_t | x0, y) = N((1 - m_t) x0 + m_t y, delta_t I),   delta_t = 2 (m_t - m_t^2) max_var

Timesteps are integers ``t = 0, ..., T-1`` (as in BBDM's code); the sampler
starts from ``x_T = y`` and evaluates the network first at ``t = T-1``.

Schedules for ``m_t`` (``BridgeConfig.schedule``):

``"linear"`` (default)
    BBDM's and the authors' code: ``m_t = linspace(m_min, m_max, T)`` with
    ``m_min = 0.001, m_max = 0.999``, so ``m_t`` never reaches 0 or 1.
``"t_over_T"`` (alias ``"paper"``)
    The paper's text: ``m_t = t / T`` for ``t = 0..T-1`` (``m_0 = 0``, so
    ``x_0`` is exactly the target; ``m_{T-1} = 1 - 1/T``). For T = 1000 the
    two schedules differ by at most 0.001.
``"sin"``
    BBDM's option called "sin", which is *not* sinusoidal: it is exponential,
    ``m_t = 1.0075**(t') / 1.0075**T`` with ``t' = linspace(0, T, T)``, the last
    value then set to ``m_max``. It keeps ``m_t`` small (little source signal
    and little noise) for most of the chain and rises steeply at the end.

Training objectives (``BridgeConfig.objective``), i.e. what the network outputs:

``"ysubx"``  ``y - x0``; ``x0_hat = y - out``. The paper's choice for MMDM
             (after eq. (3): ``x0_hat^m = x^m - eps_theta^m``) and the authors' code.
``"grad"``   ``m_t (y - x0) + sqrt(delta_t) eps = x_t - x0`` (eq. (3), BBDM's
             default); ``x0_hat = x_t - out``.
``"noise"``  ``eps``; ``x0_hat = (x_t - m_t y - sqrt(delta_t) out) / (1 - m_t)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmdm.config import ConfigError
from mmdm.diffusion.process import ScheduledProcess
from mmdm.diffusion.sampling import SPACINGS, SamplerConfig

SCHEDULES = ("linear", "t_over_T", "paper", "sin")
OBJECTIVES = ("ysubx", "grad", "noise")


@dataclass
class BridgeConfig(SamplerConfig):
    """Settings of the Brownian bridge and of its sampler (the :class:`SamplerConfig` fields).

    ``sample_steps``: network evaluations at inference (paper: 200; the
    authors' config: 50). ``eta`` scales only the noise added in each reverse
    step (BBDM's convention, default 1 = the exact bridge posterior, eq. (2));
    ``eta = 0`` steps to the posterior mean. ``clip_x0`` clamps every x0
    prediction used by the sampler to [-1, 1], as the authors' code does.
    """

    num_timesteps: int = 1000
    schedule: str = "linear"
    m_min: float = 0.001
    m_max: float = 0.999
    max_var: float = 1.0
    objective: str = "ysubx"
    eta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"BridgeConfig.schedule: unknown schedule {self.schedule!r}; use one of {SCHEDULES}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"BridgeConfig.objective: unknown objective {self.objective!r}; use one of {OBJECTIVES}")
        if self.num_timesteps < 2:
            raise ConfigError(f"BridgeConfig.num_timesteps must be >= 2, got {self.num_timesteps}")
        if not 0.0 <= self.m_min < self.m_max < 1.0:
            raise ConfigError(f"BridgeConfig: need 0 <= m_min < m_max < 1, got m_min={self.m_min}, m_max={self.m_max}")
        if self.max_var <= 0:
            raise ConfigError(f"BridgeConfig.max_var must be > 0, got {self.max_var}")


def make_m_schedule(cfg: BridgeConfig) -> Tensor:
    """The mixing coefficients ``m_t``, t = 0..T-1, as a float64 tensor (see module docstring)."""
    T = cfg.num_timesteps
    if cfg.schedule == "linear":
        m = torch.linspace(cfg.m_min, cfg.m_max, T, dtype=torch.float64)
    elif cfg.schedule in ("t_over_T", "paper"):
        m = torch.arange(T, dtype=torch.float64) / T
    else:  # "sin": BBDM's name for an exponential schedule
        m = 1.0075 ** torch.linspace(0, T, T, dtype=torch.float64)
        m = m / m[-1]
        m[-1] = cfg.m_max
    return m


def variance_schedule(m: Tensor, max_var: float = 1.0) -> Tensor:
    """Bridge variance ``delta_t = 2 (m_t - m_t^2) max_var`` (eq. (1))."""
    return 2.0 * (m - m * m) * max_var


class BrownianBridge(ScheduledProcess):
    """Schedule tables and the closed-form relations of the bridge (eqs. (1), (3)).

    The tables are float64 non-persistent buffers, so ``.to(device)`` moves
    them and they are not saved in checkpoints. All per-timestep accessors take
    ``t`` as an integer tensor of shape (B,) (or a Python int) and, given
    ``like``, return values shaped (B, 1, ..., 1) in ``like``'s dtype/device.
    """

    m_t: Tensor
    delta_t: Tensor

    def __init__(self, cfg: BridgeConfig | None = None):
        super().__init__()
        self.cfg = cfg or BridgeConfig()
        m = make_m_schedule(self.cfg)
        self.register_buffer("m_t", m, persistent=False)
        self.register_buffer("delta_t", variance_schedule(m, self.cfg.max_var), persistent=False)
        # host copies for per-step sampler coefficients (no device round trips)
        self.m_host: list[float] = self.m_t.tolist()
        self.delta_host: list[float] = self.delta_t.tolist()

    def m(self, t: Tensor | int, like: Tensor | None = None) -> Tensor:
        """``m_t`` per sample: (B,) float64, or broadcastable to ``like``."""
        return self._lookup(self.m_t, t, like)

    def delta(self, t: Tensor | int, like: Tensor | None = None) -> Tensor:
        """``delta_t`` per sample: (B,) float64, or broadcastable to ``like``."""
        return self._lookup(self.delta_t, t, like)

    # -- eq. (1) and the objectives ---------------------------------------------
    def mean(self, x0: Tensor, y: Tensor, t: Tensor | int) -> Tensor:
        """Mean of eq. (1): ``(1 - m_t) x0 + m_t y``."""
        m = self.m(t, like=x0)
        return (1 - m) * x0 + m * y

    def q_sample(self, x0: Tensor, y: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """Sample eq. (1): ``x_t = (1 - m_t) x0 + m_t y + sqrt(delta_t) eps``."""
        return self.mean(x0, y, t) + self.delta(t, like=x0).sqrt() * noise

    def objective(self, x0: Tensor, y: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """What the network learns to output for ``cfg.objective`` (see module docstring)."""
        obj = self.cfg.objective
        if obj == "ysubx":
            return y - x0
        if obj == "grad":  # eq. (3)
            return self.m(t, like=x0) * (y - x0) + self.delta(t, like=x0).sqrt() * noise
        return noise

    def predict_x0(self, x_t: Tensor, y: Tensor, t: Tensor | int, out: Tensor) -> Tensor:
        """Invert :meth:`objective`: the x0 prediction from the network output ``out``."""
        obj = self.cfg.objective
        if obj == "ysubx":
            return y - out
        if obj == "grad":
            return x_t - out
        m = self.m(t, like=x_t)
        return (x_t - m * y - self.delta(t, like=x_t).sqrt() * out) / (1 - m)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"T={c.num_timesteps}, schedule={c.schedule}, objective={c.objective}, max_var={c.max_var}"
