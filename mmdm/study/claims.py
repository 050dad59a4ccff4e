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
from mmdm.study.runs import BASELINES, REFERENCE_RUN
from mmdm.study.tables import LABELS, fmt

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
              tuple((REFERENCE_RUN, b, m) for b in BASELINES for m in METRICS)),
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


def comparisons_by_claim(comparisons: pd.DataFrame,
                         sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")) -> list[tuple[str, pd.DataFrame]]:
    """The comparisons behind the claims (:func:`evaluate_claims`) for reading, one
    table per claim in the claims' order: ``(claim text, table)``, the table with one row per
    comparison (the claimed-better run A against B), the mean difference A − B with its bootstrap
    95 % CI and the Holm-adjusted Wilcoxon p in the metric's own digits, and the verdict."""
    cols = ["A vs B", "metric", "n", "A − B (95 % CI)", "p (Holm)", "verdict"]
    out = []
    for claim in paper_claims(sources):
        c = comparisons[comparisons["claim"] == claim.key] if "claim" in comparisons else comparisons.iloc[0:0]
        rows = [{"A vs B": f"{r.better} vs {r.worse}", "metric": LABELS[r.metric], "n": r.n,
                 "A − B (95 % CI)": "–" if pd.isna(r.diff) else
                 f"{fmt(r.diff, r.metric)} [{fmt(r.ci_low, r.metric)}, {fmt(r.ci_high, r.metric)}]",
                 "p (Holm)": "–" if pd.isna(r.p_holm) else f"{r.p_holm:.3g}", "verdict": r.verdict}
                for r in c.itertuples()]
        out.append((claim.text, pd.DataFrame(rows, columns=cols).set_index("A vs B")))
    return out
