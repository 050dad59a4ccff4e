"""One config resolution (``resolve(base, *layers)``) for the study, the sweeps and ``mmdm train``, and the
set-up's numbers defined once (``SETUP``) with the descriptions, the deviations page and the Makefile
derived from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mmdm.config import ConfigError, to_dict
from mmdm.data.dataset import DataConfig
from mmdm.engine.spec import TrainConfig, resolve
from mmdm.study import api
from mmdm.study.profiles import PROFILES, SETUP, SMOKE_CROP, TrainingSetup, setup_deviations
from mmdm.study.runs import option_spec
from mmdm.study.sweep import SWEEPS, point_config

ROOT = Path(__file__).resolve().parents[1]


def test_layers_merge_in_order_nested_dicts_key_by_key_and_none_replaces():
    base = TrainConfig(method="mmdm", method_kwargs={"config": "small", "optim": {"lr": 1e-4, "betas": [0.5, 0.9]}},
                       data=DataConfig(sources=("T1w", "T2w")), steps=10, epochs=None)
    cfg = resolve(base, {"method_kwargs": {"optim": {"lr": 3e-4}}}, {"crops": {"size": [32, 32]}},
                  {"emphasis": {"kind": "top_fraction"}}, None, {"emphasis": {"weight": 5.0}, "steps": 7})
    assert cfg.method_kwargs == {"config": "small", "optim": {"lr": 3e-4, "betas": [0.5, 0.9]}}
    assert cfg.crops.size == (32, 32) and cfg.steps == 7
    assert cfg.emphasis.kind == "top_fraction" and cfg.emphasis.weight == 5.0  # both layers kept
    assert resolve(cfg, {"crops": None}).crops is None  # None replaces a whole sub-config
    assert to_dict(resolve(cfg)) == to_dict(cfg)
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        resolve(cfg, {"steps": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        resolve(cfg, {"stpes": 3})


def test_a_layer_that_changes_the_method_drops_the_stored_resolved_config():
    stored = TrainConfig(method="mmdm", method_kwargs={"config": "small"}, method_config={"window": 5})
    assert resolve(stored, {"steps": 5}).method_config == {"window": 5}  # a run setting keeps it
    assert resolve(stored, {"method_kwargs": {"variant": "mip"}}).method_config is None
    assert resolve(stored, {"method": "bbdm"}).method_config is None
    assert resolve(stored, {"method_kwargs": {}, "method_config": {"window": 3}}).method_config == {"window": 3}


def test_the_study_resolves_its_five_layers_in_order():
    """named config -> profile method overrides -> option method -> profile train -> option train."""
    prof = dataclasses.replace(PROFILES["standard"], method_overrides={"ddpm": {"optim": {"lr": 1e-3}},
                                                                       "mmdm": {"naws_lr": 5.0}},
                               train={"emphasis": {"kind": "smooth", "weight": 3.0}, "steps": 11})
    spec = option_spec(api.make_spec("ddpm", None, "", prof), "x0-prediction")
    cfg = api.train_config(spec, prof)
    assert cfg.method_kwargs == {"config": "small", "sources": list(prof.sources), "optim": {"lr": 1e-3},
                                 "prediction": "x0"}
    assert cfg.emphasis.kind == "smooth" and cfg.emphasis.weight == 3.0 and cfg.steps == 11
    spec = option_spec(api.make_spec("mmdm", "full", "", prof), "no-emphasis")
    cfg = api.train_config(spec, prof)
    assert cfg.method_kwargs["naws_lr"] == 5.0 and "optim" not in cfg.method_kwargs
    assert cfg.emphasis.kind == "none" and cfg.emphasis.weight == 3.0  # the option's train comes last


def test_a_sweep_point_is_the_profiles_run_then_the_sweep_then_the_point():
    sweep = SWEEPS["vessel"]
    point = next(p for p in sweep.points if p.name == "slices-top1-w20")
    cfg = point_config(sweep, point)
    assert cfg.crops is None  # the point's `crops: None` replaced the sweep's crops
    assert cfg.emphasis.fraction == SETUP.emphasis_fraction and cfg.emphasis.weight == SETUP.emphasis_weight
    assert cfg.method_kwargs["optim"] == {"lr": SETUP.lr} and cfg.steps == sweep.steps
    assert "naws_lr" not in cfg.method_kwargs  # the profile's own method overrides are not applied


def test_the_profiles_and_their_descriptions_follow_the_setup():
    std, quick, smoke = PROFILES["standard"], PROFILES["quick"], PROFILES["smoke"]
    assert std.train == SETUP.train() and std.method_overrides == SETUP.method_overrides()
    assert std.method_overrides["mmdm"] == {"optim": {"lr": SETUP.lr}, "naws_lr": SETUP.naws_lr,
                                            "fusion_residual": SETUP.fusion_residual}
    assert SETUP.summary() in std.description and SETUP.crop_words in quick.description
    if SETUP.crop is None:  # whole slices everywhere, the smoke profile too
        assert smoke.train["crops"] is None and std.train["crops"] is None and "whole slices" in smoke.description
    else:
        assert smoke.train["crops"]["size"] == [SMOKE_CROP, SMOKE_CROP]
        assert f"{SMOKE_CROP}x{SMOKE_CROP} crops" in smoke.description
    cropping = TrainingSetup(crop=48)
    assert cropping.crops(32)["size"] == [32, 32] and cropping.crop_words_at(32) == "32x32 crops"
    assert TrainingSetup(crop=None).crops(32) is None and TrainingSetup(crop=None).crop_words_at(32) == "whole slices"


def test_the_deviations_prose_is_generated_from_the_setup():
    other = TrainingSetup(crop=64, emphasis_fraction=0.03, emphasis_weight=5.0, lr=1e-3, naws_lr=2e-2,
                          crop_vessel_share=0.5)
    text = " ".join(setup_deviations(other))
    for words in ("64x64 in-plane crops of 5 slices", "50 % of them", "brightest 3 % of each", "weigh x5,",
                  "Learning rate 1e-3 for MMDM", "own learning rate, 2e-2", "published 2e-4"):
        assert words in text, words
    assert "48x48" not in text and "x20" not in text and "3e-4" not in text
    slices = " ".join(setup_deviations(TrainingSetup(crop=None)))
    assert "in-plane crops" not in slices and "brightest 1 % of each" in slices and "weigh x20" in slices


def test_the_makefile_asks_the_cli_for_the_cohort_and_data_dir(capsys):
    from mmdm.cli import main

    for name, prof in PROFILES.items():
        assert main(["study", "--profile", name, "--show", "cohort"]) == 0
        assert capsys.readouterr().out.strip() == prof.cohort
        assert main(["study", "--profile", name, "--show", "data-dir"]) == 0
        assert capsys.readouterr().out.strip() == prof.data_dir
    make = (ROOT / "Makefile").read_text()
    assert "--show cohort" in make and "--show data-dir" in make
    assert "filter smoke" not in make and "tiny" not in make  # the mapping is not typed again


def test_sweeps_that_choose_for_the_set_up_train_mmdm_in_the_set_up():
    """The sweeps defined after the haze diagnosis compare choices around the CPU profiles' set-up: their
    MMDM points must resolve to the set-up's MMDM settings (residual fusion, NAWS rate) except what they vary."""
    from mmdm.study.profiles import SETUP
    from mmdm.study.sweep import get_sweep, point_config

    want = SETUP.method_overrides()["mmdm"]
    for name in ("ema", "setup-fidelity"):
        sweep = get_sweep(name)
        for p in (p for p in sweep.points if p.method == "mmdm"):
            kw = point_config(sweep, p).method_kwargs
            assert kw["fusion_residual"] is want["fusion_residual"] and kw["naws_lr"] == want["naws_lr"], (name, p.name)
            if "lr1e-4" not in p.name:
                assert kw["optim"]["lr"] == want["optim"]["lr"], (name, p.name)
