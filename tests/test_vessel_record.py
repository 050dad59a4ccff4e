"""The threshold-free vessel score in the run records: per-subject columns of
metrics.csv and means in summary.json (mmdm.engine.evaluate), the validation log carried into a
record and read back as curves, and load_records' vessel columns and objective (mmdm.study.records)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

import mmdm.engine.evaluate as evaluate_mod
from mmdm.data.volumes import NormConfig, Volume
from mmdm.engine.evaluate import evaluate_run, subject_vessel_scores, vessel_summary
from mmdm.engine.infer import SubjectSynthesis
from mmdm.engine.rundir import read_metrics_csv
from mmdm.metrics import METRIC_KEYS
from mmdm.optim import OptimConfig
from mmdm.methods.base import SynthesisMethod
from mmdm.metrics import METRIC_KEYS
from mmdm.study.records import (VALIDATION_LOG, VESSEL_SCORES, export_record, load_records, read_validation_log,
                                runs_without_learned_vessels, vessel_curves)

SHAPE = (12, 12, 8)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
BRAIN, LUMEN, RIM = 0.3, 1.0, 0.5  # target intensities: vessel-free brain, lumen, partial-volume rim


def phantom_case():
    """A tiny hand-made phantom: a brain block, one straight artery along z through (6, 6) (fraction 1),
    its four in-plane face neighbours at fraction 0.05 (the outer partial-volume band, not lumen). Returns
    (target, fraction, brain)."""
    fraction = np.zeros(SHAPE, np.float32)
    fraction[6, 6, :] = 1.0
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        fraction[6 + dx, 6 + dy, :] = 0.05
    brain = np.zeros(SHAPE, bool)
    brain[2:10, 2:10, :] = True
    target = np.where(brain, BRAIN, 0.0).astype(np.float32)
    target[fraction > 0] = RIM
    target[fraction >= 0.1] = LUMEN
    return target, fraction, brain


def write_phantom_root(root: Path, subjects) -> np.ndarray:
    """The ground-truth files load_ground_truth reads, for each subject; returns the target."""
    target, fraction, brain = phantom_case()
    for s in subjects:
        d = root / "derivatives" / "phantom" / s
        d.mkdir(parents=True, exist_ok=True)
        for name, vol in (("vessels", (fraction > 0).astype(np.int16)), ("vesselfraction", fraction),
                          ("dseg", brain.astype(np.uint8)), ("brainmask", brain.astype(np.uint8))):
            nib.save(nib.Nifti1Image(vol, AFFINE), str(d / f"{s}_{name}.nii.gz"))
        (d / f"{s}_centerlines.json").write_text("[]")
        anat = root / s / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(target, AFFINE), str(anat / f"{s}_angio.nii.gz"))
    return target


def hand_scores(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Contrast recovery and vessel PSNR of the phantom case, written out by hand: lumen = the line
    (6, 6, :); vessel-free brain = brain voxels at least 2 in-plane steps (face-connected) from the line,
    as the rim (fraction > 0) is excluded with a 1-voxel margin; PSNR region = the line and its rim."""
    lumen = [(6, 6, z) for z in range(SHAPE[2])]
    rim = [(6 + dx, 6 + dy, z) for z in range(SHAPE[2]) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    background = [(x, y, z) for x in range(2, 10) for y in range(2, 10) for z in range(SHAPE[2])
                  if abs(x - 6) + abs(y - 6) > 2]
    mean = lambda v, idx: sum(float(v[i]) for i in idx) / len(idx)  # noqa: E731
    rec = (mean(pred, lumen) - mean(pred, background)) / (mean(target, lumen) - mean(target, background))
    mse = sum((float(pred[i]) - float(target[i])) ** 2 for i in lumen + rim) / len(lumen + rim)
    return rec, (math.inf if mse == 0 else 10 * math.log10(1.0 / mse))


def test_phantom_subject_scores_match_a_hand_computation(tmp_path):
    target = write_phantom_root(tmp_path, ["sub-001"])
    half = BRAIN + 0.5 * (target - BRAIN)  # half the contrast everywhere
    cases = {"same": (target, 1.0), "constant": (np.full(SHAPE, 0.3, np.float32), 0.0), "half": (half, 0.5),
             "offset": (target + 0.05, 1.0), "inverted": (1.0 - target, -1.0)}
    for name, (pred, expected) in cases.items():
        got = subject_vessel_scores(pred, target, tmp_path, "sub-001")
        rec, psnr = hand_scores(pred, target)
        assert got["mask_source"] == "ground_truth", name
        assert got["vessel_recovery"] == pytest.approx(expected, abs=1e-6) == pytest.approx(rec, abs=1e-6), name
        assert got["vessel_psnr"] == pytest.approx(psnr, rel=1e-6), name
    # the half-contrast error: 0.35 on the lumen, 0.1 on its four rim voxels per slice
    assert subject_vessel_scores(half, target, tmp_path, "sub-001")["vessel_psnr"] == pytest.approx(
        10 * math.log10(1 / ((0.35**2 + 4 * 0.1**2) / 5)), rel=1e-6)


def test_without_ground_truth_the_bright_voxels_of_the_target_are_the_vessels(tmp_path):
    rng = np.random.default_rng(0)
    target = (0.2 + 0.05 * rng.random(SHAPE)).astype(np.float32)  # head: 0.2-0.25
    target[:1] = 0.0  # air outside the head mask (target <= 0.05)
    target[6, 6, :] = 1.0  # 8 bright voxels: 1 % of the 1008 head voxels is 10, so all 8 are in the mask
    for pred, expected in ((target, 1.0), (np.full(SHAPE, 0.4, np.float32), 0.0)):
        got = subject_vessel_scores(pred, target, tmp_path, "sub-001")  # no derivatives/phantom: no ground truth
        assert got["mask_source"] == "bright_target"
        assert got["vessel_recovery"] == pytest.approx(expected, abs=1e-9)


def test_a_subject_without_vessel_contrast_gets_nan_and_is_left_out_of_the_means(tmp_path):
    flat = np.full(SHAPE, 0.5, np.float32)
    with pytest.warns(UserWarning, match="sub-009: no vessel score.*no vessel contrast"):
        bad = subject_vessel_scores(flat, flat, tmp_path, "sub-009")
    assert math.isnan(bad["vessel_recovery"]) and math.isnan(bad["vessel_psnr"])
    good = [{"vessel_recovery": r, "vessel_psnr": p, "mask_source": "ground_truth"} for r, p in ((0.2, 10.0),
                                                                                               (0.6, 20.0))]
    s = vessel_summary(good + [bad])
    assert s["n_scored"] == 2 and s["mask_source"] == ["ground_truth"]
    assert s["recovery"] == pytest.approx(0.4) and s["recovery_std"] == pytest.approx(np.std([0.2, 0.6], ddof=1))
    assert s["psnr"] == pytest.approx(15.0) and s["psnr_std"] == pytest.approx(np.std([10.0, 20.0], ddof=1))
    none = vessel_summary([bad])
    assert none["recovery"] is None and none["psnr"] is None and none["n_scored"] == 0


class _Stub(SynthesisMethod):
    def objective(self):
        return "stub objective"

    def ema_config(self):
        return None

    def optim_configs(self):
        return {"main": OptimConfig(lr=2e-4)}


def test_evaluate_run_writes_vessel_columns_and_their_means(tmp_path, monkeypatch):
    """evaluate_run on the hand-made phantom with three known predictions: metrics.csv carries the six
    metrics then vessel_recovery and vessel_psnr per subject, summary.json their mean and sd."""
    subjects = ["sub-001", "sub-002", "sub-003"]
    target = write_phantom_root(tmp_path / "data", subjects)
    raw = 400.0 * target  # a raw TOF: evaluate_run scores against target / max
    preds = {"sub-001": BRAIN + 0.5 * (target - BRAIN), "sub-002": np.full(SHAPE, 0.3, np.float32),
             "sub-003": target + 0.05}
    cfg = SimpleNamespace(method="stub", method_kwargs={}, method_config=None, steps=7, epochs=None, batch_size=4,
                          ema=None, ema_mode="method",
                          data=SimpleNamespace(root=str(tmp_path / "data"), target="angio", window=5, eval_stride=1,
                                               norm=NormConfig()))
    monkeypatch.setattr(evaluate_mod, "load_run_method", lambda *a, **k: (_Stub(), cfg, {"step": 7}))
    monkeypatch.setattr(evaluate_mod, "synthesize_subjects", lambda method, data, subs, *a, **k: (
        SubjectSynthesis(s, {}, Volume(raw, AFFINE), {"mean": preds[s].astype(np.float32)}) for s in subs))
    loads = []
    real_truth = evaluate_mod.load_ground_truth
    monkeypatch.setattr(evaluate_mod, "load_ground_truth", lambda root, s: loads.append(s) or real_truth(root, s))
    run = tmp_path / "run"
    summary = evaluate_run(run, subjects=subjects, device="cpu", require_complete=False, progress=False)
    assert loads == subjects  # each subject's ground truth read once, for the vessel score and the regions

    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == ["subject", *METRIC_KEYS, "vessel_recovery", "vessel_psnr"]
    rows = {r["subject"]: r for r in read_metrics_csv(run / "metrics.csv")}
    expected = {"sub-001": 0.5, "sub-002": 0.0, "sub-003": 1.0}
    for s in subjects:
        rec, psnr = hand_scores(preds[s], target)
        assert rows[s]["vessel_recovery"] == pytest.approx(expected[s], abs=1e-6)
        assert rows[s]["vessel_recovery"] == pytest.approx(rec, abs=1e-6)
        assert rows[s]["vessel_psnr"] == pytest.approx(psnr, rel=1e-6)
    v = json.loads((run / "summary.json").read_text())["vessel"]
    assert v == json.loads(json.dumps(summary["vessel"]))
    assert v["recovery"] == pytest.approx(0.5, abs=1e-6) and v["recovery_std"] == pytest.approx(0.5, abs=1e-6)
    psnrs = [hand_scores(preds[s], target)[1] for s in subjects]
    assert v["psnr"] == pytest.approx(np.mean(psnrs), rel=1e-6)
    assert v["psnr_std"] == pytest.approx(np.std(psnrs, ddof=1), rel=1e-6)
    assert v["n_scored"] == 3 and v["mask_source"] == ["ground_truth"] and "contrast" in v["definition"]
    assert set(summary["metrics"]) == set(METRIC_KEYS)  # the six paper metrics stay as they were
    # the footing of the row: steps, weights evaluated, learning rate of each optimiser group
    assert summary["training"]["steps"] == 7 and summary["training"]["checkpoint_step"] == 7
    assert summary["training"]["lr"] == {"main": 2e-4} and summary["training"]["ema"] is None
    # sub-002 is a flat 0.3: its whole background is 0.3 too bright
    regions = pd.read_csv(run / "regions.csv").set_index("subject")
    assert regions.at["sub-002", "background_bias"] == pytest.approx(0.3, abs=1e-6)
    assert regions.at["sub-002", "background_bright_share"] == 1.0


# ----------------------------------------------------------------------------
# records: the validation log and load_records


def _entry(step: int, recovery: float, psnr: float = 20.0) -> str:
    return json.dumps({"step": step, "losses": {"loss": 0.1}, "vessel": {"recovery": recovery, "psnr": psnr,
                                                                         "n_windows": 8}})


def _fake_run(root: Path, name: str, validation: str | None) -> Path:
    """A finished run directory as export_record reads it (config, summary, one prediction, metrics)."""
    data = root / "data"
    run = root / "runs" / name
    (run / "predictions").mkdir(parents=True)
    target = np.random.default_rng(1).random(SHAPE).astype(np.float32)
    (data / "sub-001" / "anat").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(target, AFFINE), str(data / "sub-001" / "anat" / "sub-001_angio.nii.gz"))
    nib.save(nib.Nifti1Image(target / target.max(), AFFINE), str(run / "predictions" / "sub-001_angio.nii.gz"))
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"root": str(data), "target": "angio"}}))
    (run / "metrics.csv").write_text("subject,psnr\nsub-001,20.0\n")
    (run / "summary.json").write_text(json.dumps({"method": "mmdm", "subjects": ["sub-001"]}))
    if validation is not None:
        (run / VALIDATION_LOG).write_text(validation)
    return run


