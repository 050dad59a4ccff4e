"""Paired statistics for the study's tables: bootstrap CIs, Wilcoxon, Holm, verdicts.

The paper reports means only (Tables 1-3). Every table of this study is built
from per-subject values, and every comparison with the reference method
(MMDM "full") is paired by subject.

Rules
-----
* **Pairs.** Only subjects present for both methods are paired; pairs in which
  either value is NaN or infinite (e.g. PSNR = inf of an identical image) are
  dropped and counted in ``n_dropped``.
* **Bootstrap CI** of a mean: percentile bootstrap, ``n_boot`` resamples of
  the ``n`` values with replacement (vectorised, ``numpy.random.default_rng(seed)``),
  interval = the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` quantiles of the
  resampled means. One value gives the degenerate interval [x, x]; none gives NaN.
* **Wilcoxon signed-rank** p-value (two-sided) of the paired differences,
  ``scipy.stats.wilcoxon(d)`` with its defaults (zero differences dropped;
  ``method="auto"``: the exact null distribution for small samples, a
  permutation null for small samples with ties or zeros, the normal
  approximation for large ones). Explicit rules:
  fewer than :data:`MIN_WILCOXON_N` (6) pairs -> ``p = NaN`` (with n <= 5 the
  smallest attainable two-sided p is 2 / 2^5 = 0.0625, so the test cannot
  reject at 0.05 and its p would only look like evidence of no difference);
  otherwise, all differences zero -> ``p = 1.0`` (no difference at all).
* **Holm-Bonferroni** within a table: the family is every comparison of the
  table (all methods x all metrics); NaN p-values are not part of it and stay NaN.
* **Verdict** per comparison, from the data (never typed): ``"holds"`` when the
  reference is better (by the metric's direction), the CI of the paired
  difference excludes 0 on that side, and Holm p < ``alpha`` (0.05);
  ``"contradicted"`` when the CI excludes 0 on the other side and Holm p <
  ``alpha``; ``"not shown"`` otherwise (including NaN p).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd


def top_count(n_items: int, fraction: float) -> int:
    """How many of ``n_items`` make up their top ``fraction``: ``max(1, round(fraction * n_items))``,
    at most ``n_items`` (the brightest voxels of a sample: the vessel emphasis, the bright-target lumen)."""
    if n_items < 1:
        raise ValueError(f"a sample needs at least one voxel, got {n_items}")
    return int(min(n_items, max(1, round(fraction * n_items))))


#: Fewer pairs than this: the Wilcoxon p-value is NaN (see the module docstring).
MIN_WILCOXON_N = 6
#: Default number of bootstrap resamples.
N_BOOT = 10000
#: Directions of the study's metrics (True: higher is better). ``length_r*`` keys are higher-better too.
DEFAULT_HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr": True, "ssim": True, "rmse": False,
    "mip_psnr": True, "mip_ssim": True, "mip_rmse": False,
    "cldice": True, "dice": True, "mip_dice": True, "betti0_error": False,
}
VERDICTS = ("holds", "contradicted", "not shown")
#: Most resampled values held in memory at once by the bootstrap.
_BOOT_CHUNK = 1 << 22


def _values(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1D sequence of per-subject values, got shape {a.shape}")
    return a


def bootstrap_mean_ci(values: Any, n_boot: int = N_BOOT, seed: int = 0, ci: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of finite ``values`` (NaN / inf are ignored)."""
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), e.g. 0.95; got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = _values(values, "values")
    x = x[np.isfinite(x)]
    n = x.size
    if n == 0:
        return math.nan, math.nan
    if n == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, _BOOT_CHUNK // n)
    for s in range(0, n_boot, step):
        k = min(step, n_boot - s)
        means[s:s + k] = x[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    return float(lo), float(hi)


def summarise(values: Any, n_boot: int = N_BOOT, seed: int = 0, ci: float = 0.95) -> dict[str, float]:
    """``mean``, ``sd`` (n - 1), ``n`` and the bootstrap CI of the mean of the finite values."""
    x = _values(values, "values")
    x = x[np.isfinite(x)]
    lo, hi = bootstrap_mean_ci(x, n_boot, seed, ci)
    return {"mean": float(x.mean()) if x.size else math.nan, "sd": float(x.std(ddof=1)) if x.size > 1 else math.nan,
            "n": int(x.size), "ci_low": lo, "ci_high": hi}


def wilcoxon_p(diffs: Any) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences (rules for n < 6 / all zero: module docstring)."""
    d = _values(diffs, "diffs")
    d = d[np.isfinite(d)]
    if d.size < MIN_WILCOXON_N:
        return math.nan
    if not np.any(d != 0):
        return 1.0
    from scipy.stats import wilcoxon

    with warnings.catch_warnings():  # scipy warns when it falls back to the normal approximation
        warnings.simplefilter("ignore")
        return float(wilcoxon(d).pvalue)


def min_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p-value the exact Wilcoxon signed-rank test can give with ``n``
    non-zero paired differences (all of one sign): ``2 / 2**n``; NaN below :data:`MIN_WILCOXON_N`."""
    return math.nan if n < MIN_WILCOXON_N else min(1.0, 2.0 / 2.0 ** n)


def smallest_holm_p(n: int, family: int) -> float:
    """The smallest Holm-adjusted p any comparison of a ``family`` can reach with ``n`` pairs
    (``family * min_wilcoxon_p(n)``): if it is not below alpha, no comparison can be shown."""
    return min(1.0, family * min_wilcoxon_p(n))


def paired_comparison(a: Any, b: Any, n_boot: int = N_BOOT, seed: int = 0, ci: float = 0.95) -> dict[str, float]:
    """Paired differences ``a - b`` (same subjects, same order): mean, sd, bootstrap CI, Wilcoxon p.

    Returns ``n`` (pairs used), ``n_dropped`` (pairs with a non-finite value),
    ``mean_a``, ``mean_b``, ``mean_diff``, ``sd_diff``, ``ci_low``, ``ci_high``
    and ``p_wilcoxon``.
    """
    x, y = _values(a, "a"), _values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a has {x.size} values but b has {y.size}; pass paired per-subject values "
                         f"(the same subjects in the same order)")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    d = x - y
    lo, hi = bootstrap_mean_ci(d, n_boot, seed, ci)
    return {"n": int(d.size), "n_dropped": int((~ok).sum()),
            "mean_a": float(x.mean()) if d.size else math.nan, "mean_b": float(y.mean()) if d.size else math.nan,
            "mean_diff": float(d.mean()) if d.size else math.nan,
            "sd_diff": float(d.std(ddof=1)) if d.size > 1 else math.nan,
            "ci_low": lo, "ci_high": hi, "p_wilcoxon": wilcoxon_p(d)}


