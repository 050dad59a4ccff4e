"""The premise test: visibility classes, per-segment recovery and centreline share, the stated rules."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from mmdm.study import premise
from mmdm.stats import paired_comparison


def _tube(shape=(20, 20, 20)):
    """One straight segment (label 1) along x through the middle, two voxels thick, in a flat background."""
    labels = np.zeros(shape, np.int32)
    labels[3:17, 9:11, 9:11] = 1
    fraction = (labels > 0).astype(np.float64)
    target = np.full(shape, 0.2)
    target[labels > 0] = 0.9
    return labels, fraction, target


def test_recovery_is_one_for_the_target_zero_for_a_flat_synthesis_and_linear_in_the_contrast():
    labels, fraction, target = _tube()
    got = premise.segment_scores(target, target, labels, fraction, [1])
    assert got.recovery.iloc[0] == pytest.approx(1.0)
    flat = np.full(target.shape, 0.4)
    assert premise.segment_scores(flat, target, labels, fraction, [1]).recovery.iloc[0] == pytest.approx(0.0)
    half = 0.3 + 0.5 * (target - 0.2)  # another offset, half the vessel-to-background step
    assert premise.segment_scores(half, target, labels, fraction, [1]).recovery.iloc[0] == pytest.approx(0.5)


def test_recovery_is_local_and_undefined_without_target_contrast():
    labels, fraction, target = _tube()
    pred = target.copy()
    pred[:, :, :5] = 5.0  # far from the segment (more than the ring's two voxels): must not matter
    assert premise.segment_scores(pred, target, labels, fraction, [1]).recovery.iloc[0] == pytest.approx(1.0)
    dark = np.where(labels > 0, 0.1, 0.2)  # a flow void in the target: no bright contrast to recover
    assert math.isnan(premise.segment_scores(dark, dark, labels, fraction, [1]).recovery.iloc[0])
    assert math.isnan(premise.segment_scores(target, target, labels, fraction, [7]).recovery.iloc[0])


def test_centreline_share_counts_the_length_inside_the_segmentation():
    labels, fraction, target = _tube()
    edge = {"label": 1, "kind": "artery", "radius_mm": 1.0, "points_mm": [[3.0, 9.5, 9.5], [16.0, 9.5, 9.5]]}
    mask = np.zeros(labels.shape, bool)
    mask[:10, :, :] = True  # voxel centres 0..9: the centreline from x=3 to x=16 is inside up to x=9.5
    got = premise.segment_scores(target, target, labels, fraction, [1], mask, {"edges": [edge]}, np.eye(4))
    assert got.centreline.iloc[0] == pytest.approx((9.5 - 3.0) / 13.0, abs=0.02)
    region = np.zeros(labels.shape, bool)
    region[:10] = True  # outside the region counts neither way: all of the rest is found
    got = premise.segment_scores(target, target, labels, fraction, [1], mask, {"edges": [edge]}, np.eye(4), region)
    assert got.centreline.iloc[0] == pytest.approx(1.0)


def test_classes_and_their_boundaries():
    assert [premise.visibility_class(n) for n in range(4)] == list(premise.CLASSES)
    with pytest.raises(ValueError, match=">= 0 sources"):
        premise.visibility_class(-1)
    assert premise.radius_class(0.25) == "0.25-0.5"
    assert premise.radius_class(0.2499) == "0-0.25"
    assert premise.radius_class(3.0) == "1-inf"
    with pytest.raises(ValueError, match="outside the bins"):
        premise.radius_class(-0.1)


def _table(none_values, one_full, one_base, subjects=("a", "b", "c", "d", "e", "f")):
    rows = []
    for i, s in enumerate(subjects):
        for run, one in (("mmdm-full", one_full[i]), ("pix2pix", one_base[i])):
            rows.append({"run": run, "subject": s, "segment": 1, "recovery": none_values[i], "centreline": 0.0,
                         "tof_visible": True, "visibility": "none", "visible_in": ""})
            rows.append({"run": run, "subject": s, "segment": 2, "recovery": one, "centreline": 1.0,
                         "tof_visible": True, "visibility": "one", "visible_in": "FLAIR"})
            rows.append({"run": run, "subject": s, "segment": 3, "recovery": 9.0, "centreline": 1.0,
                         "tof_visible": False, "visibility": "one", "visible_in": "FLAIR"})  # not scored
    return pd.DataFrame(rows)


def test_invisible_check_follows_its_stated_rule():
    low = premise.invisible_check(_table([0.0, 0.05, 0.02, 0.01, 0.0, 0.03], [0.5] * 6, [0.4] * 6))
    assert set(low.check) == {"not recovered"}
    high = premise.invisible_check(_table([0.8, 0.9, 0.7, 0.85, 0.9, 0.8], [0.5] * 6, [0.4] * 6))
    assert set(high.check) == {"recovered"}
    mixed = premise.invisible_check(_table([0.0, 0.9, 0.0, 0.9, 0.0, 0.9], [0.5] * 6, [0.4] * 6))
    assert set(mixed.check) == {"undecided"}
    one = premise.invisible_check(_table([0.9], [0.5], [0.4], subjects=("a",)))
    assert set(one.check) == {"too few subjects"}  # one subject's interval is a point: no decision


def test_class_means_leave_out_segments_the_tof_does_not_show_and_comparisons_are_paired():
    full = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    base = [0.1, 0.3, 0.2, 0.5, 0.4, 0.6]
    t = _table([0.0] * 6, full, base)
    ct = premise.class_table(t)
    row = ct[(ct.run == "mmdm-full") & (ct.visibility == "one")].iloc[0]
    assert row["mean"] == pytest.approx(np.mean(full))  # the segment with recovery 9 is not in it
    assert row["segments"] == 6
    c = premise.compare(t, "mmdm-full", "pix2pix", "one")
    ref = paired_comparison(np.array(full), np.array(base))
    assert c["mean_diff"] == pytest.approx(ref["mean_diff"])
    assert c["ci_low"] == pytest.approx(ref["ci_low"])
    by_only = premise.compare(t, "mmdm-full", "pix2pix", "only_FLAIR", by="only")
    assert by_only["mean_diff"] == pytest.approx(ref["mean_diff"])


def test_findings_claim_a_difference_only_by_the_verdict_rule():
    full = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    t = _table([0.0] * 6, full, [0.1] * 6)
    text = " ".join(premise.findings(t, ("T1w", "T2w", "FLAIR")))
    assert "higher than that of 1 of 1 baselines fed the same three inputs (pix2pix)" in text
    few = _table([0.0] * 3, full[:3], [0.1] * 3, subjects=("a", "b", "c"))
    text = " ".join(premise.findings(few, ("T1w", "T2w", "FLAIR")))
    assert "higher than that of 0 of 1 baselines" in text and "fewer than 6 no difference can be shown" in text
    assert "1 run(s) do not recover them" not in text  # both runs have the none class at 0
    assert "2 run(s) do not recover them" in text
    assert "pair without FLAIR" in text


def test_segment_table_of_a_phantom_subject(tiny_cohort):
    from mmdm.data.layout import Layout
    from mmdm.data.phantom import subject_visibility

    s = Layout(tiny_cohort).subjects()[0]
    t = premise.segment_table(tiny_cohort, s, ("T1w", "T2w", "FLAIR"))
    vis = subject_visibility(tiny_cohort, s)
    assert len(t) == len(vis["segments"]) > 0
    for m in ("T1w", "T2w", "FLAIR"):
        shown = set(t.loc[t.visible_in.str.split("+").apply(lambda v: m in v), "segment"])
        assert shown == vis["visible"][m]
    assert (t.n_visible == t.visible_in.apply(lambda v: len(v.split("+")) if v else 0)).all()
    assert set(t.visibility) <= set(premise.CLASSES)


def test_the_ground_truth_as_a_prediction_recovers_every_scored_segment_and_the_record_resumes(tiny_cohort, tmp_path):
    from mmdm.data.layout import TARGET_MODALITY, Layout
    from mmdm.io import save_nifti
    from mmdm.study.vessel_eval import reference_volumes

    s = Layout(tiny_cohort).split("test")[0]
    target, *_, affine = reference_volumes(tiny_cohort, s)
    runs = {}
    for name, vol in (("truth", target), ("flat", np.full(target.shape, 0.3, np.float32))):
        runs[name] = tmp_path / "runs" / name
        save_nifti(runs[name] / "predictions" / f"{s}_{TARGET_MODALITY}.nii.gz", vol, affine)
    out = tmp_path / "premise"
    seg = tmp_path / "seg.yaml"
    premise.run_premise(tiny_cohort, {"truth": runs["truth"]}, out, [s], ("T1w", "T2w", "FLAIR"), seg, log=print)
    first = (out / "recovery.csv").stat().st_mtime_ns
    (out / "summary.json").unlink()  # as if interrupted before the second run was scored
    premise.run_premise(tiny_cohort, runs, out, [s], ("T1w", "T2w", "FLAIR"), seg, log=print)
    rec = premise.load_premise(out)
    assert rec["summary"]["runs"] == ["flat", "truth"] and (out / "recovery.csv").stat().st_mtime_ns > first
    t = rec["table"]
    scored = t[t.tof_visible & (t.run == "truth")]
    assert len(scored) > 0 and np.allclose(scored.recovery, 1.0)  # the TOF's own contrast, segment by segment
    flat = t[t.tof_visible & (t.run == "flat")]
    assert np.allclose(flat.recovery, 0.0) and np.nanmax(flat.centreline.to_numpy()) == 0.0
    assert len(t[t.run == "truth"]) == len(t[t.run == "flat"]) == len(rec["segments"])  # scored once each
    # "flat" evaluated again (new predictions, a finished evaluation) before an interrupted record resumes:
    # its rows are scored anew from what is here now, the other run's are kept
    save_nifti(runs["flat"] / "predictions" / f"{s}_{TARGET_MODALITY}.nii.gz", target, affine)
    (runs["flat"] / "summary.json").write_text(json.dumps({"evaluation": {"end": "2030-01-01T00:00:00+00:00"}}))
    (out / "summary.json").unlink()
    said = []
    premise.run_premise(tiny_cohort, runs, out, [s], ("T1w", "T2w", "FLAIR"), seg, log=said.append)
    rec = premise.load_premise(out)
    t = rec["table"]
    assert "[premise] scored before from other predictions of flat: scoring them again" in said
    assert "[premise] truth: 1 subject(s) scored" not in said  # kept as scored
    assert np.allclose(t[t.tof_visible & (t.run == "flat")].recovery, 1.0) and len(t) == 2 * len(rec["segments"])
    assert rec["summary"]["predictions"] == {"flat": "2030-01-01T00:00:00+00:00", "truth": None}