def test_export_copies_the_validation_log_and_the_loader_reads_it_back(tmp_path):
    log = "\n".join([_entry(100, 0.05, 12.0), _entry(200, 0.3, 15.0),
                     json.dumps({"step": 250, "losses": {"loss": 0.1}})]) + "\n" + _entry(300, 0.4)[:25]
    results = tmp_path / "results"
    export_record(_fake_run(tmp_path, "mmdm-full", log), results / "mmdm-full")
    export_record(_fake_run(tmp_path, "pix2pix", None), results / "pix2pix")  # an old run: no log
    assert (results / "mmdm-full" / VALIDATION_LOG).read_text() == log  # copied as it is
    assert not (results / "pix2pix" / VALIDATION_LOG).exists()
    curves = vessel_curves(results)
    assert list(curves.columns) == ["run", "method", "step", "recovery", "psnr"]
    # the cut-off last line is dropped, the entry without a vessel score skipped, the old record adds nothing
    assert curves.run.tolist() == ["mmdm-full", "mmdm-full"] and curves.step.tolist() == [100, 200]
    assert curves.recovery.tolist() == [0.05, 0.3] and curves.psnr.tolist() == [12.0, 15.0]
    assert curves.method.tolist() == ["mmdm", "mmdm"]


def test_validation_log_reader_only_forgives_the_last_line(tmp_path):
    path = tmp_path / VALIDATION_LOG
    assert read_validation_log(path) == []  # missing file
    path.write_text(_entry(1, 0.1) + "\n{\"step\": 2, \"vess\n" + _entry(3, 0.3) + "\n")
    with pytest.raises(ValueError, match="line 2 of 3.*only the last line may be cut off"):
        read_validation_log(path)
    path.write_text(_entry(1, 0.1) + "\n" + _entry(2, 0.2) + "\n\n")
    assert [e["step"] for e in read_validation_log(path)] == [1, 2]


