"""Datasets in the study's layout: torchio subjects and 2.5D slice windows.

The networks of the paper see **2.5D windows**: K adjacent axial slices
(K = 5 in the authors' code) of every modality, stacked as channels. A window
item is::

    {"sources": {"T1w": (K, X, Y), "T2w": ..., "FLAIR": ...},
     "target": (K, X, Y), "subject": "sub-001", "z0": 12}

with intensities normalised per volume to [-1, 1] (:mod:`mmdm.data.volumes`).
The axial axis is the last axis of the stored volumes; window channel k is
axial slice ``z0 + k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mmdm.data.layout import TARGET_MODALITY, DatasetError, Layout
from mmdm.data.volumes import NormConfig, Volume, check_same_grid, load_volume, normalise


@dataclass
class DataConfig:
    """Which dataset, which modalities, and how windows are cut."""

    root: str = "data/phantom-quick"
    sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")
    target: str = TARGET_MODALITY
    window: int = 5  # K adjacent axial slices (authors: 5)
    train_stride: int = 2  # authors: training windows every 2nd slice
    eval_stride: int = 1  # whole-volume synthesis: every slice, overlaps averaged
    norm: NormConfig = field(default_factory=NormConfig)


def load_subject_volumes(layout: Layout | str | Path, subject: str,
                         modalities: Sequence[str]) -> dict[str, Volume]:
    """Load and validate the given modalities of one subject (same grid enforced)."""
    layout = layout if isinstance(layout, Layout) else Layout(layout)
    available = layout.modalities(subject) if (layout.root / subject / "anat").is_dir() else []
    missing = [m for m in modalities if m not in available]
    if missing:
        raise DatasetError(
            f"subject {subject}: missing modality {missing} (expected "
            f"{[str(layout.image(subject, m)) for m in missing]}; found {available or 'nothing'}). "
            "Choose source modalities that every subject has, or drop this subject from splits.json.")
    vols = {m: load_volume(layout.image(subject, m)) for m in modalities}
    check_same_grid(vols, subject)
    return vols


def load_torchio_subject(layout: Layout | str | Path, subject: str, modalities: Sequence[str]):
    """The subject as a :class:`torchio.Subject` with one ScalarImage per modality (validated)."""
    import torchio as tio

    vols = load_subject_volumes(layout, subject, modalities)
    images = {m: tio.ScalarImage(tensor=torch.from_numpy(v.data)[None], affine=v.affine) for m, v in vols.items()}
    return tio.Subject(subject_id=subject, **images)


def window_starts(depth: int, window: int, stride: int) -> list[int]:
    """First slice of every window; the last window always ends at the last slice."""
    if depth < window:
        raise DatasetError(f"volume has {depth} axial slices, fewer than the window of {window}")
    starts = list(range(0, depth - window + 1, stride))
    if starts[-1] != depth - window:
        starts.append(depth - window)
    return starts


class WindowDataset(Dataset):
    """2.5D windows of K adjacent axial slices from the subjects of one split.

    Volumes are loaded, validated and normalised once and kept in memory
    (float32). ``stride`` defaults to the config's training stride.
    """

    def __init__(self, cfg: DataConfig, split: str = "train", stride: int | None = None,
                 subjects: Sequence[str] | None = None):
        self.cfg = cfg
        self.layout = Layout(cfg.root)
        self.split = split
        self.stride = stride or cfg.train_stride
        if len(cfg.sources) < 1:
            raise DatasetError("at least one source modality is needed")
        if cfg.target in cfg.sources:
            raise DatasetError(f"target modality {cfg.target} is also listed as a source")
        self.subjects = list(subjects) if subjects is not None else self.layout.split(split)
        if not self.subjects:
            raise DatasetError(f"{self.layout.root}: split '{split}' is empty")
        mods = list(cfg.sources) + [cfg.target]
        self.volumes: dict[str, dict[str, torch.Tensor]] = {}
        self.norm_params: dict[str, dict[str, dict]] = {}
        self.affines: dict[str, np.ndarray] = {}
        self.index: list[tuple[str, int]] = []
        for s in self.subjects:
            vols = load_subject_volumes(self.layout, s, mods)
            self.affines[s] = vols[cfg.target].affine
            self.volumes[s], self.norm_params[s] = {}, {}
            for m, v in vols.items():
                arr, params = normalise(v.data, cfg.norm)
                self.volumes[s][m] = torch.from_numpy(arr)
                self.norm_params[s][m] = params
            depth = vols[cfg.target].data.shape[2]
            self.index += [(s, z0) for z0 in window_starts(depth, cfg.window, self.stride)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        s, z0 = self.index[i]
        k = self.cfg.window
        vols = self.volumes[s]
        win = lambda m: vols[m][:, :, z0:z0 + k].permute(2, 0, 1).contiguous()  # noqa: E731
        return {"sources": {m: win(m) for m in self.cfg.sources}, "target": win(self.cfg.target),
                "subject": s, "z0": z0}
