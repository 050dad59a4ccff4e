"""Skip-step reverse sampling of the Brownian bridge (paper eq. (2), Fig. 1b).

The samplers are plain functions that never see a network: the caller passes
``x0_fn(x_t, t) -> x0_hat`` (k-diffusion style), so the same code samples
MMDM, single-modality BBDM and the oracle used in the tests. Each builds a step
function for the shared loop :func:`mmdm.diffusion.sampling.reverse_loop`.

The reverse step from ``t`` to an earlier ``n < t`` (not necessarily ``t-1``)
is the posterior of the bridge, ``q(x_n | x_t, x0, y)``. With
``mu_s = (1 - m_s) x0 + m_s y`` and ``a = (1 - m_t) / (1 - m_n)``, the forward
chain that has eq. (1) as marginals is ``x_t = a x_n + (m_t - a m_n) y + noise``
with noise variance ``delta_{t|n} = delta_t - a^2 delta_n``. Gaussian
conditioning then gives::

    mean     = mu_n + (a delta_n / delta_t) (x_t - mu_t)
    variance = sigma2 = delta_n delta_{t|n} / delta_t
             = (delta_t - delta_n (1-m_t)^2 / (1-m_n)^2) delta_n / delta_t

which is BBDM's ``sigma2`` and, since ``(delta_n - sigma2) / delta_t =
(a delta_n / delta_t)^2``, BBDM's mean coefficient
``sqrt((delta_n - sigma2) / delta_t)``. The sampler replaces ``x0`` by the
prediction ``x0_hat``; ``eta`` scales only the added noise (BBDM's convention:
``eta = 1`` is the exact posterior, ``eta = 0`` steps to its mean).

Differences from the authors' code, by design: the added noise is standard
Gaussian (their sampler draws ``torch.rand``, uniform on [0, 1), which is
neither zero-mean nor unit-variance), and each branch of the multi-branch
sampler draws its own noise unless ``shared_noise=True`` (they share one tensor).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from mmdm.diffusion.bridge import BrownianBridge
from mmdm.diffusion.sampling import Callback, randn_like, resolve_sampler, reverse_loop, timestep_batch

X0Fn = Callable[[Tensor, Tensor], Tensor]
MultiX0Fn = Callable[[Sequence[Tensor], Tensor], Sequence[Tensor]]
FuseFn = Callable[[Sequence[Tensor], Sequence[Tensor], Tensor], Tensor]
SAMPLING_MODES = ("coupled", "independent")


def step_coefficients(bridge: BrownianBridge, t: int, n: int) -> tuple[float, float, float, float]:
    """``(m_t, m_n, coef, sigma2)`` of the step t -> n as Python floats (float64 math, no device sync).

    ``sigma2 = (delta_t - delta_n (1-m_t)^2 / (1-m_n)^2) delta_n / delta_t`` and
    ``coef = sqrt((delta_n - sigma2) / delta_t)`` (see the module docstring).
    """
    T = bridge.num_timesteps
    if not 0 <= n < t < T:
        raise ValueError(f"a reverse step needs 0 <= n < t < T={T}, got t={t}, n={n}")
    m_t, m_n = bridge.m_host[t], bridge.m_host[n]
    d_t, d_n = bridge.delta_host[t], bridge.delta_host[n]
    if d_t <= 0:
        raise ValueError(f"cannot step from t={t}: delta_t = 0 there (the bridge is pinned at that end)")
    sigma2 = max((d_t - d_n * ((1 - m_t) / (1 - m_n)) ** 2) * d_n / d_t, 0.0)
    coef = math.sqrt(max((d_n - sigma2) / d_t, 0.0))
    return m_t, m_n, coef, sigma2


def bridge_step(bridge: BrownianBridge, x_t: Tensor, y: Tensor, x0_hat: Tensor, t: int, n: int,
                eta: float = 1.0, noise: Tensor | None = None) -> Tensor:
    """One reverse step ``x_t -> x_n`` (n < t) with the bridge posterior (eq. (2)).

    ``x_n = mu_n + sqrt((delta_n - sigma2) / delta_t) (x_t - mu_t) + eta sqrt(sigma2) noise``
    with ``mu_s = (1 - m_s) x0_hat + m_s y`` (see the module docstring); for
    ``n = 0`` the step returns ``x0_hat`` itself; one step ``t -> n`` for the whole batch.
    ``noise`` (standard Gaussian, like ``x_t``) is required when ``eta > 0`` and ``n > 0``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    t, n = int(t), int(n)
    m_t, m_n, coef, sigma2 = step_coefficients(bridge, t, n)
    if n == 0:
        return x0_hat
    x_n = (1 - m_n) * x0_hat + m_n * y + coef * (x_t - (1 - m_t) * x0_hat - m_t * y)
    if eta > 0:
        if noise is None:
            raise ValueError("bridge_step: eta > 0 needs a noise tensor (standard Gaussian, shaped like x_t)")
        x_n = x_n + (eta * math.sqrt(sigma2)) * noise
    return x_n


def _clip(x: Tensor, clip: bool) -> Tensor:
    return x.clamp(-1.0, 1.0) if clip else x


