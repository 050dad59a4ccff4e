"""Where a synthesised TOF-MRA is wrong in the air and at the ends of the axial stack.

The bridge models (MMDM, BBDM) left a grey haze where the target is air and
large errors in the first and last slices. This module measures it, on whole
volumes and stage by stage through the pipeline, so a fix can be chosen on
numbers.

Volumes are ``(X, Y, Z)`` arrays in [0, 1] (the scale of the run records:
TOF intensity as a fraction of the volume's maximum), axis 2 axial.

Region measures (:func:`haze_summary`)
    *background* = target below :data:`BACKGROUND_LEVEL` (0.05, air);
    ``background_bias`` = mean of prediction - target there; ``background_hazy``
    = share of background voxels predicted above :data:`HAZE_LEVEL` (0.1);
    PSNR over the central half of the slices and over the outer half, the share
    of the squared error in the outer half; ``banding`` = how much the per-slice
    background bias jumps from one slice to the next (mean absolute difference
    between a slice's bias and the mean of its two neighbours; 0 for a smooth
    profile).

Pipeline stages
    :func:`x0_bias_by_timestep` (what the networks predict for air at each
    timestep, teacher-forced from the true ``x_t``), :func:`sampler_trace` (the
    predictions the sampler actually uses, step by step, raw and clamped; MMDM's
    branches and fusion apart), :func:`channel_bias` and
    :func:`aggregated_slice_bias` (how a per-slice-in-window bias becomes a
    slice-to-slice pattern under the sliding-window mean of a given stride).

Validation (:func:`evaluate_run_validation`, :func:`evaluate_sweep`,
:func:`select_points`): whole validation volumes (all slices) of a trained run,
synthesised as the records do; a sweep's points are judged by the rule its
definition states (:data:`mmdm.study.sweep.SWEEPS`).
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mmdm.data.dataset import DataConfig, window_starts
from mmdm.data.layout import Layout
from mmdm.data.phantom import has_ground_truth, load_ground_truth
from mmdm.diffusion import sample_bridge, sample_multibranch
from mmdm.diffusion.sampling import randn_like
from mmdm.engine.infer import load_run_method, synthesize_subjects
from mmdm.engine.rundir import environment_info, git_info
from mmdm.io import write_text
from mmdm.metrics import psnr
from mmdm.paths import project_path
from mmdm.regions import BACKGROUND_THRESHOLD, BRIGHT_BACKGROUND, CENTRAL_SHARE
from mmdm.study.sweep import get_sweep
from mmdm.vessel_contrast import phantom_vessel_scores

#: The region breakdown's definitions (:mod:`mmdm.regions`), under the names this module's measures use:
#: background (air) is a target below 0.05 of its maximum, a background voxel above 0.1 is hazy, and the
#: central half of the axial slices is the centre of the stack.
BACKGROUND_LEVEL = BACKGROUND_THRESHOLD
HAZE_LEVEL = BRIGHT_BACKGROUND


# ---------------------------------------------------------------------------
# region measures of one volume


def _pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"pred and target must be (X, Y, Z) volumes of one shape, got {p.shape} and {t.shape}")
    return p, t


def background_mask(target: Any, level: float = BACKGROUND_LEVEL) -> np.ndarray:
    """Voxels of ``target`` (in [0, 1]) below ``level``: the air."""
    return np.asarray(target) < level


def background_stats(pred: Any, target: Any, level: float = BACKGROUND_LEVEL,
                     haze: float = HAZE_LEVEL) -> dict[str, float]:
    """``bias`` = mean(pred - target) over the background, ``hazy`` = share of background voxels
    predicted above ``haze``, ``voxels`` = their number (NaN measures when there is no background)."""
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    bg = background_mask(t, level)
    n = int(bg.sum())
    if n == 0:
        return {"bias": math.nan, "hazy": math.nan, "voxels": 0}
    return {"bias": float((p[bg] - t[bg]).mean()), "hazy": float((p[bg] > haze).mean()), "voxels": n}


def central_slices(depth: int, share: float = CENTRAL_SHARE) -> np.ndarray:
    """Boolean (depth,): the central ``share`` of the axial slices (the rest is the outer part)."""
    if depth < 1 or not 0 < share <= 1:
        raise ValueError(f"need depth >= 1 and 0 < share <= 1, got {depth}, {share}")
    n = max(1, int(round(depth * share)))
    lo = (depth - n) // 2
    out = np.zeros(depth, dtype=bool)
    out[lo:lo + n] = True
    return out


def slice_profile(pred: Any, target: Any, level: float = BACKGROUND_LEVEL) -> pd.DataFrame:
    """One row per axial slice: ``z``, ``position`` (0 first, 1 last), ``mse``, ``psnr`` (data range 1),
    ``background_bias`` (NaN on a slice without background) and ``background_share``."""
    p, t = _pair(pred, target)
    depth = p.shape[2]
    err = ((p - t) ** 2).mean(axis=(0, 1))
    bg = background_mask(t, level)
    diff = p - t
    nbg = bg.sum(axis=(0, 1))
    bias = np.where(nbg > 0, (diff * bg).sum(axis=(0, 1)) / np.maximum(nbg, 1), np.nan)
    with np.errstate(divide="ignore"):
        ps = 10 * np.log10(1.0 / np.maximum(err, 1e-20))
    return pd.DataFrame({"z": np.arange(depth), "position": np.arange(depth) / max(depth - 1, 1), "mse": err,
                         "psnr": ps, "background_bias": bias, "background_share": nbg / (p.shape[0] * p.shape[1])})


def banding(bias_per_slice: Sequence[float]) -> float:
    """Mean absolute difference between each interior slice's value and the mean of its two
    neighbours (a straight or constant profile scores 0; alternating +a/-a scores 2a)."""
    b = np.asarray(bias_per_slice, dtype=np.float64)
    b = b[np.isfinite(b)]
    if b.size < 3:
        return math.nan
    return float(np.abs(b[1:-1] - (b[:-2] + b[2:]) / 2).mean())


def haze_summary(pred: Any, target: Any, level: float = BACKGROUND_LEVEL, haze: float = HAZE_LEVEL,
                 central_share: float = CENTRAL_SHARE) -> dict[str, float]:
    """Every region measure of one volume (see the module docstring)."""
    p, t = _pair(pred, target)
    central = central_slices(p.shape[2], central_share)
    sq = (p - t) ** 2
    sse_c, sse_o = float(sq[:, :, central].sum()), float(sq[:, :, ~central].sum())
    bg = background_stats(p, t, level, haze)
    prof = slice_profile(p, t, level)
    return {
        "psnr": psnr(p, t), "psnr_central": psnr(p[:, :, central], t[:, :, central]),
        "psnr_outer": psnr(p[:, :, ~central], t[:, :, ~central]) if (~central).any() else math.nan,
        "outer_error_share": sse_o / (sse_c + sse_o) if sse_c + sse_o > 0 else math.nan,
        "background_bias": bg["bias"], "background_hazy": bg["hazy"],
        "banding": banding(prof["background_bias"].to_numpy()),
    }


# ---------------------------------------------------------------------------
# windows and the sliding-window mean


def channel_bias(pred_windows: Any, target_windows: Any, level: float = BACKGROUND_LEVEL) -> np.ndarray:
    """Background bias per position in the window: ``(N, K, H, W)`` predictions and targets in [0, 1]
    -> ``(K,)``, mean(pred - target) over the background voxels of channel k of every window."""
    p, t = np.asarray(pred_windows, dtype=np.float64), np.asarray(target_windows, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 4:
        raise ValueError(f"windows must be (N, K, H, W) of one shape, got {p.shape} and {t.shape}")
    bg = background_mask(t, level)
    n = bg.sum(axis=(0, 2, 3))
    return np.where(n > 0, ((p - t) * bg).sum(axis=(0, 2, 3)) / np.maximum(n, 1), np.nan)


def aggregated_slice_bias(bias_per_channel: Sequence[float], depth: int, stride: int) -> np.ndarray:
    """The per-slice bias that the sliding-window mean (windows at :func:`window_starts`, overlaps
    averaged, as :func:`mmdm.engine.infer.synthesize_volume`) makes of a bias that depends only on
    the position in the window. With stride 1 every interior slice averages all K positions (flat);
    with stride > 1 neighbouring slices average different subsets (a pattern of period ``stride``)."""
    b = np.asarray(bias_per_channel, dtype=np.float64)
    k = b.size
    acc, cnt = np.zeros(depth), np.zeros(depth)
    for s in window_starts(depth, k, stride):
        acc[s:s + k] += b
        cnt[s:s + k] += 1
    return acc / cnt


# ---------------------------------------------------------------------------
# pipeline probes on a trained method (MMDM or BBDM)


def _to01(x: Tensor) -> np.ndarray:
    return ((x.detach().float().cpu() + 1) / 2).numpy()


def _bg(pred: Tensor, target: Tensor, level: float, haze: float) -> dict[str, float]:
    """Background stats of window tensors in [-1, 1] (unclamped: the raw values count)."""
    return background_stats(_to01(pred), _to01(target), level, haze)


def _is_multibranch(method: Any) -> bool:
    return hasattr(method, "branches") and hasattr(method, "fuse")


@torch.no_grad()
def x0_bias_by_timestep(method: Any, batch: dict, timesteps: Sequence[int], generator: torch.Generator | None = None,
                        level: float = BACKGROUND_LEVEL, haze: float = HAZE_LEVEL) -> pd.DataFrame:
    """Teacher-forced x0 predictions: for each ``t``, ``x_t`` drawn from eq. (1) around the true
    target, and the background bias of every stage's x0 prediction (MMDM: each branch and the
    fusion; BBDM: its one network). Rows: ``t, stage, bias, hazy``."""
    method.eval()
    x0 = batch["target"]
    rows = []
    for t_int in timesteps:
        t = torch.full((x0.shape[0],), int(t_int), dtype=torch.long, device=x0.device)
        noise = randn_like(x0, generator)
        if _is_multibranch(method):
            ys = method.source_list(batch["sources"])
            preds = [method.branch_x0(m, method.bridge.q_sample(x0, y, t, noise), y, t)
                     for m, y in zip(method.sources, ys)]
            stages = {f"branch {m}": p for m, p in zip(method.sources, preds)}
            stages["branch mean"] = torch.stack(preds).mean(0)
            stages["fused"] = method.fuse(preds, ys, t)
        else:
            y = method.condition(batch["sources"])
            stages = {"x0": method.predict_x0(method.bridge.q_sample(x0, y, t, noise), y, t)}
        for name, p in stages.items():
            rows.append({"t": int(t_int), "stage": name, **{k: v for k, v in _bg(p, x0, level, haze).items()
                                                             if k != "voxels"}})
    return pd.DataFrame(rows)


@torch.no_grad()
def sampler_trace(method: Any, batch: dict, steps: int, generator: torch.Generator | None = None,
                  clip_x0: bool | None = None, level: float = BACKGROUND_LEVEL,
                  haze: float = HAZE_LEVEL) -> tuple[pd.DataFrame, Tensor]:
    """Run the method's own bridge sampler on a batch of windows and record, at every visited step,
    the background bias of what each stage predicts (raw) and of what drives the step (clamped
    when ``clip_x0``; None: the method's setting), then of the output, raw and clamped to [-1, 1].
    Returns the rows (``i, t, stage, bias, hazy``) and the final prediction (N, K, H, W).

    The wiring repeats the method's ``sample`` (branches -> fusion -> multi-branch sampler for
    MMDM, gating -> one bridge for BBDM) with recording wrappers around the networks."""
    method.eval()
    x0 = batch["target"]
    rows: list[dict] = []
    clock = {"i": 0}

    def record(stage: str, pred: Tensor, t: Tensor) -> None:
        rows.append({"i": clock["i"], "t": int(t[0]), "stage": stage,
                     **{k: v for k, v in _bg(pred, x0, level, haze).items() if k != "voxels"}})

    def after_step(info: dict) -> None:
        clock["i"] += 1

    if _is_multibranch(method):
        ys = method.source_list(batch["sources"])

        def x0_fn(xs: Sequence[Tensor], t: Tensor) -> list[Tensor]:
            preds = [method.branch_x0(m, x, y, t) for m, x, y in zip(method.sources, xs, ys)]
            for m, p in zip(method.sources, preds):
                record(f"branch {m}", p, t)
            record("branch mean", torch.stack(preds).mean(0), t)
            return preds

        def fuse(preds: Sequence[Tensor], ys_: Sequence[Tensor], t: Tensor) -> Tensor:
            out = method.fuse(preds, ys_, t)
            record("fused", out, t)
            return out

        final = sample_multibranch(x0_fn, ys, method.bridge, steps=steps, mode=method.cfg.sampling, fuse_fn=fuse,
                                   generator=generator, clip_x0=clip_x0, callback=after_step,
                                   shared_noise=method.cfg.sampling_shared_noise)
    else:
        y = method.condition(batch["sources"])

        def x0_fn(x: Tensor, t: Tensor) -> Tensor:
            out = method.predict_x0(x, y, t)
            record("x0", out, t)
            return out

        final = sample_bridge(x0_fn, y, method.bridge, steps=steps, generator=generator, clip_x0=clip_x0,
                              callback=after_step)
    record("output", final, torch.zeros(1, dtype=torch.long))
    # the stored image is clamped once (the whole-volume synthesis; BBDM's image saving): in the air a
    # noisy but unbiased output gains a positive bias there
    record("output clamped", final.clamp(-1, 1), torch.zeros(1, dtype=torch.long))
    return pd.DataFrame(rows), final


# ---------------------------------------------------------------------------
# whole validation volumes of a trained run


def evaluate_run_validation(run_dir: str | Path, subjects: Sequence[str] | None = None, stride: int = 2,
                            steps: int | None = 10, seed: int = 0, batch_size: int = 8,
                            progress: bool = False, clip_x0: bool | None = None,
                            use_ema: bool = True) -> pd.DataFrame:
    """Synthesise the validation subjects of a trained run (whole volumes, every slice, the
    sliding window of ``stride``, ``steps`` sampling steps, one generator seeded ``seed`` per
    subject) and measure them: one row per subject with :func:`haze_summary` and, on a phantom,
    the vessel contrast recovery (:func:`mmdm.vessel_contrast.phantom_vessel_scores`).
    ``clip_x0``: override the sampler's clamp of x0 (None: the run's setting); ``use_ema``: the
    run's weight average when it kept one (as the records), else its raw weights."""
    method, cfg, info = load_run_method(run_dir, use_ema=use_ema)
    if clip_x0 is not None:
        method.bridge.cfg.clip_x0 = bool(clip_x0)
    data: DataConfig = cfg.data
    root = project_path(data.root)
    subjects = list(subjects) if subjects is not None else Layout(root).split("val")
    device = next(method.parameters()).device
    phantom = has_ground_truth(root)
    rows = []
    for item in synthesize_subjects(method, data, subjects,
                                    lambda i, s: torch.Generator(device=device).manual_seed(seed),
                                    root=root, with_target=True, stride=stride, steps=steps,
                                    batch_size=batch_size, progress=progress):
        target = item.target.data / float(item.target.data.max())
        pred = item.result["mean"]
        row = {"subject": item.subject, **haze_summary(pred, target)}
        if phantom:
            gt = load_ground_truth(root, item.subject)
            row["recovery"] = float(phantom_vessel_scores(pred, target, gt["vessel_fraction"],
                                                          gt["brain_mask"])["contrast_recovery"])
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs.update({"checkpoint_step": info["step"], "ema_used": info["ema_used"]})
    return out


