"""What each table row was given, and whether it had converged: the footing of a comparison.

A verdict between two rows is about the methods only when both had the same
footing: the same optimiser steps, the same weight-average rule, a learning
rate chosen the same way, and a budget at which both have stopped improving.
:func:`footing_table` reads every row's record (summary.json, config.yaml,
provenance.json, validation.jsonl) and says what it had; :func:`convergence`
applies the study's convergence rule to its validation curves;
:func:`budget_markdown` writes the limitations page's sentences about budgets
from the profile itself, so that they cannot drift from what the runs did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

from mmdm.config import from_dict
from mmdm.engine.spec import TrainConfig, build_method_from_config, resolve_ema
from mmdm.study.profiles import StudyProfile
from mmdm.study.records import record_complete, vessel_curves, volume_curves
from mmdm.study.runs import REFERENCE_RUN, study_runs
from mmdm.study.seeds import split_seed
from mmdm.study.tables import table_rows

#: The convergence rule: a row's validation whole-volume PSNR, averaged over the validations in the last quarter of
#: its steps, lies less than this many dB above its average over the quarter before ...
CONVERGED_PSNR_DB = 0.3
#: ... and its validation vessel contrast recovery comes less than this much closer to 1 by the same comparison.
CONVERGED_RECOVERY = 0.03
CONVERGENCE_RULE = (f"a row has converged when its validation whole-volume PSNR, averaged over the validations in the "
                    f"last quarter of its steps, is less than {CONVERGED_PSNR_DB:g} dB above its average over the "
                    f"quarter before, and its validation vessel contrast recovery, averaged the same way, comes less "
                    f"than {CONVERGED_RECOVERY:g} closer to 1 (the target's own contrast, so a recovery that "
                    "overshoots further does not count as improving); a row with several seeds is judged on the mean "
                    "of its seeds' curves. Averages, not the best single validation: consecutive validations scatter "
                    "by tenths of a dB without any trend, and the best of several would count that scatter as "
                    "improvement")


def _gain_se(before: pd.Series, after: pd.Series) -> float:
    """Standard error of ``mean(after) - mean(before)`` from the scatter within each (NaN with < 2 values in one)."""
    a, b = before.dropna(), after.dropna()
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def convergence(curve: pd.DataFrame, psnr_db: float = CONVERGED_PSNR_DB,
                recovery: float = CONVERGED_RECOVERY) -> dict[str, Any]:
    """The convergence rule (:data:`CONVERGENCE_RULE`) on one validation curve (columns ``step``, ``psnr``:
    whole-volume PSNR, ``recovery``: vessel contrast recovery).

    With ``L`` the last step, the third quarter holds the validations at steps in ``(L/2, 3L/4]`` and the last
    quarter those in ``(3L/4, L]``. ``psnr_gain`` = mean PSNR of the last quarter minus that of the third;
    ``recovery_gain`` = mean |1 - recovery| of the third quarter minus that of the last. ``psnr_gain_se`` and
    ``recovery_gain_se``: the standard error of each gain from the scatter of the validations within the two
    quarters (``sqrt(var_3 / n_3 + var_4 / n_4)``; NaN with fewer than two validations in a quarter), so a
    reader can tell a gain from the validations' noise. Returns ``{"converged": True/False/None, "psnr_gain",
    "psnr_gain_se", "recovery_gain", "recovery_gain_se", "from_step", "to_step"}`` (``from_step``: the first
    validation of the third quarter); ``converged`` is None (undecided) when the curve has no whole-volume
    PSNR or either quarter has no validation. The verdict is the rule's; the standard errors do not change it."""
    out: dict[str, Any] = {"converged": None, "psnr_gain": float("nan"), "psnr_gain_se": float("nan"),
                           "recovery_gain": float("nan"), "recovery_gain_se": float("nan"),
                           "from_step": None, "to_step": None}
    c = curve.dropna(subset=["psnr"]).sort_values("step") if len(curve) and "psnr" in curve else curve.iloc[0:0]
    if not len(c):
        return out
    last = int(c.step.max())
    third = c[(c.step > 0.5 * last) & (c.step <= 0.75 * last)]
    fourth = c[c.step > 0.75 * last]
    if not len(third) or not len(fourth):
        return out
    out["psnr_gain"] = float(fourth.psnr.mean() - third.psnr.mean())
    out["psnr_gain_se"] = _gain_se(third.psnr, fourth.psnr)
    if "recovery" in c and third.recovery.notna().any() and fourth.recovery.notna().any():
        off3, off4 = (1.0 - third.recovery).abs(), (1.0 - fourth.recovery).abs()
        out["recovery_gain"] = float(off3.mean() - off4.mean())
        out["recovery_gain_se"] = _gain_se(off3, off4)
    out.update(from_step=int(third.step.iloc[0]), to_step=last)
    rec_ok = pd.isna(out["recovery_gain"]) or out["recovery_gain"] < recovery
    out["converged"] = bool(out["psnr_gain"] < psnr_db and rec_ok)
    return out