def test_curves_keep_the_last_entry_of_a_repeated_step_and_name_runs_that_never_learn_vessels(tmp_path):
    for run, lines in {"a": [_entry(100, 0.1), _entry(200, 0.15), _entry(200, 0.18)],
                       "b": [_entry(100, 0.1), _entry(200, 0.25)],
                       "c": [json.dumps({"step": 100, "vessel": {"recovery": None, "psnr": None}})]}.items():
        (tmp_path / run).mkdir()
        (tmp_path / run / "summary.json").write_text(json.dumps({"method": run}))
        (tmp_path / run / VALIDATION_LOG).write_text("\n".join(lines) + "\n")
    (tmp_path / "unfinished").mkdir()  # no summary.json: ignored
    (tmp_path / "unfinished" / VALIDATION_LOG).write_text(_entry(100, 0.9) + "\n")
    curves = vessel_curves(tmp_path)
    assert curves[curves.run == "a"].recovery.tolist() == [0.1, 0.18]  # a resumed run's repeat: the latest
    assert set(curves.run) == {"a", "b", "c"} and curves[curves.run == "c"].recovery.isna().all()
    assert runs_without_learned_vessels(curves) == ["a"]  # b reaches 0.25; c has no score at all
    assert runs_without_learned_vessels(curves.iloc[0:0]) == []
    assert vessel_curves(tmp_path / "nothing-here").empty


