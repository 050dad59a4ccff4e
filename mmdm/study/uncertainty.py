"""Per-voxel uncertainty of MMDM from repeated sampling, and whether it tracks the error.

A diffusion model's sampler is stochastic: drawing the same volume ``K``
times (each draw the paper's sliding-window synthesis with fresh noise) gives
a per-voxel standard deviation across draws. The synthesis itself is the mean
of the draws. Inside the brain we ask whether that spread tracks the actual
error ``|mean - target|``: Pearson and Spearman correlation per subject, the
mean error in equal-count bins of the standard deviation (a calibration
curve), and the share of the total error that falls in the 10 % most
uncertain voxels (0.1 if uncertainty says nothing about the error).

The analysis needs MMDM full's checkpoint (``runs/<profile>/mmdm-full``); its
record, ``results/<profile>/analysis/uncertainty/`` (``uncertainty.csv``,
``uncertainty_bins.csv``, ``uncertainty.npz``, then ``summary.json``), is
what the book reads.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from mmdm.data.layout import Layout
from mmdm.engine.distributed import resolve_device
from mmdm.engine.evaluate import sampling_record
from mmdm.engine.infer import load_run_method, synthesize_subjects
from mmdm.engine.rundir import RecordWriter
from mmdm.io import atomic_path, write_text
from mmdm.paths import project_path, repo_root
from mmdm.study.api import analysis_target, test_subjects
from mmdm.study.profiles import get_profile
from mmdm.study.records import portable
from mmdm.study.stale import model_stamp
from mmdm.study.vessel_eval import reference_volumes

N_BINS = 10


def uncertainty_stats(mean: np.ndarray, std: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None,
                      n_bins: int = N_BINS) -> tuple[dict[str, float], pd.DataFrame]:
    """Does ``std`` track ``|mean - target|`` inside ``mask``?

    Returns per-volume statistics (``pearson_r``, ``spearman_rho``, ``mean_std``,
    ``mean_abs_error``, ``top_decile_error_share``, ``n_voxels``) and a table of
    ``n_bins`` equal-count bins of ``std`` (ascending) with the mean std and
    the mean absolute error of each. Correlations are NaN where either side is constant.
    """
    mean, std, target = (np.asarray(a, dtype=np.float64) for a in (mean, std, target))
    if not (mean.shape == std.shape == target.shape):
        raise ValueError(f"mean, std and target must have one shape, got {mean.shape}, {std.shape}, {target.shape}")
    m = np.ones(mean.shape, bool) if mask is None else np.asarray(mask, bool)
    if m.shape != mean.shape:
        raise ValueError(f"mask shape {m.shape} differs from the volume's {mean.shape}")
    if m.sum() < n_bins:
        raise ValueError(f"the mask holds {int(m.sum())} voxels, fewer than the {n_bins} bins")
    s, e = std[m], np.abs(mean - target)[m]
    constant = s.std() == 0 or e.std() == 0
    pearson = float("nan") if constant else float(np.corrcoef(s, e)[0, 1])
    spearman = float("nan") if constant else float(spearmanr(s, e).statistic)
    order = np.argsort(s, kind="stable")
    chunks = np.array_split(order, n_bins)
    bins = pd.DataFrame({"bin": np.arange(n_bins), "std_mean": [s[c].mean() for c in chunks],
                         "abs_error_mean": [e[c].mean() for c in chunks], "n_voxels": [len(c) for c in chunks]})
    top = order[len(order) - max(1, len(order) // 10):]
    share = float(e[top].sum() / e.sum()) if e.sum() > 0 else float("nan")
    return ({"pearson_r": pearson, "spearman_rho": spearman, "mean_std": float(s.mean()),
             "mean_abs_error": float(e.mean()), "top_decile_error_share": share, "n_voxels": int(m.sum())}, bins)


def uncertainty_panels(mean: np.ndarray, std: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """The central axial slice and the axial maximum projection of target, mean, std and |error|."""
    err = np.abs(mean - target)
    z = mean.shape[2] // 2
    out = {}
    for name, vol in (("target", target), ("mean", mean), ("std", std), ("error", err)):
        out[f"{name}_axial"] = vol[:, :, z]
        out[f"{name}_mip"] = vol.max(axis=2)
    return {k: np.asarray(v, dtype=np.float16) for k, v in out.items()}


def uncertainty_settings(subjects: Sequence[str], n_samples: int, steps: int | None, stride: int | None,
                         seed: int = 0) -> dict[str, Any]:
    """What an uncertainty record was sampled with beyond the model (recorded; a record with other settings
    than the profile's now is sampled again)."""
    return {"subjects": list(subjects), "samples": n_samples, "steps": steps, "stride": stride, "seed": seed}


def run_uncertainty(run_dir: str | Path, out_dir: str | Path, subjects: Sequence[str], n_samples: int,
                    steps: int | None = None, stride: int | None = None, seed: int = 0, device: str = "auto",
                    profile: str | None = None, progress: bool = True) -> Path:
    """Sample every subject ``n_samples`` times with the run's model and write the record."""
    settings = uncertainty_settings(subjects, n_samples, steps, stride, seed)  # as asked, before they resolve
    if n_samples < 2:
        raise ValueError(f"uncertainty needs at least 2 samples per subject, got {n_samples}")
    if not subjects:
        raise ValueError("no subjects to sample")
    record = RecordWriter(out_dir)
    out_dir = record.root
    dev = resolve_device(device)
    method, cfg, ckpt = load_run_method(run_dir, device=dev)
    root = project_path(cfg.data.root)
    stride = stride or cfg.data.eval_stride
    rows, bins, panels = [], [], {}
    draws = synthesize_subjects(method, cfg.data, subjects,
                                lambda i, s: torch.Generator(device=dev).manual_seed(seed + i), root=root,
                                stride=stride, steps=steps, n_samples=n_samples, progress=progress,
                                desc=lambda s: f"{s} x{n_samples}")
    for i, item in enumerate(draws):
        s, res = item.subject, item.result
        target, _, brain, _, _ = reference_volumes(root, s)
        if not np.any(res["std"] > 0):
            warnings.warn(f"{s}: the {n_samples} draws are identical: the sampler injects no noise at this "
                          f"setting (eta = 0, or fewer than 3 sampling steps); the uncertainty is zero", stacklevel=2)
        stats, b = uncertainty_stats(res["mean"], res["std"], target, brain)
        rows.append({"subject": s, **stats})
        bins.append(b.assign(subject=s))
        if i == 0:
            panels = uncertainty_panels(res["mean"], res["std"], target)
    write_text(out_dir / "uncertainty.csv", pd.DataFrame(rows).to_csv(index=False))
    write_text(out_dir / "uncertainty_bins.csv", pd.concat(bins, ignore_index=True).to_csv(index=False))
    buf = io.BytesIO()
    np.savez_compressed(buf, subject=np.array(subjects[0]), **panels)
    with atomic_path(out_dir / "uncertainty.npz") as tmp:
        tmp.write_bytes(buf.getvalue())
    record.finish(portable({
        "analysis": "uncertainty", "run": str(run_dir), "profile": profile, "subjects": list(subjects),
        "sampling": sampling_record(method, steps, None, n_samples=n_samples, stride=stride, seed=seed),
        "checkpoint_step": ckpt.get("step"), "models": {Path(run_dir).name: model_stamp(run_dir)},
        "settings": settings,
        **record.session(dev, git_root=repo_root())}))
    return out_dir


def load_uncertainty(out_dir: str | Path) -> dict[str, Any] | None:
    """The record (tables, panels, summary), or None while it is missing or unfinished."""
    out_dir = Path(out_dir)
    if not (out_dir / "summary.json").is_file():
        return None
    with np.load(out_dir / "uncertainty.npz") as z:
        panels = {k: z[k] for k in z.files}
    return {"subjects": pd.read_csv(out_dir / "uncertainty.csv"), "bins": pd.read_csv(out_dir / "uncertainty_bins.csv"),
            "panels": panels, "summary": json.loads((out_dir / "summary.json").read_text())}


def ensure_uncertainty(profile, device: str | None = None, log: Callable[[str], None] = print,
                       progress: bool = True) -> Path | None:
    """The profile's uncertainty record: computed from MMDM full's checkpoint unless complete.
    Returns None (and says why) when the profile skips it or the checkpoint is not here."""
    profile = get_profile(profile)
    if profile.uncertainty_samples < 2:
        return None
    steps = profile.uncertainty_steps or profile.eval_sample_steps
    subjects = test_subjects(profile, profile.uncertainty_subjects)
    out, run_dir = analysis_target(profile, "uncertainty", log, settings=None if subjects is None else
                                   uncertainty_settings(subjects, profile.uncertainty_samples, steps,
                                                        profile.eval_stride))
    if run_dir is None:
        return out if (out / "summary.json").is_file() else None
    subjects = Layout(project_path(profile.data_dir)).split("test")[: profile.uncertainty_subjects]
    log(f"[analysis] uncertainty: {profile.uncertainty_samples} samples of {len(subjects)} test subjects")
    return run_uncertainty(run_dir, out, subjects, profile.uncertainty_samples, steps=steps,
                           stride=profile.eval_stride, device=device or profile.device, profile=profile.name,
                           progress=progress)
