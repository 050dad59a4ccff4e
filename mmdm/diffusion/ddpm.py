"""Gaussian (noise-to-data) diffusion: DDPM training and DDIM sampling.

The comparison method "DDPM" of Table 1 (Ho et al. 2020) uses the standard
variance-preserving process with a linear beta schedule::

    beta_t    = linspace(beta_start, beta_end, T)           (Ho et al.: 1e-4 .. 0.02, T = 1000)
    abar_t    = prod_{s <= t} (1 - beta_s)
    q(x_t|x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)           x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps

Timesteps are integers ``t = 0..T-1`` (index ``t`` is Ho et al.'s step
``t + 1``). The network learns ``eps`` with an MSE loss ("L_simple").

What the network outputs (``prediction``, :data:`PREDICTIONS`)::

    "eps"  the noise eps (Ho et al. 2020, L_simple; the default)
    "x0"   x0 itself (Ho et al. 2020, sec. 3.2, discuss predicting x0 directly)
    "v"    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, sec. 4)

:meth:`GaussianDiffusion.prediction_target` gives the training target of each,
:meth:`GaussianDiffusion.x0_eps_from_output` turns a network output into the
pair ``(x0_hat, eps_hat)`` the sampler steps with.

Sampling uses the DDIM update (Song et al. 2021) between any two visited
timesteps ``t > n``: with ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``
(for the eps prediction; the other predictions give ``x0_hat`` and ``eps_hat``
by the relations above),

    sigma = eta sqrt((1 - abar_n) / (1 - abar_t)) sqrt(1 - abar_t / abar_n)
    x_n   = sqrt(abar_n) x0_hat + sqrt(1 - abar_n - sigma^2) eps_hat + sigma z

``eta = 0`` is the deterministic DDIM sampler (the study's default for DDPM),
``eta = 1`` the DDPM posterior. For every ``eta`` the step keeps the marginal
``q(x_n | x0)`` when ``x0_hat`` and ``eps_hat`` are exact (tested). The visited
timesteps are the shared skip schedule :func:`mmdm.diffusion.skip_timesteps`
(``T-1`` first, ``0`` last); the prediction at ``t = 0`` is returned.

If ``clip_x0`` is set, ``x0_hat`` is clamped to [-1, 1] and ``eps_hat`` is
re-derived from the clamped ``x0_hat`` before the step (the convention of
guided-diffusion and of the common PyTorch DDPM ports), so the two stay consistent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mmdm.config import ConfigError
from mmdm.diffusion.sampling import Callback, SamplerConfig, randn_like, resolve_sampler, reverse_loop, timestep_batch
from mmdm.diffusion.process import ScheduledProcess

EpsFn = Callable[[Tensor, Tensor], Tensor]
BETA_SCHEDULES = ("linear",)
#: What the network may output: the noise (Ho et al. 2020), x0 (ibid., sec. 3.2) or v (Salimans & Ho 2022).
PREDICTIONS = ("eps", "x0", "v")


def check_prediction(prediction: str, where: str = "prediction") -> str:
    """Return ``prediction`` or raise :class:`ConfigError` naming :data:`PREDICTIONS`."""
    if prediction not in PREDICTIONS:
        raise ConfigError(f"{where}: unknown prediction {prediction!r}; use one of {PREDICTIONS}")
    return prediction


@dataclass
class GaussianConfig(SamplerConfig):
    """Settings of the Gaussian diffusion and of its DDIM sampler (defaults: Ho et al.;
    200 deterministic steps as the MMDM paper's sampling budget)."""

    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"GaussianConfig.beta_schedule: unknown schedule {self.beta_schedule!r}; "
                              f"use one of {BETA_SCHEDULES}")
        if self.num_timesteps < 2:
            raise ConfigError(f"GaussianConfig.num_timesteps must be >= 2, got {self.num_timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(f"GaussianConfig: need 0 < beta_start <= beta_end < 1, got "
                              f"beta_start={self.beta_start}, beta_end={self.beta_end}")


