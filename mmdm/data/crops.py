"""2.5D training crops, a share of them centred on the target's bright voxels.

A crop is K adjacent axial slices of an in-plane ``size`` box, cut from
subjects held in memory (e.g. :class:`mmdm.data.dataset.WindowDataset`'s
normalised volumes). An item has the layout of a window item
(:mod:`mmdm.data.dataset`), so the training engine's collate function takes it
unchanged::

    {"sources": {"T1w": (K, sx, sy), ...}, "target": (K, sx, sy), "subject": "sub-001", "z0": 12,
     "x0": 30, "y0": 41, "centre": (54, 65, 14), "vessel_centred": True, "air_centred": False}

Each crop draws, in order: a subject (uniform), its kind from one uniform
number ``u`` (vessel-centred if ``u < vessel_share``, air-centred if
``vessel_share <= u < vessel_share + background_share``, placed uniformly
otherwise), then

* vessel-centred: a centre voxel with probability proportional to
  ``max(target - q, 0) ** power``, ``q`` the ``quantile`` of that subject's
  target volume (computed once; the **target** image only, no vessel ground
  truth, so it works on IXI); the crop is placed with the centre at offset
  ``size // 2`` (``K // 2`` axially) and shifted inwards where it would leave the
  volume, so it always contains its centre and every voxel can be a centre;
* air-centred: a centre voxel drawn uniformly from the target's air (voxels
  below ``background_level`` of the target's maximum; most voxels of the
  first and last slices), placed like a vessel-centred crop. Whole volumes are
  about half air, vessel-centred crops hold little of it and rarely reach the
  ends of the stack; these crops show the model what a window of air looks like;
* otherwise: a crop position uniform over all positions inside the volume
  (its centre is reported as ``start + size // 2``).

Determinism and resume: the crops of step ``s`` are a pure function of
``(seed, rank, s)`` (:meth:`CropSampler.batch`, one numpy ``PCG64`` stream per
step), as the engine's window order is a pure function of ``(seed, epoch)``.
A resumed run therefore continues bit-identically from its step counter;
:class:`CropStream` wraps that as an iterator with ``state_dict()``.

Why not ``tio.Queue`` with ``tio.data.WeightedSampler`` (torchio 1.2)
----------------------------------------------------------------------
The issue asks for torchio's own machinery where it can serve. It cannot here:

1. its samplers draw from the **global** torch RNG (``torch.rand(1)`` in
   ``WeightedSampler.sample_probability_map``, ``torch.randint`` in
   ``UniformSampler``) and take no generator, so crops would depend on every
   other global draw of the process (dropout, Gumbel noise, validation);
2. ``tio.Queue`` fills a patch buffer from a subject ``DataLoader`` (workers,
   ``torch.randperm`` shuffling) whose position and buffer cannot be saved, so
   a run resumed from a checkpoint cannot continue with the same next crops;
3. ``WeightedSampler`` zeroes the probability within half a patch of the
   border, so vessels near the first/last slices or the in-plane border can
   never be centres, and it rebuilds the float64 CDF of the whole volume on
   every call (one call per subject visit);
4. it would also need a mixed share of map-driven and uniform crops, i.e. two
   samplers and a second random choice outside torchio.

The sampler here is small: per subject it keeps only the positive-probability
voxels' flat indices and cumulative weights (about ``1 - quantile`` of the
voxels) and samples them by inverse transform with the step's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mmdm.config import ConfigError


@dataclass
class CropConfig:
    """2.5D crop sampling (see the module doc).

    ``size``: in-plane crop ``(sx, sy)`` in voxels, or None for the whole slice
    (windows of the full in-plane extent, positioned like crops). ``multiple``:
    the spatial multiple the network needs (e.g. 16 for four down-samplings);
    both sides must be multiples of it. ``vessel_share``: the probability that
    a crop is centred by the target's probability map. ``quantile`` / ``power``:
    the map, ``max(target - q, 0) ** power`` with ``q`` the subject target's
    ``quantile``. ``background_share``: the probability that a crop is centred on
    an air voxel of the target (below ``background_level`` of its maximum);
    ``vessel_share + background_share`` must not exceed 1.
    """

    size: tuple[int, int] | None = (48, 48)
    multiple: int = 16
    vessel_share: float = 0.7
    quantile: float = 0.99
    power: float = 1.0
    background_share: float = 0.0
    background_level: float = 0.05

    def __post_init__(self) -> None:
        if self.size is not None:
            self.size = tuple(self.size)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> "CropConfig":
        """Raise :class:`ConfigError` for a setting that cannot work (shape-free checks); returns ``self``."""
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise ConfigError(f"CropConfig.multiple must be an integer >= 1 (the network's spatial multiple), "
                              f"got {self.multiple!r}")
        if self.size is not None:
            if len(self.size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                          for s in self.size):
                raise ConfigError(f"CropConfig.size must be two positive integers (in-plane voxels) or null for "
                                  f"whole slices, got {self.size!r}")
            bad = [s for s in self.size if s % self.multiple]
            if bad:
                m = self.multiple
                up = tuple(-(-s // m) * m for s in self.size)
                down = tuple(max(m, s // m * m) for s in self.size)
                raise ConfigError(f"CropConfig.size {self.size[0]}x{self.size[1]} is not a multiple of the "
                                  f"network's spatial multiple {m}; use e.g. {up[0]}x{up[1]} or {down[0]}x{down[1]}")
        if not _number(self.vessel_share) or not 0.0 <= self.vessel_share <= 1.0:
            raise ConfigError(f"CropConfig.vessel_share must lie in [0, 1] (the share of vessel-centred crops), "
                              f"got {self.vessel_share!r}")
        if not _number(self.quantile) or not 0.0 <= self.quantile < 1.0:
            raise ConfigError(f"CropConfig.quantile must lie in [0, 1) (e.g. 0.99: voxels above the subject's "
                              f"99th percentile can be centres), got {self.quantile!r}")
        if not _number(self.power) or not 0.0 < self.power < float("inf"):
            raise ConfigError(f"CropConfig.power must be a positive finite number, got {self.power!r}")
        if not _number(self.background_share) or not 0.0 <= self.background_share <= 1.0:
            raise ConfigError(f"CropConfig.background_share must lie in [0, 1] (the share of air-centred crops), "
                              f"got {self.background_share!r}")
        if self.vessel_share + self.background_share > 1.0 + 1e-12:
            raise ConfigError(f"CropConfig: vessel_share ({self.vessel_share}) + background_share "
                              f"({self.background_share}) exceeds 1; lower one of them")
        if not _number(self.background_level) or not 0.0 < self.background_level < 1.0:
            raise ConfigError(f"CropConfig.background_level must lie in (0, 1) (a fraction of the target's "
                              f"maximum), got {self.background_level!r}")
        return self


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def probability_map(target: Tensor | np.ndarray, quantile: float, power: float = 1.0) -> np.ndarray:
    """``max(target - q, 0) ** power`` (float64), ``q`` the ``quantile`` of all the target's voxels."""
    t = np.asarray(target.numpy() if isinstance(target, Tensor) else target, dtype=np.float64)
    q = float(np.quantile(t, quantile))
    return np.maximum(t - q, 0.0) ** power


