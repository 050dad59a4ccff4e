"""The speed-quality frontier of MMDM's sampling: steps x window stride x coupled/independent.

The paper samples with 200 steps and overlapping windows every slice (stride
1), coupling the branches at every step (Fig. 1b). Each of the three costs
time. For MMDM full this module synthesises whole test volumes for every
setting of a grid, on one machine, and records the wall time of the
synthesis and its quality (PSNR and MIP PSNR as in Tables 1-3, SSIM, and the
vessel metrics clDice and Dice with the cohort's validation-fitted
segmentation). :func:`recommend` then names the cheapest setting within
``tol_db`` (0.2 dB) PSNR of the reference setting: the paper's (most steps,
smallest stride, coupled) where the grid holds it, else the grid's most
expensive.

The record (``results/<profile>/analysis/frontier/``: ``frontier.csv``, one
row per subject and setting, written after every setting so an interrupted
run resumes; ``summary.json`` last) is what the book reads. Before the first
timed synthesis of each sampling mode an untimed two-step synthesis of a few
windows warms the code path (lazy initialisation, allocator, caches), so the
first setting of the grid is not charged for them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # not tqdm.auto: in a kernel without ipywidgets it warns with a path on import

from mmdm.data.layout import Layout
from mmdm.data.volumes import NormConfig
from mmdm.engine.distributed import resolve_device
from mmdm.engine.infer import load_run_method, subject_sources, synthesize_volume
from mmdm.engine.rundir import RecordWriter
from mmdm.io import write_text
from mmdm.methods.base import SynthesisMethod
from mmdm.metrics import evaluate_volumes
from mmdm.paths import project_path, repo_root
from mmdm.study.api import analysis_target, results_dir, test_subjects
from mmdm.study.profiles import get_profile
from mmdm.study.records import portable
from mmdm.study.stale import model_stamp
from mmdm.study.vessel_eval import cohort_segmentation, reference_volumes
from mmdm.vessel_segmentation import evaluate_vessels

SETTING = ["mode", "stride", "steps"]
QUALITY = ("psnr", "mip_psnr", "ssim", "cldice", "dice")


def grid(steps: Sequence[int], strides: Sequence[int], modes: Sequence[str]) -> list[dict[str, Any]]:
    """Every (mode, stride, steps), cheapest first within a mode and stride."""
    if not steps or not strides or not modes:
        raise ValueError("the frontier grid needs at least one value of steps, strides and modes")
    bad = [v for v in (*steps, *strides) if int(v) < 1]
    if bad:
        raise ValueError(f"steps and strides must be >= 1, got {bad}")
    return [{"mode": m, "stride": int(s), "steps": int(n)} for m in modes for s in sorted(strides)
            for n in sorted(steps)]


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over subjects of wall time and quality per setting."""
    cols = ["wall_s", "windows", *[q for q in QUALITY if q in df]]
    return df.groupby(SETTING, as_index=False)[cols].mean()


def reference_setting(settings: pd.DataFrame) -> dict[str, Any]:
    """The paper's setting if the grid holds it (most steps, smallest stride, coupled), else the most
    expensive setting by mean wall time."""
    top = settings[(settings.steps == settings.steps.max()) & (settings.stride == settings.stride.min())]
    coupled = top[top["mode"] == "coupled"]
    row = (coupled if len(coupled) else top).iloc[0] if len(top) else settings.loc[settings.wall_s.idxmax()]
    return {k: row[k] for k in SETTING}


