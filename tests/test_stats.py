"""Paired statistics (mmdm/stats.py) on constructed data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from mmdm.stats import (
    MIN_WILCOXON_N,
    bootstrap_mean_ci,
    compare_to_reference,
    holm,
    paired_comparison,
    summarise,
    wilcoxon_p,
)

# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_covers_a_known_shift_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    shift, n, reps = 0.5, 30, 300
    covered = 0
    for r in range(reps):
        b = rng.normal(10.0, 2.0, n)
        a = b + shift + rng.normal(0.0, 1.0, n)
        res = paired_comparison(a, b, n_boot=2000, seed=r)
        covered += res["ci_low"] <= shift <= res["ci_high"]
    assert 0.88 <= covered / reps <= 0.99  # percentile bootstrap: slightly below 0.95 at n = 30


def test_bootstrap_ci_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(1)
    widths = {}
    for n in (25, 400):
        w = []
        for r in range(20):
            lo, hi = bootstrap_mean_ci(0.5 + rng.normal(0.0, 1.0, n), n_boot=2000, seed=r)
            w.append(hi - lo)
        widths[n] = np.mean(w)
    assert widths[25] / widths[400] == pytest.approx(4.0, rel=0.2)
    # the width itself is about 2 x 1.96 sd / sqrt(n)
    assert widths[400] == pytest.approx(2 * 1.96 / 20.0, rel=0.15)


def test_bootstrap_is_seeded_and_degenerate_cases_do_not_crash():
    x = np.random.default_rng(2).normal(size=15)
    assert bootstrap_mean_ci(x, seed=5) == bootstrap_mean_ci(x, seed=5)
    assert bootstrap_mean_ci(x, seed=5) != bootstrap_mean_ci(x, seed=6)
    assert bootstrap_mean_ci([3.0]) == (3.0, 3.0)
    assert all(math.isnan(v) for v in bootstrap_mean_ci([]))
    with pytest.raises(ValueError, match="ci must be"):
        bootstrap_mean_ci(x, ci=95)


def test_summarise_matches_numpy():
    x = np.array([1.0, 2.0, 4.0, 8.0, np.nan, 16.0])
    s = summarise(x, n_boot=2000)
    finite = x[np.isfinite(x)]
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(finite.mean())
    assert s["sd"] == pytest.approx(finite.std(ddof=1))
    assert finite.min() <= s["ci_low"] < s["mean"] < s["ci_high"] <= finite.max()


# --------------------------------------------------------------------------- Wilcoxon


def test_wilcoxon_p_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.3, 1.0, 15), rng.normal(0.0, 1.0, 15)
    assert paired_comparison(a, b, n_boot=100)["p_wilcoxon"] == pytest.approx(sps.wilcoxon(a, b).pvalue)
    # with zero differences and ties (scipy then uses the normal approximation)
    a2 = np.round(rng.normal(0.2, 1.0, 24), 1)
    b2 = a2.copy()
    b2[::3] = np.round(b2[::3] - rng.normal(0.5, 0.5, 8), 1)
    b2[1::3] -= 0.3
    assert wilcoxon_p(a2 - b2) == pytest.approx(sps.wilcoxon(a2, b2).pvalue)


def test_wilcoxon_rules_for_tiny_and_all_zero_samples():
    assert math.isnan(wilcoxon_p([1.0, 2.0, 3.0, 4.0, 5.0]))  # n = 5 < MIN_WILCOXON_N
    assert MIN_WILCOXON_N == 6
    # the rule's rationale: with 5 pairs the best two-sided exact p is 2 / 2^5
    assert sps.wilcoxon([1.0, 2.0, 3.0, 4.0, 5.0]).pvalue == pytest.approx(0.0625)
    assert wilcoxon_p(np.zeros(10)) == 1.0
    same = paired_comparison(np.arange(8.0), np.arange(8.0), n_boot=100)
    assert same["p_wilcoxon"] == 1.0 and same["mean_diff"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.0


def test_paired_comparison_drops_non_finite_pairs():
    a = np.array([1.0, 2.0, np.inf, 4.0, 5.0, 6.0, 7.0, np.nan])
    b = np.array([0.5, 1.0, 1.0, 3.0, 4.0, 5.5, 6.0, 1.0])
    res = paired_comparison(a, b, n_boot=500)
    assert res["n"] == 6 and res["n_dropped"] == 2
    assert res["mean_diff"] == pytest.approx(np.mean([0.5, 1.0, 1.0, 1.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="paired"):
        paired_comparison([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------- Holm


def _holm_by_definition(p):
    """Step-down procedure written as a loop over ranks (reject order), for comparison."""
    p = list(p)
    m = len(p)
    ranked = sorted(range(m), key=lambda i: p[i])
    adj, running = [0.0] * m, 0.0
    for rank, i in enumerate(ranked):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj


def test_holm_hand_computed_example():
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> raised to 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.01, np.nan, 0.04, 0.03, 0.005])  # NaN is not part of the family
    assert math.isnan(out[1])
    assert out[[0, 2, 3, 4]] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]).size == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.2, 1.5])


def test_holm_is_monotone_and_matches_the_definition():
    p = np.random.default_rng(4).random(25) ** 3
    adj = holm(p)
    assert adj == pytest.approx(_holm_by_definition(p))
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)
    assert np.all(adj >= p) and np.all(adj <= 1.0)


# --------------------------------------------------------------------------- tables and verdicts


def constructed_table(n: int = 12) -> pd.DataFrame:
    """MMDM full beats 'weak' clearly, loses to 'strong' clearly, ties with 'noisy'."""
    rng = np.random.default_rng(5)
    subjects = [f"sub-{i:03d}" for i in range(1, n + 1)]
    base = rng.normal(30.0, 1.5, n)
    base_rmse = rng.normal(3.0, 0.3, n)
    jitter = np.tile([1.0, -1.0], n // 2) * np.repeat(np.arange(1, n // 2 + 1), 2) * 0.05  # symmetric, mean 0
    rows = []
    for method, dp, dr in (("mmdm-full", 1.0, -0.4), ("weak", 0.0, 0.0), ("strong", 2.0, -0.8)):
        for i, s in enumerate(subjects):
            rows.append({"method": method, "subject": s, "psnr": base[i] + dp + rng.normal(0, 0.1),
                         "rmse": base_rmse[i] + dr + rng.normal(0, 0.02), "seed_note": 0})
    ref = [r for r in rows if r["method"] == "mmdm-full"]
    for i, r in enumerate(ref):
        rows.append({"method": "noisy", "subject": r["subject"], "psnr": r["psnr"] + jitter[i],
                     "rmse": r["rmse"] - jitter[i] / 10, "seed_note": 0})
    return pd.DataFrame(rows)


def test_verdicts_on_constructed_tables():
    table = constructed_table()
    out = compare_to_reference(table, reference="mmdm-full", metrics=["psnr", "rmse"], n_boot=2000)
    v = {(r.method, r.metric): r.verdict for r in out.itertuples()}
    assert v == {("weak", "psnr"): "holds", ("weak", "rmse"): "holds",
                 ("strong", "psnr"): "contradicted", ("strong", "rmse"): "contradicted",
                 ("noisy", "psnr"): "not shown", ("noisy", "rmse"): "not shown"}
    # Holm over the whole table (6 comparisons), and the difference is reference - method
    assert out["p_holm"].to_numpy() == pytest.approx(holm(out["p_wilcoxon"]))
    assert np.all(out["p_holm"] >= out["p_wilcoxon"])
    weak = out[(out.method == "weak") & (out.metric == "psnr")].iloc[0]
    assert weak.diff_mean == pytest.approx(weak.ref_mean - weak["mean"])
    assert weak.diff_ci_low < weak.diff_mean < weak.diff_ci_high
    assert weak.n == 12
    ref_psnr = table.loc[table.method == "mmdm-full", "psnr"]
    assert weak.ref_mean == pytest.approx(ref_psnr.mean()) and weak.ref_sd == pytest.approx(ref_psnr.std(ddof=1))


def test_direction_flips_the_verdict():
    table = constructed_table()
    default = compare_to_reference(table, metrics=["psnr"], n_boot=1000)
    flipped = compare_to_reference(table, metrics=["psnr"], higher_is_better={"psnr": False}, n_boot=1000)
    swap = {"holds": "contradicted", "contradicted": "holds", "not shown": "not shown"}
    assert list(flipped["verdict"]) == [swap[v] for v in default["verdict"]]
    # rmse is lower-better by default: the same numbers read as psnr would flip its verdicts
    as_rmse = compare_to_reference(table, metrics=["rmse"], n_boot=1000)
    as_higher = compare_to_reference(table, metrics=["rmse"], higher_is_better={"rmse": True}, n_boot=1000)
    assert list(as_higher["verdict"]) == [swap[v] for v in as_rmse["verdict"]]


def test_default_metrics_and_errors():
    table = constructed_table()
    out = compare_to_reference(table, n_boot=200)  # seed_note has no direction: left out
    assert set(out["metric"]) == {"psnr", "rmse"}
    with pytest.raises(ValueError, match="no direction known for metric 'seed_note'"):
        compare_to_reference(table, metrics=["seed_note"], n_boot=200)
    with pytest.raises(ValueError, match="reference method 'mmdm' is not in the table"):
        compare_to_reference(table, reference="mmdm", n_boot=200)
    with pytest.raises(ValueError, match="Average over seeds"):
        compare_to_reference(pd.concat([table, table.iloc[:1]]), n_boot=200)


def test_unpaired_subjects_are_left_out():
    table = constructed_table()
    table = table[~((table.method == "weak") & table.subject.isin(["sub-001", "sub-002"]))]
    out = compare_to_reference(table, metrics=["psnr"], n_boot=200)
    assert out.set_index("method").loc["weak", "n"] == 10
    assert out.set_index("method").loc["strong", "n"] == 12


@pytest.mark.parametrize("n", [6, 8, 11])
def test_smallest_wilcoxon_p_is_that_of_all_differences_one_sign(n):
    from scipy.stats import wilcoxon

    from mmdm.stats import min_wilcoxon_p, smallest_holm_p

    d = np.arange(1, n + 1, dtype=float)  # distinct ranks, all positive: the most extreme outcome
    assert min_wilcoxon_p(n) == pytest.approx(wilcoxon(d).pvalue)
    rng = np.random.default_rng(n)
    for _ in range(20):  # no other outcome goes below it
        assert wilcoxon(rng.normal(1, 1, n)).pvalue >= min_wilcoxon_p(n) - 1e-12
    assert smallest_holm_p(n, 36) == pytest.approx(min(1.0, 36 * wilcoxon(d).pvalue))
    assert np.isnan(min_wilcoxon_p(5))
