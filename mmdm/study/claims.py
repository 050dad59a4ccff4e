"""The paper's claims, each tested on this study's per-subject results.

Every claim is a set of paired comparisons "A is better than B on metric m"
over the test subjects. Each comparison gets the mean difference A - B with a
bootstrap 95 % CI and a Wilcoxon signed-rank p-value; the p-values of one
claim are Holm-corrected together. A comparison *holds* when A is better, the
CI excludes 0 and the corrected p < 0.05; it is *contradicted* when the same
is true in B's favour; otherwise it is *not shown*. A claim holds when every
comparison holds, is contradicted when any is contradicted, and is not shown
otherwise. The paper's own figure for a claim is computed from its tables
(``paper_results.csv``), never typed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mmdm.stats import holm, paired_comparison, smallest_holm_p, verdict
from mmdm.study.records import (HIGHER_IS_BETTER, METRICS, VESSEL_HIGHER_IS_BETTER, VESSEL_SCORE_HIGHER_IS_BETTER,
                                paper_results)
from mmdm.study.runs import REFERENCE_RUN, baselines
from mmdm.study.seeds import seeded_name, split_seed
from mmdm.study.tables import LABELS, fmt, seed_groups

DIRECTION = {**HIGHER_IS_BETTER, **VESSEL_HIGHER_IS_BETTER, **VESSEL_SCORE_HIGHER_IS_BETTER}


@dataclass(frozen=True)
class Claim:
    key: str
    text: str
    comparisons: tuple[tuple[str, str, str], ...]  # (better run, worse run, metric)


def paper_claims(sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")) -> list[Claim]:
    from itertools import combinations

    pairs = ["mmdm-full-" + "+".join(p) for p in combinations(sources, len(sources) - 1)]
    return [
        Claim("beats_baselines", "MMDM beats every comparison method on all six metrics (Table 1)",
              tuple((REFERENCE_RUN, b, m) for b in baselines() for m in METRICS)),
        Claim("mip_loss_mip_psnr", "The MIP loss raises axial-MIP PSNR over the base model (Table 2)",
              (("mmdm-mip", "mmdm-base", "mip_psnr"),)),
        Claim("naws_mip_psnr", "NAWS raises axial-MIP PSNR over the base model (Table 2)",
              (("mmdm-naws", "mmdm-base", "mip_psnr"),)),
        Claim("full_beats_single", "MIP loss + NAWS together beat each single addition on all six metrics (Table 2)",
              tuple((REFERENCE_RUN, r, m) for r in ("mmdm-mip", "mmdm-naws") for m in METRICS)),
        Claim("three_beat_pairs", "Three modalities beat every pair of modalities on all six metrics (Table 3)",
              tuple((REFERENCE_RUN, p, m) for p in pairs for m in METRICS)),
        Claim("mip_loss_continuity", "The MIP loss improves vessel continuity (clDice) over the base model "
              "(section 2.2, Fig. 3)", (("mmdm-mip", "mmdm-base", "cldice"),)),
    ]


def _paper_figure(claim: Claim, paper: pd.DataFrame) -> str:
    """The paper's own difference(s) for the claim, from its tables."""
    vals = paper.drop_duplicates("run").set_index("run")
    diffs = []
    for a, b, m in claim.comparisons:
        if m not in vals or a not in vals.index or b not in vals.index:
            return "not reported"
        diffs.append(vals.at[a, m] - vals.at[b, m])
    if len(diffs) == 1:
        a, b, m = claim.comparisons[0]
        return f"{fmt(diffs[0], m)} ({LABELS[m]})"
    signed = [d if DIRECTION[m] else -d for d, (_, _, m) in zip(diffs, claim.comparisons)]
    return f"better in {sum(s > 0 for s in signed)} of {len(signed)} comparisons"


def _many_comparisons(df: pd.DataFrame) -> str:
    """Summary of a claim's comparisons: how many go the claimed way (beside the paper's count), how
    many have a bootstrap CI clear of 0 on either side, and how many hold after Holm correction."""
    sign = np.array([1.0 if DIRECTION[m] else -1.0 for m in df.metric])
    lo, hi = np.minimum(df.ci_low * sign, df.ci_high * sign), np.maximum(df.ci_low * sign, df.ci_high * sign)
    better = int(((df["diff"] * sign) > 0).sum())
    return (f"better in {better} of {len(df)} comparisons (CI above 0 in {int((lo > 0).sum())}, "
            f"below 0 in {int((hi < 0).sum())}); holds in {int((df.verdict == 'holds').sum())}")


