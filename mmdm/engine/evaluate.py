"""The evaluation of a trained run: predictions, ``metrics.csv`` and, last, ``summary.json``.

The top of the engine: it rebuilds the run's method (:mod:`mmdm.engine.infer`),
synthesises every subject of a split, scores each prediction with the six
metrics of Tables 1-3 (:func:`mmdm.metrics.evaluate_volumes`) and the
threshold-free vessel score (:func:`subject_vessel_scores`), breaks its error down by
region and axial slice (:mod:`mmdm.regions`: ``regions.csv``, ``slice_errors.csv``) and
writes the record through :class:`mmdm.engine.rundir.RecordWriter`. An interrupted
evaluation resumes after its last finished subject (``evaluation_progress.json``).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch

from mmdm.config import to_dict
from mmdm.data.layout import SPLIT_NAMES, Layout
from mmdm.data.phantom import has_ground_truth, load_ground_truth
from mmdm.engine.distributed import resolve_device
from mmdm.engine.infer import check_amp, load_run_method, synthesize_subjects
from mmdm.engine.rundir import (VESSEL_SCORE_COLUMNS, RecordWriter, run_lock, run_paths,
                                run_provenance, run_status, write_metrics_csv, write_table_csv)
from mmdm.engine.spec import resolve_ema
from mmdm.io import check_output_path, save_nifti, tof_fraction_descrip, write_json
from mmdm.methods.base import SynthesisMethod
from mmdm.metrics import METRIC_KEYS, evaluate_volumes
from mmdm.regions import REGION_COLUMNS, SLICE_COLUMNS, region_errors, region_summary, slice_errors
from mmdm.vessel_contrast import HEAD_THRESHOLD, phantom_vessel_scores, vessel_scores

#: What summary.json says the vessel score is (key ``vessel``, ``definition``).
VESSEL_SCORE_DEFINITION = (
    "Threshold-free vessel score (mmdm.vessel_contrast), prediction and target both scaled by the target's maximum. "
    "recovery: (mean prediction on the vessel lumen - mean prediction on vessel-free brain) / (the same for the "
    "real TOF-MRA); 1 = the target's vessel contrast, 0 = vessels as dark as the brain. psnr: PSNR (dB, data "
    "range 1) inside the lumen dilated by 1 voxel. Lumen: phantom vessel fraction >= 0.1 "
    "(mmdm.vessel_segmentation.phantom_lumen; mask_source 'ground_truth'); without ground truth the brightest 1 % of the real TOF-MRA inside its head mask "
    "(target > 0.05; 'bright_target'). Vessel-free brain: the brain (head) mask minus every vessel voxel dilated "
    "by 1 voxel. Means and sample sd over the subjects that could be scored (n_scored).")


def subject_vessel_scores(pred: np.ndarray, target: np.ndarray, data_root: str | Path,
                          subject: str, truth: dict[str, Any] | None = None) -> dict[str, Any]:
    """``vessel_recovery``, ``vessel_psnr`` and ``mask_source`` of one subject's prediction.

    ``pred`` and ``target`` are both scaled by the target's maximum (evaluate_run's
    convention). On a phantom cohort the lumen is :func:`mmdm.vessel_segmentation.phantom_lumen`
    (:func:`mmdm.vessel_contrast.phantom_vessel_scores`, inside the phantom's brain mask); on
    other data the brightest 1 % of ``target`` inside its head mask (``target >``
    :data:`HEAD_THRESHOLD`). A subject that cannot be scored (e.g. a target without vessel
    contrast) gets NaN and a warning saying why, so one bad subject does not stop the evaluation.
    ``truth``: the subject's phantom ground truth when the caller has already loaded it.
    """
    root = Path(data_root)
    try:
        if truth is not None or has_ground_truth(root):
            gt = truth if truth is not None else load_ground_truth(root, subject)
            s = phantom_vessel_scores(pred, target, gt["vessel_fraction"], gt["brain_mask"], data_range=1.0)
        else:
            s = vessel_scores(pred, target, brain_mask=np.asarray(target) > HEAD_THRESHOLD, data_range=1.0)
    except ValueError as err:
        warnings.warn(f"{subject}: no vessel score ({err})", stacklevel=2)
        return {"vessel_recovery": math.nan, "vessel_psnr": math.nan, "mask_source": None}
    return {"vessel_recovery": float(s["contrast_recovery"]), "vessel_psnr": float(s["vessel_psnr"]),
            "mask_source": s["mask_source"]}


def subject_brain_mask(data_root: str | Path, subject: str, truth: dict[str, Any] | None = None) -> np.ndarray | None:
    """The phantom's brain mask of ``subject`` (None without ground truth: the region breakdown then
    uses the head, target >= :data:`mmdm.regions.BACKGROUND_THRESHOLD`); ``truth`` as in
    :func:`subject_vessel_scores`."""
    root = Path(data_root)
    if truth is None and not has_ground_truth(root):
        return None
    return np.asarray((truth if truth is not None else load_ground_truth(root, subject))["brain_mask"], dtype=bool)


def vessel_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``vessel`` entry of summary.json: mean and sample sd of each score over the subjects
    with a score (None when no subject has one), how many, and the mask used."""
    out: dict[str, Any] = {}
    for col in VESSEL_SCORE_COLUMNS:
        v = np.array([r[col] for r in rows], dtype=np.float64)
        v = v[~np.isnan(v)]
        key = col.removeprefix("vessel_")
        out[key] = float(np.mean(v)) if len(v) else None
        with np.errstate(invalid="ignore"):
            out[f"{key}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else (0.0 if len(v) else None)
    out["n_scored"] = int(sum(not math.isnan(r["vessel_recovery"]) for r in rows))
    out["mask_source"] = sorted({r["mask_source"] for r in rows if r["mask_source"]})
    out["definition"] = VESSEL_SCORE_DEFINITION
    return out


def training_footing(cfg: Any, method: Any, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The ``training`` entry of summary.json: what this row was given, for the footing table --
    optimiser steps (configured, and of the evaluated checkpoint), which weights were evaluated
    (the weight average or the raw weights) and the average's setting, the batch size and the
    learning rate of every optimiser group."""
    ema = resolve_ema(cfg, method)
    lrs = {g: float(c.lr) for g, c in method.optim_configs().items()}
    return {"steps": cfg.steps, "epochs": cfg.epochs if cfg.steps is None else None,
            "checkpoint_step": ckpt.get("step"), "batch_size": cfg.batch_size,
            "ema_evaluated": bool(ckpt.get("ema_used")), "ema": to_dict(ema) if ema is not None else None,
            "ema_mode": cfg.ema_mode, "lr": lrs}


def check_evaluation_args(split: str, steps: int | None, eta: float | None, n_samples: int, batch_size: int,
                          seed: int) -> None:
    """Raise ``ValueError`` (with what to pass instead) for an evaluation argument out of range."""
    if split not in (*SPLIT_NAMES, "all"):
        raise ValueError(f"unknown split '{split}'; choose one of {', '.join((*SPLIT_NAMES, 'all'))}")
    for name, v in (("steps", steps), ("samples", n_samples), ("batch size", batch_size)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a whole number >= 1 (got {v!r})")
    if eta is not None and not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0 (got {eta})")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0 (got {seed!r})")


def evaluate_run(run_dir: str | Path, split: str = "test", steps: int | None = None, eta: float | None = None,
                 n_samples: int = 1, batch_size: int = 8, device: str = "auto", checkpoint: str = "latest",
                 use_ema: bool = True, seed: int = 0, subjects: Sequence[str] | None = None,
                 require_complete: bool = True, progress: bool = True, amp: str = "none",
                 allow_code: bool = False) -> dict[str, Any]:
    """Synthesise every subject of ``split``, write predictions, metrics.csv, then summary.json.

    The data (root, modalities, window, normalisation) come from the run's
    config. Each prediction is the sliding-window mean in [0, 1] (see
    :func:`mmdm.engine.infer.synthesize_volume`); it is scored against
    ``target / target.max()`` with :func:`mmdm.metrics.evaluate_volumes`.
    ``summary.json`` is deleted first and written last, so an interrupted
    evaluation never looks finished. ``amp="bf16"`` samples with bf16 autocast of the networks
    (:func:`mmdm.engine.infer.synthesize_volume`); the summary's ``sampling`` records it.

    Every argument, the checkpoint, the method (``allow_code``: see
    :func:`mmdm.engine.infer.load_run_method`), the subjects and the run directory's
    writability are checked, and the run's lock taken, before the record is touched: a call
    that fails on any of them leaves a finished record as it was.
    """
    p = run_paths(run_dir)
    if require_complete and not p.train_complete.is_file():
        raise RuntimeError(f"run {run_dir} has not finished training (no train_complete.json; state "
                           f"'{run_status(run_dir)}'). Resume it with `mmdm train --resume --run-dir {run_dir}`, "
                           "or pass require_complete=False to evaluate its latest checkpoint anyway.")
    check_evaluation_args(split, steps, eta, n_samples, batch_size, seed)
    dev = resolve_device(device)
    check_amp(amp, dev)
    method, cfg, ckpt = load_run_method(run_dir, checkpoint=checkpoint, device=dev, use_ema=use_ema,
                                        allow_code=allow_code)
    subs = list(subjects) if subjects is not None else Layout(cfg.data.root).split(split)
    if not subs:
        raise RuntimeError(f"split '{split}' of {Layout(cfg.data.root).root} is empty: nothing to evaluate")
    layout = Layout(cfg.data.root)
    shape = nib.load(str(layout.image(subs[0], cfg.data.target))).shape
    per_subject = int(np.prod(shape[:3])) * 4 * (2 if n_samples > 1 else 1)  # float32, uncompressed: an upper bound
    check_output_path(p.predictions / f"{subs[0]}_{cfg.data.target}.nii.gz", nbytes=per_subject * len(subs) + 2**20,
                      what="prediction")
    with run_lock(p.root, "evaluation"):
        return _evaluate(p, run_dir, method, cfg, ckpt, subs, split, steps, eta, n_samples, batch_size, dev, seed,
                         progress, amp)


def sampling_record(method: SynthesisMethod, steps: int | None, eta: float | None, **extra: Any) -> dict[str, Any]:
    """How the predictions were sampled, with the values actually used (never None for "the config's
    default"): ``steps``, ``eta``, ``spacing``, ``clip_x0`` of the method's sampler
    (:meth:`~mmdm.methods.base.SynthesisMethod.sampler_settings`; all None for a one-pass method, whose
    ``sampler`` is None), the sampling ``mode`` where the method has several, then ``extra``."""
    used = method.sampler_settings(steps, eta)
    out: dict[str, Any] = {"steps": used["sample_steps"] if used else None, "eta": used["eta"] if used else None,
                           "spacing": used["spacing"] if used else None, "clip_x0": used["clip_x0"] if used else None,
                           "sampler": "iterative" if used else "one pass"}
    if method.sampling_modes:
        out["mode"] = method.sampling_mode
    return {**out, **extra}


def _progress_key(cfg, ckpt, subs, split, steps, eta, n_samples, batch_size, dev, seed, amp) -> dict[str, Any]:
    """Everything that decides an evaluation's predictions: an unfinished evaluation resumes only under the same."""
    return {"checkpoint": ckpt.get("file"), "step": ckpt.get("step"), "ema": ckpt.get("ema_used"), "split": split,
            "subjects": list(subs), "steps": steps, "eta": eta, "n_samples": n_samples, "batch_size": batch_size,
            "device": str(dev), "seed": seed, "amp": amp, "window": cfg.data.window, "stride": cfg.data.eval_stride,
            "norm": to_dict(cfg.data.norm)}


def _plain(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers, as JSON reads it back."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


def _resume_point(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The saved progress of an interrupted evaluation made under ``key``; None (and the file removed)
    when there is none or it was made under another key."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        state = None
    if not isinstance(state, dict) or state.get("key") != json.loads(json.dumps(key, default=str)):
        path.unlink()
        return None
    return state


def _evaluate(p, run_dir, method, cfg, ckpt, subs, split, steps, eta, n_samples, batch_size, dev, seed, progress,
              amp) -> dict[str, Any]:
    """Synthesise and score ``subs`` in turn. After each subject its scores and the sampling generator's state
    go to ``evaluation_progress.json``, so an interrupted evaluation resumes after its last finished subject
    with the generator where it was: the record is the one an uninterrupted evaluation writes."""
    record = RecordWriter(p.root)
    gen = torch.Generator(device=dev).manual_seed(seed)  # one stream through all subjects
    descrip = tof_fraction_descrip(1.0)
    key = _progress_key(cfg, ckpt, subs, split, steps, eta, n_samples, batch_size, dev, seed, amp)
    state = _resume_point(p.evaluation_progress, key)
    rows, regions, slices = ([], [], []) if state is None else (state["rows"], state["regions"], state["slices"])
    wall_before = 0.0 if state is None else float(state["wall_s"])
    if state is not None:
        gen.set_state(torch.tensor(state["rng"], dtype=torch.uint8))
        if progress:
            print(f"{run_dir}: evaluation resumes after {len(rows)} of {len(subs)} subjects", file=sys.stderr)
    phantom = has_ground_truth(cfg.data.root)
    todo = subs[len(rows):]
    for item in synthesize_subjects(method, cfg.data, todo, lambda i, s: gen, with_target=True, steps=steps,
                                    eta=eta, n_samples=n_samples, batch_size=batch_size, progress=progress, amp=amp):
        s, out, target = item.subject, item.result, item.target
        save_nifti(p.predictions / f"{s}_{cfg.data.target}.nii.gz", out["mean"], target.affine, descrip=descrip)
        if "std" in out:
            save_nifti(p.predictions / f"{s}_{cfg.data.target}_std.nii.gz", out["std"], target.affine,
                       descrip=descrip)
        target01 = target.data / float(target.data.max())
        truth = load_ground_truth(cfg.data.root, s) if phantom else None  # read once for both uses
        # as plain JSON values, in the record as in the saved progress (a resumed record is the same to the digit)
        rows.append(_plain({"subject": s, **evaluate_volumes(out["mean"], target01),
                            **subject_vessel_scores(out["mean"], target01, cfg.data.root, s, truth)}))
        regions.append(_plain({"subject": s, **region_errors(out["mean"], target01,
                                                             subject_brain_mask(cfg.data.root, s, truth))}))
        slices += _plain([{"subject": s, **r} for r in slice_errors(out["mean"], target01)])
        write_json(p.evaluation_progress, {"key": key, "rows": rows, "regions": regions, "slices": slices,
                                           "rng": gen.get_state().tolist(),
                                           "wall_s": wall_before + time.time() - record.t0})
    write_metrics_csv(p.metrics, rows)
    write_table_csv(p.regions, regions, ("subject", *REGION_COLUMNS))
    write_table_csv(p.slice_errors, slices, ("subject", *SLICE_COLUMNS))
    means = {k: float(np.mean([r[k] for r in rows])) for k in METRIC_KEYS}
    stds = {k: float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0 for k in METRIC_KEYS}
    summary = record.finish({
        "run": str(Path(run_dir)), "method": cfg.method, "method_kwargs": cfg.method_kwargs,
        "method_config": cfg.method_config, "objective": method.objective(),
        "split": split, "n_subjects": len(rows), "subjects": [r["subject"] for r in rows],
        "metrics": means, "metrics_std": stds, "vessel": vessel_summary(rows), "regions": region_summary(regions),
        "training": training_footing(cfg, method, ckpt),
        "sampling": sampling_record(method, steps, eta, n_samples=n_samples, seed=seed, window=cfg.data.window,
                                    stride=cfg.data.eval_stride, amp=amp),
        "checkpoint": {"file": ckpt.get("file"), "step": ckpt.get("step"), "ema": ckpt.get("ema_used")},
        "evaluation": _session(record, dev, wall_before, len(subs) - len(todo)),
        "provenance": run_provenance(run_dir),
    })
    p.evaluation_progress.unlink(missing_ok=True)
    return summary


def _session(record: RecordWriter, dev, wall_before: float, resumed_after: int) -> dict[str, Any]:
    """The evaluation's session fields; a resumed one's ``wall_s`` counts the interrupted sessions' time too
    (``resumed_after``: how many subjects they had finished)."""
    out = record.session(dev)
    if resumed_after:
        out["wall_s"] = round(out["wall_s"] + wall_before, 3)
        out["resumed_after_subjects"] = resumed_after
    return out


__all__ = ["check_evaluation_args", "evaluate_run", "sampling_record", "subject_vessel_scores", "vessel_summary",
           "VESSEL_SCORE_DEFINITION"]