def row_curve(curves: pd.DataFrame, run: str) -> pd.DataFrame:
    """The validation curve a row is judged on: ``run``'s own, or with seed repeats (``run-s1``, ...) the mean
    of the seeds' curves at the steps every seed validated."""
    if not len(curves):
        return curves
    base = curves.run.map(lambda r: split_seed(r)[0])
    mine = curves[base == run]
    n = mine.run.nunique()
    if n <= 1:
        return mine
    common = mine.groupby("step").run.nunique()
    steps = common[common == n].index
    mean = mine[mine.step.isin(steps)].groupby("step", as_index=False)[["psnr", "recovery"]].mean()
    return mean.assign(run=run)[["run", "step", "psnr", "recovery"]]


def row_convergence(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Seed-0 run -> :func:`convergence` of its row curve (:func:`row_curve`), for every row with a curve."""
    curves = run_curves(results_dir)
    rows = sorted({split_seed(r)[0] for r in curves.run}) if len(curves) else []
    return {r: convergence(row_curve(curves, r)) for r in rows}


def run_curves(results_dir: str | Path) -> pd.DataFrame:
    """Every record's validation curve for the convergence rule: ``run, step, psnr, recovery``; the
    whole-volume vessel recovery where recorded, else the validation windows' one."""
    vol = volume_curves(results_dir)
    win = vessel_curves(results_dir)[["run", "step", "recovery"]].rename(columns={"recovery": "window_recovery"})
    if not len(vol):
        return pd.DataFrame(columns=["run", "step", "psnr", "recovery"])
    df = vol[["run", "step", "psnr", "vessel_recovery"]].merge(win, on=["run", "step"], how="left")
    df["recovery"] = df.vessel_recovery.where(df.vessel_recovery.notna(), df.window_recovery)
    return df[["run", "step", "psnr", "recovery"]]


def not_converged(results_dir: str | Path) -> dict[str, str]:
    """Seed-0 run -> a note for its table row, for every row whose curve (the mean over its seeds) fails the
    convergence rule (records without whole-volume validation curves are not judged)."""
    return {run: "not converged" for run, v in row_convergence(results_dir).items() if v["converged"] is False}


def _ema_text(ema: dict[str, Any] | None, evaluated: bool | None) -> str:
    if not evaluated:
        return "raw"
    if not ema:
        return "average"
    every = ema.get("every", 1)
    return f"EMA {ema.get('decay')} from step {ema.get('start_step')}" + (f", every {every}" if every != 1 else "")


def _lr_text(lr: dict[str, float] | None) -> str:
    """``{"main": 3e-4}`` -> "3e-4"; several groups with one rate -> that rate; else ``"generator 2e-4, ..."``."""
    if not isinstance(lr, dict) or not lr:
        return "–"

    def short(v: float) -> str:
        m, e = f"{v:.1e}".split("e")
        return f"{m.rstrip('0').rstrip('.')}e{int(e)}"

    if len(set(lr.values())) == 1:
        return short(next(iter(lr.values())))
    return ", ".join(f"{g} {short(v)}" for g, v in lr.items())


def _record_footing(rec: Path) -> dict[str, Any]:
    """What the record says its row was given (newer records carry it in summary.json's ``training``;
    for older ones it is read from config.yaml, the method's configuration and the checkpoint entry)."""
    summary = json.loads((rec / "summary.json").read_text())
    prov = summary.get("provenance") or {}
    cfg = yaml.safe_load((rec / "config.yaml").read_text()) if (rec / "config.yaml").is_file() else {}
    tr = summary.get("training")
    ckpt = summary.get("checkpoint") or {}
    settings = _method_settings(cfg)  # the method built once from the stored config
    if tr is None:  # a record written before the footing was recorded
        tr = {"checkpoint_step": ckpt.get("step"), "batch_size": cfg.get("batch_size"), "ema_evaluated": ckpt.get("ema"),
              "ema_mode": cfg.get("ema_mode", "method"), **settings}
    wall = prov.get("train_wall_s")
    return {"steps": tr.get("checkpoint_step"), "EMA rule": tr.get("ema_mode") or "method",
            "weights evaluated": _ema_text(tr.get("ema"), tr.get("ema_evaluated")),
            "lr": _lr_text(tr.get("lr")), "batch": tr.get("batch_size"),
            "windows": _windows_text(cfg), "emphasis": _emphasis_text(cfg, settings["pixel_loss"]),
            "train (min)": "–" if wall is None else f"{wall / 60:.1f}"}


def _windows_text(cfg: dict[str, Any]) -> str:
    """The training windows a stored config gave its run: in-plane crops or whole slices."""
    if "crops" not in cfg:
        return "–"
    crops = cfg["crops"]
    if not crops:
        return "whole slices"
    size = crops.get("size") or ["?", "?"]
    return f"{size[0]}x{size[1]} crops"


def _emphasis_text(cfg: dict[str, Any], pixel_loss: bool | None = None) -> str:
    """The vessel emphasis of a stored config's per-pixel term, or why it was not applied
    (``pixel_loss``: whether its method has a paired per-pixel term; None: unknown)."""
    if "emphasis" not in cfg:
        return "–"
    e = cfg["emphasis"] or {}
    kind = e.get("kind", "none")
    if kind == "none":
        return "none"
    if pixel_loss is False:
        return "not applied (no paired pixel term)"
    if kind == "top_fraction":
        return f"brightest {100 * float(e.get('fraction', 0)):g} % x{float(e.get('weight', 1)):g}"
    return str(kind)


def _method_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Learning rates and weight average of a stored run's method (built from its config.yaml)."""
    try:
        tc = from_dict(TrainConfig, cfg)
        method = build_method_from_config(tc)
        ema = resolve_ema(tc, method)
        return {"lr": {g: float(c.lr) for g, c in method.optim_configs().items()},
                "ema": None if ema is None else {"decay": ema.decay, "start_step": ema.start_step, "every": ema.every},
                "pixel_loss": bool(method.uses_pixel_loss)}
    except Exception:  # noqa: BLE001 - an unreadable config leaves these cells empty rather than the page
        return {"lr": None, "ema": None, "pixel_loss": None}


def _gain_text(v: dict[str, Any]) -> str:
    """``+0.54 ± 0.55 dB, -0.022 ± 0.040 recovery`` (a gain and its standard error; no ± where it is NaN)."""
    def pm(gain: float, se: float, fmt: str) -> str:
        return f"{gain:{fmt}}" + ("" if pd.isna(se) else f" ± {se:{fmt[1:]}}")
    return (f"{pm(v['psnr_gain'], v['psnr_gain_se'], '+.2f')} dB, "
            f"{pm(v['recovery_gain'], v['recovery_gain_se'], '+.3f')} recovery")


def footing_table(results_dir: str | Path, table: str = "table1",
                  sources: Sequence[str] = ("T1w", "T2w", "FLAIR")) -> pd.DataFrame:
    """One row per row of ``table`` with a record: optimiser steps, the EMA rule and the weights
    evaluated, learning rate(s), batch size, training windows, vessel emphasis, training wall time and whether it converged
    (:func:`convergence`; "no curve" for a record without whole-volume validation curves, "not judged"
    for one whose curve is too short for the rule)."""
    results_dir = Path(results_dir)
    present = {p.name for p in results_dir.iterdir() if record_complete(p)} if results_dir.is_dir() else set()
    curves = run_curves(results_dir)
    rows = []
    for label, run in table_rows(table, tuple(sources), present=present):
        if run not in present:
            continue
        mine = row_curve(curves, run)
        v = convergence(mine)
        if not len(mine):
            conv = "no curve"
        elif v["converged"] is None:
            conv = "not judged"
        else:
            conv = ("yes" if v["converged"] else "no") + f" ({_gain_text(v)})"
        rows.append({"row": label, **_record_footing(results_dir / run), "converged": conv})
    cols = ["row", "steps", "EMA rule", "weights evaluated", "lr", "batch", "windows", "emphasis", "train (min)",
            "converged"]
    return pd.DataFrame(rows, columns=cols).set_index("row")


def footing_markdown(results_dir: str | Path, profile: StudyProfile) -> str:
    """The methods page's footing section: the rule, then :func:`footing_table` as a Markdown table."""
    t = footing_table(results_dir, "table1", profile.sources)
    head = (f"What each row of Table 1 in the `{profile.name}` records was given, read from its record. "
            f"Convergence: {CONVERGENCE_RULE}; a row that fails it is marked *not converged* in Table 1 "
            "({doc}`generated/04_results`); *not judged*: too few validations for the rule; *no curve*: a record "
            "written before whole-volume validation. Each gain is shown with its standard error (±, from the "
            "scatter of the validations within the two quarters): where the error is as large as the limit, "
            "the verdict says more about the validations' noise than about the training.\n\n")
    if t.empty:
        return head + f"No Table 1 record of profile `{profile.name}` yet.\n"
    # the training windows and the emphasis are mostly shared: one sentence grouping the rows, not two columns
    setups: dict[str, list[str]] = {}
    for row, w, e in zip(t.index, t["windows"], t["emphasis"]):
        setups.setdefault(f"{w}, emphasis {e}", []).append(str(row))
    said = "; ".join(f"{k} ({', '.join(v)})" if len(setups) > 1 else f"{k} (every row)" for k, v in setups.items())
    t = t.drop(columns=["windows", "emphasis"])
    lines = ["| row | " + " | ".join(t.columns) + " |", "|" + "---|" * (len(t.columns) + 1)]
    lines += ["| " + " | ".join([str(i), *[str(x) for x in r]]) + " |" for i, r in zip(t.index, t.to_numpy())]
    return head + "\n".join(lines) + f"\n\nTraining windows and vessel emphasis: {said}.\n"


def records_note(results_dir: str | Path, profile: StudyProfile) -> str:
    """One paragraph for the results page: how the records shown differ from what ``profile`` now
    trains (optimiser steps and training windows of each Table 1-3 row; seeds of the runs it repeats), read from the
    records, so that the profile's description never stands for records made under an older one.
    Empty when the records match the profile."""
    results_dir = Path(results_dir)
    present = {p.name for p in results_dir.iterdir() if record_complete(p)} if results_dir.is_dir() else set()
    runs = [r for r in study_runs(profile.sources) if r.tables and r.name in present]
    if not runs:
        return ""
    parts = []
    footing = {r.name: _record_footing(results_dir / r.name) for r in runs}
    steps: dict[int | None, list[str]] = {}
    for r in runs:
        steps.setdefault(footing[r.name]["steps"], []).append(r.name)
    expected = {profile.run_steps(r.method) for r in runs}
    if profile.steps is not None and (len(steps) > 1 or set(steps) != expected):
        counts = sorted(steps.items(), key=lambda kv: (-len(kv[1]), kv[0] or 0))
        said = "; ".join(f"{k if k is not None else 'unknown'} steps: {', '.join(v) if len(v) <= 3 else f'{len(v)} rows'}"
                         for k, v in counts)
        parts.append(f"the records' Table 1-3 rows were trained for {said} (the profile now trains "
                     f"{', '.join(str(s) for s in sorted(expected))})")
    want = _windows_text({"crops": profile.train.get("crops")})
    windows: dict[str, list[str]] = {}
    for r in runs:
        w = footing[r.name]["windows"]
        if w != "–":  # a record that does not say is not counted as differing
            windows.setdefault(w, []).append(r.name)
    if set(windows) - {want}:
        said = "; ".join(f"{k}: {', '.join(v) if len(v) <= 3 else f'{len(v)} rows'}" for k, v in windows.items())
        parts.append(f"their training windows were {said} (the profile now trains on {want})")
    seeds = [s for s in profile.seeds if s != 0]
    repeated = [r.name for r in runs if r.name in profile.seed_runs]
    if seeds and repeated:
        have = [r for r in repeated if all(f"{r}-s{s}" in present for s in seeds)]
        if len(have) < len(repeated):
            parts.append(f"{len(have)} of the {len(repeated)} runs the profile repeats with seeds "
                         f"{', '.join(str(s) for s in profile.seeds)} have a record for every seed "
                         f"({', '.join(have) if have else 'none'}); the others show seed 0 only")
    if not parts:
        return ""
    return ("These records predate the profile as described: " + "; ".join(parts) +
            ". The methods page's footing table lists what every row had.")


EMA_MODE_TEXT = {"method": "each method keeps its own official weight average (DDPM, BBDM and RDDM one, MMDM and "
                           "the GANs none), and each is evaluated with what it keeps",
                 "all": "every method keeps the same weight average and is evaluated with it",
                 "none": "no method keeps a weight average: every row is evaluated with its raw weights"}


def budget_markdown(profile: StudyProfile) -> str:
    """The limitations page's sentences about the budgets of ``profile``'s table rows, from the profile."""
    runs = [r for r in study_runs(profile.sources) if r.tables]
    steps = {r.name: profile.run_steps(r.method) for r in runs}
    mode = str(profile.train.get("ema_mode", "method"))
    if profile.steps is None:
        budget = f"every row trains {profile.epochs} epochs"
    elif len(set(steps.values())) == 1:
        budget = (f"every row of Tables 1-3 trains the same {next(iter(steps.values()))} optimiser steps "
                  f"(batch {profile.batch_size}), as the paper trains every method for the same number of epochs")
    else:
        common = steps[REFERENCE_RUN]
        other = sorted({f"{r.method} {n}" for r in runs if (n := steps[r.name]) != common})
        budget = (f"the rows do NOT all get the same budget: MMDM trains {common} optimiser steps (batch "
                  f"{profile.batch_size}), while {', '.join(other)}")
    return (f"In the `{profile.name}` profile {budget}; on the weight average, {EMA_MODE_TEXT.get(mode, mode)}. "
            "A step costs each method a different wall time; the methods page's footing table lists the steps, "
            "weights, learning rate, batch and training wall time of every Table 1 record, and whether it "
            "converged.\n")


__all__ = ["CONVERGED_PSNR_DB", "CONVERGED_RECOVERY", "CONVERGENCE_RULE", "budget_markdown", "convergence",
           "footing_markdown", "footing_table", "not_converged", "row_convergence", "row_curve", "run_curves"]