def evaluate_claims(per_subject: pd.DataFrame, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR"),
                    n_boot: int = 10000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per claim, one row per comparison) from per-subject results (columns run, subject, metrics)."""
    paper = paper_results()
    claims, comps = [], []
    for claim in paper_claims(sources):
        rows = []
        for a, b, m in claim.comparisons:
            pa = per_subject[per_subject.run == a].set_index("subject")
            pb = per_subject[per_subject.run == b].set_index("subject")
            common = pa.index.intersection(pb.index)
            if m not in per_subject or len(common) == 0:
                rows.append({"claim": claim.key, "better": a, "worse": b, "metric": m, "n": 0, "diff": np.nan,
                             "ci_low": np.nan, "ci_high": np.nan, "p": np.nan})
                continue
            r = paired_comparison(pa.loc[common, m].to_numpy(float), pb.loc[common, m].to_numpy(float), n_boot=n_boot)
            rows.append({"claim": claim.key, "better": a, "worse": b, "metric": m, "n": r["n"], "diff": r["mean_diff"],
                         "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p": r["p_wilcoxon"]})
        df = pd.DataFrame(rows)
        df["p_holm"] = holm(df["p"].to_numpy(float))
        df["verdict"] = [verdict((lo, hi), p, DIRECTION[m]) if n else "not shown"
                         for lo, hi, p, m, n in zip(df.ci_low, df.ci_high, df.p_holm, df.metric, df.n)]
        if (df.verdict == "contradicted").any():
            overall = "contradicted"
        elif (df.verdict == "holds").all():
            overall = "holds"
        else:
            overall = "not shown"
        if len(df) == 1:
            m = df.metric[0]
            ours = "–" if pd.isna(df["diff"][0]) else (f"{fmt(df['diff'][0], m)} [{fmt(df.ci_low[0], m)}, "
                                                       f"{fmt(df.ci_high[0], m)}] ({LABELS[m]})")
        else:
            ours = _many_comparisons(df)
        floor = smallest_holm_p(int(df.n.max()), len(df))
        claims.append({"claim": claim.text, "paper": _paper_figure(claim, paper), "this study (95 % CI)": ours,
                       "n subjects": int(df.n.max()),
                       "smallest attainable p (Holm)": "–" if np.isnan(floor) else f"{floor:.3g}",
                       "verdict": overall})
        comps.append(df)
    return pd.DataFrame(claims), pd.concat(comps, ignore_index=True)


# ----------------------------------------------------------------------------
# verdicts over all seeds

#: The rule that decides a claim over every seed, stated before any verdict is computed.
SEED_RULE = ("each run's test subjects are first averaged over all of its seeds (a run with one seed counts as it "
             "is); each comparison is then tested on those seed-averaged subjects exactly as for one seed (bootstrap "
             "95 % CI of the mean difference, Wilcoxon signed-rank p, Holm-corrected within the claim); a comparison "
             "holds (or is contradicted) only when, in addition, the mean difference goes the same way in every "
             "pairing of a seed of A with a seed of B; otherwise it is not shown. A claim holds when every comparison "
             "holds and is contradicted when any is contradicted")


def seed_averaged(per_subject: pd.DataFrame) -> pd.DataFrame:
    """``per_subject`` with the seeds of every run averaged: one row per (run, subject), the run named by
    its seed-0 name (``mmdm-full-s2`` joins ``mmdm-full``), numeric columns the mean over its seeds, and
    ``n_seeds`` how many seeds the subject's value averages."""
    if not len(per_subject):
        return per_subject.assign(n_seeds=pd.Series(dtype=int))
    df = per_subject.copy()
    df["run"] = [split_seed(r)[0] for r in df.run]
    num = [c for c in df.columns if c not in ("run", "subject") and pd.api.types.is_numeric_dtype(df[c])]
    out = df.groupby(["run", "subject"], as_index=False)[num].mean()
    out["n_seeds"] = df.groupby(["run", "subject"]).size().to_numpy()
    return out


def _pairing_signs(per_subject: pd.DataFrame, groups: dict[str, list[str]], a: str, b: str, m: str) -> list[float]:
    """Mean difference A − B (over common subjects) for every pairing of a seed of A with a seed of B."""
    out = []
    for ra in groups.get(a, []):
        for rb in groups.get(b, []):
            pa = per_subject[per_subject.run == ra].set_index("subject")[m]
            pb = per_subject[per_subject.run == rb].set_index("subject")[m]
            common = pa.index.intersection(pb.index)
            if len(common):
                out.append(float((pa.loc[common] - pb.loc[common]).mean()))
    return out


