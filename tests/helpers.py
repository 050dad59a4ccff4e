"""Small datasets built by the tests themselves (independent of the phantom)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

MODS = ("T1w", "T2w", "FLAIR", "angio")


def affine(spacing=(2.0, 2.0, 2.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = [-90.0, -120.0, -70.0]
    return a


def write_subject(root: Path, subject: str, shape=(16, 16, 12), seed=0, mods=MODS, aff=None) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for i, m in enumerate(mods):
        data = (rng.random(shape) * (i + 1) * 100).astype(np.float32)
        path = root / subject / "anat" / f"{subject}_{m}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine() if aff is None else aff), str(path))
        out[m] = data
    return out


def make_dataset(root: Path, n: int = 5, shape=(16, 16, 12)) -> dict:
    subjects = [f"sub-{i:03d}" for i in range(1, n + 1)]
    data = {s: write_subject(root, s, shape, seed=i) for i, s in enumerate(subjects)}
    splits = {"train": subjects[:-2], "val": subjects[-2:-1], "test": subjects[-1:]}
    (root / "splits.json").write_text(json.dumps(splits))
    return data


#: what a study needs from the checkout (the package itself is installed)
STUDY_SOURCES = ("_config.yml", "_toc.yml", "book", "data_cards", "notebooks", "pyproject.toml")


@contextlib.contextmanager
def study_copy(work: Path, repo: Path, cohorts: dict[str, Path] | None = None) -> Iterator[Path]:
    """A copy of the repository's study sources in ``work``, each of ``cohorts`` linked as
    ``data/<name>`` (e.g. ``{"phantom-tiny": path}``), and ``MMDM_ROOT`` pointing at the copy
    for the duration of the block."""
    for name in STUDY_SOURCES:
        src = repo / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    shutil.rmtree(work / "book" / "generated", ignore_errors=True)
    for name, path in (cohorts or {}).items():
        (work / "data").mkdir(exist_ok=True)
        os.symlink(path, work / "data" / name)
    old = os.environ.get("MMDM_ROOT")
    os.environ["MMDM_ROOT"] = str(work)
    try:
        yield work
    finally:
        if old is None:
            os.environ.pop("MMDM_ROOT", None)
        else:
            os.environ["MMDM_ROOT"] = old