def holm(pvalues: Iterable[float]) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (same order; NaN stays NaN and is not counted).

    With the m non-NaN p-values sorted, ``p_(1) <= ... <= p_(m)``:
    ``adj_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``.
    """
    p = np.asarray(list(pvalues), dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be a flat sequence, got shape {p.shape}")
    valid = ~np.isnan(p)
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[valid][(p[valid] < 0) | (p[valid] > 1)].tolist()}")
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(valid)
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def higher_is_better_of(metric: str, higher_is_better: Mapping[str, bool] | None = None) -> bool:
    """Direction of ``metric``: ``higher_is_better`` first, then the study defaults."""
    if higher_is_better and metric in higher_is_better:
        return bool(higher_is_better[metric])
    if metric in DEFAULT_HIGHER_IS_BETTER:
        return DEFAULT_HIGHER_IS_BETTER[metric]
    if metric.startswith("length_r"):
        return True
    raise ValueError(f"no direction known for metric '{metric}'; pass higher_is_better={{'{metric}': True or "
                     f"False}} (known defaults: {sorted(DEFAULT_HIGHER_IS_BETTER)} and length_r*)")


def verdict(diff_ci: tuple[float, float], p_holm: float, higher_is_better: bool, alpha: float = 0.05) -> str:
    """``holds`` / ``contradicted`` / ``not shown`` for a CI of (reference - method) (rule: module docstring)."""
    lo, hi = diff_ci
    if not (p_holm < alpha):  # NaN -> not shown
        return "not shown"
    better_lo, better_hi = (lo, hi) if higher_is_better else (-hi, -lo)  # CI of the reference's advantage
    if better_lo > 0:
        return "holds"
    if better_hi < 0:
        return "contradicted"
    return "not shown"


def _check_table(table: pd.DataFrame, method_col: str, subject_col: str) -> None:
    missing = [c for c in (method_col, subject_col) if c not in table.columns]
    if missing:
        raise ValueError(f"the table has no column(s) {missing}; expected long format with columns "
                         f"[{method_col}, {subject_col}, <metric>...], got {list(table.columns)}")
    dup = table.duplicated([method_col, subject_col])
    if dup.any():
        ex = table.loc[dup, [method_col, subject_col]].iloc[0].tolist()
        raise ValueError(f"{int(dup.sum())} duplicated ({method_col}, {subject_col}) row(s), e.g. {ex}: each method "
                         f"needs one value per subject. Average over seeds / samples first, or make the seed part "
                         f"of the subject key.")


def _metric_columns(table: pd.DataFrame, metrics: Sequence[str] | None, higher_is_better: Mapping[str, bool] | None,
                    exclude: Sequence[str]) -> list[str]:
    if metrics is not None:
        absent = [m for m in metrics if m not in table.columns]
        if absent:
            raise ValueError(f"metric column(s) {absent} not in the table; available: {list(table.columns)}")
        return list(metrics)
    out = []
    for c in table.columns:
        if c in exclude or not pd.api.types.is_numeric_dtype(table[c]):
            continue
        try:
            higher_is_better_of(str(c), higher_is_better)
        except ValueError:
            continue  # no known direction (e.g. a component count): only compared when named in metrics
        out.append(str(c))
    if not out:
        raise ValueError("no metric column with a known direction in the table; pass metrics=[...] and "
                         "higher_is_better={...}")
    return out


def compare_to_reference(table: pd.DataFrame, reference: str = "mmdm-full", metrics: Sequence[str] | None = None,
                         higher_is_better: Mapping[str, bool] | None = None, n_boot: int = N_BOOT, seed: int = 0,
                         ci: float = 0.95, alpha: float = 0.05, method_col: str = "method",
                         subject_col: str = "subject") -> pd.DataFrame:
    """Every other method against ``reference`` on every metric, paired by subject.

    ``table``: long format, one row per (method, subject) and one column per
    metric. ``metrics`` defaults to the numeric columns with a known direction
    (:data:`DEFAULT_HIGHER_IS_BETTER`, ``length_r*``, or ``higher_is_better``).
    Returns one row per (method, metric) with ``n`` (pairs), ``ref_mean``,
    ``ref_sd``, ``mean``, ``sd`` (reference and method, both over the pairs used),
    ``diff_mean``, ``diff_sd``, ``diff_ci_low``, ``diff_ci_high`` of
    ``reference - method``, ``p_wilcoxon``, ``p_holm`` (Holm within the whole
    table), ``higher_is_better`` and ``verdict``: "holds" if the reference is
    better with the CI excluding 0 and Holm p < ``alpha``, "contradicted" if it
    is worse with the CI excluding 0 and Holm p < ``alpha``, else "not shown".
    """
    _check_table(table, method_col, subject_col)
    methods = list(dict.fromkeys(table[method_col].tolist()))
    if reference not in methods:
        raise ValueError(f"reference method '{reference}' is not in the table; methods present: {methods}")
    cols = _metric_columns(table, metrics, higher_is_better, (method_col, subject_col))
    directions = {m: higher_is_better_of(m, higher_is_better) for m in cols}
    ref = table[table[method_col] == reference].set_index(subject_col)
    rows = []
    for method in methods:
        if method == reference:
            continue
        other = table[table[method_col] == method].set_index(subject_col)
        subjects = [s for s in ref.index if s in other.index]
        for metric in cols:
            a = ref.loc[subjects, metric].to_numpy(dtype=np.float64)
            b = other.loc[subjects, metric].to_numpy(dtype=np.float64)
            pc = paired_comparison(a, b, n_boot, seed, ci)
            ok = np.isfinite(a) & np.isfinite(b)
            rows.append({"method": method, "metric": metric, "n": pc["n"],
                         "ref_mean": pc["mean_a"], "ref_sd": float(a[ok].std(ddof=1)) if ok.sum() > 1 else math.nan,
                         "mean": pc["mean_b"], "sd": float(b[ok].std(ddof=1)) if ok.sum() > 1 else math.nan,
                         "diff_mean": pc["mean_diff"], "diff_sd": pc["sd_diff"],
                         "diff_ci_low": pc["ci_low"], "diff_ci_high": pc["ci_high"],
                         "p_wilcoxon": pc["p_wilcoxon"], "higher_is_better": directions[metric]})
    out = pd.DataFrame(rows, columns=["method", "metric", "n", "ref_mean", "ref_sd", "mean", "sd", "diff_mean",
                                      "diff_sd", "diff_ci_low", "diff_ci_high", "p_wilcoxon", "higher_is_better"])
    out["p_holm"] = holm(out["p_wilcoxon"].to_numpy()) if len(out) else []
    out["verdict"] = [verdict((r.diff_ci_low, r.diff_ci_high), r.p_holm, bool(r.higher_is_better), alpha)
                      for r in out.itertuples()]
    return out
