"""Vessel continuity of a run's predictions (the paper's claim for the MIP loss, measured).

The segmentation of a synthesised TOF-MRA (:mod:`mmdm.vessel_segmentation`) is fitted once
per cohort on the **validation** subjects' real TOF-MRA against their ground
truth vessel masks, never on test subjects, and stored in
``results/<profile>/vessel_segmentation.yaml``. Each test prediction is then
segmented with it and compared with the phantom's ground truth: clDice, Dice,
Dice of the axial MIPs, fragmentation, recovered length by vessel radius.
For data without vessel ground truth (IXI), the reference is the same
segmentation of the real TOF-MRA.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mmdm.config import load_yaml, save_yaml
from mmdm.data.dataset import load_subject_volumes
from mmdm.data.layout import TARGET_MODALITY, Layout
from mmdm.data.phantom import has_ground_truth, load_ground_truth
from mmdm.data.volumes import load_volume
from mmdm.vessel_contrast import HEAD_THRESHOLD
from mmdm.vessel_segmentation import VesselSegConfig, evaluate_vessels, fit_segmentation, phantom_lumen, segment_vessels


def reference_volumes(root: Path, subject: str, cfg: VesselSegConfig | None = None):
    """(target volume scaled to [0, 1], ground-truth vessel mask, brain mask, centrelines, affine)."""
    vol = load_subject_volumes(root, subject, [TARGET_MODALITY])[TARGET_MODALITY]
    target = vol.data / float(vol.data.max())
    if has_ground_truth(root):
        gt = load_ground_truth(root, subject)
        return target, phantom_lumen(gt["vessel_fraction"]), gt["brain_mask"], gt["centerlines"], vol.affine
    brain = target > HEAD_THRESHOLD
    return target, segment_vessels(target, cfg or VesselSegConfig(), brain), brain, None, vol.affine


def cohort_segmentation(root: str | Path, cache: str | Path) -> VesselSegConfig:
    """The vessel segmentation fitted on the cohort's validation split (cached in ``cache``)."""
    cache = Path(cache)
    if cache.is_file():
        return load_yaml(VesselSegConfig, cache)
    root = Path(root)
    cfg = VesselSegConfig()
    if has_ground_truth(root):
        vols, gts, masks = {}, {}, {}
        for s in Layout(root).split("val"):
            target, gt, brain, _, _ = reference_volumes(root, s)
            vols[s], gts[s], masks[s] = target, gt, brain
        cfg = fit_segmentation(vols, gts, cfg, masks=masks)
    save_yaml(cfg, cache)
    return cfg


def vessel_metrics(run_dir: str | Path, data_root: str | Path, cfg: VesselSegConfig,
                   subjects: list[str]) -> pd.DataFrame:
    """One row of vessel metrics per evaluated test subject of a run."""
    run_dir, root = Path(run_dir), Path(data_root)
    rows = []
    for s in subjects:
        pred = load_volume(run_dir / "predictions" / f"{s}_{TARGET_MODALITY}.nii.gz").data
        _, gt, brain, centerlines, affine = reference_volumes(root, s, cfg)
        rows.append({"subject": s, **evaluate_vessels(pred, gt, cfg, centerlines=centerlines, affine=affine,
                                                      brain_mask=brain, subject=s)})
    return pd.DataFrame(rows)