def sample_bridge(x0_fn: X0Fn, y: Tensor, bridge: BrownianBridge, steps: int | None = None,
                  eta: float | None = None, generator: torch.Generator | None = None, progress: bool = False,
                  spacing: str | None = None, clip_x0: bool | None = None, callback: Callback | None = None) -> Tensor:
    """Reverse the bridge from ``x_T = y`` to an x0 estimate (single branch).

    At each visited timestep ``t`` (see :func:`skip_timesteps`) the sampler
    asks ``x0_fn(x_t, t)`` for ``x0_hat`` (``t`` is an integer tensor (B,)),
    clamps it to [-1, 1] if ``clip_x0``, and takes :func:`bridge_step` to the
    next visited timestep; the prediction at t = 0 is returned. ``None``
    arguments take their value from ``bridge.cfg``; ``callback`` see
    :func:`~mmdm.diffusion.sampling.reverse_loop`.
    """
    sc, ts = resolve_sampler(bridge.cfg, bridge.num_timesteps, steps, eta, spacing, clip_x0)

    def step(x: Tensor, t: int, n: int | None) -> tuple[Tensor | None, Tensor]:
        x0_hat = _clip(x0_fn(x, timestep_batch(t, y)), sc.clip_x0)
        if n is None:
            return None, x0_hat
        noise = randn_like(x, generator) if (sc.eta > 0 and n > 0) else None
        return bridge_step(bridge, x, y, x0_hat, t, n, sc.eta, noise), x0_hat

    return reverse_loop(step, y, ts, callback, progress, "bridge sampling")


def mean_fusion(x0_hats: Sequence[Tensor], ys: Sequence[Tensor], t: Tensor) -> Tensor:
    """Fallback fusion: the average of the branch predictions."""
    return torch.stack(list(x0_hats), 0).mean(0)


def sample_multibranch(x0_fn: MultiX0Fn, ys: Sequence[Tensor], bridge: BrownianBridge, steps: int | None = None,
                       eta: float | None = None, mode: str = "coupled", fuse_fn: FuseFn | None = None,
                       generator: torch.Generator | None = None, progress: bool = False,
                       shared_noise: bool = False, spacing: str | None = None,
                       clip_x0: bool | None = None, callback: Callback | None = None) -> Tensor:
    """Sample M coupled bridges, one per source ``ys[m]`` (MMDM inference, Fig. 1b).

    ``x0_fn(x_ts, t)`` returns the M branch predictions ``x0_hat^m`` from the
    M states ``x_t^m``; ``fuse_fn(x0_hats, ys, t)`` is the cross-modal fusion
    (eq. (4); default: the mean). Every branch starts at its own source,
    ``x_T^m = x^m``.

    ``mode="coupled"`` (the paper): at every step the fused ``x0_hat`` drives
    every branch's reverse step; the fused prediction at t = 0 is returned.
    ``mode="independent"``: each branch steps with its own ``x0_hat^m``; the
    fusion runs once, at t = 0, on the final branch predictions.

    The branch predictions given to the fusion are not clamped (as in
    training); what drives a step, and the result, are clamped if ``clip_x0``.
    ``shared_noise=True`` reuses one noise tensor for all branches (the
    authors' code); the default draws independent noise per branch. ``callback``
    (:func:`~mmdm.diffusion.sampling.reverse_loop`) sees the M states and the fused
    prediction (coupled) or the M clamped branch predictions (independent).
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown multi-branch sampling mode {mode!r}; use one of {SAMPLING_MODES}")
    ys = list(ys)
    if not ys:
        raise ValueError("sample_multibranch needs at least one source tensor in ys")
    shapes = {tuple(y.shape) for y in ys}
    if len(shapes) != 1:
        raise ValueError(f"all sources must have one shape, got {sorted(shapes)}")
    fuse = fuse_fn or mean_fusion
    sc, ts = resolve_sampler(bridge.cfg, bridge.num_timesteps, steps, eta, spacing, clip_x0)
    clip = sc.clip_x0

    def step(xs: list[Tensor], t: int, n: int | None) -> tuple[list[Tensor] | None, Tensor | list[Tensor]]:
        tt = timestep_batch(t, ys[0])
        preds = list(x0_fn(xs, tt))
        if len(preds) != len(ys):
            raise ValueError(f"x0_fn returned {len(preds)} predictions for {len(ys)} branches")
        if mode == "coupled":
            fused = _clip(fuse(preds, ys, tt), clip)
            drivers = [fused] * len(ys)
        else:
            drivers = [_clip(p, clip) for p in preds]
        if n is None:
            return None, fused if mode == "coupled" else _clip(fuse(preds, ys, tt), clip)
        if sc.eta > 0 and n > 0:
            if shared_noise:
                noises = [randn_like(xs[0], generator)] * len(xs)
            else:
                noises = [randn_like(x, generator) for x in xs]
        else:
            noises = [None] * len(xs)
        xs = [bridge_step(bridge, x, y, d, t, n, sc.eta, e) for x, y, d, e in zip(xs, ys, drivers, noises)]
        return xs, fused if mode == "coupled" else drivers

    return reverse_loop(step, list(ys), ts, callback, progress, f"{mode} multi-branch sampling")
