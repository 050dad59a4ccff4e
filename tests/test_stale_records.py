"""A record or run made under another config than the profile now gives its run is re-made, never
skipped as finished; fields that only say where or how often a run wrote are not compared."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmdm.config import to_dict
from mmdm.engine.spec import resolve_method_config
from mmdm.study import api
from mmdm.study.profiles import get_profile
from mmdm.study.runs import study_runs
from mmdm.study.stale import MISSING, config_differences, stale_reasons


def _cfg(profile="smoke", run="mmdm-full"):
    prof = get_profile(profile)
    spec = next(r for r in study_runs(prof.sources) if r.name == run)
    return api.train_config(spec, prof, 0, None)


def test_a_config_stored_as_resolved_has_no_differences_and_changes_are_named():
    cfg = _cfg()
    stored = to_dict(resolve_method_config(cfg))
    assert config_differences(stored, cfg) == []
    # where and how often the run wrote files is not what it trained
    moved = {**stored, "device": "cuda", "num_workers": 8, "checkpoint_every": 1,
             "data": {**stored["data"], "root": "/elsewhere"}}
    assert config_differences(moved, cfg) == []
    older = {**stored, "steps": cfg.steps // 2 + 1}
    older["method_config"] = {**stored["method_config"], "fusion_residual": not cfg.method_kwargs["fusion_residual"]}
    del older["ema_mode"]
    diffs = config_differences(older, cfg)
    assert diffs[:2] == [f"method_config.fusion_residual: {not cfg.method_kwargs['fusion_residual']} -> "
                         f"{cfg.method_kwargs['fusion_residual']}", f"steps: {cfg.steps // 2 + 1} -> {cfg.steps}"]
    assert diffs[2] == f"ema_mode: {MISSING} -> {cfg.ema_mode}"  # fields the stored config lacks come last
    assert config_differences(older, cfg, limit=1)[-1] == "... and 2 more field(s)"
    # a sub-config replaced by None (crops -> whole slices) is one difference, with both sides shown
    cropped = {**stored, "crops": {"size": [48, 48], "vessel_share": 0.7}}
    whole = {**stored, "crops": None}
    assert config_differences(cropped, whole) == ["crops: {'size': [48, 48], 'vessel_share': 0.7} -> None"]
    assert config_differences(whole, cropped) == ["crops: None -> {'size': [48, 48], 'vessel_share': 0.7}"]
    assert config_differences({**stored, "crops": {}}, {**stored, "crops": {}}) == []


def test_committed_standard_records_are_stale_under_the_current_profile():
    """The committed standard records predate 4000 steps for every row: a re-make must not skip them."""
    rec = api.results_dir("standard") / "mmdm-full"
    if not (rec / "config.yaml").is_file():
        pytest.skip("no committed standard record")
    why = stale_reasons(rec, _cfg("standard"), limit=None)
    stored_steps = yaml.safe_load((rec / "config.yaml").read_text())["steps"]
    assert (f"steps: {stored_steps} -> {get_profile('standard').steps}" in why) == (
        stored_steps != get_profile("standard").steps)
    assert stale_reasons(rec.parent / "no-such-run", _cfg("standard")) == []


def test_the_study_re_makes_stale_records_and_keeps_them_on_request(monkeypatch, tmp_path):
    import mmdm.study.runner as runner

    monkeypatch.setenv("MMDM_ROOT", str(tmp_path))
    executed = []
    monkeypatch.setattr(runner, "execute", lambda name, out, params, log, env=None: executed.append(
        (name, params.get("method"))))
    monkeypatch.setattr(api, "ensure_data", lambda profile: tmp_path)
    monkeypatch.setattr(runner, "build_book", lambda root, log, profile: None)
    for name in ("select_seed_runs", "select_option_runs"):
        monkeypatch.setattr(runner, name, lambda profile, only, log: [])
    # complete records: one made under the profile's config, one under more steps (re-made), one under fewer
    # (its training continues), one evaluated with another stride
    more = get_profile("smoke").steps + 5
    for run, steps in (("pix2pix", None), ("ddpm", more), ("unest", 1), ("resvit", None)):
        cfg = to_dict(resolve_method_config(_cfg("smoke", run)))
        if steps is not None:
            cfg["steps"] = steps
        if run == "resvit":  # evaluated with another window stride: evaluated again, not retrained
            cfg["data"]["eval_stride"] += 1
        rec = api.results_dir("smoke") / run
        rec.mkdir(parents=True)
        (rec / "config.yaml").write_text(yaml.safe_dump(cfg))
        (rec / "summary.json").write_text(json.dumps({}))
    lines = []
    runner.run_study("smoke", only=["pix2pix", "ddpm", "unest", "resvit"], book=False, log=lines.append)
    assert {m for n, m in executed if n == "02_train"} == {"ddpm", "unest", "resvit"}
    steps = get_profile("smoke").steps
    assert any(line.startswith("[stale] ddpm:") and f"steps: {more} -> {steps}" in line
               and "re-making it" in line for line in lines)
    assert any(line.startswith("[stale] unest:") and f"steps: 1 -> {steps}" in line
               and f"continuing its training to {steps} steps" in line for line in lines)
    stride = get_profile("smoke").eval_stride
    assert any(line.startswith("[stale] resvit:") and f"data.eval_stride: {stride + 1} -> {stride}" in line
               and "evaluating it again with the trained model kept" in line for line in lines)
    assert "[skip] pix2pix: record complete" in lines
    executed.clear()
    lines.clear()
    runner.run_study("smoke", only=["pix2pix", "ddpm"], book=False, log=lines.append, keep_stale=True)
    assert not [n for n, _ in executed if n == "02_train"]
    assert any(line.startswith("[skip] ddpm: record complete, kept (--keep-stale)") for line in lines)


def test_a_run_trained_under_another_config_starts_over_and_its_record_is_replaced(tiny_cohort, tmp_path,
                                                                                    monkeypatch, one_thread):
    monkeypatch.setenv("MMDM_ROOT", str(tmp_path))
    spec = next(r for r in study_runs() if r.name == "pix2pix")
    run_dir, rec = tmp_path / "run", tmp_path / "rec"
    old = get_profile("smoke", dataset=str(tiny_cohort), steps=3)
    api.train_study_run(spec, old, run_dir=run_dir, progress=False)
    api.evaluate_study_run(spec, old, run_dir=run_dir, record_dir=rec, progress=False)
    assert json.loads((rec / "summary.json").read_text())["checkpoint"]["step"] == 3
    new = get_profile("smoke", dataset=str(tiny_cohort), steps=2)  # a run already past the new budget
    assert stale_reasons(rec, api.train_config(spec, new)) == ["steps: 3 -> 2"]
    api.train_study_run(spec, new, run_dir=run_dir, progress=False)
    assert len(list(run_dir.glob("superseded-*/checkpoints"))) == 1  # the old run moved aside, not deleted
    assert not (run_dir / "vessel_metrics.csv").exists()  # nor its vessel metrics left to be reused
    api.evaluate_study_run(spec, new, run_dir=run_dir, record_dir=rec, progress=False)
    assert json.loads((rec / "summary.json").read_text())["checkpoint"]["step"] == 2
    assert stale_reasons(rec, api.train_config(spec, new)) == []


def test_a_run_that_differs_only_in_its_evaluation_stride_keeps_its_model_and_is_evaluated_again(
        tiny_cohort, tmp_path, monkeypatch, one_thread):
    from mmdm.study.stale import evaluation_only_differences

    monkeypatch.setenv("MMDM_ROOT", str(tmp_path))
    spec = next(r for r in study_runs() if r.name == "pix2pix")
    run_dir, rec = tmp_path / "run", tmp_path / "rec"
    old = get_profile("smoke", dataset=str(tiny_cohort), steps=2, eval_stride=2)
    api.train_study_run(spec, old, run_dir=run_dir, progress=False)
    api.evaluate_study_run(spec, old, run_dir=run_dir, record_dir=rec, progress=False)
    assert json.loads((rec / "summary.json").read_text())["sampling"]["stride"] == 2
    ckpts = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    trained = (run_dir / "train_complete.json").read_text()
    new = get_profile("smoke", dataset=str(tiny_cohort), steps=2, eval_stride=1)
    cfg = api.train_config(spec, new)
    assert stale_reasons(rec, cfg) == ["data.eval_stride: 2 -> 1"]
    assert stale_reasons(rec, cfg, training_only=True) == []
    assert evaluation_only_differences(yaml.safe_load((rec / "config.yaml").read_text()), cfg) == [
        "data.eval_stride: 2 -> 1"]
    # a training field among the differences: not an evaluation-only change
    assert evaluation_only_differences(yaml.safe_load((rec / "config.yaml").read_text()),
                                       api.train_config(spec, get_profile("smoke", dataset=str(tiny_cohort),
                                                                          steps=3, eval_stride=1))) == []
    api.train_study_run(spec, new, run_dir=run_dir, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == ckpts  # not retrained
    assert (run_dir / "train_complete.json").read_text() == trained
    moved = list(run_dir.glob("superseded-eval-*"))
    assert len(moved) == 1 and (moved[0] / "summary.json").is_file() and (moved[0] / "predictions").is_dir()
    assert not (run_dir / "summary.json").exists() and stale_reasons(run_dir, cfg) == []
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["steps"] == 2
    api.evaluate_study_run(spec, new, run_dir=run_dir, record_dir=rec, progress=False)
    summary = json.loads((rec / "summary.json").read_text())
    assert summary["sampling"]["stride"] == 1 and summary["checkpoint"]["step"] == 2
    assert stale_reasons(rec, cfg) == []


def test_an_interrupted_run_whose_evaluation_stride_changed_resumes_its_training(tiny_cohort, tmp_path, monkeypatch,
                                                                                  one_thread):
    monkeypatch.setenv("MMDM_ROOT", str(tmp_path))
    spec = next(r for r in study_runs() if r.name == "pix2pix")
    run_dir = tmp_path / "run"
    old = get_profile("smoke", dataset=str(tiny_cohort), steps=4, checkpoint_every=2, eval_stride=2)
    api.train_study_run(spec, old, run_dir=run_dir, progress=False)
    (run_dir / "train_complete.json").unlink()  # as if stopped after the checkpoint at step 2
    (run_dir / "checkpoints" / "step-00000004.pt").unlink()
    kept = (run_dir / "checkpoints" / "step-00000002.pt").stat().st_mtime_ns
    new = get_profile(old, eval_stride=1)
    api.train_study_run(spec, new, run_dir=run_dir, progress=False)
    assert not list(run_dir.glob("superseded-*"))  # nothing moved: neither the training nor an evaluation
    assert (run_dir / "checkpoints" / "step-00000002.pt").stat().st_mtime_ns == kept  # resumed, not started over
    assert json.loads((run_dir / "train_complete.json").read_text())["steps"] == 4
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["eval_stride"] == 1
    assert stale_reasons(run_dir, api.train_config(spec, new)) == []


def test_an_analysis_measured_before_its_model_was_retrained_is_moved_aside(tmp_path, monkeypatch):
    from mmdm.study.stale import trained_after

    monkeypatch.setenv("MMDM_ROOT", str(tmp_path))
    prof = get_profile("smoke")
    out = api.analysis_dir(prof) / "frontier"
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"start": "2026-12-01T10:00:00+00:00"}))
    run = api.runs_dir(prof) / "mmdm-full"
    run.mkdir(parents=True)
    (run / "train_complete.json").write_text(json.dumps({"finished": "2026-12-01T09:59:59+00:00"}))
    assert trained_after(out, [run]) == [] and not api.retire_if_stale(prof, "frontier", [run], log=lambda s: None)
    assert (out / "summary.json").is_file()  # measured with the model that is here: kept
    (run / "train_complete.json").write_text(json.dumps({"finished": "2026-12-01T10:00:01+00:00"}))
    lines = []
    assert trained_after(out, [run, tmp_path / "absent"]) == ["mmdm-full"]
    assert api.retire_if_stale(prof, "frontier", [run], log=lines.append)
    assert not out.exists() and "[stale] frontier: measured before mmdm-full" in lines[0]
    moved = list((api.runs_dir(prof) / "superseded-analyses").glob("frontier-*/summary.json"))
    assert len(moved) == 1  # kept outside results/, not deleted


def _stamped_run(root: Path, name: str, trained: str | None = None, evaluated: str | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    if trained:
        (run / "train_complete.json").write_text(json.dumps({"finished": trained}))
    if evaluated:
        (run / "summary.json").write_text(json.dumps({"evaluation": {"start": "x", "end": evaluated}}))
    return run


def test_stamps_name_the_model_and_predictions_and_only_rows_of_what_is_here_now_are_kept(tmp_path):
    from mmdm.study.stale import changed_inputs, keep_current_rows, model_stamp, predictions_stamp, stamps

    a = _stamped_run(tmp_path, "a", trained="T1", evaluated="E1")
    b = _stamped_run(tmp_path, "b", trained="T2")
    absent = tmp_path / "c"
    assert (model_stamp(a), predictions_stamp(a), model_stamp(absent), predictions_stamp(b)) == ("T1", "E1", None, None)
    runs = {"a": a, "b": b, "c": absent}
    assert stamps(runs, "models") == {"a": "T1", "b": "T2", "c": None}
    # b trained again since; c not trained here (its record is all there is: not counted); d not asked about
    assert changed_inputs({"a": "T1", "b": "T0", "c": "T9", "d": "T9"}, runs, "models") == ["b"]
    assert changed_inputs({"a": "E0"}, runs, "predictions") == ["a"]
    rows = [{"run": "a", "model": "T1", "x": 1}, {"run": "b", "model": "T0", "x": 2},
            {"run": "b", "model": "T2", "x": 3}, {"run": "a", "x": 4}, {"run": "zz", "model": "T1", "x": 5}]
    kept, dropped = keep_current_rows(rows, runs, "models", "model")
    assert [r["x"] for r in kept] == [1, 3] and dropped == ["b", "a", "zz"]  # old model, no stamp, not a run now
    # a stamp read back from a table as NaN is None: predictions not finished then, and not now either
    kept, _ = keep_current_rows([{"run": "b", "p": float("nan")}, {"run": "a", "p": float("nan")}],
                                runs, "predictions", "p")
    assert [r["run"] for r in kept] == ["b"]


def test_an_analysis_made_with_another_model_predictions_or_settings_is_moved_aside(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDM_ROOT", str(tmp_path))
    prof = get_profile("smoke")
    run = _stamped_run(api.runs_dir(prof), "mmdm-full", trained="T1", evaluated="E1")
    out = api.analysis_dir(prof) / "robustness"
    settings = {"steps": 2, "stride": 5, "subjects": ("sub-001",), "path": str(tmp_path / "x")}

    def record(**extra):
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"start": "2030-01-01T00:00:00+00:00", **extra}))

    record(models={"mmdm-full": "T1"}, settings=api.as_recorded(settings))
    assert not api.retire_if_stale(prof, "robustness", [run], log=print, settings=settings)  # as recorded: kept
    lines = []
    assert api.retire_if_stale(prof, "robustness", [run], log=lines.append, settings={**settings, "stride": 1})
    assert "measured with other settings (stride: 5 -> 1)" in lines[-1] and not out.exists()
    record(models={"mmdm-full": "T0"}, settings=api.as_recorded(settings))
    assert api.retire_if_stale(prof, "robustness", [run], log=lines.append, settings=settings)
    assert "measured before mmdm-full was trained again" in lines[-1]
    record(predictions={"mmdm-full": "E0"})  # an analysis of the written predictions: evaluated again
    assert api.retire_if_stale(prof, "robustness", [run], log=lines.append, kind="predictions")
    assert "was evaluated again" in lines[-1]
    record(predictions={"mmdm-full": "E1"})
    assert not api.retire_if_stale(prof, "robustness", [run], log=lines.append, kind="predictions")
    assert len(list((api.runs_dir(prof) / "superseded-analyses").glob("robustness-*/summary.json"))) == 3


def test_an_analysis_is_kept_as_made_and_made_again_when_the_profiles_stride_changes(tiny_cohort, tmp_path,
                                                                                      monkeypatch, one_thread):
    from mmdm.study.uncertainty import ensure_uncertainty

    monkeypatch.setenv("MMDM_ROOT", str(tmp_path))
    prof = get_profile("smoke", dataset=str(tiny_cohort), steps=2)
    spec = next(r for r in study_runs(prof.sources) if r.name == "mmdm-full")
    api.train_study_run(spec, prof, run_dir=api.runs_dir(prof) / "mmdm-full", progress=False)
    said = []
    out = ensure_uncertainty(prof, log=said.append, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == {"mmdm-full": json.loads(
        (api.runs_dir(prof) / "mmdm-full" / "train_complete.json").read_text())["finished"]}
    assert summary["settings"]["stride"] == prof.eval_stride == summary["sampling"]["stride"]
    assert ensure_uncertainty(prof, log=said.append, progress=False) == out and "record complete" in said[-1]
    other = get_profile(prof, eval_stride=2)
    ensure_uncertainty(other, log=said.append, progress=False)
    assert any(f"stride: {prof.eval_stride} -> 2" in s for s in said)
    assert json.loads((out / "summary.json").read_text())["sampling"]["stride"] == 2
    # an interrupted frontier resumes with the rows of the model here now only
    from mmdm.study.frontier import ensure_frontier

    prof = get_profile(prof, frontier_steps=(2,), frontier_strides=(5,))
    out = ensure_frontier(prof, log=said.append, progress=False)
    n = len(pd.read_csv(out / "frontier.csv"))
    (out / "summary.json").unlink()  # as if interrupted at the end
    tc = api.runs_dir(prof) / "mmdm-full" / "train_complete.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "finished": "2030-01-01T00:00:00+00:00"}))  # "trained again"
    ensure_frontier(prof, log=said.append, progress=False)
    assert f"[frontier] {n} setting(s) measured with another model of mmdm-full: measuring them again" in said
    table = pd.read_csv(out / "frontier.csv")
    assert len(table) == n and set(table.model) == {"2030-01-01T00:00:00+00:00"}
    assert json.loads((out / "summary.json").read_text())["settings"]["strides"] == [5]
    assert ensure_frontier(prof, log=said.append, progress=False) == out and "record complete" in said[-1]
    ensure_frontier(get_profile(prof, frontier_strides=(4,)), log=said.append, progress=False)
    assert any("strides: [5] -> [4]" in s for s in said)
    # the robustness record too: kept as made (its settings recorded as the profile gives them)
    from mmdm.study.robustness import ensure_robustness

    out = ensure_robustness(prof, log=said.append, progress=False)
    assert json.loads((out / "summary.json").read_text())["models"]["mmdm-full"] == "2030-01-01T00:00:00+00:00"
    assert ensure_robustness(prof, log=said.append, progress=False) == out and "record complete" in said[-1]


def test_extension_differences_are_a_grown_budget_and_evaluation_settings_only():
    from mmdm.study.stale import extension_differences

    cfg = _cfg()
    stored = to_dict(resolve_method_config(cfg))
    longer = to_dict(resolve_method_config(cfg))
    longer["steps"] = cfg.steps * 2
    assert extension_differences(stored, longer) == [f"steps: {cfg.steps} -> {cfg.steps * 2}"]
    longer["data"]["eval_stride"] = stored["data"]["eval_stride"] + 1  # evaluation settings may change with it
    assert len(extension_differences(stored, longer)) == 2
    shorter = {**stored, "steps": cfg.steps - 1}
    assert extension_differences(stored, shorter) == []  # a run past the new total cannot be cut back
    assert extension_differences(stored, stored) == []
    other = to_dict(resolve_method_config(cfg))
    other["steps"], other["seed"] = cfg.steps * 2, cfg.seed + 1
    assert extension_differences(stored, other) == []  # another seed is another run
    only_eval = {**stored, "data": {**stored["data"], "eval_stride": stored["data"]["eval_stride"] + 1}}
    assert extension_differences(stored, only_eval) == []  # not an extension: a re-evaluation


def test_a_checkpoint_continues_under_a_grown_budget_and_not_past_a_shrunk_one(tmp_path):
    from mmdm.config import ConfigError
    from mmdm.engine.spec import check_checkpoint_config

    cfg = _cfg()
    stored = to_dict(resolve_method_config(cfg))
    state = {"config": stored, "step": cfg.steps}
    check_checkpoint_config("ckpt", state, dataclasses.replace(cfg, steps=cfg.steps * 2))  # continues
    check_checkpoint_config("ckpt", {**state, "step": cfg.steps - 1},
                            dataclasses.replace(cfg, steps=cfg.steps - 1))  # at most the new total: continues
    with pytest.raises(ConfigError, match="steps"):
        check_checkpoint_config("ckpt", state, dataclasses.replace(cfg, steps=cfg.steps - 1))  # already past it
    with pytest.raises(ConfigError, match="seed"):
        check_checkpoint_config("ckpt", state, dataclasses.replace(cfg, steps=cfg.steps * 2, seed=cfg.seed + 1))


def test_a_grown_budget_continues_the_trained_run_to_the_weights_of_a_run_trained_that_long(tiny_cohort, tmp_path,
                                                                                           monkeypatch, one_thread):
    import torch

    from mmdm.engine.checkpoint import CheckpointManager, load_checkpoint

    monkeypatch.setenv("MMDM_ROOT", str(tmp_path))
    spec = next(r for r in study_runs() if r.name == "pix2pix")
    short = get_profile("smoke", dataset=str(tiny_cohort), steps=4, checkpoint_every=2)
    long = get_profile(short, steps=6)
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    api.train_study_run(spec, short, run_dir=run_dir, progress=False)
    (run_dir / "summary.json").write_text("{}")  # as if evaluated at 4 steps
    kept = (run_dir / "checkpoints" / "step-00000004.pt").stat().st_mtime_ns
    api.train_study_run(spec, long, run_dir=run_dir, progress=False)
    api.train_study_run(spec, long, run_dir=ref_dir, progress=False)
    moved = list(run_dir.glob("superseded-extension-*"))
    assert len(moved) == 1 and {f.name for f in moved[0].iterdir()} == {"train_complete.json", "summary.json"}
    assert json.loads((moved[0] / "train_complete.json").read_text())["steps"] == 4
    assert (run_dir / "checkpoints" / "step-00000004.pt").stat().st_mtime_ns == kept  # continued, not redone
    assert json.loads((run_dir / "train_complete.json").read_text())["steps"] == 6
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["steps"] == 6
    assert stale_reasons(run_dir, api.train_config(spec, long)) == []
    a = load_checkpoint(CheckpointManager(run_dir / "checkpoints").latest())["model"]
    b = load_checkpoint(CheckpointManager(ref_dir / "checkpoints").latest())["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sessions = json.loads((run_dir / "provenance.json").read_text())["sessions"]
    assert [s.get("resumed_from_step") for s in sessions][-1] == 4
    rec = tmp_path / "rec"
    api.evaluate_study_run(spec, long, run_dir=run_dir, record_dir=rec, progress=False)
    assert json.loads((rec / "summary.json").read_text())["checkpoint"]["step"] == 6
    assert stale_reasons(rec, api.train_config(spec, long)) == []
