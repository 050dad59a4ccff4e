"""The study's BIDS-like dataset layout, shared by the phantom, the IXI importer
and a user's own data::

    DIR/
      dataset_description.json
      participants.tsv            participant_id + covariates / simulation parameters
      splits.json                 {"train": [...], "val": [...], "test": [...]}
      sub-001/anat/sub-001_T1w.nii.gz      source modalities (T1w, T2w, FLAIR, PDw, ...)
      sub-001/anat/sub-001_angio.nii.gz    target: TOF-MRA
      derivatives/<pipeline>/sub-001/...   ground truth (phantom) or QC (IXI)

All modalities of one subject share one shape and one affine. The axial axis is
the last array axis (index 2), as nibabel returns it for RAS-oriented volumes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from mmdm.io import write_json

#: Modality suffixes known to the study. ``angio`` is TOF-MRA (BIDS suffix).
KNOWN_MODALITIES = ("T1w", "T2w", "FLAIR", "PDw", "angio")
TARGET_MODALITY = "angio"
SPLIT_NAMES = ("train", "val", "test")
#: The paper's split: 98 / 14 / 28 of 140 subjects.
PAPER_SPLIT_RATIOS = (0.7, 0.1, 0.2)


class DatasetError(ValueError):
    """A dataset or file that the study cannot use; the message says what to do."""


def subject_id(index: int) -> str:
    """``sub-001`` style identifier (1-based ``index``)."""
    return f"sub-{index:03d}"


def image_path(root: str | Path, subject: str, modality: str) -> Path:
    """Path of one modality of one subject inside the layout."""
    return Path(root) / subject / "anat" / f"{subject}_{modality}.nii.gz"


def derivatives_dir(root: str | Path, pipeline: str, subject: str) -> Path:
    return Path(root) / "derivatives" / pipeline / subject


def make_splits(subjects: Sequence[str], seed: int = 0,
                ratios: tuple[float, float, float] = PAPER_SPLIT_RATIOS,
                strata: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Subject-level train/val/test split in ``ratios`` (default the paper's 98/14/28).

    With ``strata`` (subject -> group, e.g. scanner site) each group is split on
    its own, so every split sees every group in proportion. Every split gets at
    least one subject when there are at least three subjects.
    """
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must sum to 1, got {ratios}")
    groups: dict[str, list[str]] = {}
    for s in subjects:
        groups.setdefault(strata.get(s, "") if strata else "", []).append(s)
    rng = random.Random(seed)
    out: dict[str, list[str]] = {k: [] for k in SPLIT_NAMES}
    for key in sorted(groups):
        members = sorted(groups[key])
        rng.shuffle(members)
        n = len(members)
        n_val = round(n * ratios[1])
        n_test = round(n * ratios[2])
        if n >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        n_train = n - n_val - n_test
        out["train"] += members[:n_train]
        out["val"] += members[n_train:n_train + n_val]
        out["test"] += members[n_train + n_val:]
    return {k: sorted(v) for k, v in out.items()}


@dataclass(frozen=True)
class Layout:
    """A dataset directory in the study's layout."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    def subjects(self) -> list[str]:
        """Subject folders present on disk (``sub-*`` with an ``anat`` folder)."""
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: no such dataset directory. Build one with "
                               "`mmdm data phantom --out DIR`, or point to a dataset in the study's layout.")
        return sorted(p.name for p in self.root.glob("sub-*") if (p / "anat").is_dir())

    def image(self, subject: str, modality: str) -> Path:
        return image_path(self.root, subject, modality)

    def modalities(self, subject: str) -> list[str]:
        anat = self.root / subject / "anat"
        prefix = f"{subject}_"
        return sorted(p.name[len(prefix):-len(".nii.gz")] for p in anat.glob(f"{prefix}*.nii.gz"))

    def splits(self) -> dict[str, list[str]]:
        """Read ``splits.json`` and check that every listed subject exists."""
        path = self.root / "splits.json"
        if not path.exists():
            raise DatasetError(f"{path}: missing. Every dataset needs a subject-level split file "
                               "with keys train/val/test (see mmdm.data.layout.make_splits).")
        try:
            splits = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: not valid JSON ({e}).") from e
        missing_keys = [k for k in SPLIT_NAMES if k not in splits]
        if missing_keys:
            raise DatasetError(f"{path}: missing split(s) {missing_keys}; expected keys {list(SPLIT_NAMES)}.")
        present = set(self.subjects())
        for name in SPLIT_NAMES:
            absent = [s for s in splits[name] if s not in present]
            if absent:
                raise DatasetError(
                    f"{path}: split '{name}' lists subject(s) {absent[:5]} that do not exist under "
                    f"{self.root} (no {absent[0]}/anat folder). Remove them from splits.json or "
                    "restore their files.")
        seen: dict[str, str] = {}
        for name in SPLIT_NAMES:
            for s in splits[name]:
                if s in seen:
                    raise DatasetError(f"{path}: subject {s} is in both '{seen[s]}' and '{name}'.")
                seen[s] = name
        return {k: list(splits[k]) for k in SPLIT_NAMES}

    def split(self, name: str) -> list[str]:
        if name == "all":
            return self.subjects()
        if name not in SPLIT_NAMES:
            raise DatasetError(f"unknown split '{name}'; choose one of {SPLIT_NAMES + ('all',)}")
        return self.splits()[name]


def write_dataset_description(root: str | Path, name: str, description: str,
                              generated_by: Iterable[dict] | None = None, **extra) -> Path:
    obj = {"Name": name, "BIDSVersion": "1.9.0", "DatasetType": "raw", "Description": description}
    if generated_by:
        obj["GeneratedBy"] = list(generated_by)
    obj.update(extra)
    return write_json(Path(root) / "dataset_description.json", obj)
