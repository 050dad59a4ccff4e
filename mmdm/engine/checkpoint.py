"""Checkpoints: atomic writes, keep-last-k, and every random number generator's state.

A checkpoint is one ``torch.save`` file ``RUN/checkpoints/step-00001000.pt``
written through :func:`mmdm.io.atomic_path` (temporary file + fsync + rename),
so a process killed while writing leaves the previous checkpoint intact and no
half-written file under a final name. Files are read back with
``torch.load(..., weights_only=True)``: everything stored is a tensor or a plain
Python value (dict, list, tuple, int, float, str, bool, None) -- including the
RNG states, which is why numpy's and Python's states are converted to lists.

Captured RNG states (:func:`capture_rng`): Python ``random``, numpy's global
``RandomState``, torch's CPU generator, every CUDA device's generator (when
CUDA is initialised) and any ``torch.Generator`` the caller owns.
"""

from __future__ import annotations

import contextlib
import errno
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from mmdm.io import atomic_path

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8,})\.pt$")
#: the temporary file of a checkpoint being written (:func:`mmdm.io.atomic_path`); one left behind
#: by a process killed while writing is an orphan
TEMP_PATTERN = re.compile(r"^\.step-\d{8,}\..+\.pt$")


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint taken after ``step`` optimiser steps."""
    return f"step-{step:08d}.pt"


# ----------------------------------------------------------------------------
# random number generator states


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state as tensors and plain Python values (``weights_only``-loadable)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(v) for v in mt], "gauss": gauss},
        "numpy": {"name": str(name), "keys": [int(v) for v in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng`; generators named in ``state`` but not given are ignored."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], np.asarray(npst["keys"], dtype=np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].cpu(), i)
    for k, g in (generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k].cpu())


# ----------------------------------------------------------------------------
# files


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` ``state`` to ``path`` (the old file survives any failure)."""
    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch's writer reports a full disk as "enforce fail ... unexpected pos"
            free = shutil.disk_usage(path.parent).free
            raise OSError(errno.ENOSPC, f"writing checkpoint {path} failed ({str(e).strip().splitlines()[-1]}); "
                          f"{free / 2**20:.1f} MiB are free there, so the disk is most likely full. Free some "
                          "space, then continue with `mmdm train --resume` (the previous checkpoint is intact)") from e
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a clear error if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; list the run's checkpoints/ folder "
                                "or train the run first (`mmdm train`).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and what to do
        first = (str(e).strip().splitlines() or [""])[0]
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(e).__name__}: {first}). The file is "
                           "damaged: use another checkpoint of the run ('latest' falls back to the previous "
                           "readable one by itself) or retrain.") from e


class CheckpointManager:
    """The ``checkpoints/`` folder of a run: numbered files, the last ``keep_last`` kept."""

    def __init__(self, directory: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (got {keep_last}): at least the latest checkpoint is kept")
        self.dir = Path(directory)
        self.keep_last = int(keep_last)

    def steps(self) -> list[int]:
        """Steps of the checkpoints on disk, ascending (temporary files are ignored)."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = CHECKPOINT_PATTERN.match(p.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def path(self, step: int) -> Path:
        return self.dir / checkpoint_name(step)

    def remove_orphans(self) -> list[Path]:
        """Delete the temporary files of checkpoint writes that never finished (a process killed
        while writing). Only the run directory's single writer may call this."""
        if not self.dir.is_dir():
            return []
        removed = [p for p in self.dir.iterdir() if TEMP_PATTERN.match(p.name)]
        for p in removed:
            p.unlink(missing_ok=True)
        return removed

    def resolve(self, checkpoint: str | int | Path = "latest") -> Path:
        """``"latest"``, a step number or a path -> the checkpoint file (which must exist)."""
        if str(checkpoint) == "latest":
            path = self.latest()
            if path is None:
                raise FileNotFoundError(f"{self.dir} holds no checkpoint; train the run first "
                                        f"(`mmdm train --resume --run-dir {self.dir.parent}`)")
            return path
        path = self.path(int(checkpoint)) if str(checkpoint).isdigit() else Path(checkpoint)
        if not path.is_file():
            have = ", ".join(str(s) for s in self.steps()) or "none"
            raise FileNotFoundError(f"checkpoint {checkpoint}: {path} does not exist; the run's checkpoints are at "
                                    f"steps {have} (use one of them, or 'latest')")
        return path

    def latest(self) -> Path | None:
        """The newest checkpoint, or None when there is none."""
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step``, then delete all but the last ``keep_last``."""
        path = save_checkpoint(self.path(step), state)
        self.prune()
        return path

    def prune(self) -> list[Path]:
        removed = []
        for s in self.steps()[:-self.keep_last]:
            p = self.path(s)
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

    def load_newest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """``(path, state)`` of the newest readable checkpoint, None when there is none. An unreadable
        newer one is skipped with a warning that names it (training, evaluation and synthesis all
        fall back this way)."""
        errors = []
        for s in reversed(self.steps()):
            path = self.path(s)
            try:
                state = load_checkpoint(path, map_location)
            except RuntimeError as e:
                errors.append(str(e))
                continue
            if errors:
                warnings.warn(f"using checkpoint {path.name}: the newer one(s) cannot be read ("
                              + "; ".join(errors) + ")", stacklevel=2)
            return path, state
        if errors:
            raise RuntimeError(f"no readable checkpoint in {self.dir}: " + " | ".join(errors))
        return None


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without touching any global RNG stream (Python, numpy, torch CPU and CUDA)."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)
