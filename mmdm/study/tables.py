"""Tables 1-3 of the paper, filled with this study's measurements beside the paper's numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Collection, Mapping

import pandas as pd

from mmdm.regions import (MAX_BACKGROUND_BIAS, MAX_BRIGHT_SHARE, MAX_SLICE_BANDING, REGION_COLUMNS,
                          REGION_LABELS)
from mmdm.stats import compare_to_reference, holm, paired_comparison
from mmdm.study.records import (METRIC_LABELS, METRIC_LABELS_VESSEL, METRICS, REGIONS_MEASURED,
                                VESSEL_HIGHER_IS_BETTER, VESSEL_SCORE_HIGHER_IS_BETTER, VESSEL_SCORE_LABELS,
                                paper_results)
from mmdm.study.runs import REFERENCE_RUN, get_option, labelled_rows, study_runs
from mmdm.study.seeds import seed_differences, seed_spread, split_seed

TABLE_TITLES = {"table1": "Table 1: comparison methods", "table2": "Table 2: ablation of the MIP loss and NAWS",
                "table3": "Table 3: modality combinations"}
#: digits shown after the decimal point: few enough that a table of Tables 1-3 fits a 1280 px screen
#: (the paper's own numbers are shown rounded the same way beside ours)
DECIMALS = {"psnr": 2, "ssim": 3, "rmse": 2, "mip_psnr": 2, "mip_ssim": 3, "mip_rmse": 2,
            "cldice": 3, "dice": 3, "mip_dice": 3, "betti0_error": 1, "vessel_recovery": 2, "vessel_psnr": 2,
            "vessel_contrast_error": 2}
#: the two metric families of Tables 1-3, shown as two tables (whole volume, axial MIP)
METRIC_FAMILIES = {"volume": ("psnr", "ssim", "rmse"), "mip": ("mip_psnr", "mip_ssim", "mip_rmse")}
LABELS = {**METRIC_LABELS, **METRIC_LABELS_VESSEL, **VESSEL_SCORE_LABELS}


def fmt(value: float, metric: str) -> str:
    return "–" if pd.isna(value) else f"{value:.{DECIMALS[metric]}f}"


def table_rows(table: str, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR"),
               present: Collection[str] | None = None) -> list[tuple[str, str]]:
    """(row label, run name) of ``table`` in the paper's row order (MMDM full last, as in the paper).

    A labelled extra row (:data:`mmdm.study.runs.LABELLED_ROWS`) follows its published row, and only
    where its run is in ``present`` (the runs with records; None: never)."""
    extra: dict[str, list] = {}
    for spec in labelled_rows(sources):
        if table in spec.tables and present is not None and spec.name in present:
            base = spec.name[: -len(spec.option) - 1]
            extra.setdefault(base, []).append(spec)
    runs = [s for s in study_runs(sources) if table in s.tables]
    runs = [s for s in runs if s.name != REFERENCE_RUN] + [s for s in runs if s.name == REFERENCE_RUN]
    runs = [x for s in runs for x in (s, *extra.get(s.name, ()))]
    return [(s.labels[table], s.name) for s in runs]


def short_labels(table: str, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR"),
                 present: Collection[str] | None = None) -> dict[str, str]:
    """Run -> a label for a figure panel: the row label without its parenthesis ("MMDM"), a labelled
    extra row with its option's name ("DDPM (x0-prediction)")."""
    options = {r.name: r.option for r in labelled_rows(sources)}
    return {run: label.split(" (")[0] + (f" ({options[run]})" if run in options else "")
            for label, run in table_rows(table, sources, present)}


def seed_groups(per_subject: pd.DataFrame) -> dict[str, list[str]]:
    """Seed-0 run name -> its recorded runs in seed order (itself and its ``-s<k>`` repeats)."""
    out: dict[str, list[tuple[int, str]]] = {}
    for r in sorted(set(per_subject.run)) if len(per_subject) else []:
        base, seed = split_seed(r)
        out.setdefault(base, []).append((seed, r))
    return {b: [r for _, r in sorted(v)] for b, v in out.items()}