class _SubjectMap:
    """Flat indices and cumulative weights of one subject's positive-probability voxels."""

    def __init__(self, target: Tensor, cfg: CropConfig):
        p = probability_map(target, cfg.quantile, cfg.power).ravel()
        self.index = np.flatnonzero(p > 0)
        self.cum = np.cumsum(p[self.index])

    def draw(self, rng: np.random.Generator) -> int:
        u = rng.random() * self.cum[-1]
        return int(self.index[min(int(np.searchsorted(self.cum, u, side="right")), self.index.size - 1)])


def air_voxels(target: Tensor | np.ndarray, level: float) -> np.ndarray:
    """Flat indices of the voxels of a normalised target (in [-1, 1], -1 = 0) below ``level`` of its
    maximum, i.e. ``(target + 1) / 2 < level``."""
    t = np.asarray(target.numpy() if isinstance(target, Tensor) else target, dtype=np.float64)
    return np.flatnonzero((t.ravel() + 1.0) / 2.0 < level)


def _start(centre: int, size: int, extent: int) -> int:
    """First index of a ``size`` box with ``centre`` at offset ``size // 2``, shifted to lie in ``[0, extent)``."""
    return int(min(max(centre - size // 2, 0), extent - size))


class CropSampler:
    """Deterministic 2.5D crops from in-memory subjects (see the module doc).

    ``volumes``: subject -> modality -> (X, Y, Z) tensor (normalised, as
    :class:`WindowDataset` keeps them); every modality of a subject on one grid.
    ``sources`` / ``target``: modality names; ``window``: K slices; ``seed``:
    the run's seed. Raises :class:`ConfigError` before any training when a crop
    cannot be cut or a subject's probability map is all zero.
    """

    def __init__(self, volumes: Mapping[str, Mapping[str, Tensor]], sources: Sequence[str], target: str,
                 window: int, cfg: CropConfig, seed: int = 0):
        cfg.validate()
        if not volumes:
            raise ConfigError("CropSampler needs at least one subject")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window (K slices) must be an integer >= 1, got {window!r}")
        self.cfg, self.window, self.seed = cfg, window, int(seed)
        self.sources, self.target = list(sources), target
        self.subjects = list(volumes)
        self.volumes = volumes
        self.shapes: dict[str, tuple[int, int, int]] = {}
        self.maps: dict[str, _SubjectMap] = {}
        self.air: dict[str, np.ndarray] = {}
        for s in self.subjects:
            mods = volumes[s]
            missing = [m for m in self.sources + [target] if m not in mods]
            if missing:
                raise ConfigError(f"subject {s}: no volume for modality {missing}; have {sorted(mods)}")
            shape = tuple(int(n) for n in mods[target].shape)
            if len(shape) != 3:
                raise ConfigError(f"subject {s}: the {target} volume must be (X, Y, Z), got shape {shape}")
            for m in self.sources:
                if tuple(mods[m].shape) != shape:
                    raise ConfigError(f"subject {s}: {m} has shape {tuple(mods[m].shape)} but {target} has {shape}")
            sx, sy = self.crop_size(shape)
            if sx > shape[0] or sy > shape[1]:
                raise ConfigError(f"subject {s}: the crop {sx}x{sy} is larger than the image's {shape[0]}x{shape[1]} "
                                  f"in-plane size; use a smaller CropConfig.size (a multiple of {cfg.multiple})")
            if window > shape[2]:
                raise ConfigError(f"subject {s}: the window of {window} slices is deeper than the volume's "
                                  f"{shape[2]} axial slices")
            if cfg.size is None and (shape[0] % cfg.multiple or shape[1] % cfg.multiple):
                raise ConfigError(f"subject {s}: whole slices of {shape[0]}x{shape[1]} are not a multiple of the "
                                  f"network's spatial multiple {cfg.multiple}; give CropConfig.size")
            self.shapes[s] = shape
            if cfg.vessel_share > 0:
                smap = _SubjectMap(mods[target], cfg)
                if smap.index.size == 0:
                    raise ConfigError(f"subject {s}: the crop probability map is all zero (no {target} voxel is "
                                      f"above its {cfg.quantile} quantile: a constant or saturated image). Lower "
                                      f"CropConfig.quantile, check the subject's {target} volume, or set "
                                      f"vessel_share to 0")
                self.maps[s] = smap
            if cfg.background_share > 0:
                self.air[s] = air_voxels(mods[target], cfg.background_level)
                if self.air[s].size == 0:
                    raise ConfigError(f"subject {s}: no {target} voxel lies below {cfg.background_level} of its "
                                      "maximum (no air to centre a crop on); set CropConfig.background_share to 0 "
                                      "or raise background_level")

    @classmethod
    def from_dataset(cls, dataset: Any, cfg: CropConfig, seed: int = 0) -> "CropSampler":
        """A sampler over the subjects a :class:`mmdm.data.dataset.WindowDataset` holds in memory."""
        return cls(dataset.volumes, dataset.cfg.sources, dataset.cfg.target, dataset.cfg.window, cfg, seed)

    def crop_size(self, shape: Sequence[int]) -> tuple[int, int]:
        """In-plane crop size for a volume of ``shape`` (the whole slice when ``cfg.size`` is None)."""
        return (int(shape[0]), int(shape[1])) if self.cfg.size is None else self.cfg.size  # type: ignore[return-value]

    def rng(self, step: int, rank: int = 0) -> np.random.Generator:
        """The generator of one step: a pure function of ``(seed, rank, step)``."""
        if step < 0 or rank < 0:
            raise ValueError(f"step and rank must be >= 0, got step={step}, rank={rank}")
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, rank, step])))

    def draw(self, rng: np.random.Generator) -> dict:
        """One crop from ``rng`` (see the module doc for the order of the draws)."""
        s = self.subjects[int(rng.integers(len(self.subjects)))]
        X, Y, Z = self.shapes[s]
        sx, sy = self.crop_size(self.shapes[s])
        k = self.window
        u = rng.random()
        vessel = bool(u < self.cfg.vessel_share)
        air = not vessel and bool(u < self.cfg.vessel_share + self.cfg.background_share)
        if vessel or air:
            flat = self.maps[s].draw(rng) if vessel else int(self.air[s][int(rng.integers(self.air[s].size))])
            cx, cy, cz = (int(i) for i in np.unravel_index(flat, (X, Y, Z)))
            x0, y0, z0 = _start(cx, sx, X), _start(cy, sy, Y), _start(cz, k, Z)
        else:
            x0, y0, z0 = (int(rng.integers(0, n + 1)) for n in (X - sx, Y - sy, Z - k))
            cx, cy, cz = x0 + sx // 2, y0 + sy // 2, z0 + k // 2
        vols = self.volumes[s]

        def cut(m: str) -> Tensor:
            return vols[m][x0:x0 + sx, y0:y0 + sy, z0:z0 + k].permute(2, 0, 1).contiguous()

        return {"sources": {m: cut(m) for m in self.sources}, "target": cut(self.target), "subject": s,
                "z0": z0, "x0": x0, "y0": y0, "centre": (cx, cy, cz), "vessel_centred": vessel,
                "air_centred": air}

    def batch(self, step: int, batch_size: int, rank: int = 0) -> list[dict]:
        """The ``batch_size`` crops of training step ``step`` on process ``rank`` (pure function)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rng = self.rng(step, rank)
        return [self.draw(rng) for _ in range(batch_size)]


class CropStream:
    """Batches of crops from ``start_step`` on, with a saveable position (for checkpoints)."""

    def __init__(self, sampler: CropSampler, batch_size: int, start_step: int = 0, rank: int = 0):
        self.sampler, self.batch_size, self.step, self.rank = sampler, batch_size, int(start_step), rank

    def __iter__(self) -> Iterator[list[dict]]:
        return self

    def __next__(self) -> list[dict]:
        out = self.sampler.batch(self.step, self.batch_size, self.rank)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        """The position and the identity of the stream (seed, rank, batch size)."""
        return {"step": self.step, "seed": self.sampler.seed, "rank": self.rank, "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue at ``state["step"]``; refuses a state of another seed, rank or batch size."""
        mine = self.state_dict()
        diff = [k for k in ("seed", "rank", "batch_size") if int(state[k]) != mine[k]]
        if diff:
            raise ValueError(f"the saved crop stream differs in {diff} ({[state[k] for k in diff]} saved, "
                             f"{[mine[k] for k in diff]} now); resume with the run's original settings")
        self.step = int(state["step"])
