"""The one reverse-diffusion loop and its settings, shared by every process.

k-diffusion's design: samplers are plain functions with one signature. Here
each process contributes only a *step function*::

    step_fn(x, t, n) -> (x_n, x0_hat)

which, at the visited timestep ``t``, asks the network for its prediction,
forms the estimate ``x0_hat`` and returns the state at the next visited
timestep ``n`` (``None`` at the last step, where only ``x0_hat`` is needed).
:func:`reverse_loop` walks the timesteps of :func:`skip_timesteps` (``T-1``
first, ``0`` last), draws nothing itself (every random draw happens inside
the step function, in the process's own order, so results stay bit-identical
to the former per-process loops), shows a progress bar if asked and calls
``callback({"i", "t", "n", "x", "x0_hat"})`` after every step (progress,
intermediate images). It returns the last ``x0_hat``.

:class:`SamplerConfig` holds the settings of a sampling run (``sample_steps``,
``spacing``, ``eta``, ``clip_x0``) and their checks, once. The process configs
(:class:`~mmdm.diffusion.bridge.BridgeConfig`,
:class:`~mmdm.diffusion.ddpm.GaussianConfig`,
:class:`~mmdm.diffusion.rddm.ResidualConfig`) extend it, so a method's YAML
keeps its flat keys, and :func:`resolve_sampler` turns such a config plus a
call's overrides into the plain :class:`SamplerConfig` the loop reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from mmdm.config import ConfigError

SPACINGS = ("linear", "cosine")
S = TypeVar("S")
#: ``step_fn(x, t, n) -> (x_n or None at the last step, x0_hat)``; ``x`` is any state (a tensor, a list).
StepFn = Callable[[Any, int, "int | None"], "tuple[Any, Any]"]
Callback = Callable[[dict[str, Any]], None]


@dataclass
class SamplerConfig:
    """Settings of a reverse-diffusion run.

    ``sample_steps``: network evaluations (paper: 200; the MMDM authors' config: 50).
    ``spacing``: how the visited timesteps are spread (:func:`skip_timesteps`).
    ``eta``: scale of the noise added in each step (its meaning per process: the
    bridge posterior (eq. (2)), DDIM's sigma, RDDM's sigma). ``clip_x0``: clamp every
    x0 prediction to [-1, 1].
    """

    sample_steps: int = 200
    spacing: str = "linear"
    eta: float = 0.0
    clip_x0: bool = True

    def __post_init__(self) -> None:
        where = type(self).__name__
        if self.sample_steps < 2:  # the upper bound (num_timesteps) is checked when sampling
            raise ConfigError(f"{where}.sample_steps must be >= 2 (first step T-1, last 0), got {self.sample_steps}")
        if self.spacing not in SPACINGS:
            raise ConfigError(f"{where}.spacing: unknown spacing {self.spacing!r}; use one of {SPACINGS}")
        if self.eta < 0:
            raise ConfigError(f"{where}.eta must be >= 0, got {self.eta}")


def resolve_sampler(cfg: SamplerConfig, num_timesteps: int, steps: int | None = None, eta: float | None = None,
                    spacing: str | None = None, clip_x0: bool | None = None) -> tuple[SamplerConfig, list[int]]:
    """The plain :class:`SamplerConfig` of one call (``cfg``'s settings, each overridden when given)
    and its visited timesteps for a process of ``num_timesteps`` steps. Raises ``ValueError`` on a
    negative ``eta`` or steps outside [2, T]."""
    steps = cfg.sample_steps if steps is None else int(steps)
    eta = cfg.eta if eta is None else float(eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    spacing = cfg.spacing if spacing is None else spacing
    ts = skip_timesteps(num_timesteps, steps, spacing)
    clip = cfg.clip_x0 if clip_x0 is None else bool(clip_x0)
    return SamplerConfig(sample_steps=steps, spacing=spacing, eta=eta, clip_x0=clip), ts


def skip_timesteps(T: int, steps: int, spacing: str = "linear") -> list[int]:
    """The ``steps`` timesteps the sampler visits: strictly decreasing from T-1 to 0.

    ``"linear"`` (BBDM's default): T-1, then evenly spaced values down to 1,
    then 0 -- i.e. ``round(linspace(T-1, 1, steps-1)) + [0]``. ``"cosine"``
    (this project's definition): ``(T-1) (1 + cos(pi u)) / 2`` for ``u`` evenly
    spaced in [0, 1], which puts more steps near both ends of the bridge.
    After rounding, ties are pushed apart so that every step is distinct.
    The network is evaluated once per entry (the last one at t = 0, as BBDM).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown step spacing {spacing!r}; use one of {SPACINGS}")
    if not 2 <= steps <= T:
        raise ValueError(f"number of sampling steps must lie in [2, T={T}], got {steps}")
    if spacing == "linear":
        if steps == 2:
            ts = [float(T - 1)]
        else:
            ts = [T - 1 - k * (T - 2) / (steps - 2) for k in range(steps - 1)]
        ts = ts + [0.0]
    else:
        ts = [(T - 1) * (1 + math.cos(math.pi * k / (steps - 1))) / 2 for k in range(steps)]
    out = [int(math.floor(v + 0.5)) for v in ts]
    out[0], out[-1] = T - 1, 0
    for k in range(1, steps):  # keep strictly decreasing and leave room below
        out[k] = max(min(out[k], out[k - 1] - 1), steps - 1 - k)
    return out


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gaussian noise shaped like ``x``; drawn on ``generator``'s device, then moved."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def timestep_batch(t: int, like: Tensor) -> Tensor:
    """``t`` as an integer tensor (B,) on ``like``'s device (B = ``like.shape[0]``)."""
    return torch.full((like.shape[0],), t, dtype=torch.long, device=like.device)


def reverse_loop(step_fn: StepFn, x_T: S, timesteps: list[int], callback: Callback | None = None,
                 progress: bool = False, desc: str = "sampling") -> Any:
    """Run ``step_fn`` over ``timesteps`` from the state ``x_T``; return the final ``x0_hat``
    (see the module docstring)."""
    if not timesteps:
        raise ValueError("reverse_loop needs at least one timestep")
    steps = timesteps
    if progress:
        from tqdm import tqdm  # not tqdm.auto: in a kernel without ipywidgets it warns with a path on import

        steps = tqdm(timesteps, desc=desc, leave=False)
    x: Any = x_T
    x0_hat: Any = None
    last = len(timesteps) - 1
    for i, t in enumerate(steps):
        n = timesteps[i + 1] if i < last else None
        x, x0_hat = step_fn(x, t, n)
        if callback is not None:
            callback({"i": i, "t": t, "n": n, "x": x, "x0_hat": x0_hat})
    return x0_hat


__all__ = ["SPACINGS", "SamplerConfig", "randn_like", "resolve_sampler", "reverse_loop", "skip_timesteps",
           "timestep_batch"]
