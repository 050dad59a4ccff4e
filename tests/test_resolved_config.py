"""A run record holds the resolved method config (every field) and the run is rebuilt from it alone:
editing a named configuration after a run changes nothing about that run; old records (which name a
configuration) load through the one migration, checked on the committed records."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from helpers import make_dataset
from mmdm.config import ConfigError, from_dict, to_dict
from mmdm.data.dataset import DataConfig
from mmdm.engine.checkpoint import load_checkpoint
from mmdm.engine.evaluate import evaluate_run
from mmdm.engine.migrate import legacy_configs, legacy_method_config, migrate_record
from mmdm.engine.spec import (TrainConfig, build_method_from_config, config_differences, load_run_config,
                              resolve_method_config)
from mmdm.engine.train import train
from mmdm.methods import METHODS, build_method
from mmdm.methods.mmdm import MMDM
from mmdm.paths import project_path

SOURCES = ("T1w", "T2w", "FLAIR")
COMMITTED = project_path("results/standard")


@pytest.mark.parametrize("name", METHODS.names())
def test_resolved_config_round_trips_for_every_named_config(name):
    """to_dict -> from_dict gives the same config, field for field, for every method and named config."""
    cls = METHODS.get(name).method_class
    for config in cls.named_configs:
        d = to_dict(cls.make_config(config))
        assert to_dict(from_dict(cls.config_class, d)) == d, (name, config)
    small = build_method(name, config="small")
    rebuilt = cls.from_resolved(small.resolved_config())
    assert rebuilt.resolved_config() == small.resolved_config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}


def test_from_resolved_rejects_a_partial_or_misspelt_config():
    d = to_dict(MMDM.make_config("small", variant="full"))
    d["bridg"] = d.pop("bridge")
    with pytest.raises(ConfigError, match="unknown key.*bridg"):
        MMDM.from_resolved(d)


def _tiny_run(root: Path) -> TrainConfig:
    make_dataset(root / "data", n=5, shape=(16, 16, 8))
    return TrainConfig(method="mmdm", method_kwargs={"variant": "full", "config": "small"},
                       data=DataConfig(root=str(root / "data"), sources=SOURCES), steps=2, epochs=None, batch_size=2,
                       device="cpu", checkpoint_every=2, keep_last=1, image_every=0, log_every=1)


def test_a_run_rebuilds_from_its_record_after_the_named_config_changes(tmp_path, monkeypatch):
    cfg = _tiny_run(tmp_path)
    expected = to_dict(MMDM.make_config("small", SOURCES, variant="full"))
    run = train(cfg, tmp_path / "run", progress=False)
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["method_config"] == expected  # every field, not the name
    ckpt = load_checkpoint(next((run / "checkpoints").iterdir()), map_location="cpu")
    assert ckpt["config"]["method_config"] == expected
    first = evaluate_run(run, steps=2, device="cpu", progress=False)
    assert first["method_config"] == expected
    # the sampler settings actually used, not null for "the config's default"
    assert first["sampling"]["steps"] == 2 and first["sampling"]["eta"] == expected["bridge"]["eta"]
    assert first["sampling"]["spacing"] == "linear" and first["sampling"]["mode"] == "coupled"

    def edited_small():  # someone later makes `small` wider and samples with other settings
        c = MMDM.make_config("paper", variant="full")
        c.resunet = dataclasses.replace(c.resunet, base=4, groups=4, ffn_expansion=2)
        c.fusion = dataclasses.replace(c.fusion, unet=dataclasses.replace(c.fusion.unet, base=8, mult=(1, 2),
                                                                          num_res_blocks=1, groups=8))
        c.bridge = dataclasses.replace(c.bridge, sample_steps=3, eta=0.5)
        return c

    monkeypatch.setitem(MMDM.named_configs, "small", edited_small)
    assert to_dict(MMDM.make_config("small", SOURCES, variant="full")) != expected  # the name now means another model
    second = evaluate_run(run, steps=2, device="cpu", progress=False)
    assert second["method_config"] == expected and second["sampling"] == first["sampling"]
    assert second["metrics"] == first["metrics"]  # bit-identical: the same network, weights and sampler
    # asking for the run again by name now asks for another model: refused, not silently mixed
    with pytest.raises(ConfigError, match="different config.*method_config"):
        train(dataclasses.replace(cfg, steps=3), run, progress=False)
    # its own record resumes it (the README's resume command)
    again = load_run_config(run / "config.yaml")
    assert build_method_from_config(again).resolved_config() == expected


def test_resolve_fills_the_resolved_config_and_keeps_a_given_one():
    cfg = TrainConfig(method="mmdm", method_kwargs={"config": "small", "variant": "mip"},
                      data=DataConfig(sources=("T1w", "T2w")))
    r = resolve_method_config(cfg)
    assert r.method_config == to_dict(MMDM.make_config("small", ("T1w", "T2w"), variant="mip"))
    assert cfg.method_config is None  # the caller's config is not changed
    assert resolve_method_config(r) is r
    stub = TrainConfig(method="test_resolved_config:no_such", method_kwargs={})
    assert resolve_method_config(stub).method_config is None  # code is never imported
    # a stored record (old or new format) and a config given by name compare resolved on both sides
    assert config_differences(to_dict(cfg), cfg) == [] == config_differences(to_dict(r), cfg)
    other = TrainConfig(method="mmdm", method_kwargs={"config": "small", "variant": "full"},
                        data=DataConfig(sources=("T1w", "T2w")))
    assert any(d.startswith("method_config.use_naws") for d in config_differences(to_dict(r), other))


def _committed_records() -> list[Path]:
    return sorted(p for p in COMMITTED.iterdir() if (p / "summary.json").is_file()) if COMMITTED.is_dir() else []


@pytest.mark.skipif(not _committed_records(), reason="no committed records")
def test_committed_records_migrate_to_the_model_that_made_them():
    """Every committed record names a configuration (``config: small``); migrated through the frozen
    table it rebuilds a method whose objective is the one the record wrote at the time, with the
    record's sources, and its config.yaml migrates to the same config as its summary."""
    for rec in _committed_records():
        summary = json.loads((rec / "summary.json").read_text())
        assert "method_config" not in summary  # made before records kept it
        migrated = migrate_record(summary)
        cls = METHODS.get(summary["method"]).method_class
        method = cls.from_resolved(migrated["method_config"])
        assert method.objective() == summary["objective"], rec.name
        assert list(method.sources) == summary["method_kwargs"]["sources"], rec.name
        from_yaml = migrate_record(yaml.safe_load((rec / "config.yaml").read_text()))
        assert from_yaml["method_config"] == migrated["method_config"], rec.name
        assert migrate_record(migrated) == migrated  # a record that holds its config is left alone