def evaluate_claims_over_seeds(per_subject: pd.DataFrame, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR"),
                               n_boot: int = 10000) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The claims decided over every seed by :data:`SEED_RULE`, with the single-seed verdicts beside.

    Returns ``(claims, comparisons, per_seed)``: ``claims`` as :func:`evaluate_claims` (verdict over all
    seeds) plus ``seeds`` (how many seeds each compared run has, e.g. "3 vs 1") and one column
    ``seed k`` per seed with the claim's verdict from the runs of that seed alone ("–" where a run of
    the claim has no such seed); ``comparisons`` with ``pairings`` (how many seed pairings go the claimed
    way, of how many); ``per_seed`` the per-seed verdict of every comparison."""
    groups = seed_groups(per_subject)
    avg = seed_averaged(per_subject)
    claims, comps = evaluate_claims(avg.drop(columns="n_seeds"), sources, n_boot=n_boot)
    pair_cols, verdicts = [], []
    for r in comps.itertuples():
        signs = _pairing_signs(per_subject, groups, r.better, r.worse, r.metric) if r.metric in per_subject else []
        sign = 1.0 if DIRECTION[r.metric] else -1.0
        claimed = sum(s * sign > 0 for s in signs)
        pair_cols.append(f"{claimed} of {len(signs)}")
        v = r.verdict
        if v == "holds" and claimed != len(signs):
            v = "not shown"
        elif v == "contradicted" and sum(s * sign < 0 for s in signs) != len(signs):
            v = "not shown"
        verdicts.append(v)
    comps = comps.assign(pairings=pair_cols, verdict=verdicts)
    overall, summaries = [], list(claims["this study (95 % CI)"])
    for i, (key, df) in enumerate(comps.groupby("claim", sort=False)):
        overall.append("contradicted" if (df.verdict == "contradicted").any() else
                       "holds" if (df.verdict == "holds").all() else "not shown")
        if len(df) > 1:  # its count of comparisons that hold, after the seed-pairing condition
            summaries[i] = _many_comparisons(df.reset_index(drop=True))
    claims = claims.assign(verdict=overall, **{"this study (95 % CI)": summaries})
    # the number of seeds of every run a claim compares
    keys = list(comps.drop_duplicates("claim").claim)
    seeds_text = []
    for key in keys:
        c = comps[comps.claim == key]
        by_count: dict[int, list[str]] = {}
        for r in dict.fromkeys([*c.better, *c.worse]):
            by_count.setdefault(len(groups.get(r, [])), []).append(r)
        seeds_text.append("; ".join(f"{n}: {', '.join(rs)}" for n, rs in sorted(by_count.items(), reverse=True)))
    claims.insert(claims.columns.get_loc("verdict"), "seeds per run", seeds_text)
    # single-seed verdicts: seed k of every run that has it, seed 0 of the others (marked *)
    seeds = sorted({split_seed(r)[1] for r in per_subject.run}) if len(per_subject) else []
    per_seed_rows = []
    for k in seeds:
        one, fell_back = _seed_slice(per_subject, groups, k)
        ck, dk = evaluate_claims(one, sources, n_boot=n_boot)
        col = []
        for i, key in enumerate(keys):
            d = dk[dk.claim == key]
            involved = set(d.better) | set(d.worse)
            col.append(ck.verdict[i] + ("*" if involved & fell_back else ""))
        claims[f"seed {k}"] = col
        per_seed_rows.append(dk.assign(seed=k))
    per_seed = pd.concat(per_seed_rows, ignore_index=True) if per_seed_rows else pd.DataFrame()
    return claims, comps, per_seed


def _seed_slice(per_subject: pd.DataFrame, groups: dict[str, list[str]], k: int) -> tuple[pd.DataFrame, set[str]]:
    """The records of seed ``k`` named by their seed-0 names: each run's seed ``k`` where it has one, else its
    seed 0; and the runs that fell back to seed 0."""
    parts, fell_back = [], set()
    for base, runs in groups.items():
        want = seeded_name(base, k)
        pick = want if want in runs else base
        if pick not in runs:
            continue
        if pick != want:
            fell_back.add(base)
        parts.append(per_subject[per_subject.run == pick].assign(run=base))
    return (pd.concat(parts, ignore_index=True) if parts else per_subject.iloc[0:0]), fell_back


def single_seed_runs(per_subject: pd.DataFrame, sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")) -> list[str]:
    """The runs the claims compare that have a record of one seed only (seed 0)."""
    groups = seed_groups(per_subject)
    compared = {x for c in paper_claims(sources) for a, b, _ in c.comparisons for x in (a, b)}
    return sorted(r for r in compared if len(groups.get(r, [])) == 1)


def comparisons_by_claim(comparisons: pd.DataFrame,
                         sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")) -> list[tuple[str, pd.DataFrame]]:
    """The comparisons behind the claims (:func:`evaluate_claims`) for reading, one
    table per claim in the claims' order: ``(claim text, table)``, the table with one row per
    comparison (the claimed-better run A against B), the mean difference A − B with its bootstrap
    95 % CI and the Holm-adjusted Wilcoxon p in the metric's own digits, and the verdict."""
    cols = ["A vs B", "metric", "n", "A − B (95 % CI)", "p (Holm)", "pairings", "verdict"]
    out = []
    for claim in paper_claims(sources):
        c = comparisons[comparisons["claim"] == claim.key] if "claim" in comparisons else comparisons.iloc[0:0]
        rows = [{"A vs B": f"{r.better} vs {r.worse}", "metric": LABELS[r.metric], "n": r.n,
                 "A − B (95 % CI)": "–" if pd.isna(r.diff) else
                 f"{fmt(r.diff, r.metric)} [{fmt(r.ci_low, r.metric)}, {fmt(r.ci_high, r.metric)}]",
                 "p (Holm)": "–" if pd.isna(r.p_holm) else f"{r.p_holm:.3g}",
                 "pairings": getattr(r, "pairings", "–"), "verdict": r.verdict}
                for r in c.itertuples()]
        out.append((claim.text, pd.DataFrame(rows, columns=cols).set_index("A vs B")))
    return out
