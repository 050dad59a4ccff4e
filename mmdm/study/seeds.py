"""Training seeds: which runs are repeated, and how far seeds spread against method differences.

A profile names the runs it trains with every seed in ``profile.seeds``
(``profile.seed_runs``); ``"strongest-baseline"`` stands for the Table 1
baseline with the highest mean PSNR among the seed-0 records. Seed ``s > 0``
of run ``name`` is the run ``name-s<s>`` (:func:`mmdm.study.runs.run_name`),
trained exactly like seed 0 but for the seed of initialisation, data order
and diffusion noise. Evaluation (sampling seed, subjects) is the same for all.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd

from mmdm.study.runs import REFERENCE_RUN, RunSpec, baselines, study_runs

STRONGEST_BASELINE = "strongest-baseline"
_SEED_SUFFIX = re.compile(r"^(?P<base>.+)-s(?P<seed>[1-9][0-9]*)$")


def split_seed(run: str) -> tuple[str, int]:
    """``"mmdm-full-s2"`` -> ``("mmdm-full", 2)``; a name without suffix is seed 0."""
    m = _SEED_SUFFIX.match(run)
    return (m["base"], int(m["seed"])) if m else (run, 0)


def seeded_name(run: str, seed: int) -> str:
    return run if seed == 0 else f"{run}-s{seed}"


def strongest_baseline(per_subject: pd.DataFrame, metric: str = "psnr") -> str | None:
    """The Table 1 baseline (seed 0) with the highest mean ``metric``; None without any record."""
    sub = per_subject[per_subject.run.isin(baselines())] if len(per_subject) else per_subject
    if not len(sub) or metric not in sub:
        return None
    means = sub.groupby("run")[metric].mean().dropna()
    return str(means.idxmax()) if len(means) else None


def resolve_seed_runs(names: Sequence[str], per_subject: pd.DataFrame,
                      sources: Sequence[str] = ("T1w", "T2w", "FLAIR")) -> tuple[list[str], list[str]]:
    """(resolved run names, messages about names that cannot be resolved yet)."""
    known = {r.name for r in study_runs(sources)}
    out, notes = [], []
    for name in names:
        if name == STRONGEST_BASELINE:
            best = strongest_baseline(per_subject)
            missing = [b for b in baselines() if b not in set(per_subject.get("run", []))]
            if best is None or missing:
                notes.append(f"'{STRONGEST_BASELINE}' is decided once every baseline has a seed-0 record "
                             f"(missing: {', '.join(missing) or 'none'})")
                continue
            name = best
        if name not in known:
            raise KeyError(f"seed run '{name}' is not a run of the study; known: {', '.join(sorted(known))}")
        if name not in out:
            out.append(name)
    return out, notes


def seed_specs(runs: Sequence[str], seeds: Sequence[int], sources: Sequence[str] = ("T1w", "T2w", "FLAIR")
               ) -> list[tuple[RunSpec, int]]:
    """(spec named ``run-s<seed>``, seed) for every run and every seed > 0."""
    by_name = {r.name: r for r in study_runs(sources)}
    out = []
    for run in runs:
        spec = by_name[run]
        for seed in seeds:
            if seed != 0:
                out.append((RunSpec(seeded_name(run, seed), spec.method, spec.variant, spec.sources, (), {}), seed))
    return out


def seed_means(per_subject: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per (run group, seed): the mean over test subjects of each metric."""
    if not len(per_subject):
        return pd.DataFrame(columns=["group", "seed", "run", *metrics])
    df = per_subject.copy()
    split = df.run.map(split_seed)
    df["group"], df["seed"] = [g for g, _ in split], [s for _, s in split]
    metrics = [m for m in metrics if m in df]
    return df.groupby(["group", "seed", "run"], as_index=False)[metrics].mean()


def seed_spread(per_subject: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """For every run trained with more than one seed: number of seeds, and per metric the mean
    over seeds and the seed-to-seed standard deviation (ddof=1) of the per-run means."""
    means = seed_means(per_subject, metrics)
    rows = []
    for group, g in means.groupby("group"):
        if len(g) < 2:
            continue
        row = {"run": group, "seeds": ",".join(str(s) for s in sorted(g.seed)), "n_seeds": len(g)}
        for m in metrics:
            if m in g:
                row[f"{m}_mean"] = float(g[m].mean())
                row[f"{m}_sd"] = float(g[m].std(ddof=1))
        rows.append(row)
    cols = ["run", "seeds", "n_seeds", *[f"{m}_{k}" for m in metrics for k in ("mean", "sd")]]
    return pd.DataFrame(rows, columns=cols)


def seed_differences(per_subject: pd.DataFrame, metrics: Sequence[str], reference: str = REFERENCE_RUN
                     ) -> pd.DataFrame:
    """Reference minus each other multi-seed run: the difference of the seed means, and the
    seed-to-seed spread beside it (the sd of each side, and the standard error of the
    difference ``sqrt(sd_a^2 / n_a + sd_b^2 / n_b)``)."""
    spread = seed_spread(per_subject, metrics).set_index("run")
    if reference not in spread.index:
        return pd.DataFrame()
    ref = spread.loc[reference]
    rows = []
    for other, o in spread.drop(index=reference).iterrows():
        for m in metrics:
            if f"{m}_mean" not in spread:
                continue
            se = np.sqrt(ref[f"{m}_sd"] ** 2 / ref.n_seeds + o[f"{m}_sd"] ** 2 / o.n_seeds)
            rows.append({"other": other, "metric": m, "difference": ref[f"{m}_mean"] - o[f"{m}_mean"],
                         "sd_reference": ref[f"{m}_sd"], "sd_other": o[f"{m}_sd"], "se_difference": se,
                         "n_seeds_reference": int(ref.n_seeds), "n_seeds_other": int(o.n_seeds)})
    return pd.DataFrame(rows)