def evaluate_sweep(name: str, runs_root: str | Path = "runs/sweeps", results_root: str | Path = "results/sweeps",
                   stride: int = 5, steps: int = 5, reuse: bool = True, jobs: int = 1,
                   log: Callable[[str], None] = print) -> pd.DataFrame:
    """:func:`evaluate_run_validation` for every trained point of sweep ``name``; writes
    ``results_root/name/validation_volumes.csv`` (one row per point and subject) and
    ``validation_volumes.json`` (how it was made) and returns the table. ``reuse``: keep the
    rows of points measured before with the same stride and steps; ``jobs``: points measured at once."""
    sweep = get_sweep(name)
    src = project_path(runs_root) / name
    dst = project_path(results_root) / name
    frames, made = [], {}
    old_csv, old_json = dst / "validation_volumes.csv", dst / "validation_volumes.json"
    if reuse and old_csv.is_file() and old_json.is_file():  # points measured before with the same settings
        meta = json.loads(old_json.read_text())
        if meta.get("stride") == stride and meta.get("sample_steps") == steps:
            old = pd.read_csv(old_csv)
            for point, g in old.groupby("point", sort=False):
                frames.append(g)
                made[point] = meta["points"].get(point, {})
    t0 = time.time()
    todo = []
    for p in sweep.points:
        if p.name in made:
            log(f"[haze] {p.name}: measured before, kept")
        elif not (src / p.name / "train_complete.json").is_file():
            log(f"[haze] {p.name}: not trained, skipped")
        else:
            todo.append(p.name)

    def one(point: str) -> tuple[str, pd.DataFrame, float]:
        t1 = time.time()
        df = evaluate_run_validation(src / point, stride=stride, steps=steps)
        log(f"[haze] {point}: {len(df)} validation subjects in {time.time() - t1:.0f} s")
        return point, df, time.time() - t1

    # points side by side in threads (the networks' kernels release the GIL); rows in the sweep's order
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for point, df, wall in pool.map(one, todo):
            df.insert(0, "point", point)
            frames.append(df)
            made[point] = {"checkpoint_step": df.attrs["checkpoint_step"], "ema_used": df.attrs["ema_used"],
                           "wall_s": round(wall, 1)}
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    dst.mkdir(parents=True, exist_ok=True)
    write_text(dst / "validation_volumes.csv", table.to_csv(index=False))
    meta = {"what": "whole validation volumes, every slice", "stride": stride, "sample_steps": steps, "seed": 0,
            "background_level": BACKGROUND_LEVEL, "haze_level": HAZE_LEVEL, "central_share": CENTRAL_SHARE,
            "points": made, "wall_s": round(time.time() - t0, 1), "load_1min": _load(), **_provenance()}
    write_text(dst / "validation_volumes.json", json.dumps(meta, indent=2) + "\n")
    return table