def results_table(table: str, per_subject: pd.DataFrame, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR"),
                  with_paper: bool = True, metrics: tuple[str, ...] = METRICS,
                  notes: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per table row: ``ours`` as mean ± sd, and the paper's value.

    A row whose run has records of several seeds (``run``, ``run-s1``, ...) shows the mean over its seeds of
    each seed's mean over the test subjects ± the sd between seeds; a row with one seed the mean ± sd over
    test subjects; column ``seeds`` says which. Runs without a complete record show "–" (not yet run).
    ``notes``: run -> a note added to its row label in parentheses (e.g. "not converged",
    :func:`mmdm.study.footing.not_converged`).
    """
    paper = paper_results()
    paper = paper[paper.table == table].set_index("run")
    groups = seed_groups(per_subject)
    rows = []
    for label, run in table_rows(table, sources, present=set(per_subject.run) if len(per_subject) else set()):
        vals = per_subject[per_subject.run == run]
        seeds = groups.get(run, [run] if len(vals) else [])
        if notes and run in notes:
            label = f"{label} ({notes[run]})"
        row = {"row": label, "run": run, "n": len(vals), "seeds": len(seeds)}
        for m in metrics:
            v = vals[m] if m in vals else pd.Series(dtype=float)
            if len(seeds) > 1 and m in per_subject:
                v = pd.Series([per_subject.loc[per_subject.run == r, m].mean() for r in seeds])
            mean, sd = (v.mean(), v.std(ddof=1) if len(v) > 1 else float("nan")) if len(v) else (float("nan"),) * 2
            name = f"{LABELS[m]} (ours)" if with_paper else LABELS[m]
            row[name] = fmt(mean, m) + ("" if pd.isna(sd) else f" ± {fmt(sd, m)}")
            if with_paper:
                row[f"{LABELS[m]} (paper)"] = fmt(paper[m].get(run, float("nan")), m)
        rows.append(row)
    return pd.DataFrame(rows).set_index("row")


#: Header of :func:`side_by_side`'s first column: test subjects × seeds of the row.
SUBJECTS_SEEDS = "n × seeds"


def side_by_side(table: str, per_subject: pd.DataFrame, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR"),
                 metrics: tuple[str, ...] = METRIC_FAMILIES["volume"],
                 notes: Mapping[str, str] | None = None) -> pd.DataFrame:
    """:func:`results_table` laid out for reading: one row per table row (the paper's row label),
    the number of test subjects × seeds (:data:`SUBJECTS_SEEDS`), then for each metric *ours* (mean ± sd) and the *paper*'s value
    side by side under one two-level header (metric, ours | paper)."""
    flat = results_table(table, per_subject, sources, with_paper=True, metrics=metrics, notes=notes)
    # test subjects and seeds in one narrow column ("16 × 3"), so that three metric pairs fit the text column
    columns = {("", SUBJECTS_SEEDS): [f"{n} × {k}" if n else "–"
                                            for n, k in zip(flat["n"], flat["seeds"])]}
    for m in metrics:
        columns[(LABELS[m], "ours")] = flat[f"{LABELS[m]} (ours)"]
        columns[(LABELS[m], "paper")] = flat[f"{LABELS[m]} (paper)"]
    out = pd.DataFrame(columns, index=flat.index)
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    out.index.name = None
    return out


#: columns of :func:`provenance_table`: record field -> header
PROVENANCE_COLUMNS = {"profile": "profile", "steps": "steps", "n_subjects": "subjects", "device": "device",
                      "commit": "commit", "train_wall_s": "train (min)", "eval_wall_s": "eval (min)"}


def provenance_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Commit, device, steps and wall times (minutes, one decimal) of every run record."""
    if not len(runs):
        return pd.DataFrame(columns=list(PROVENANCE_COLUMNS.values()), index=pd.Index([], name="run"))
    out = runs.set_index("run")[[c for c in PROVENANCE_COLUMNS if c in runs]]
    for c in ("train_wall_s", "eval_wall_s"):
        if c in out:
            out[c] = ["–" if pd.isna(v) else f"{v / 60:.1f}" for v in out[c]]
    return out.rename(columns=PROVENANCE_COLUMNS)


def machine_time(runs: pd.DataFrame, analysis_dir: str | Path | None = None) -> str:
    """The machine time the records took, summed from what they recorded: training and evaluation of
    the run records per device, and the analyses (``analysis_dir/<name>/summary.json``'s ``wall_s``).
    A sentence for the results page; "" without records."""
    if not len(runs):
        return ""
    parts = []
    for device, g in runs.groupby(runs["device"].fillna("").replace("", "unknown device")):
        tr, ev = pd.to_numeric(g["train_wall_s"]).sum(), pd.to_numeric(g["eval_wall_s"]).sum()
        missing = int(g["train_wall_s"].isna().sum() + g["eval_wall_s"].isna().sum())
        parts.append(f"{len(g)} run record(s) on {device}: {tr / 3600:.1f} h of training and {ev / 3600:.1f} h "
                     f"of evaluation" + (f" ({missing} wall time(s) not recorded)" if missing else ""))
    text = "Machine time, summed from the records: " + "; ".join(parts)
    extra = []
    if analysis_dir is not None and Path(analysis_dir).is_dir():
        for f in sorted(Path(analysis_dir).glob("*/summary.json")):
            wall = json.loads(f.read_text()).get("wall_s")
            if isinstance(wall, (int, float)):
                extra.append((f.parent.name, float(wall)))
    if extra:
        text += "; the analyses " + ", ".join(f"{n} {w / 3600:.1f} h" for n, w in extra)
    return text + ". Runs that ran side by side overlap in wall-clock time, so the sum is machine time, not elapsed time."


def paired_table(table: str, per_subject: pd.DataFrame, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR"),
                 n_boot: int = 10000, metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """MMDM full against every other row of ``table``, paired over test subjects
    (:func:`mmdm.stats.compare_to_reference`: bootstrap 95 % CI of the mean difference
    full - other, Wilcoxon signed-rank p, Holm-corrected within the table, verdict)."""

    labels = dict((run, label) for label, run in table_rows(table, sources, present=set(per_subject.run)))
    sub = per_subject[per_subject.run.isin(labels)]
    metrics = [m for m in metrics if m in sub and sub[m].notna().any()]
    if sub.run.nunique() < 2 or REFERENCE_RUN not in set(sub.run) or not metrics:
        return pd.DataFrame()
    cmp = compare_to_reference(sub, reference=REFERENCE_RUN, metrics=metrics, n_boot=n_boot, method_col="run",
                               higher_is_better={**VESSEL_HIGHER_IS_BETTER, **VESSEL_SCORE_HIGHER_IS_BETTER})
    cmp.insert(0, "row", cmp["method"].map(labels))
    return cmp


def paired_summary(cmp: pd.DataFrame) -> pd.DataFrame:
    """:func:`paired_table` for reading: one row per (table row, metric)."""
    if cmp.empty:
        return pd.DataFrame(columns=["row", "metric", "full − other (95 % CI)", "p (Holm)", "verdict"])
    out = pd.DataFrame({
        "row": cmp["row"], "metric": cmp["metric"].map(LABELS),
        "full − other (95 % CI)": [f"{fmt(d, m)} [{fmt(lo, m)}, {fmt(hi, m)}]" for d, lo, hi, m in
                                   zip(cmp.diff_mean, cmp.diff_ci_low, cmp.diff_ci_high, cmp.metric)],
        "n": cmp["n"],
        "p (Holm)": ["–" if pd.isna(p) else f"{p:.3g}" for p in cmp.p_holm],
        "verdict": cmp["verdict"]})
    return out.set_index(["row", "metric"])


SEED_METRICS = ("psnr", "mip_psnr", "ssim", "cldice")


def seed_table(per_subject: pd.DataFrame, metrics: tuple[str, ...] = SEED_METRICS) -> pd.DataFrame:
    """Runs trained with several seeds: mean ± seed-to-seed sd of the per-run means."""

    metrics = tuple(m for m in metrics if m in per_subject)
    spread = seed_spread(per_subject, metrics)
    if spread.empty:
        return pd.DataFrame(columns=["run", "seeds", *[LABELS[m] for m in metrics]]).set_index("run")
    out = spread[["run", "seeds"]].copy()
    for m in metrics:
        out[LABELS[m]] = [f"{fmt(a, m)} ± {fmt(b, m)}" for a, b in zip(spread[f"{m}_mean"], spread[f"{m}_sd"])]
    return out.set_index("run")


def seed_difference_table(per_subject: pd.DataFrame, metrics: tuple[str, ...] = SEED_METRICS) -> pd.DataFrame:
    """MMDM full minus each other multi-seed run: difference of seed means beside the seed spread."""

    metrics = tuple(m for m in metrics if m in per_subject)
    d = seed_differences(per_subject, metrics, REFERENCE_RUN)
    cols = ["full − other (seed means)", "seed sd (full)", "seed sd (other)", "SE of difference", "seeds"]
    if d.empty:
        return pd.DataFrame(columns=["other", "metric", *cols]).set_index(["other", "metric"])
    out = pd.DataFrame({
        "other": d.other, "metric": d.metric.map(LABELS),
        cols[0]: [fmt(v, m) for v, m in zip(d.difference, d.metric)],
        cols[1]: [fmt(v, m) for v, m in zip(d.sd_reference, d.metric)],
        cols[2]: [fmt(v, m) for v, m in zip(d.sd_other, d.metric)],
        cols[3]: [fmt(v, m) for v, m in zip(d.se_difference, d.metric)],
        cols[4]: [f"{a} vs {b}" for a, b in zip(d.n_seeds_reference, d.n_seeds_other)]})
    return out.set_index(["other", "metric"])


#: metrics of the run-option comparison (:func:`option_table`): the volume, its MIP, the vessels
OPTION_METRICS = ("psnr", "ssim", "mip_psnr", "vessel_recovery", "vessel_contrast_error", "vessel_psnr", "cldice")


def option_pairs(per_subject: pd.DataFrame, option: str) -> list[tuple[str, str]]:
    """(run, run trained with ``option``) for every run whose ``<run>-<option>`` has a record too."""
    get_option(option)
    runs = set(per_subject.run) if len(per_subject) else set()
    suffix = f"-{option}"
    return sorted((r[: -len(suffix)], r) for r in runs if r.endswith(suffix) and r[: -len(suffix)] in runs)


def option_table(per_subject: pd.DataFrame, option: str, metrics: tuple[str, ...] = OPTION_METRICS,
                 n_boot: int = 10000) -> pd.DataFrame:
    """Each run beside the same run trained with run option ``option`` (e.g. without the vessel
    emphasis), paired over test subjects: mean ± sd of both, the mean difference (run − with the
    option) with its bootstrap 95 % CI, and the Wilcoxon signed-rank p Holm-corrected over all rows.

    One row per (run, metric); empty (with the columns) while no pair has records."""
    cols = ["as in Tables 1-3", f"{option} run", "difference (95 % CI)", "n", "p (Holm)"]
    rows = []
    for run, other in option_pairs(per_subject, option):
        a = per_subject[per_subject.run == run].set_index("subject")
        b = per_subject[per_subject.run == other].set_index("subject")
        subjects = sorted(set(a.index) & set(b.index))
        for m in metrics:
            if m not in per_subject or a[m].isna().all() or b[m].isna().all():
                continue
            c = paired_comparison(a.loc[subjects, m].to_numpy(float), b.loc[subjects, m].to_numpy(float),
                                  n_boot=n_boot)
            rows.append({"run": run, "metric": LABELS[m], "m": m, "c": c,
                         "sd_a": a.loc[subjects, m].std(ddof=1), "sd_b": b.loc[subjects, m].std(ddof=1)})
    if not rows:
        return pd.DataFrame(columns=["run", "metric", *cols]).set_index(["run", "metric"])
    p_holm = holm([r["c"]["p_wilcoxon"] for r in rows])
    out = pd.DataFrame({
        "run": [r["run"] for r in rows], "metric": [r["metric"] for r in rows],
        cols[0]: [f"{fmt(r['c']['mean_a'], r['m'])} ± {fmt(r['sd_a'], r['m'])}" for r in rows],
        cols[1]: [f"{fmt(r['c']['mean_b'], r['m'])} ± {fmt(r['sd_b'], r['m'])}" for r in rows],
        cols[2]: [f"{fmt(r['c']['mean_diff'], r['m'])} [{fmt(r['c']['ci_low'], r['m'])}, "
                  f"{fmt(r['c']['ci_high'], r['m'])}]" for r in rows],
        cols[3]: [r["c"]["n"] for r in rows],
        cols[4]: ["–" if pd.isna(p) else f"{p:.3g}" for p in p_holm]})
    return out.set_index(["run", "metric"])


#: digits of the region breakdown's columns (:data:`mmdm.regions.REGION_COLUMNS`)
REGION_DECIMALS = {"psnr_brain": 2, "psnr_background": 2, "psnr_central": 2, "psnr_outer": 2,
                   "central_minus_outer_psnr": 2, "outer_error_share": 2, "background_bias": 3,
                   "background_bright_share": 3, "slice_banding": 2}


#: the two halves of the region breakdown as the results page shows them (each fits the text column)
REGION_GROUPS = {"psnr": ("psnr_brain", "psnr_background", "psnr_central", "psnr_outer", "central_minus_outer_psnr"),
                 "haze": ("outer_error_share", "background_bias", "background_bright_share", "slice_banding")}


def _row_regions(regions: pd.DataFrame, run: str, measured_only: bool = False) -> pd.DataFrame:
    """The region rows of a table row: its run and the run's seed repeats (``run-s1``, ...); with
    ``measured_only``, the whole-volume measurements only (no estimates from stored panels)."""
    if not len(regions):
        return regions
    keep = regions.run.map(lambda r: split_seed(r)[0]) == run
    if measured_only:
        keep &= regions.source == REGIONS_MEASURED
    return regions[keep]


#: the clean-image limits (:mod:`mmdm.regions`): column -> (largest allowed mean, how the text names it)
CLEAN_LIMITS = {"background_bias": (MAX_BACKGROUND_BIAS, "background bias"),
                "background_bright_share": (MAX_BRIGHT_SHARE, "share of background voxels above 0.1"),
                "slice_banding": (MAX_SLICE_BANDING, "slice banding")}


def clean_image_check(table: str, regions: pd.DataFrame, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")) -> str:
    """One paragraph: which rows of ``table`` exceed a clean-image limit (:data:`CLEAN_LIMITS`, the mean over
    a row's test subjects and seeds; whole-volume measurements only) and by how much, which are not measured."""
    present = set(regions.run) if len(regions) else set()
    limits = "; ".join(f"{name} at most {lim:g}" for lim, name in CLEAN_LIMITS.values())
    over, unmeasured, clean = [], [], []
    for label, run in table_rows(table, sources, present=present):
        v = _row_regions(regions, run, measured_only=True)
        if not len(v):
            unmeasured.append(label)
            continue
        bad, missing = [], []
        for col, (lim, name) in CLEAN_LIMITS.items():
            m = v[col].astype(float).mean() if col in v else float("nan")
            if pd.isna(m):
                missing.append(name)
            elif m > lim:
                bad.append(f"{name} = {m:.3g}")
        if bad:
            over.append(f"{label}: {', '.join(bad)}")
        elif missing:
            unmeasured.append(f"{label} ({', '.join(missing)} not measured)")
        else:
            clean.append(label)
    text = [f"Limits, on each row's mean over its test subjects and seeds (whole volumes): {limits}."]
    text.append("Rows over a limit: " + ("; ".join(over) + "." if over else "none."))
    if clean:
        text.append(f"Within every limit: {', '.join(clean)}.")
    if unmeasured:
        text.append(f"Not measured on whole volumes: {', '.join(unmeasured)}.")
    return " ".join(text)


def banding_sentence(table: str, regions: pd.DataFrame, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")) -> str:
    """Each row's slice banding (:func:`mmdm.regions.slice_banding`), the mean over its test subjects and seeds
    (whole volumes), in one sentence for the error views of Fig. 3."""
    present = set(regions.run) if len(regions) else set()
    vals, missing = [], []
    for run, label in short_labels(table, sources, present).items():
        v = _row_regions(regions, run, measured_only=True)
        m = v["slice_banding"].astype(float).mean() if len(v) else float("nan")
        if pd.isna(m):
            missing.append(label)
        else:
            vals.append(f"{label} {m:.2f}" + (" (banding)" if m > MAX_SLICE_BANDING else ""))
    text = (f"Slice banding, mean over each row's test subjects and seeds (1 = as the ground truth; above "
            f"{MAX_SLICE_BANDING:g} counts as banding): " + (", ".join(vals) if vals else "no row measured") + ".")
    return text + (f" Not measured on whole volumes: {', '.join(missing)}." if missing else "")


def region_table(table: str, regions: pd.DataFrame, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR"),
                 columns: tuple[str, ...] = REGION_COLUMNS, with_source: bool = True) -> pd.DataFrame:
    """The region breakdown (:func:`mmdm.study.records.load_regions`) of every row of ``table``: mean ±
    sd over its test subjects and seeds (the run and its ``-s<k>`` repeats, as :func:`clean_image_check`)
    of each :data:`mmdm.regions.REGION_COLUMNS` column, ``n`` (test subjects, "16x3" for 16 subjects of 3 seeds),
    and what they are computed on (``source``: the whole volumes, or the stored mid-sagittal slice of a record
    written before the breakdown). Rows without a record show "–"."""
    present = set(regions.run) if len(regions) else set()
    rows = []
    for label, run in table_rows(table, sources, present=present):
        v = _row_regions(regions, run)
        subjects, seeds = (v.subject.nunique(), v.run.nunique()) if len(v) else (0, 0)
        row = {"row": label, "n": f"{subjects}x{seeds}" if seeds > 1 else str(subjects)}
        if with_source:
            row["computed on"] = ", ".join(sorted(set(v.source))) if len(v) else "–"
        for c in columns:
            x = v[c].astype(float) if len(v) else pd.Series(dtype=float)
            mean = x.mean() if len(x) else float("nan")
            sd = x.std(ddof=1) if len(x) > 1 else float("nan")
            d = REGION_DECIMALS[c]
            row[REGION_LABELS[c]] = "–" if pd.isna(mean) else f"{mean:.{d}f}" + ("" if pd.isna(sd) else f" ± {sd:.{d}f}")
        rows.append(row)
    return pd.DataFrame(rows).set_index("row")
