"""Equal footing: one weight-average rule for every method, the same steps for every table row of the
standard profile, the footing table, the convergence rule and the budget sentences generated from a profile."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from mmdm.config import ConfigError
from mmdm.engine.spec import SHARED_EMA, TrainConfig, resolve_ema
from mmdm.methods import build_method
from mmdm.optim import EMAConfig
from mmdm.study import footing
from mmdm.study.profiles import CLAIM_RUNS, get_profile
from mmdm.study.runs import study_runs
from mmdm.study.sweep import SETUP_POINTS, SWEEPS, ema_decision, setup_decision


def test_ema_mode_is_one_rule_for_every_method():
    bbdm, mmdm = build_method("bbdm", config="small"), build_method("mmdm", variant="base", config="small")
    own = TrainConfig(ema_mode="method")
    assert resolve_ema(own, bbdm) == bbdm.ema_config() and resolve_ema(own, mmdm) is None  # unequal
    for method in (bbdm, mmdm):
        assert resolve_ema(TrainConfig(ema_mode="none"), method) is None
        assert resolve_ema(TrainConfig(ema_mode="all"), method) == SHARED_EMA
        custom = EMAConfig(decay=0.9, start_step=0)
        assert resolve_ema(TrainConfig(ema_mode="all", ema=custom), method) == custom
    with pytest.raises(ConfigError, match="ema_mode"):
        TrainConfig(ema_mode="some").validate()
    with pytest.raises(ConfigError, match="contradicts"):
        TrainConfig(ema_mode="none", ema=EMAConfig()).validate()


def test_standard_profile_gives_every_row_the_same_steps_one_ema_rule_and_three_seeds():
    std = get_profile("standard")
    rows = [r for r in study_runs(std.sources) if r.tables]
    assert len({std.run_steps(r.method) for r in rows}) == 1
    assert std.train["ema_mode"] in ("none", "all")  # never each method's own
    assert set(CLAIM_RUNS) == {r.name for r in study_runs()} and len(CLAIM_RUNS) == 13
    assert set(std.seed_runs) == set(CLAIM_RUNS) and len(std.seeds) >= 3


def test_convergence_rule_on_constructed_curves():
    steps = np.arange(1, 9) * 500
    flat = pd.DataFrame({"step": steps, "psnr": [20, 22, 23, 23.5, 23.6, 23.7, 23.7, 23.8],
                         "recovery": [0.1, 0.3, 0.4, 0.45, 0.46, 0.46, 0.47, 0.47]})
    v = footing.convergence(flat)
    # last step 4000: the third quarter is steps 2500-3000, the last 3500-4000
    assert v["converged"] is True and v["from_step"] == 2500 and v["to_step"] == 4000
    assert v["psnr_gain"] == pytest.approx((23.7 + 23.8) / 2 - (23.6 + 23.7) / 2)
    assert v["recovery_gain"] == pytest.approx((0.54 + 0.54) / 2 - (0.53 + 0.53) / 2)
    rising = flat.assign(recovery=[0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35])
    r = footing.convergence(rising)
    assert r["converged"] is False and r["recovery_gain"] == pytest.approx(0.1)
    psnr_up = flat.assign(psnr=[20, 21, 22, 23, 24, 25, 25.2, 25.4])
    assert footing.convergence(psnr_up)["psnr_gain"] == pytest.approx(0.8)
    assert footing.convergence(psnr_up)["converged"] is False
    # above 1 the recovery overshoots: rising further is no improvement, coming back towards 1 is
    over = flat.assign(recovery=[0.5, 0.9, 1.0, 1.1, 1.2, 1.2, 1.3, 1.4])
    assert footing.convergence(over)["converged"] is True and footing.convergence(over)["recovery_gain"] < 0
    back = flat.assign(recovery=[0.5, 0.9, 1.0, 1.1, 1.2, 1.3, 1.2, 1.05])
    assert footing.convergence(back)["recovery_gain"] == pytest.approx(0.25 - 0.125)  # |1-r| 0.25 -> 0.125
    assert footing.convergence(flat.iloc[:0])["converged"] is None
    assert footing.convergence(flat.assign(psnr=np.nan))["converged"] is None
    assert footing.convergence(flat[flat.step <= 1500])["converged"] is not None  # 1000 | 1500 quarters
    assert footing.convergence(flat[flat.step.isin([500, 4000])])["converged"] is None  # no third quarter


def test_a_flat_curve_with_validation_noise_is_not_judged_improving_on_average():
    """Scatter without trend: the rule's expected gain is 0, where the best later validation minus one earlier
    one (a max of several noisy values) would be biased upwards."""
    rng = np.random.default_rng(0)
    steps = np.arange(1, 21) * 200
    gains, best_minus_one = [], []
    for _ in range(400):
        psnr = 28.0 + rng.normal(0, 0.5, len(steps))
        gains.append(footing.convergence(pd.DataFrame({"step": steps, "psnr": psnr, "recovery": 0.9}))["psnr_gain"])
        best_minus_one.append(psnr[steps > 3000].max() - psnr[steps == 3000][0])
    assert abs(np.mean(gains)) < 0.05 and np.mean(best_minus_one) > 0.5
    assert np.std(gains) == pytest.approx(0.5 * np.sqrt(2 / 5), rel=0.15)  # two means of 5 validations


def test_a_row_with_seeds_is_judged_on_the_mean_of_their_curves():
    steps = [1000, 2000, 3000, 4000]
    curves = pd.concat([pd.DataFrame({"run": run, "step": steps, "psnr": p, "recovery": 0.9})
                        for run, p in (("bbdm", [20, 22, 22, 23]), ("bbdm-s1", [20, 22, 24, 23]),
                                       ("bbdm-s2", [20, 22, 23, 23.5]), ("pix2pix", [25, 26, 26, 26.1]))])
    mean = footing.row_curve(pd.concat([curves, curves.iloc[[0]].assign(run="bbdm-s1", step=500)]), "bbdm")
    assert mean.step.tolist() == steps  # step 500 is validated by one seed only: left out
    assert mean.psnr.tolist() == pytest.approx([20, 22, 23, 23 + 1 / 6])
    assert footing.row_curve(curves, "pix2pix").psnr.tolist() == [25, 26, 26, 26.1]
    assert footing.convergence(mean)["psnr_gain"] == pytest.approx(1 / 6)


def _record(root, run, steps, psnr, with_curves=True, training=None):
    rec = root / run
    rec.mkdir(parents=True)
    summary = {"method": run.split("-")[0], "checkpoint": {"step": int(steps[-1]), "ema": False},
               "provenance": {"train_wall_s": 600.0}}
    if training is not None:
        summary["training"] = training
    (rec / "summary.json").write_text(json.dumps(summary))
    (rec / "config.yaml").write_text(yaml.safe_dump({"batch_size": 4}))
    if with_curves:
        (rec / "validation.jsonl").write_text("".join(
            json.dumps({"step": int(s), "vessel": {"recovery": 0.5}, "volume": {"psnr": p, "vessel_recovery": 0.5}})
            + "\n" for s, p in zip(steps, psnr)))


def test_footing_table_and_not_converged_rows_from_records(tmp_path):
    steps = [1000, 2000, 3000, 4000]
    tr = {"checkpoint_step": 4000, "batch_size": 4, "ema_evaluated": False, "ema": None, "ema_mode": "none",
          "lr": {"main": 3e-4}}
    _record(tmp_path, "mmdm-full", steps, [20, 22, 22.9, 23.0], training=tr)
    _record(tmp_path, "pix2pix", steps, [20, 21, 22, 23.0], training={**tr, "lr": {"generator": 2e-4,
                                                                                    "discriminator": 2e-4}})
    _record(tmp_path, "bbdm", steps, [], with_curves=False, training=tr)
    _record(tmp_path, "rddm", [4000], [22.0], training={**tr, "lr": {"generator": 1e-4, "discriminator": 2e-4},
                                                        "ema_evaluated": True,
                                                        "ema": {"decay": 0.995, "start_step": 100, "every": 1}})
    assert footing.not_converged(tmp_path) == {"pix2pix": "not converged"}
    t = footing.footing_table(tmp_path)
    assert list(t.index) == ["Pix2Pix", "BBDM", "RDDM", "MMDM (ours in the paper)"]  # rows with records, in order
    assert t.loc["RDDM", "converged"].startswith("not judged")  # one validation: too short for the rule
    assert t.loc["RDDM", "lr"] == "generator 1e-4, discriminator 2e-4"
    assert t.loc["RDDM", "weights evaluated"] == "EMA 0.995 from step 100"
    assert t.loc["MMDM (ours in the paper)", "converged"].startswith("yes")
    assert t.loc["Pix2Pix", "converged"].startswith("no (+1.00 dB")
    assert t.loc["BBDM", "converged"] == "no curve"
    assert t.loc["Pix2Pix", "lr"] == "2e-4" and t.loc["MMDM (ours in the paper)", "lr"] == "3e-4"
    assert t.loc["BBDM", "weights evaluated"] == "raw" and t.loc["BBDM", "train (min)"] == "10.0"
    md = footing.footing_markdown(tmp_path, get_profile("standard"))
    assert "| Pix2Pix | 4000 | none |" in md and footing.CONVERGENCE_RULE in md
    assert md.rstrip().endswith("Training windows and vessel emphasis: –, emphasis – (every row).")  # not recorded


def test_budget_sentences_follow_the_profile():
    import dataclasses

    std = get_profile("standard")
    text = footing.budget_markdown(std)
    assert f"the same {std.steps} optimiser steps" in text and "raw weights" in text
    unequal = dataclasses.replace(std, steps_per_method={"pix2pix": 2 * std.steps},
                                  train={**std.train, "ema_mode": "method"})
    text = footing.budget_markdown(unequal)
    assert "do NOT all get the same budget" in text and f"pix2pix {2 * std.steps}" in text
    assert "its own official weight average" in text


def test_ema_decision_follows_the_pairs_ranking():
    table = pd.DataFrame({"point": ["a-all", "a-none", "b-none", "b-all", "c-all", "c-none"]})
    out = ema_decision(table)
    assert out == {"ema_mode": "all", "helps": {"a": True, "b": False, "c": True}}
    assert ema_decision(table.iloc[[1, 0, 2, 3]])["ema_mode"] == "none"  # one of two is not a majority
    with pytest.raises(ValueError, match="nothing to decide"):
        ema_decision(pd.DataFrame({"point": ["x"]}))


def _recorded_sweep(name):
    """The ranked summary of a recorded sweep with every point finished (skip where it is not recorded)."""
    from mmdm.study.sweep import sweep_summary
    try:
        table = sweep_summary(name)
    except FileNotFoundError:
        pytest.skip(f"sweep '{name}' is not recorded")
    assert set(table["point"]) == {p.name for p in SWEEPS[name].points} and table["complete"].all()
    return table


def test_setup_ema_mode_is_what_the_recorded_ema_sweep_decided():
    # the standard profile's weight-average rule follows the recorded sweep's pre-written rule
    from mmdm.study.profiles import SETUP
    table = _recorded_sweep("ema")
    assert SETUP.ema_mode == ema_decision(table)["ema_mode"]
    assert get_profile("standard").train["ema_mode"] == SETUP.ema_mode


def test_setup_follows_what_the_recorded_setup_fidelity_sweep_decided():
    # the set-up's fields that the sweep's MMDM points vary are those of its winning point
    from mmdm.study.profiles import SETUP
    table = _recorded_sweep("setup-fidelity")
    changes = setup_decision(table)["changes"]
    assert (SETUP.crop is None) == (changes.get("crops") == "whole slices")
    assert (SETUP.emphasis_fraction, SETUP.lr) == (changes.get("emphasis_fraction", 0.01), changes.get("lr", 3e-4))
    assert changes.get("emphasis") != "none" and "mip_noise_scale" not in changes  # neither is in the set-up


def test_standard_evaluation_stride_follows_the_recorded_banding_measurement():
    """Windows every slice when, on validation, MMDM full bands above 1.5 at stride 2 and not at stride 1 (or the
    PSNR at stride 1 is at most 0.1 dB lower); the rule of book/methods.md, written before the measurement."""
    from mmdm.paths import project_path
    from mmdm.regions import MAX_SLICE_BANDING

    path = project_path("benchmarks/results/haze/stride-mmdm-full.json")
    if not path.is_file():
        pytest.skip("no recorded stride measurement")
    m = {k: v["means"] for k, v in json.loads(path.read_text())["strides"].items()}
    adopt = (m["2"]["slice_banding"] > MAX_SLICE_BANDING >= m["1"]["slice_banding"]
             and m["1"]["psnr"] >= m["2"]["psnr"] - 0.1)
    assert get_profile("standard").eval_stride == (1 if adopt else 2)


def test_setup_decision_ranks_mmdm_points_among_themselves():
    rows = [("top1-w20", "mmdm", 0.40, 24.0), ("none", "mmdm", 0.10, 24.3), ("top3-w20", "mmdm", 0.45, 23.2),
            ("slices-top1-w20", "mmdm", 0.50, 22.0), ("pix2pix-none", "pix2pix", 0.05, 30.0),
            ("pix2pix-top1-w20", "pix2pix", 0.20, 29.9)]
    table = pd.DataFrame([{"point": p, "method": m, "recovery": r, "volume_psnr": v, "val_loss": 0.1}
                          for p, m, r, v in rows])
    out = setup_decision(table)
    # Pix2Pix's 30 dB does not make every MMDM point ineligible; slices (2.3 dB below 24.3) is out,
    # top3 (1.1 dB below) too: top1-w20 is the best eligible MMDM point
    assert out["winner"] == "top1-w20" and out["changes"] == {}
    assert out["ranking"][:2] == ["top1-w20", "none"] and out["pix2pix_emphasis_helps"] is True
    table.loc[table.point == "top3-w20", "volume_psnr"] = 24.0
    assert setup_decision(table)["changes"] == {"emphasis_fraction": 0.03}
    # every point of the sweep has a meaning, and the current set-up is the no-change point
    mmdm_points = {p.name for p in SWEEPS["setup-fidelity"].points if p.method == "mmdm"}
    assert mmdm_points == set(SETUP_POINTS)


def test_records_note_says_where_records_predate_the_profile(tmp_path):
    import dataclasses

    std = get_profile("standard")
    tr = {"checkpoint_step": std.steps, "batch_size": 4, "ema_mode": "none"}
    for run in ("mmdm-full", "mmdm-full-s1", "mmdm-full-s2", "bbdm"):
        _record(tmp_path, run, [std.steps], [20.0], training=tr)
    # every row at the profile's steps, but only MMDM full has all its seeds
    note = footing.records_note(tmp_path, std)
    assert "trained for" not in note  # the steps agree with the profile
    assert "1 of the 2 runs the profile repeats" in note and "(mmdm-full)" in note
    # a row at another budget is named with its steps
    _record(tmp_path, "pix2pix", [std.steps // 2], [20.0], training={**tr, "checkpoint_step": std.steps // 2})
    note = footing.records_note(tmp_path, std)
    assert f"{std.steps // 2} steps: pix2pix" in note and f"now trains {std.steps}" in note
    assert "training windows" not in note  # these records do not say theirs
    # a row trained on other windows than the profile's is named with them
    other = {"size": [40, 40]} if std.train["crops"] is None else None
    (tmp_path / "bbdm" / "config.yaml").write_text(yaml.safe_dump({"batch_size": 4, "crops": other}))
    note = footing.records_note(tmp_path, std)
    said = "40x40 crops" if other else "whole slices"
    assert f"training windows were {said}: bbdm (the profile now trains on {footing._windows_text(std.train)})" in note
    (tmp_path / "bbdm" / "config.yaml").write_text(yaml.safe_dump({"batch_size": 4, "crops": std.train["crops"]}))
    assert "training windows" not in footing.records_note(tmp_path, std)
    # records that match a profile repeating nothing: no note
    single = dataclasses.replace(std, seeds=(0,), seed_runs=())
    (tmp_path / "pix2pix" / "summary.json").unlink()
    assert footing.records_note(tmp_path, single) == ""
    assert footing.records_note(tmp_path / "none", std) == ""


def test_sweep_decisions_in_words_with_convergence():
    from mmdm.study.profiles import SETUP
    from mmdm.study.sweep import sweep_convergence, sweep_decision_markdown

    table = pd.DataFrame({"point": ["a-all", "a-none", "b-all", "b-none"]})
    steps = [400, 800, 1200, 1600, 2000]
    curves = pd.concat([
        pd.DataFrame({"point": "a-all", "step": steps, "volume_psnr": [20, 22, 23, 23.1, 23.2],
                      "volume_vessel_recovery": [0.1, 0.3, 0.4, 0.41, 0.42]}),
        pd.DataFrame({"point": "a-none", "step": steps, "volume_psnr": [20, 21, 22, 23, 24],
                      "volume_vessel_recovery": [0.1, 0.2, 0.3, 0.4, 0.5]})])
    conv = sweep_convergence(curves).set_index("point")
    # of 2000 steps, the third quarter holds step 1200, the last 1600 and 2000
    assert conv.loc["a-all", "converged"] and conv.loc["a-all", "from_step"] == 1200
    assert conv.loc["a-all", "psnr_gain"] == pytest.approx(0.15) and not conv.loc["a-none", "converged"]
    text = sweep_decision_markdown("ema", table, curves)
    assert "`ema_mode: all`" in text and "a: helps" in text and f"use `ema_mode: {SETUP.ema_mode}`" in text
    assert "Converged at 2000 steps" in text and "a-none: no (+1.50 dB" in text
    assert sweep_decision_markdown("vessel", table, curves.iloc[0:0]) == ""
    assert sweep_convergence(curves.drop(columns="volume_psnr")).empty


def test_a_rule_with_a_recovery_target_ranks_overshoot_as_a_miss():
    from mmdm.study.sweep import FIDELITY_AND_VESSELS, FIDELITY_AND_VESSELS_TO_ONE, get_sweep, rank_points

    table = pd.DataFrame({"point": ["over", "under", "close"], "recovery": [1.30, 0.80, 1.05],
                          "volume_psnr": [25.0, 25.0, 25.0], "val_loss": [0.1, 0.1, 0.1]})
    assert list(rank_points(table, FIDELITY_AND_VESSELS)["point"]) == ["over", "close", "under"]
    assert list(rank_points(table, FIDELITY_AND_VESSELS_TO_ONE)["point"]) == ["close", "under", "over"]
    assert "distance from 1" in FIDELITY_AND_VESSELS_TO_ONE.text and "higher is better" in FIDELITY_AND_VESSELS.text
    assert get_sweep("setup-fidelity").rule == FIDELITY_AND_VESSELS_TO_ONE


def test_the_ema_decision_is_shown_beside_its_reading_with_the_recovery_to_one():
    from mmdm.study.sweep import FIDELITY_AND_VESSELS, rank_points, sweep_decision_markdown

    # the average overshoots (1.3) where raw weights land at 1.05: higher-is-better and to-one disagree
    table = pd.DataFrame({"point": ["a-all", "a-none"], "recovery": [1.3, 1.05], "volume_psnr": [25.0, 25.0],
                          "val_loss": [0.1, 0.1]})
    text = sweep_decision_markdown("ema", rank_points(table, FIDELITY_AND_VESSELS), pd.DataFrame())
    assert "`ema_mode: all` for every method (a: helps" in text
    assert "distance from 1 instead of its height" in text and "`ema_mode: none` (a: does not help)" in text


def test_footing_says_each_rows_training_windows_and_emphasis():
    from mmdm.config import to_dict
    from mmdm.engine.spec import resolve_method_config
    from mmdm.study import api

    assert footing._windows_text({"crops": None}) == "whole slices"
    assert footing._windows_text({"crops": {"size": [48, 40]}}) == "48x40 crops"
    assert footing._windows_text({}) == footing._emphasis_text({}) == "–"  # not recorded
    assert footing._emphasis_text({"emphasis": {"kind": "none"}}) == "none"
    prof = get_profile("smoke")
    runs = {r.name: r for r in study_runs(prof.sources)}
    cfgs = {n: to_dict(resolve_method_config(api.train_config(runs[n], prof, 0, None))) for n in ("pix2pix", "unest")}
    emph = prof.train["emphasis"]
    said = {n: footing._emphasis_text(c, footing._method_settings(c)["pixel_loss"]) for n, c in cfgs.items()}
    assert said["pix2pix"] == f"brightest {100 * emph['fraction']:g} % x{emph['weight']:g}"
    assert said["unest"] == "not applied (no paired pixel term)"  # its objective is unpaired
    assert footing._windows_text(cfgs["pix2pix"]) == ("whole slices" if prof.train["crops"] is None else
                                                      f"{prof.train['crops']['size'][0]}x{prof.train['crops']['size'][1]} crops")


def test_convergence_gains_carry_their_standard_error():
    steps = np.arange(1, 9) * 500  # third quarter: 2500, 3000; last: 3500, 4000
    curve = pd.DataFrame({"step": steps, "psnr": [20, 21, 22, 23, 24.0, 25.0, 25.5, 26.5],
                          "recovery": [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.8, 0.8]})
    v = footing.convergence(curve)
    # independent: var(ddof=1) of (24, 25) and (25.5, 26.5) is 0.5 each, two values each
    assert v["psnr_gain"] == pytest.approx(1.5) and v["psnr_gain_se"] == pytest.approx(np.sqrt(0.5 / 2 + 0.5 / 2))
    # |1 - r|: (0.5, 0.3) and (0.2, 0.2): variances 0.02 and 0
    assert v["recovery_gain"] == pytest.approx(0.2) and v["recovery_gain_se"] == pytest.approx(np.sqrt(0.01))
    one = footing.convergence(curve[curve.step.isin([2500, 3500, 4000])])  # one validation in the third quarter
    assert one["converged"] is not None and np.isnan(one["psnr_gain_se"])
    assert footing._gain_text(v) == "+1.50 ± 0.71 dB, +0.200 ± 0.100 recovery"
    assert footing._gain_text(one).startswith("+2.00 dB, ")  # no ± without a standard error


def test_the_standard_error_matches_the_scatter_of_the_gain_on_noisy_flat_curves():
    rng = np.random.default_rng(1)
    steps = np.arange(1, 21) * 200
    out = [footing.convergence(pd.DataFrame({"step": steps, "psnr": 28.0 + rng.normal(0, 0.5, len(steps)),
                                             "recovery": 0.9})) for _ in range(400)]
    gains, ses = [o["psnr_gain"] for o in out], [o["psnr_gain_se"] for o in out]
    assert np.mean(ses) == pytest.approx(np.std(gains), rel=0.15)