def _load() -> float | None:
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _provenance() -> dict[str, Any]:
    """Commit and environment (device, versions) of this measurement."""
    return {"git": git_info(), "environment": environment_info("cpu")}


def point_means(table: pd.DataFrame) -> pd.DataFrame:
    """Mean over validation subjects per point (the numbers the selection rule reads)."""
    cols = [c for c in ("psnr", "psnr_central", "psnr_outer", "outer_error_share", "background_bias",
                        "background_hazy", "banding", "recovery") if c in table.columns]
    return table.groupby("point", sort=False)[cols].mean().reset_index()


def sweep_regions(name: str, results_root: str | Path = "results/sweeps") -> tuple[pd.DataFrame, dict] | None:
    """Where the error of each point of a recorded sweep lies on its whole validation volumes
    (:func:`evaluate_sweep`'s ``validation_volumes.csv``, the mean over subjects per point:
    :func:`point_means`) and how they were measured (``validation_volumes.json``); ``None`` when the
    sweep has no such measurement."""
    dst = project_path(results_root) / name
    csv, meta = dst / "validation_volumes.csv", dst / "validation_volumes.json"
    if not (csv.is_file() and meta.is_file()):
        return None
    return point_means(pd.read_csv(csv)), json.loads(meta.read_text())


def select_points(means: pd.DataFrame, references: dict[str, str | None], max_bias: float = 0.02,
                  max_psnr_loss: float = 0.3, max_recovery_loss: float = 0.03) -> pd.DataFrame:
    """Judge every candidate point against its reference point (``references``: point -> the point
    it is compared with, None for a reference): adopted when its background bias is at most
    ``max_bias``, its PSNR at most ``max_psnr_loss`` dB below the reference's and its contrast
    recovery at most ``max_recovery_loss`` below. Adds ``reference``, ``d_psnr``, ``d_recovery``,
    ``adopted`` (None for references and points not evaluated)."""
    by = means.set_index("point")
    rows = []
    for point, ref in references.items():
        if point not in by.index:
            continue
        row = {"point": point, "reference": ref, **by.loc[point].to_dict(), "d_psnr": math.nan,
               "d_recovery": math.nan, "adopted": None}
        if ref is not None and ref in by.index:
            r = by.loc[ref]
            row["d_psnr"] = float(by.loc[point, "psnr"] - r["psnr"])
            row["d_recovery"] = float(by.loc[point, "recovery"] - r["recovery"]) if "recovery" in by else math.nan
            ok_rec = not (row["d_recovery"] < -max_recovery_loss)  # NaN (no ground truth): not a veto
            row["adopted"] = bool(row["background_bias"] <= max_bias and row["d_psnr"] >= -max_psnr_loss and ok_rec)
        rows.append(row)
    return pd.DataFrame(rows)


def judge_sweep(name: str, results_root: str | Path = "results/sweeps") -> pd.DataFrame:
    """Apply sweep ``name``'s rule to its recorded ``validation_volumes.csv`` (each point against its
    ``reference``; thresholds of :func:`select_points`, the ones the rule states); writes and
    returns ``selection.csv``."""
    sweep = get_sweep(name)
    dst = project_path(results_root) / name
    path = dst / "validation_volumes.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: sweep '{name}' has no whole-volume validation yet; run "
                                f"`python benchmarks/haze_sweep.py {name}`")
    table = select_points(point_means(pd.read_csv(path)), {p.name: p.reference for p in sweep.points})
    write_text(dst / "selection.csv", table.to_csv(index=False))
    return table


__all__ = ["BACKGROUND_LEVEL", "CENTRAL_SHARE", "HAZE_LEVEL", "aggregated_slice_bias", "background_mask",
           "background_stats", "banding", "central_slices", "channel_bias", "evaluate_run_validation",
           "evaluate_sweep", "haze_summary", "judge_sweep", "point_means", "sampler_trace", "select_points",
           "slice_profile", "sweep_regions", "x0_bias_by_timestep"]