def linear_beta_schedule(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al.'s linear schedule ``beta_t = linspace(beta_start, beta_end, T)`` (float64)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


class GaussianDiffusion(ScheduledProcess):
    """Schedule tables and closed-form relations of the Gaussian process.

    Tables are float64 non-persistent buffers (moved by ``.to``, absent from
    checkpoints). Per-timestep accessors take integer ``t`` (B,) and, given
    ``like``, return values broadcastable to ``like`` in its dtype/device.
    """

    betas: Tensor
    alphas_cumprod: Tensor

    def __init__(self, cfg: GaussianConfig | None = None):
        super().__init__()
        self.cfg = cfg or GaussianConfig()
        betas = linear_beta_schedule(self.cfg.num_timesteps, self.cfg.beta_start, self.cfg.beta_end)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0), persistent=False)

    def alpha_bar(self, t: Tensor | int, like: Tensor | None = None) -> Tensor:
        """``abar_t`` per sample: (B,) float64, or broadcastable to ``like``."""
        return self._lookup(self.alphas_cumprod, t, like)

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. eq. (4))."""
        a = self.alpha_bar(t, like=x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """Invert :meth:`q_sample` for ``x0`` given the noise:
        ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (Ho et al. 2020, eq. (4))."""
        a = self.alpha_bar(t, like=x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def predict_eps(self, x_t: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        """Invert :meth:`q_sample` for the noise given ``x0``:
        ``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)`` (Ho et al. 2020, eq. (4))."""
        a = self.alpha_bar(t, like=x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    def eps_from_x0(self, x_t: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        """The noise of an x0 prediction, ``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``
        (:meth:`predict_eps` under the name of the conversion)."""
        return self.predict_eps(x_t, t, x0)

    def v_target(self, x0: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """The v target of Salimans & Ho 2022 (sec. 4): ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``."""
        a = self.alpha_bar(t, like=x0)
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        """x0 from a v prediction (Salimans & Ho 2022): ``x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v``."""
        a = self.alpha_bar(t, like=x_t)
        return a.sqrt() * x_t - (1 - a).sqrt() * v

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        """The noise from a v prediction (Salimans & Ho 2022): ``eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v``."""
        a = self.alpha_bar(t, like=x_t)
        return (1 - a).sqrt() * x_t + a.sqrt() * v

    def prediction_target(self, prediction: str, x0: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """What a network with output ``prediction`` (:data:`PREDICTIONS`) learns for ``x_t = q_sample(x0, t, eps)``:
        ``eps``, ``x0`` or :meth:`v_target`."""
        check_prediction(prediction)
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        return self.v_target(x0, t, eps)

    def x0_eps_from_output(self, prediction: str, x_t: Tensor, t: Tensor | int, out: Tensor) -> tuple[Tensor, Tensor]:
        """``(x0_hat, eps_hat)`` from the network output ``out`` read as ``prediction``; the two satisfy
        ``x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_hat`` (up to rounding)."""
        check_prediction(prediction)
        if prediction == "eps":
            return self.predict_x0(x_t, t, out), out
        if prediction == "x0":
            return out, self.eps_from_x0(x_t, t, out)
        return self.predict_x0_from_v(x_t, t, out), self.predict_eps_from_v(x_t, t, out)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"T={c.num_timesteps}, betas=linear({c.beta_start}, {c.beta_end})"


def ddim_step(diffusion: GaussianDiffusion, x0_hat: Tensor, eps_hat: Tensor, t: int | Tensor, n: int | Tensor,
              eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """One DDIM step ``x_t -> x_n`` (n < t) from the predictions ``x0_hat`` and ``eps_hat``
    (module docstring). ``noise`` is required when ``eta > 0``."""
    a_t, a_n = diffusion.alpha_bar(t, like=x0_hat), diffusion.alpha_bar(n, like=x0_hat)
    if bool((a_n <= a_t).any()):
        raise ValueError(f"a reverse step needs n < t (abar_n > abar_t), got t={t}, n={n}")
    sigma2 = eta ** 2 * (1 - a_n) / (1 - a_t) * (1 - a_t / a_n)
    x_n = a_n.sqrt() * x0_hat + (1 - a_n - sigma2).clamp_min(0).sqrt() * eps_hat
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs a noise tensor (standard Gaussian, shaped like x_t)")
        x_n = x_n + sigma2.sqrt() * noise
    return x_n


def sample_ddim(eps_fn: EpsFn, x_T: Tensor, diffusion: GaussianDiffusion, steps: int | None = None,
                eta: float | None = None, generator: torch.Generator | None = None, progress: bool = False,
                spacing: str | None = None, clip_x0: bool | None = None, callback: Callback | None = None,
                prediction: str = "eps") -> Tensor:
    """Run the DDIM sampler from ``x_T`` (standard Gaussian noise) to an x0 estimate.

    ``eps_fn(x_t, t)`` returns the network output (``t``: integer tensor (B,)):
    the predicted noise, or x0 / v when ``prediction`` says so (:data:`PREDICTIONS`;
    :meth:`GaussianDiffusion.x0_eps_from_output` converts it). At each visited
    timestep the x0 prediction is formed (and clamped if ``clip_x0``, with
    ``eps_hat`` re-derived), then :func:`ddim_step` moves to the next one; the
    prediction at ``t = 0`` is returned. ``None`` arguments take their value
    from ``diffusion.cfg``; ``callback`` see :func:`~mmdm.diffusion.sampling.reverse_loop`.
    """
    check_prediction(prediction, "sample_ddim")
    sc, ts = resolve_sampler(diffusion.cfg, diffusion.cfg.num_timesteps, steps, eta, spacing, clip_x0)

    def step(x: Tensor, t: int, n: int | None) -> tuple[Tensor | None, Tensor]:
        tt = timestep_batch(t, x)
        x0_hat, eps_hat = diffusion.x0_eps_from_output(prediction, x, tt, eps_fn(x, tt))
        if sc.clip_x0:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            eps_hat = diffusion.predict_eps(x, tt, x0_hat)
        if n is None:
            return None, x0_hat
        noise = randn_like(x, generator) if sc.eta > 0 else None
        return ddim_step(diffusion, x0_hat, eps_hat, t, n, sc.eta, noise), x0_hat

    return reverse_loop(step, x_T, ts, callback, progress, "DDIM sampling")
