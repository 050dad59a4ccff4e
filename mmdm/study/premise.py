"""The paper's premise, segment by segment: are vessels that fewer sources show recovered less?

The paper motivates fusing T1W, T2W and FLAIR by vessels that no single
modality shows well, and tests it only through whole-volume PSNR/SSIM of
modality pairs (Table 3). The phantom knows every vessel segment and how
visible it is in each source, so the premise can be tested where it lives.

Per test subject and ground-truth vessel segment ``s``:

* **visibility** in each source ``m`` by the criterion of
  :func:`mmdm.data.phantom.vessel_visibility` (``|CNR_m(s)| > k``, ``k =``
  :data:`VISIBILITY_K` = 3 noise standard deviations, the simulation's known
  noise levels); the **visibility class** is the number of sources that show it:
  ``none``, ``one``, ``two``, ``three`` (``only_<m>`` names the source when one
  shows it);
* its **radius class**: the bins of
  :data:`mmdm.vessel_segmentation.DEFAULT_RADIUS_BINS_MM` on the segment's radius;
* each model's **contrast recovery** on the segment::

      r(s) = (mean pred on lumen(s) - mean pred on ring(s))
             / (mean target on lumen(s) - mean target on ring(s))

  with ``lumen(s)`` the voxels labelled ``s`` whose vessel fraction is
  > 0.5 (all voxels labelled ``s`` where none is) and ``ring(s)`` the local
  background of the visibility criterion (within :data:`SHELL` voxels,
  26-connected, of the segment, with vessel fraction <= 0.02): 1 when the
  synthesis reproduces the TOF's local contrast of that vessel, 0 when it
  shows none. Defined on the segments the real TOF-MRA shows brighter than their
  surround (``CNR_angio(s) > k``); the others are not scored;
* the **centreline share**: the fraction of the segment's centreline length
  (samples every quarter voxel, nearest voxel) inside the cohort's fixed vessel
  segmentation of the synthesis (:func:`mmdm.study.vessel_eval.cohort_segmentation`:
  fitted once on the validation subjects' real TOF-MRA, never on test
  subjects), inside the brain mask as for clDice.

Per run and class, a subject's value is the mean over its segments; tables
give the mean over subjects with a bootstrap CI, and comparisons are paired by
subject (:mod:`mmdm.stats`). The check that nothing recovers what no source
shows is decided by a rule fixed here: the ``none`` class is **not recovered**
when the upper end of its CI is below :data:`RECOVERED_AT` (0.2, the
study's threshold for "vessels learned"), **recovered** when the lower end is
above it, and **undecided** otherwise (with fewer than two subjects: **too few subjects**).
Comparisons of MMDM full with another run are claimed only by the study's
verdict rule (:func:`mmdm.stats.verdict`: paired CI excluding 0 and a
Holm-adjusted Wilcoxon p < 0.05 within the question's comparisons; no claim
with fewer than six subjects).

The record (``results/<profile>/analysis/premise/``: ``segments.csv``,
``recovery.csv`` written after every run so an interrupted analysis resumes,
then ``summary.json``) is computed from the runs' written predictions
(``runs/<profile>/<run>/predictions``); nothing is synthesised again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from mmdm.data.layout import TARGET_MODALITY, Layout
from mmdm.data.phantom import has_ground_truth, load_ground_truth, subject_visibility
from mmdm.data.volumes import load_volume
from mmdm.engine.rundir import RecordWriter
from mmdm.io import write_text
from mmdm.paths import project_path, repo_root
from mmdm.stats import MIN_WILCOXON_N, holm, paired_comparison, summarise, verdict
from mmdm.study.api import analysis_dir, results_dir, retire_if_stale, runs_dir
from mmdm.study.stale import keep_current_rows, stamps
from mmdm.study.profiles import get_profile
from mmdm.study.records import VESSELS_LEARNED_RECOVERY, portable
from mmdm.study.runs import REFERENCE_RUN, baselines, study_runs
from mmdm.study.vessel_eval import cohort_segmentation, reference_volumes
from mmdm.vessel_segmentation import (DEFAULT_RADIUS_BINS_MM, LUMEN_MIN_FRACTION, VesselSegConfig, centreline_samples,
                                      phantom_lumen, segment_vessels)

#: A segment is visible in a modality when its contrast-to-noise ratio exceeds this many noise sigmas.
VISIBILITY_K = 3.0
#: Width (voxels) of the local background ring, as in the visibility criterion.
SHELL = 2
#: Voxels with a larger vessel fraction are not background (the visibility criterion's value).
BACKGROUND_MAX_FRACTION = 0.02
#: Visibility classes by the number of sources that show a segment.
CLASSES = ("none", "one", "two", "three")
#: The ``none`` class counts as recovered above this contrast recovery (the study's "vessels learned").
RECOVERED_AT = VESSELS_LEARNED_RECOVERY
#: The check needs a CI over at least this many subjects (one subject's "interval" is a point).
MIN_CHECK_SUBJECTS = 2
INVISIBLE_CHECKS = ("not recovered", "recovered", "undecided", "too few subjects", "no such segment")
SCORES = ("recovery", "centreline")
SCORE_LABELS = {"recovery": "contrast recovery", "centreline": "centreline share"}


def visibility_class(n_visible: int) -> str:
    """``none`` / ``one`` / ``two`` / ``three`` (more than three sources: ``three``)."""
    if n_visible < 0:
        raise ValueError(f"a segment is visible in >= 0 sources, got {n_visible}")
    return CLASSES[min(int(n_visible), 3)]


def radius_class(radius_mm: float, bins: Sequence[float] = DEFAULT_RADIUS_BINS_MM) -> str:
    """The bin ``[lo, hi)`` (mm) that holds ``radius_mm``, as ``"lo-hi"``."""
    for lo, hi in zip(bins[:-1], bins[1:]):
        if lo <= radius_mm < hi:
            return f"{lo:g}-{hi:g}"
    raise ValueError(f"radius {radius_mm} mm is outside the bins {list(bins)}")


def segment_table(root: str | Path, subject: str, sources: Sequence[str], k: float = VISIBILITY_K) -> pd.DataFrame:
    """One row per ground-truth segment of ``subject``: CNR and visibility per source and in the TOF,
    the number of sources that show it, its visibility and radius classes."""
    vis = subject_visibility(root, subject, k=k)
    edges = {int(e["label"]): e for e in load_ground_truth(root, subject)["centerlines"]["edges"]
             if e.get("label", 0)}
    rows = []
    for i, seg in enumerate(vis["segments"].tolist()):
        row: dict[str, Any] = {"subject": subject, "segment": int(seg), "voxels": int(vis["n_voxels"][i])}
        shown = []
        for m in (*sources, TARGET_MODALITY):
            c = float(vis["cnr"][m][i])
            row[f"cnr_{m}"] = c
            if m != TARGET_MODALITY and abs(c) > k:
                shown.append(m)
        row["tof_visible"] = bool(row[f"cnr_{TARGET_MODALITY}"] > k)  # bright in the TOF: recovery defined
        row["n_visible"] = len(shown)
        row["visible_in"] = "+".join(shown)
        row["visibility"] = visibility_class(len(shown))
        r = float(edges[seg]["radius_mm"]) if seg in edges else math.nan
        row["radius_mm"] = r
        row["radius_class"] = radius_class(r) if math.isfinite(r) else ""
        rows.append(row)
    return pd.DataFrame(rows)


def segment_scores(pred: np.ndarray, target: np.ndarray, labels: np.ndarray, fraction: np.ndarray,
                   segments: Sequence[int], seg_mask: np.ndarray | None = None,
                   centerlines: Mapping[str, Any] | None = None, affine: np.ndarray | None = None,
                   region: np.ndarray | None = None) -> pd.DataFrame:
    """Contrast recovery and centreline share of every segment in ``segments`` (definitions: module doc).

    ``seg_mask``: the vessel segmentation of ``pred`` (with ``centerlines`` and ``affine``: the share
    of each segment's centreline inside it; samples outside ``region`` are left out)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if pred.shape != target.shape or labels.shape != target.shape or fraction.shape != target.shape:
        raise ValueError(f"pred {pred.shape}, target {target.shape}, labels {labels.shape} and fraction "
                         f"{fraction.shape} must be on one grid")
    clean = fraction <= BACKGROUND_MAX_FRACTION
    struct = ndimage.generate_binary_structure(3, 3)
    objects = ndimage.find_objects(labels)
    share = _centreline_share(seg_mask, centerlines, affine, region) if seg_mask is not None else {}
    rows = []
    for s in segments:
        s = int(s)
        rec = math.nan
        sl = objects[s - 1] if 0 < s <= len(objects) else None
        if sl is not None:
            big = tuple(slice(max(a.start - SHELL, 0), min(a.stop + SHELL, n)) for a, n in zip(sl, labels.shape))
            own = labels[big] == s
            lumen = own & phantom_lumen(fraction[big])
            if not lumen.any():
                lumen = own
            ring = ndimage.binary_dilation(own, struct, iterations=SHELL) & ~own & clean[big]
            if ring.any():
                p, t = pred[big], target[big]
                denom = t[lumen].mean() - t[ring].mean()
                if denom > 0:
                    rec = float((p[lumen].mean() - p[ring].mean()) / denom)
        rows.append({"segment": s, "recovery": rec, "centreline": share.get(s, math.nan)})
    return pd.DataFrame(rows, columns=["segment", *SCORES])


def _centreline_share(mask: np.ndarray, centerlines: Mapping[str, Any] | None, affine: np.ndarray | None,
                      region: np.ndarray | None) -> dict[int, float]:
    """Per segment label, the length fraction of its centreline samples inside ``mask``."""
    if centerlines is None or affine is None:
        return {}
    aff = np.asarray(affine, np.float64)
    step = 0.25 * float(np.linalg.norm(aff[:3, :3], axis=0).min())
    inv = np.linalg.inv(aff)
    out = {}
    for e in centerlines["edges"]:
        lab = int(e.get("label", 0))
        if not lab or e.get("kind") == "virtual":
            continue
        pts, lens, _ = centreline_samples({"edges": [e]}, step)
        ijk = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
        keep = np.all((ijk >= 0) & (ijk < np.asarray(mask.shape)), axis=1)
        ijk, lens = ijk[keep], lens[keep]
        if region is not None and len(ijk):
            inside = region[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
            ijk, lens = ijk[inside], lens[inside]
        total = float(lens.sum())
        if total > 0:
            out[lab] = float(lens[mask[ijk[:, 0], ijk[:, 1], ijk[:, 2]]].sum()) / total
    return out


def premise_runs(sources: Sequence[str]) -> list[str]:
    """The runs of Tables 1-3 in the study's order (MMDM full, the baselines, the variants, the pairs)."""
    return [r.name for r in study_runs(sources)]


def prediction_path(run_dir: Path, subject: str) -> Path:
    return run_dir / "predictions" / f"{subject}_{TARGET_MODALITY}.nii.gz"


def run_premise(data_root: str | Path, runs: Mapping[str, Path], out_dir: str | Path, subjects: Sequence[str],
                sources: Sequence[str], seg_cache: str | Path, profile: str | None = None,
                log: Callable[[str], None] = print) -> Path:
    """Score every run's written predictions of ``subjects`` segment by segment; resumable
    (``recovery.csv`` after every run), ``summary.json`` last."""
    root = Path(data_root)
    if not has_ground_truth(root):
        raise ValueError(f"{root}: the premise test needs the phantom's ground truth (vessel segments and "
                         "their visibility); a dataset without it (IXI) cannot answer it")
    record = RecordWriter(out_dir)
    out = record.root
    seg_cfg = cohort_segmentation(root, seg_cache)
    seg_csv, rec_csv = out / "segments.csv", out / "recovery.csv"
    if seg_csv.is_file():
        segs = pd.read_csv(seg_csv, keep_default_na=False, na_values=[""])
    else:
        segs = pd.concat([segment_table(root, s, sources) for s in subjects], ignore_index=True)
        write_text(seg_csv, segs.to_csv(index=False))
    done = pd.read_csv(rec_csv) if rec_csv.is_file() else pd.DataFrame(columns=["run", "subject", "segment", *SCORES])
    kept, dropped = keep_current_rows(done.to_dict("records"), runs, "predictions", "predictions")
    if dropped and len(done):
        log(f"[premise] scored before from other predictions of {', '.join(map(str, dropped))}: scoring them again")
    done = pd.DataFrame(kept, columns=done.columns) if kept else done.iloc[:0]
    parts = [done] if len(done) else []
    have = set(zip(done["run"], done["subject"]))
    current = stamps(runs, "predictions")
    record.start_clock()
    refs: dict[str, Any] = {}
    for name, run_dir in runs.items():
        todo = [s for s in subjects if (name, s) not in have and prediction_path(run_dir, s).is_file()]
        for s in todo:
            if s not in refs:
                target, _, brain, centerlines, affine = reference_volumes(root, s, seg_cfg)
                gt = load_ground_truth(root, s)
                refs[s] = (target, brain, centerlines, affine, gt["vessel_labels"], gt["vessel_fraction"])
            target, brain, centerlines, affine, labels, fraction = refs[s]
            pred = load_volume(prediction_path(run_dir, s)).data
            mask = segment_vessels(pred, seg_cfg, brain)
            ids = segs.loc[segs.subject == s, "segment"].to_numpy()
            df = segment_scores(pred, target, labels, fraction, ids, mask, centerlines, affine, brain)
            df.insert(0, "subject", s)
            df.insert(0, "predictions", current[name])
            df.insert(0, "run", name)
            parts.append(df)
        if todo:
            write_text(rec_csv, pd.concat(parts, ignore_index=True).to_csv(index=False))
            log(f"[premise] {name}: {len(todo)} subject(s) scored")
    table = pd.concat(parts, ignore_index=True) if parts else \
        pd.DataFrame(columns=["run", "predictions", "subject", "segment", *SCORES])
    write_text(rec_csv, table.to_csv(index=False))  # without the rows dropped above, also when nothing was scored
    scored = sorted(set(table["run"]))
    record.finish(portable({
        "analysis": "premise", "profile": profile, "subjects": list(subjects), "sources": list(sources),
        "runs": scored, "runs_missing": [r for r in runs if r not in scored],
        "predictions": {r: current[r] for r in scored if r in current},
        "visibility_k": VISIBILITY_K, "shell": SHELL, "background_max_fraction": BACKGROUND_MAX_FRACTION,
        "lumen_fraction": LUMEN_MIN_FRACTION, "radius_bins_mm": list(DEFAULT_RADIUS_BINS_MM),
        "recovered_at": RECOVERED_AT, "segmentation": _seg_summary(seg_cfg),
        **record.session("cpu", git_root=repo_root())}))
    return out


def _seg_summary(cfg: VesselSegConfig) -> dict[str, Any]:
    from dataclasses import asdict  # the segmentation's settings, every field, in the record

    return asdict(cfg)


def load_premise(out_dir: str | Path) -> dict[str, Any] | None:
    """``{"segments", "recovery", "table" (both joined), "summary"}``, or None while missing or unfinished."""
    out_dir = Path(out_dir)
    if not (out_dir / "summary.json").is_file():
        return None
    segs = pd.read_csv(out_dir / "segments.csv", keep_default_na=False, na_values=[""])
    rec = pd.read_csv(out_dir / "recovery.csv")
    return {"segments": segs, "recovery": rec, "table": rec.merge(segs, on=["subject", "segment"], how="left"),
            "summary": json.loads((out_dir / "summary.json").read_text())}


def per_subject(table: pd.DataFrame, score: str = "recovery", by: str = "visibility") -> pd.DataFrame:
    """Mean ``score`` per run, subject and class ``by`` over the segments the TOF shows (NaN scores left out)."""
    t = table[table["tof_visible"].astype(bool) & np.isfinite(table[score])]
    return t.groupby(["run", "subject", by], as_index=False)[score].mean()


def only_class(table: pd.DataFrame) -> pd.Series:
    """``only_<m>`` for segments exactly one source shows, else the visibility class."""
    return np.where(table["visibility"] == "one", "only_" + table["visible_in"].astype(str), table["visibility"])


def class_table(table: pd.DataFrame, score: str = "recovery", by: str = "visibility", seed: int = 0) -> pd.DataFrame:
    """Per run and class: mean over subjects, bootstrap 95 % CI, subjects and segments."""
    t = table.assign(only=only_class(table)) if by == "only" else table
    subj = per_subject(t, score, by)
    rows = []
    for (run, cls), g in subj.groupby(["run", by], sort=False):
        s = summarise(g[score].to_numpy(), seed=seed)
        sel = t[(t.run == run) & (t[by] == cls)]
        nseg = int((sel["tof_visible"].astype(bool) & np.isfinite(sel[score])).sum())  # the segments scored
        rows.append({"run": run, by: cls, "mean": s["mean"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                     "subjects": s["n"], "segments": nseg})
    return pd.DataFrame(rows, columns=["run", by, "mean", "ci_low", "ci_high", "subjects", "segments"])


def compare(table: pd.DataFrame, a: str, b: str, cls: str, score: str = "recovery", by: str = "visibility",
            seed: int = 0) -> dict[str, float]:
    """Paired over subjects: run ``a`` minus run ``b`` on class ``cls`` (:func:`mmdm.stats.paired_comparison`)."""
    t = table.assign(only=only_class(table)) if by == "only" else table
    subj = per_subject(t, score, by)
    subj = subj[subj[by] == cls].pivot(index="subject", columns="run", values=score)
    if a not in subj or b not in subj:
        return {"n": 0, "mean_a": math.nan, "mean_b": math.nan, "mean_diff": math.nan, "ci_low": math.nan,
                "ci_high": math.nan, "p_wilcoxon": math.nan, "n_dropped": 0, "sd_diff": math.nan}
    return paired_comparison(subj[a].to_numpy(), subj[b].to_numpy(), seed=seed)


def invisible_check(table: pd.DataFrame, score: str = "recovery", threshold: float = RECOVERED_AT) -> pd.DataFrame:
    """Per run, the ``none`` class against ``threshold`` by the rule of the module doc (one of
    :data:`INVISIBLE_CHECKS`)."""
    ct = class_table(table, score)
    rows = []
    for run in dict.fromkeys(table["run"]):
        row = ct[(ct.run == run) & (ct.visibility == "none")]
        if row.empty or not np.isfinite(row["mean"].iloc[0]):
            verdict, m, lo, hi, n = "no such segment", math.nan, math.nan, math.nan, 0
        else:
            m, lo, hi, n = (float(row[c].iloc[0]) for c in ("mean", "ci_low", "ci_high", "segments"))
            if int(row["subjects"].iloc[0]) < MIN_CHECK_SUBJECTS:
                verdict = "too few subjects"
            else:
                verdict = "not recovered" if hi < threshold else "recovered" if lo > threshold else "undecided"
        rows.append({"run": run, "mean": m, "ci_low": lo, "ci_high": hi, "segments": int(n), "check": verdict})
    return pd.DataFrame(rows)


def _said(c: Mapping[str, float], v: str) -> str:
    """How one verdict of :func:`mmdm.stats.verdict` reads (MMDM full against the other run)."""
    if not c["n"]:
        return "cannot be compared (no subject has both)"
    if v == "holds":
        return "is higher (paired 95 % CI excludes 0, Holm-adjusted Wilcoxon p < 0.05)"
    if v == "contradicted":
        return "is lower (paired 95 % CI excludes 0, Holm-adjusted Wilcoxon p < 0.05)"
    why = f"fewer than {MIN_WILCOXON_N} subjects, so no test can decide" if c["n"] < MIN_WILCOXON_N else \
        "the paired test does not decide"
    return f"is not shown to differ ({why})"


def judged(comparisons: Sequence[dict[str, float]]) -> list[str]:
    """The study's verdict (:func:`mmdm.stats.verdict`, higher is better) of each comparison, Holm-adjusted
    within the family passed."""
    adj = holm([c["p_wilcoxon"] for c in comparisons]) if comparisons else []
    return [verdict((c["ci_low"], c["ci_high"]), float(p), True) for c, p in zip(comparisons, adj)]


def findings(table: pd.DataFrame, sources: Sequence[str], score: str = "recovery") -> list[str]:
    """The page's answers, one sentence each, generated from the numbers. Each question's comparisons of
    MMDM full are one family (Holm); a difference is claimed only by the study's verdict rule."""
    out = []
    runs = set(table["run"])
    lab = SCORE_LABELS[score]
    full = REFERENCE_RUN
    if full not in runs:
        return ["MMDM full has no scored prediction yet, so none of the questions can be answered."]
    pairs = []
    for m in sources:
        pair = f"{full}-" + "+".join(x for x in sources if x != m)
        if pair not in runs:
            out.append(f"Segments only {m} shows: the pair without {m} ({pair}) has no scored prediction.")
            continue
        c = compare(table, full, pair, f"only_{m}", score, by="only")
        if not c["n"]:
            out.append(f"No test subject has a TOF-visible segment that only {m} shows, so the pair without {m} "
                       "cannot be compared with MMDM full there.")
            continue
        pairs.append((m, c))
    for (m, c), v in zip(pairs, judged([c for _, c in pairs])):
        out.append(f"On segments only {m} shows, MMDM full's {lab} ({c['mean_a']:.2f}) against the pair without "
                   f"{m} ({c['mean_b']:.2f}): the difference {c['mean_diff']:+.2f} "
                   f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] over {c['n']} subject(s) {_said(c, v)}. "
                   + ("This supports the premise that fusion recovers what one source alone shows."
                      if v == "holds" else "This contradicts the premise." if v == "contradicted"
                      else "This neither supports nor contradicts the premise."))
    base = [(b, compare(table, full, b, "one", score)) for b in baselines() if b in runs]
    base = [(b, c) for b, c in base if c["n"]]
    if base:
        verdicts = judged([c for _, c in base])
        wins = [b for (b, _), v in zip(base, verdicts) if v == "holds"]
        losses = [b for (b, _), v in zip(base, verdicts) if v == "contradicted"]
        n = max(c["n"] for _, c in base)
        out.append(f"On segments exactly one source shows, MMDM full's {lab} is higher than that of "
                   f"{len(wins)} of {len(base)} baselines fed the same three inputs ({', '.join(wins) or 'none'}) "
                   f"and lower than that of {len(losses)} ({', '.join(losses) or 'none'}) by the study's verdict "
                   f"rule (paired CI and Holm-adjusted Wilcoxon test over {n} subject(s)"
                   + (f"; with fewer than {MIN_WILCOXON_N} no difference can be shown" if n < MIN_WILCOXON_N else "")
                   + ").")
    if score == "recovery":
        chk = invisible_check(table, score)
        groups = {k: chk[chk.check == k].run.tolist() for k in INVISIBLE_CHECKS}
        out.append(f"Segments no source shows: {len(groups['not recovered'])} run(s) do not recover them (CI below "
                   f"{RECOVERED_AT}); {len(groups['recovered'])} do "
                   f"({', '.join(groups['recovered']) or 'none'}: the check fails for them, a model that recovers "
                   "what no input shows has learnt where the phantom puts vessels, or the score credits something "
                   f"else); {len(groups['undecided'])} are undecided; "
                   f"{len(groups['too few subjects'])} have fewer than {MIN_CHECK_SUBJECTS} subjects and "
                   f"{len(groups['no such segment'])} no such segment.")
    out.append("The single-branch predictions inside MMDM (each modality's branch alone) are not scored: the "
               "runs write only the fused synthesis.")
    return out


def ensure_premise(profile, device: str | None = None, log: Callable[[str], None] = print,
                   progress: bool = True) -> Path | None:
    """The profile's premise record from the runs' written predictions, unless complete (every run with
    predictions here scored). Returns None (and says why) when no run has predictions here or the dataset
    has no vessel ground truth."""
    profile = get_profile(profile)
    out = analysis_dir(profile) / "premise"
    runs = {n: runs_dir(profile) / n for n in premise_runs(profile.sources)}
    runs = {n: d for n, d in runs.items() if (d / "predictions").is_dir()}
    retire_if_stale(profile, "premise", runs.values(), log, kind="predictions")
    if (out / "summary.json").is_file():
        new = [n for n in runs if n not in json.loads((out / "summary.json").read_text())["runs"]]
        if not new:
            log(f"[skip] premise: record complete ({out})")
            return out
        log(f"[premise] the record has no score of {', '.join(new)}, whose predictions are here now")
    root = project_path(profile.data_dir)
    if not has_ground_truth(root):
        log(f"[skip] premise: {root} has no vessel ground truth (phantom only)")
        return None
    if not runs:
        log(f"[skip] premise: no run under {runs_dir(profile)} has written predictions; run `mmdm study "
            f"--profile {profile.name}` where they are")
        return None
    subjects = Layout(root).split("test")
    subjects = [s for s in subjects if any(prediction_path(d, s).is_file() for d in runs.values())]
    log(f"[analysis] premise: {len(runs)} run(s), {len(subjects)} test subject(s)")
    return run_premise(root, runs, out, subjects, profile.sources,
                       seg_cache=results_dir(profile) / "vessel_segmentation.yaml", profile=profile.name, log=log)