def test_legacy_names_expand_through_the_frozen_table_not_the_live_code(monkeypatch):
    before = legacy_method_config("mmdm", {"config": "small", "variant": "base", "optim": {"lr": 3e-4}},
                                  sources=SOURCES)
    assert before["use_mip"] is False and before["use_naws"] is False and before["optim"]["lr"] == 3e-4
    assert before["resunet"] == legacy_configs()["mmdm"]["small"]["resunet"]
    monkeypatch.setitem(MMDM.named_configs, "small", lambda: MMDM.make_config("paper", variant="full"))
    after = legacy_method_config("mmdm", {"config": "small", "variant": "base", "optim": {"lr": 3e-4}},
                                 sources=SOURCES)
    assert after == before
    with pytest.raises(ConfigError, match="does not hold.*known: depthwise, paper, small, small-depthwise"):
        legacy_method_config("mmdm", {"config": "huge"})


def test_a_one_pass_method_records_no_sampler_settings():
    from mmdm.engine.evaluate import sampling_record

    rec = sampling_record(build_method("pix2pix", config="small"), 10, None, seed=0)
    assert rec["sampler"] == "one pass" and rec["steps"] is None and rec["eta"] is None and "mode" not in rec
    rec = sampling_record(build_method("bbdm", config="small"), None, None)
    assert rec == {"steps": 20, "eta": 1.0, "spacing": "linear", "clip_x0": False, "sampler": "iterative"}


def test_a_run_recorded_before_method_config_resumes_and_evaluates(tmp_path):
    """A run directory of the old format (config.yaml and checkpoint without method_config) is
    migrated where it is read: it evaluates, and training it further is accepted as the same run."""
    import torch

    cfg = _tiny_run(tmp_path)
    run = train(cfg, tmp_path / "run", progress=False)
    first = evaluate_run(run, steps=2, device="cpu", progress=False)
    stored = yaml.safe_load((run / "config.yaml").read_text())
    stored.pop("method_config")
    (run / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    ckpt_path = next((run / "checkpoints").iterdir())
    state = load_checkpoint(ckpt_path, map_location="cpu")
    state["config"].pop("method_config")
    torch.save(state, ckpt_path)
    assert load_run_config(run / "config.yaml").method_config == first["method_config"]
    again = evaluate_run(run, steps=2, device="cpu", progress=False)
    assert again["metrics"] == first["metrics"] and again["method_config"] == first["method_config"]
    (run / "train_complete.json").unlink()
    train(dataclasses.replace(cfg), run, progress=False)  # resumes: the stored config migrates to the same one
    assert (run / "train_complete.json").is_file()
