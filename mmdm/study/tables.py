"""Tables 1-3 of the paper, filled with this study's measurements beside the paper's numbers."""

from __future__ import annotations

import pandas as pd

from mmdm.study.records import (METRIC_LABELS, METRIC_LABELS_VESSEL, METRICS, VESSEL_HIGHER_IS_BETTER,
                                paper_results)
from mmdm.study.runs import REFERENCE_RUN, study_runs

TABLE_TITLES = {"table1": "Table 1: comparison methods", "table2": "Table 2: ablation of the MIP loss and NAWS",
                "table3": "Table 3: modality combinations"}
DECIMALS = {"psnr": 2, "ssim": 4, "rmse": 3, "mip_psnr": 2, "mip_ssim": 4, "mip_rmse": 3,
            "cldice": 3, "dice": 3, "mip_dice": 3, "betti0_error": 1}
LABELS = {**METRIC_LABELS, **METRIC_LABELS_VESSEL}


def fmt(value: float, metric: str) -> str:
    return "–" if pd.isna(value) else f"{value:.{DECIMALS[metric]}f}"


def table_rows(table: str, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")) -> list[tuple[str, str]]:
    """(row label, run name) of ``table`` in the paper's row order (MMDM full last, as in the paper)."""
    runs = [s for s in study_runs(sources) if table in s.tables]
    runs = [s for s in runs if s.name != REFERENCE_RUN] + [s for s in runs if s.name == REFERENCE_RUN]
    return [(s.labels[table], s.name) for s in runs]


def results_table(table: str, per_subject: pd.DataFrame, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR"),
                  with_paper: bool = True, metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """One row per table row: ``ours`` as mean ± sd over test subjects, and the paper's value.

    Runs without a complete record show "–" (not yet run).
    """
    paper = paper_results()
    paper = paper[paper.table == table].set_index("run")
    rows = []
    for label, run in table_rows(table, sources):
        vals = per_subject[per_subject.run == run]
        row = {"row": label, "run": run, "n": len(vals)}
        for m in metrics:
            v = vals[m] if m in vals else pd.Series(dtype=float)
            mean, sd = (v.mean(), v.std(ddof=1) if len(v) > 1 else float("nan")) if len(v) else (float("nan"),) * 2
            name = f"{LABELS[m]} (ours)" if with_paper else LABELS[m]
            row[name] = fmt(mean, m) + ("" if pd.isna(sd) else f" ± {fmt(sd, m)}")
            if with_paper:
                row[f"{LABELS[m]} (paper)"] = fmt(paper[m].get(run, float("nan")), m)
        rows.append(row)
    return pd.DataFrame(rows).set_index("row")


def provenance_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Commit, device, steps and wall times of every run record."""
    cols = ["run", "profile", "steps", "n_subjects", "device", "commit", "train_wall_s", "eval_wall_s"]
    return runs[[c for c in cols if c in runs]].set_index("run") if len(runs) else pd.DataFrame(columns=cols)


def paired_table(table: str, per_subject: pd.DataFrame, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR"),
                 n_boot: int = 10000, metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """MMDM full against every other row of ``table``, paired over test subjects
    (:func:`mmdm.stats.compare_to_reference`: bootstrap 95 % CI of the mean difference
    full - other, Wilcoxon signed-rank p, Holm-corrected within the table, verdict)."""
    from mmdm.stats import compare_to_reference

    labels = dict((run, label) for label, run in table_rows(table, sources))
    sub = per_subject[per_subject.run.isin(labels)]
    metrics = [m for m in metrics if m in sub and sub[m].notna().any()]
    if sub.run.nunique() < 2 or REFERENCE_RUN not in set(sub.run) or not metrics:
        return pd.DataFrame()
    cmp = compare_to_reference(sub, reference=REFERENCE_RUN, metrics=metrics, n_boot=n_boot, method_col="run",
                               higher_is_better=VESSEL_HIGHER_IS_BETTER)
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
    from mmdm.study.seeds import seed_spread

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
    from mmdm.study.seeds import seed_differences

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
