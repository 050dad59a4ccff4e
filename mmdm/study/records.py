"""Run records: the small, committable part of a run, and reading them back for the book.

A run directory (``runs/<profile>/<run>``) holds checkpoints and volumes. Its
*record* (``results/<profile>/<run>``) holds only what the book needs:
``config.yaml``, ``provenance.json``, ``metrics.csv`` (per test subject),
``scalars.csv`` (the TensorBoard scalars), ``panels.npz`` (a few 2D images of
one test subject for Fig. 3), ``regions.csv`` and ``slice_errors.csv`` (where
each test subject's error lies: :mod:`mmdm.regions`), ``validation.jsonl`` (the trainer's validation
log, one JSON object per validation, where the run has one) and, written last,
``summary.json``. A record without ``summary.json`` is unfinished and the book
ignores it.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import pandas as pd

from mmdm.data.layout import Layout
from mmdm.engine.rundir import REGIONS_FILE, SLICE_ERRORS_FILE, VALIDATION_LOG, VESSEL_SCORE_COLUMNS, run_paths
from mmdm.io import atomic_path, write_json, write_text
from mmdm.metrics import METRIC_KEYS, axial_mip
from mmdm.regions import PANEL_ESTIMATE, REGION_COLUMNS, panel_regions
from mmdm.paths import repo_root

#: The image metrics of the tables (the one tuple, :data:`mmdm.metrics.METRIC_KEYS`).
METRICS = METRIC_KEYS
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "rmse": False, "mip_psnr": True, "mip_ssim": True, "mip_rmse": False}
METRIC_LABELS = {"psnr": "PSNR", "ssim": "SSIM", "rmse": "RMSE(%)", "mip_psnr": "MIP PSNR", "mip_ssim": "MIP SSIM",
                 "mip_rmse": "MIP RMSE(%)"}
#: The files an evaluated run's record keeps (:func:`export_record`); the trainer's validation log
#: (VALIDATION_LOG) holds one JSON object per line,
#: ``{"step": 200, "losses": {...}, "vessel": {"recovery": ..., "psnr": ..., "n_windows": ...}}``.
RECORD_FILES = ("config.yaml", "provenance.json", "metrics.csv", "vessel_metrics.csv", "scalars.csv", "panels.npz",
                REGIONS_FILE, SLICE_ERRORS_FILE, VALIDATION_LOG, "summary.json")
#: The files a training-only record keeps (a sweep point: trained and validated, never evaluated).
TRAINING_RECORD_FILES = ("config.yaml", "provenance.json", "train_complete.json", VALIDATION_LOG)
#: Vessel-continuity metrics (:mod:`mmdm.vessel_segmentation`) shown in the book, and their direction.
VESSEL_METRICS = ("cldice", "dice", "mip_dice", "betti0_error")
VESSEL_HIGHER_IS_BETTER = {"cldice": True, "dice": True, "mip_dice": True, "betti0_error": False}
METRIC_LABELS_VESSEL = {"cldice": "clDice", "dice": "vessel Dice", "mip_dice": "MIP Dice",
                        "betti0_error": "Betti-0 error"}
#: The threshold-free vessel score of each test subject (metrics.csv; :mod:`mmdm.vessel_contrast`), both higher is
#: better. Records written before it existed lack these columns.
VESSEL_SCORES = VESSEL_SCORE_COLUMNS
VESSEL_SCORE_LABELS = {"vessel_recovery": "contrast recovery", "vessel_psnr": "vessel PSNR",
                       "vessel_contrast_error": "|1 − recovery|"}
#: The contrast recovery is 1 when the vessels stand out from the brain as in the target; above 1 they
#: overshoot. Its height says how much vessel contrast a model learnt (below 1), its distance from 1
#: (``vessel_contrast_error``, derived per subject by :func:`load_records`) how right it is.
VESSEL_SCORE_HIGHER_IS_BETTER = {"vessel_recovery": True, "vessel_psnr": True, "vessel_contrast_error": False}
#: A run whose validation contrast recovery never reaches this did not learn to draw vessels.
VESSELS_LEARNED_RECOVERY = 0.2


def record_complete(record_dir: str | Path) -> bool:
    return (Path(record_dir) / "summary.json").is_file()


def read_scalars(run_dir: str | Path) -> pd.DataFrame:
    """All TensorBoard scalars of a run as a long table (tag, step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for ev in sorted(run_paths(run_dir).tb.glob("**/events.out.tfevents.*")):
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            rows += [{"tag": tag, "step": e.step, "value": e.value} for e in acc.Scalars(tag)]
    df = pd.DataFrame(rows, columns=["tag", "step", "value"])
    return df.drop_duplicates(["tag", "step"], keep="last").sort_values(["tag", "step"]).reset_index(drop=True)


def figure_panels(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """The views of Fig. 3 for one subject, both scaled by the target's max: axial, sagittal and
    coronal slices through the centre, axial MIP (max over the axial stack) and coronal MIP."""
    scale = float(target.max())
    out = {}
    for who, vol in (("pred", pred), ("target", target / scale)):
        x, y, z = vol.shape
        out[f"{who}_axial"] = vol[:, :, z // 2]
        out[f"{who}_sagittal"] = vol[x // 2, :, :]
        out[f"{who}_coronal"] = vol[:, y // 2, :]
        out[f"{who}_axial_mip"] = axial_mip(vol)
        out[f"{who}_coronal_mip"] = vol.max(axis=1)
    return {k: np.asarray(v, dtype=np.float16) for k, v in out.items()}


def export_record(run_dir: str | Path, record_dir: str | Path) -> Path:
    """Copy a finished run's record into ``record_dir`` (``summary.json`` last)."""
    import nibabel as nib

    run_dir, record_dir = Path(run_dir), Path(record_dir)
    p = run_paths(run_dir)
    if not p.summary.is_file():
        raise RuntimeError(f"run {run_dir} is not evaluated yet (no summary.json): nothing to export")
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / "summary.json").unlink(missing_ok=True)
    for src in (p.provenance, p.metrics, p.regions, p.slice_errors, run_dir / "vessel_metrics.csv",
                run_dir / VALIDATION_LOG):
        if not src.is_file():
            continue
        with atomic_path(record_dir / src.name) as tmp:
            shutil.copyfile(src, tmp)
    import yaml

    cfg = yaml.safe_load(p.config.read_text())
    data_root = cfg["data"]["root"]
    write_text(record_dir / "config.yaml", yaml.safe_dump(portable(cfg), sort_keys=False))
    write_text(record_dir / "scalars.csv", read_scalars(run_dir).to_csv(index=False))
    summary = json.loads(p.summary.read_text())
    subject = summary["subjects"][0]
    target_mod = cfg["data"]["target"]
    target = Layout(data_root).image(subject, target_mod)
    pred = nib.load(str(p.predictions / f"{subject}_{target_mod}.nii.gz")).get_fdata(dtype=np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, subject=np.array(subject), **figure_panels(pred, nib.load(str(target)).get_fdata(dtype=np.float32)))
    with atomic_path(record_dir / "panels.npz") as tmp:
        tmp.write_bytes(buf.getvalue())
    write_json(record_dir / "summary.json", portable(summary))
    return record_dir


def portable(obj):
    """``obj`` with every absolute path inside the repository rewritten relative to it, so a
    committed record does not carry the directory layout of the machine that ran it."""
    root = str(repo_root()).rstrip("/") + "/"

    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items()}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o[len(root):] if isinstance(o, str) and o.startswith(root) else o

    return strip(obj)


def load_records(results_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-subject metrics, one row per run) of every complete record under ``results_dir``.

    The per-subject table has columns ``run, subject`` + the six metrics (+ the vessel scores
    :data:`VESSEL_SCORES` and the vessel metrics where the record has them, NaN in the rows of
    records without them); the run table has ``run, method, variant, sources, objective,
    n_subjects, steps, device, commit, train_wall_s, eval_wall_s``, the six means and the
    means of the vessel scores (NaN where the record has none).
    """
    results_dir = Path(results_dir)
    per_subject, runs = [], []
    for rec in sorted(p for p in results_dir.iterdir() if p.is_dir()) if results_dir.is_dir() else []:
        if not record_complete(rec):
            continue
        summary = json.loads((rec / "summary.json").read_text())
        m = pd.read_csv(rec / "metrics.csv")
        if (rec / "vessel_metrics.csv").is_file():
            m = m.merge(pd.read_csv(rec / "vessel_metrics.csv"), on="subject", how="left")
        m.insert(0, "run", rec.name)
        per_subject.append(m)
        prov = summary.get("provenance", {})
        git = prov.get("git") or {}
        kw = summary.get("method_kwargs", {})
        resolved = summary.get("method_config") or {}
        runs.append({
            "run": rec.name, "method": summary.get("method"), "variant": kw.get("variant"),
            "sources": "+".join(resolved.get("sources") or kw.get("sources", [])), "objective": summary.get("objective"),
            "n_subjects": summary.get("n_subjects"),
            "steps": summary.get("checkpoint", {}).get("step"), "profile": prov.get("profile"),
            "device": summary.get("evaluation", {}).get("device_name", ""),
            "commit": (git.get("commit") or "")[:10] + ("-dirty" if git.get("dirty") else ""),
            "train_wall_s": prov.get("train_wall_s"),
            "eval_wall_s": summary.get("evaluation", {}).get("wall_s"),
            **summary.get("metrics", {}),
            **{c: m[c].mean() if c in m else float("nan") for c in VESSEL_SCORES}})
    ps = pd.concat(per_subject, ignore_index=True) if per_subject else pd.DataFrame(columns=["run", "subject", *METRICS])
    for c in VESSEL_SCORES:
        if c not in ps:
            ps[c] = float("nan")
    ps["vessel_contrast_error"] = (1.0 - pd.to_numeric(ps["vessel_recovery"])).abs()
    return ps, pd.DataFrame(runs)


#: ``source`` of a region row read from the record's regions.csv / slice_errors.csv
REGIONS_MEASURED = "whole volume"


def _complete_records(results_dir: Path) -> list[Path]:
    return [p for p in sorted(results_dir.iterdir()) if p.is_dir() and record_complete(p)] if results_dir.is_dir() else []


def _measured_or_estimated(results_dir: str | Path, filename: str, estimate: Callable[[dict], list[dict]],
                           cols: list[str]) -> pd.DataFrame:
    """One table over every complete record: its ``filename`` (``source`` :data:`REGIONS_MEASURED`) or,
    for a record written before that file existed, the rows ``estimate`` makes from
    :func:`mmdm.regions.panel_regions` of its panels.npz (``source`` :data:`mmdm.regions.PANEL_ESTIMATE`)."""
    rows = []
    for rec in _complete_records(Path(results_dir)):
        if (rec / filename).is_file():
            r = pd.read_csv(rec / filename)
            r.insert(0, "run", rec.name)
            r.insert(2, "source", REGIONS_MEASURED)
            rows.append(r)
        elif (rec / "panels.npz").is_file():
            with np.load(rec / "panels.npz") as z:
                est = panel_regions({k: z[k] for k in z.files})
            rows.append(pd.DataFrame([{"run": rec.name, "subject": est["subject"], "source": PANEL_ESTIMATE, **r}
                                      for r in estimate(est)]))
    # a column a record predates (e.g. slice_banding) reads as NaN: "not measured" rather than an error
    return pd.concat(rows, ignore_index=True).reindex(columns=cols) if rows else pd.DataFrame(columns=cols)


def load_regions(results_dir: str | Path) -> pd.DataFrame:
    """The region breakdown (:mod:`mmdm.regions`) of every complete record: ``run, subject, source``
    and :data:`mmdm.regions.REGION_COLUMNS`, one row per test subject.

    ``source`` says what a row is computed on: :data:`REGIONS_MEASURED` (the record's regions.csv),
    or, for a record written before regions.csv existed, :data:`mmdm.regions.PANEL_ESTIMATE` (one row,
    the subject of its panels.npz, from the stored mid-sagittal slice; None when it has no panels)."""
    return _measured_or_estimated(results_dir, REGIONS_FILE, lambda est: [est["regions"]],
                                  ["run", "subject", "source", *REGION_COLUMNS])


def load_slice_errors(results_dir: str | Path) -> pd.DataFrame:
    """The per-slice error profile of every complete record: ``run, subject, source, z, position, mse,
    psnr, background_bias`` (:func:`mmdm.regions.slice_errors`); ``source`` as in :func:`load_regions`
    (a record without slice_errors.csv: the profile along its stored mid-sagittal slice)."""
    return _measured_or_estimated(results_dir, SLICE_ERRORS_FILE, lambda est: est["slices"],
                                  ["run", "subject", "source", "z", "position", "mse", "psnr", "background_bias"])


def read_validation_log(path: str | Path) -> list[dict]:
    """The entries of a validation log (:data:`VALIDATION_LOG`), in file order; [] when there is none.

    A last line that is not valid JSON (a log cut off mid-write) is dropped; a bad line
    before the last one is an error, as the file is then damaged rather than unfinished."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError(f"a JSON {type(entry).__name__}, not an object")
        except ValueError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {i + 1} of {len(lines)}: not a validation entry ({err}); only the "
                             "last line may be cut off") from err
        out.append(entry)
    return out


def vessel_curves(results_dir: str | Path) -> pd.DataFrame:
    """Validation vessel score against training step of every complete record under ``results_dir``.

    Columns ``run, method, step, recovery, psnr``, one row per validation entry that has a
    ``vessel`` score (read with :func:`read_validation_log`); records without a validation log
    (written before the trainer kept one) contribute nothing."""
    results_dir = Path(results_dir)
    rows = []
    for rec in sorted(p for p in results_dir.iterdir() if p.is_dir()) if results_dir.is_dir() else []:
        if not record_complete(rec):
            continue
        method = json.loads((rec / "summary.json").read_text()).get("method")
        for e in read_validation_log(rec / VALIDATION_LOG):
            v = e.get("vessel")
            if not isinstance(v, dict) or e.get("step") is None:
                continue
            rows.append({"run": rec.name, "method": method, "step": int(e["step"]),
                         "recovery": _float(v.get("recovery")), "psnr": _float(v.get("psnr"))})
    df = pd.DataFrame(rows, columns=["run", "method", "step", "recovery", "psnr"])
    # a resumed training validates again at steps it had logged before it stopped: keep the latest
    df = df.drop_duplicates(["run", "step"], keep="last")
    return df.sort_values(["run", "step"], kind="stable").reset_index(drop=True)


#: Whole-volume validation scores (``volume`` of a validation entry; :mod:`mmdm.engine.volume_validation`).
VOLUME_CURVE_SCORES = ("psnr", "ssim", "mip_psnr", "mip_ssim", "vessel_recovery")


def volume_curves(results_dir: str | Path) -> pd.DataFrame:
    """Whole-volume validation scores against training step of every complete record: columns
    ``run, method, step`` + :data:`VOLUME_CURVE_SCORES` + ``stride, sampler_steps``, one row per
    validation entry with a ``volume`` score; records written before whole-volume validation
    contribute nothing."""
    rows = []
    for rec in _complete_records(Path(results_dir)):
        method = json.loads((rec / "summary.json").read_text()).get("method")
        for e in read_validation_log(rec / VALIDATION_LOG):
            v = e.get("volume")
            if not isinstance(v, dict) or e.get("step") is None:
                continue
            rows.append({"run": rec.name, "method": method, "step": int(e["step"]),
                         **{k: _float(v.get(k)) for k in VOLUME_CURVE_SCORES},
                         "stride": v.get("stride"), "sampler_steps": v.get("steps")})
    cols = ["run", "method", "step", *VOLUME_CURVE_SCORES, "stride", "sampler_steps"]
    df = pd.DataFrame(rows, columns=cols).drop_duplicates(["run", "step"], keep="last")
    return df.sort_values(["run", "step"], kind="stable").reset_index(drop=True)


def _float(x) -> float:
    return float("nan") if x is None else float(x)


def runs_without_learned_vessels(curves: pd.DataFrame,
                                 threshold: float = VESSELS_LEARNED_RECOVERY) -> list[str]:
    """Runs of :func:`vessel_curves` whose validation contrast recovery stays below ``threshold``
    at every validation (NaN entries ignored; a run with none at all is not listed)."""
    if not len(curves):
        return []
    best = curves.groupby("run").recovery.max().dropna()
    return sorted(best[best < threshold].index)


#: Why a method's runs may stay below :data:`VESSELS_LEARNED_RECOVERY` under the CPU profiles' vessel set-up:
#: the study's reading of its own records and sweeps, shown only beside runs whose recorded
#: scores are in fact below it. Each is an explanation to be tested, not a measurement.
NO_VESSELS_WHY: dict[str, str] = {
    "pix2pix": "Its per-pixel term is L1, whose minimiser is a weighted median rather than a mean: where the "
               "sources leave it uncertain whether a voxel is a vessel, the median can stay at the brain's intensity "
               "even with the vessel weight, and the adversarial term added no vessels within its budget. A probable "
               "cause, not a tested one: ResViT and BBDM also use L1 and get further. With the emphasis it still "
               "recovers more than without (the emphasis ablation on the results page).",
    "rddm": "Both of its terms (residual and noise) are L1 as in the original, so the median argument given for "
            "Pix2Pix may apply to the residual that carries the vessels; its validation curve levels off near zero "
            "well before the end of its budget.",
    "ddpm": "It predicts the noise (Ho et al.'s eps objective) and samples from pure noise, so a vessel first has "
            "to emerge from the synthesis as a whole: at this budget its samples are still mostly noise (see its "
            "PSNR) while its validation curve is still rising at the last step; a budget limit rather than a "
            "ceiling: the same network and budget trained to predict x0 (the labelled extra row of Table 1, "
            "chosen on the sweeps page) is not held back this way.",
    "unest": "It is unpaired as published: it has no per-pixel term to emphasise (the emphasis is not applied), "
             "and cycle consistency only asks that the synthesis can be mapped back to the sources, which does "
             "not require vessels in the right place.",
}


def vessel_shortfalls(runs: pd.DataFrame, curves: pd.DataFrame, only: Collection[str] | None = None,
                      threshold: float = VESSELS_LEARNED_RECOVERY) -> pd.DataFrame:
    """Runs of :func:`load_records`'s run table (those named in ``only``, e.g. the table rows; None: all)
    whose mean test contrast recovery is below ``threshold``:
    ``run, method, test_recovery, best_validation, best_step, last_step, why`` (best and last over the
    validation curve of :func:`vessel_curves`, NaN without one; ``why`` from :data:`NO_VESSELS_WHY`, empty
    for a method without an explanation)."""
    cols = ["run", "method", "test_recovery", "best_validation", "best_step", "last_step", "why"]
    if not len(runs) or "vessel_recovery" not in runs:
        return pd.DataFrame(columns=cols)
    low = runs[(runs.vessel_recovery < threshold) & (runs.run.isin(only) if only is not None else True)]
    rows = []
    for r in low.itertuples():
        every = curves[curves.run == r.run] if len(curves) else curves
        c = every[every.recovery.notna()]
        best = c.loc[c.recovery.idxmax()] if len(c) else None
        rows.append({"run": r.run, "method": r.method, "test_recovery": float(r.vessel_recovery),
                     "best_validation": float(best.recovery) if best is not None else float("nan"),
                     "best_step": int(best.step) if best is not None else None,
                     "last_step": int(every.step.max()) if len(every) else None,
                     "why": NO_VESSELS_WHY.get(str(r.method), "")})
    return pd.DataFrame(rows, columns=cols)


def runs_without_vessels(per_subject: pd.DataFrame) -> tuple[list[str], int] | None:
    """(runs whose segmentation finds no vessel component in any test subject, runs with vessel
    metrics), or None while no record has vessel metrics."""
    if "components_pred" not in per_subject or not len(per_subject):
        return None
    found = per_subject.groupby("run").components_pred.max()
    return sorted(found[found == 0].index), len(found)


def paper_results() -> pd.DataFrame:
    """The paper's Tables 1-3 (``mmdm/study/paper_results.csv``; each row cites table and row)."""
    return pd.read_csv(Path(__file__).with_name("paper_results.csv"), comment="#")