def _record(root: Path, name: str, metrics: pd.DataFrame, summary: dict) -> None:
    (root / name).mkdir(parents=True)
    metrics.to_csv(root / name / "metrics.csv", index=False)
    (root / name / "summary.json").write_text(json.dumps(summary))


def test_load_records_exposes_vessel_columns_and_the_objective(tmp_path):
    six = {k: [1.0, 2.0] for k in METRIC_KEYS}
    new = pd.DataFrame({"subject": ["sub-001", "sub-002"], **six, "vessel_recovery": [0.2, 0.6],
                        "vessel_psnr": [10.0, 14.0]})
    old = pd.DataFrame({"subject": ["sub-001", "sub-002"], **six})
    _record(tmp_path, "mmdm-full", new, {"method": "mmdm", "objective": "x0 of the bridge, MSE"})
    _record(tmp_path, "pix2pix", old, {"method": "pix2pix"})  # written before vessel scores and objectives
    per_subject, runs = load_records(tmp_path)
    full = per_subject[per_subject.run == "mmdm-full"]
    assert full.vessel_recovery.tolist() == [0.2, 0.6] and full.vessel_psnr.tolist() == [10.0, 14.0]
    assert per_subject[per_subject.run == "pix2pix"][list(VESSEL_SCORES)].isna().all().all()
    r = runs.set_index("run")
    assert r.at["mmdm-full", "objective"] == "x0 of the bridge, MSE" and pd.isna(r.at["pix2pix", "objective"])
    assert r.at["mmdm-full", "vessel_recovery"] == pytest.approx(0.4) and r.at["mmdm-full", "vessel_psnr"] == 12.0
    assert math.isnan(r.at["pix2pix", "vessel_recovery"])
    # only old records: the columns still exist, all NaN
    ps_old, _ = load_records(tmp_path / "none")
    assert set(VESSEL_SCORES) <= set(ps_old.columns)
