"""Reading a written phantom cohort's ground truth back from disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmdm.data.layout import DatasetError
from mmdm.data.phantom.cohort import MODALITIES, subject_files
from mmdm.data.phantom.visibility import vessel_visibility
from mmdm.data.volumes import load_volume


def has_ground_truth(root: str | Path) -> bool:
    """Whether ``root`` is a phantom cohort with its ground truth (``derivatives/phantom/``)."""
    return (Path(root) / "derivatives" / "phantom").is_dir()


def load_ground_truth(root: str | Path, subject: str) -> dict:
    """Vessel labels and fractions, tissue labels, brain mask, centreline graph and
    simulation parameters of one phantom subject (``derivatives/phantom/``)."""
    files = subject_files(Path(root), subject)
    if not files["centerlines"].exists():
        raise DatasetError(f"{files['centerlines']}: no phantom ground truth for {subject}. Is {root} a phantom "
                           "cohort (built by `mmdm data phantom`), and is it complete?")
    out = {k: load_volume(files[k], allow_empty=True).data for k in ("vessels", "vesselfraction", "dseg", "brainmask")}
    params_path = files["centerlines"].with_name(f"{subject}_params.json")
    return {
        "vessel_labels": out["vessels"].astype(np.int32),
        "vessel_fraction": out["vesselfraction"],
        "tissue_labels": out["dseg"].astype(np.uint8),
        "brain_mask": out["brainmask"] > 0,
        "centerlines": json.loads(files["centerlines"].read_text()),
        "params": json.loads(params_path.read_text()) if params_path.exists() else {},
    }


def subject_visibility(root: str | Path, subject: str, k: float = 3.0) -> dict:
    """:func:`vessel_visibility` of a written subject, with the simulation's known noise levels.

    Adds ``"fraction"``: per modality, the fraction of the segments that TOF-MRA
    shows which are visible in that modality, and ``"union"`` for the sources together.
    """
    gt = load_ground_truth(root, subject)
    images = {m: load_volume(subject_files(Path(root), subject)[m]).data for m in MODALITIES}
    sigma = {m: gt["params"][f"noise_sigma_{m}"] for m in MODALITIES if f"noise_sigma_{m}" in gt["params"]}
    vis = vessel_visibility(images, gt["vessel_fraction"], gt["tissue_labels"], gt["vessel_labels"],
                            noise_sigma=sigma if len(sigma) == len(MODALITIES) else None, k=k)
    tof = vis["visible"]["angio"]
    sources = [m for m in MODALITIES if m != "angio"]
    union = set().union(*(vis["visible"][m] for m in sources)) & tof
    denom = max(len(tof), 1)
    vis["fraction"] = {m: len(vis["visible"][m] & tof) / denom for m in sources}
    vis["fraction"]["union"] = len(union) / denom
    return vis