def recommend(df: pd.DataFrame, tol_db: float = 0.2, metric: str = "psnr",
              reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cheapest setting (mean wall time) whose mean ``metric`` is within ``tol_db`` of the
    reference setting's; ``speedup`` is the reference's wall time over the choice's."""
    s = summarise(df)
    ref = reference or reference_setting(s)
    sel = (s["mode"] == ref["mode"]) & (s.stride == ref["stride"]) & (s.steps == ref["steps"])
    if not sel.any():
        raise ValueError(f"reference setting {ref} is not in the frontier's grid")
    ref_row = s[sel].iloc[0]
    ok = s[s[metric] >= ref_row[metric] - tol_db]
    choice = ok.loc[ok.wall_s.idxmin()]
    return {"reference": {k: _plain(ref_row[k]) for k in s.columns}, "choice": {k: _plain(choice[k]) for k in s.columns},
            "tol_db": tol_db, "metric": metric, "speedup": float(ref_row.wall_s / choice.wall_s)}


def pareto(df: pd.DataFrame, metric: str = "psnr") -> pd.DataFrame:
    """The settings no other setting beats on both mean wall time (lower) and ``metric`` (higher)."""
    s = summarise(df).sort_values(["wall_s", metric], ascending=[True, False]).reset_index(drop=True)
    keep, best = [], -np.inf
    for i, row in s.iterrows():
        if row[metric] > best:
            keep.append(i)
            best = row[metric]
    return s.loc[keep].reset_index(drop=True)


def sensitivity(df: pd.DataFrame, metric: str = "psnr") -> dict[str, float]:
    """For each factor (steps, stride, mode): the largest change of mean ``metric`` that varying it
    alone makes, the other two held fixed (max over their values of max - min)."""
    s = summarise(df)
    out = {}
    for factor in SETTING[::-1]:
        if s[factor].nunique() < 2:
            out[factor] = float("nan")
            continue
        spans = s.groupby([f for f in SETTING if f != factor])[metric].agg(lambda v: v.max() - v.min())
        out[factor] = float(spans.max())
    return out


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def frontier_settings(subjects: Sequence[str], steps: Sequence[int], strides: Sequence[int],
                      modes: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """What a frontier record was measured with beyond the model (recorded; a record with other settings
    than the profile's now is measured again)."""
    return {"subjects": list(subjects), "steps": sorted(int(x) for x in steps),
            "strides": sorted(int(x) for x in strides), "modes": list(modes), "seed": seed}


def run_frontier(run_dir: str | Path, out_dir: str | Path, subjects: Sequence[str], steps: Sequence[int],
                 strides: Sequence[int], modes: Sequence[str] = ("coupled", "independent"), seed: int = 0,
                 device: str = "auto", seg_cache: str | Path | None = None, profile: str | None = None,
                 progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Synthesise every subject with every setting of the grid; resumable, ``summary.json`` last."""
    record = RecordWriter(out_dir)
    out_dir = record.root
    dev = resolve_device(device)
    method, cfg, ckpt = load_run_method(run_dir, device=dev)
    asked = frontier_settings(subjects, steps, strides, modes, seed)  # recorded as asked, before modes resolve
    if not method.sampling_modes:
        modes = ("default",)
    settings = grid(steps, strides, modes)
    root = project_path(cfg.data.root)
    seg = cohort_segmentation(root, seg_cache or out_dir / "vessel_segmentation.yaml")
    csv = out_dir / "frontier.csv"
    done = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=["subject", *SETTING])
    model = model_stamp(run_dir)
    rows = [r for r in done.to_dict("records") if r.get("model") == model]  # measured with this model only
    if len(rows) < len(done):
        log(f"[frontier] {len(done) - len(rows)} setting(s) measured with another model of {Path(run_dir).name}: "
            "measuring them again")
    have = {(r["subject"], r["mode"], int(r["stride"]), int(r["steps"])) for r in rows}
    todo = {s: [g for g in settings if (s, g["mode"], g["stride"], g["steps"]) not in have] for s in subjects}
    record.start_clock()  # the timed part: syntheses, not loading the model or fitting the segmentation
    bar = tqdm(total=sum(map(len, todo.values())), desc="frontier", unit="setting", dynamic_ncols=True) \
        if progress else None
    warmed: dict[str, float] = {}
    original_mode = method.sampling_mode
    try:
        for item in subject_sources(cfg.data, [s for s in subjects if todo[s]], root=root):
            s, srcs = item.subject, item.sources
            target, gt, brain, _, _ = reference_volumes(root, s, seg)
            for g in todo[s]:
                if g["mode"] != "default":
                    method.sampling_mode = g["mode"]
                if g["mode"] not in warmed:
                    warmed[g["mode"]] = _warm_up(method, srcs, cfg.data.window, cfg.data.norm, dev)
                gen = torch.Generator(device=dev).manual_seed(seed)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                tic = time.perf_counter()
                res = synthesize_volume(method, srcs, window=cfg.data.window, stride=g["stride"], steps=g["steps"],
                                        norm=cfg.data.norm, generator=gen, progress=False)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                wall = time.perf_counter() - tic
                q = evaluate_volumes(res["mean"], target)
                v = evaluate_vessels(res["mean"], gt, seg, brain_mask=brain, subject=s)
                rows.append({"subject": s, **g, "model": model, "windows": res["windows"], "wall_s": wall,
                             **{k: q[k] for k in ("psnr", "mip_psnr", "ssim")}, "cldice": v["cldice"],
                             "dice": v["dice"]})
                write_text(csv, pd.DataFrame(rows).to_csv(index=False))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{s} {g['mode']} stride {g['stride']} steps {g['steps']}: {wall:.1f} s")
    finally:
        if bar is not None:
            bar.close()
        if original_mode is not None:
            method.sampling_mode = original_mode
    record.finish(portable({
        "analysis": "frontier", "run": str(run_dir), "profile": profile, "subjects": list(subjects),
        "grid": {"steps": sorted(int(x) for x in steps), "strides": sorted(int(x) for x in strides),
                 "modes": list(modes)},
        "seed": seed, "warmup_s": {m: round(w, 3) for m, w in warmed.items()}, "checkpoint_step": ckpt.get("step"),
        "models": {Path(run_dir).name: model}, "settings": asked,
        **record.session(dev, git_root=repo_root())}))
    return out_dir


def _warm_up(method: SynthesisMethod, sources: dict[str, np.ndarray], window: int, norm: NormConfig,
             dev: torch.device) -> float:
    """One untimed two-step synthesis (the fewest a sampler takes) of about a batch of windows; returns
    its seconds."""
    depth = next(iter(sources.values())).shape[-1]
    tic = time.perf_counter()
    synthesize_volume(method, sources, window=window, stride=max(1, (depth - window) // 8), steps=2, norm=norm,
                      generator=torch.Generator(device=dev).manual_seed(0), progress=False)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - tic


def load_frontier(out_dir: str | Path) -> dict[str, Any] | None:
    """``{"table": per subject and setting, "summary": ...}``, or None while missing or unfinished."""
    out_dir = Path(out_dir)
    if not (out_dir / "summary.json").is_file():
        return None
    return {"table": pd.read_csv(out_dir / "frontier.csv"), "summary": json.loads((out_dir / "summary.json").read_text())}


def ensure_frontier(profile, device: str | None = None, log: Callable[[str], None] = print,
                    progress: bool = True) -> Path | None:
    """The profile's frontier record: measured with MMDM full's checkpoint unless complete.
    Returns None (and says why) when the profile skips it or the checkpoint is not here."""
    profile = get_profile(profile)
    if not profile.frontier_steps:
        return None
    subjects = test_subjects(profile, profile.frontier_subjects)
    out, run_dir = analysis_target(profile, "frontier", log, settings=None if subjects is None else frontier_settings(
        subjects, profile.frontier_steps, profile.frontier_strides, profile.frontier_modes))
    if run_dir is None:
        return out if (out / "summary.json").is_file() else None
    subjects = Layout(project_path(profile.data_dir)).split("test")[: profile.frontier_subjects]
    n = len(profile.frontier_steps) * len(profile.frontier_strides) * len(profile.frontier_modes) * len(subjects)
    log(f"[analysis] frontier: {n} syntheses of {len(subjects)} test subject(s)")
    return run_frontier(run_dir, out, subjects, profile.frontier_steps, profile.frontier_strides,
                        profile.frontier_modes, device=device or profile.device,
                        seg_cache=results_dir(profile) / "vessel_segmentation.yaml", profile=profile.name,
                        progress=progress, log=log)
