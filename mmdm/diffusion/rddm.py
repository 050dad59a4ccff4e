"""Residual denoising diffusion (RDDM, Liu et al. CVPR 2024): process and sampler.

RDDM diffuses the target ``I_0`` towards the degraded input ``I_in`` through
the residual ``I_res = I_in - I_0`` and, separately, towards noise::

    I_t = I_0 + abar_t I_res + betabar_t eps,   abar_t = sum_{i<=t} alpha_i,  betabar_t^2 = sum_{i<=t} beta_i^2

with ``abar_T = 1`` (so ``I_T = I_in + betabar_T eps``) and ``betabar_T^2``
a chosen total (``beta2_total``). Timesteps are integers ``t = 0..T-1``; index
``t`` is RDDM's step ``t + 1``. In this study ``I_in`` is the gated source
window and ``I_0`` the TOF-MRA window.

Coefficient schedules (:func:`coefficient_schedule`, the official code's
three shapes, each normalised to its total):

``"increased"``  ``c_t`` proportional to ``t`` (t = 1..T)
``"decreased"``  ``c_t`` proportional to ``T + 1 - t``
``"average"``    ``c_t = total / T``

The official defaults for image restoration, used here: ``alpha`` decreased
(sum 1) and ``beta^2`` increased with total 0.01 (the class default of the
official code whenever it is conditioned on an input).

The network predicts both ``I_res`` and ``eps``. The reverse step from ``t``
to an earlier ``n`` (RDDM's generalised DDIM step) is::

    sigma^2 = eta^2 (betabar_t^2 - betabar_n^2) betabar_n^2 / betabar_t^2
    I_n     = I_t - (abar_t - abar_n) res_hat - (betabar_t - sqrt(betabar_n^2 - sigma^2)) eps_hat + sigma z

It equals ``I0_hat + abar_n res_hat + sqrt(betabar_n^2 - sigma^2) eps_hat + sigma z`` with
``I0_hat = I_t - abar_t res_hat - betabar_t eps_hat``, so with exact predictions
it keeps the marginal ``q(I_n | I_0, I_res)`` for every ``eta`` in [0, 1]
(tested). ``eta = 0`` is the deterministic sampler (the official setting for
conditioned tasks). The sampler starts from ``I_T = I_in + betabar_T eps``
(the official start), visits :func:`mmdm.diffusion.skip_timesteps` and returns
``I0_hat`` at ``t = 0`` (clamped to [-1, 1] if ``clip_x0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mmdm.config import ConfigError
from mmdm.diffusion.sampling import Callback, SamplerConfig, randn_like, resolve_sampler, reverse_loop, timestep_batch
from mmdm.diffusion.process import ScheduledProcess

#: ``model_fn(I_t, t) -> (res_hat, eps_hat)``
ResNoiseFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
COEFFICIENT_SCHEDULES = ("increased", "decreased", "average")


@dataclass
class ResidualConfig(SamplerConfig):
    """Settings of the residual diffusion and its sampler (defaults: the official
    image-restoration setting with the MMDM paper's T = 1000 and 200 steps).

    ``clip_residual`` clamps ``res_hat`` to [-1, 1] in sampling as the official
    code does; off by default because ``I_in - I_0`` spans [-2, 2] here.
    """

    num_timesteps: int = 1000
    alpha_schedule: str = "decreased"
    beta2_schedule: str = "increased"
    beta2_total: float = 0.01
    clip_residual: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha_schedule", "beta2_schedule"):
            if getattr(self, name) not in COEFFICIENT_SCHEDULES:
                raise ConfigError(f"ResidualConfig.{name}: unknown schedule {getattr(self, name)!r}; "
                                  f"use one of {COEFFICIENT_SCHEDULES}")
        if self.num_timesteps < 2:
            raise ConfigError(f"ResidualConfig.num_timesteps must be >= 2, got {self.num_timesteps}")
        if self.beta2_total <= 0:
            raise ConfigError(f"ResidualConfig.beta2_total (betabar_T^2) must be > 0, got {self.beta2_total}")


def coefficient_schedule(num_timesteps: int, kind: str, total: float = 1.0) -> Tensor:
    """Per-step coefficients ``c_1..c_T`` (float64) of shape ``kind`` summing to ``total``."""
    T = num_timesteps
    k = torch.arange(1, T + 1, dtype=torch.float64)
    if kind == "increased":
        c = k
    elif kind == "decreased":
        c = T + 1 - k
    elif kind == "average":
        c = torch.ones(T, dtype=torch.float64)
    else:
        raise ValueError(f"unknown coefficient schedule {kind!r}; use one of {COEFFICIENT_SCHEDULES}")
    return c / c.sum() * total


class ResidualDiffusion(ScheduledProcess):
    """Schedule tables (``abar_t``, ``betabar_t^2``; float64, non-persistent) and the
    closed-form relations of RDDM's forward process."""

    alphas_cumsum: Tensor
    betas2_cumsum: Tensor

    def __init__(self, cfg: ResidualConfig | None = None):
        super().__init__()
        self.cfg = cfg or ResidualConfig()
        c = self.cfg
        alphas = coefficient_schedule(c.num_timesteps, c.alpha_schedule, 1.0)
        betas2 = coefficient_schedule(c.num_timesteps, c.beta2_schedule, c.beta2_total)
        abar = alphas.cumsum(0)
        abar[-1] = 1.0  # exact, not 1 - rounding
        b2bar = betas2.cumsum(0)
        b2bar[-1] = c.beta2_total
        self.register_buffer("alphas_cumsum", abar, persistent=False)
        self.register_buffer("betas2_cumsum", b2bar, persistent=False)

    def alpha_bar(self, t: Tensor | int, like: Tensor | None = None) -> Tensor:
        """``abar_t`` (cumulative residual weight)."""
        return self._lookup(self.alphas_cumsum, t, like)

    def beta_bar(self, t: Tensor | int, like: Tensor | None = None) -> Tensor:
        """``betabar_t`` (cumulative noise standard deviation)."""
        return self._lookup(self.betas2_cumsum, t, like).sqrt()

    def q_sample(self, x0: Tensor, res: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """``I_t = I_0 + abar_t I_res + betabar_t eps``."""
        return x0 + self.alpha_bar(t, like=x0) * res + self.beta_bar(t, like=x0) * noise

    def predict_x0(self, x_t: Tensor, t: Tensor | int, res: Tensor, eps: Tensor) -> Tensor:
        """``I0_hat = I_t - abar_t res - betabar_t eps``."""
        return x_t - self.alpha_bar(t, like=x_t) * res - self.beta_bar(t, like=x_t) * eps

    def start(self, x_in: Tensor, noise: Tensor) -> Tensor:
        """The sampler's start ``I_T = I_in + betabar_T eps``."""
        return x_in + self.cfg.beta2_total ** 0.5 * noise

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"T={c.num_timesteps}, alpha={c.alpha_schedule}, beta2={c.beta2_schedule}, "
                f"betabar_T^2={c.beta2_total}")


def residual_step(process: ResidualDiffusion, x_t: Tensor, res_hat: Tensor, eps_hat: Tensor, t: int | Tensor,
                  n: int | Tensor, eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """One reverse step ``I_t -> I_n`` (n < t) of RDDM (module docstring)."""
    a_t, a_n = process.alpha_bar(t, like=x_t), process.alpha_bar(n, like=x_t)
    b2_t = process.beta_bar(t, like=x_t) ** 2
    b2_n = process.beta_bar(n, like=x_t) ** 2
    if bool((b2_n >= b2_t).any()):
        raise ValueError(f"a reverse step needs n < t, got t={t}, n={n}")
    sigma2 = eta ** 2 * (b2_t - b2_n) * b2_n / b2_t
    x_n = x_t - (a_t - a_n) * res_hat - (b2_t.sqrt() - (b2_n - sigma2).clamp_min(0).sqrt()) * eps_hat
    if eta > 0:
        if noise is None:
            raise ValueError("residual_step: eta > 0 needs a noise tensor (standard Gaussian, shaped like x_t)")
        x_n = x_n + sigma2.sqrt() * noise
    return x_n


def sample_residual(model_fn: ResNoiseFn, x_in: Tensor, process: ResidualDiffusion, steps: int | None = None,
                    eta: float | None = None, generator: torch.Generator | None = None, progress: bool = False,
                    spacing: str | None = None, clip_x0: bool | None = None,
                    callback: Callback | None = None) -> Tensor:
    """Reverse RDDM from ``I_T = I_in + betabar_T eps`` to an ``I_0`` estimate.

    ``model_fn(I_t, t)`` returns ``(res_hat, eps_hat)``. ``None`` arguments
    take their value from ``process.cfg``; ``callback`` see
    :func:`~mmdm.diffusion.sampling.reverse_loop` (its ``x0_hat`` is ``I0_hat``, unclamped
    before the last step).
    """
    sc, ts = resolve_sampler(process.cfg, process.cfg.num_timesteps, steps, eta, spacing, clip_x0)

    def step(x: Tensor, t: int, n: int | None) -> tuple[Tensor | None, Tensor]:
        tt = timestep_batch(t, x)
        res_hat, eps_hat = model_fn(x, tt)
        if process.cfg.clip_residual:
            res_hat = res_hat.clamp(-1.0, 1.0)
        x0_hat = process.predict_x0(x, tt, res_hat, eps_hat)
        if n is None:
            return None, x0_hat.clamp(-1.0, 1.0) if sc.clip_x0 else x0_hat
        noise = randn_like(x, generator) if sc.eta > 0 else None
        return residual_step(process, x, res_hat, eps_hat, t, n, sc.eta, noise), x0_hat

    return reverse_loop(step, process.start(x_in, randn_like(x_in, generator)), ts, callback, progress,
                        "RDDM sampling")
