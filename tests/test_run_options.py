"""Run options (a named change of one run's set-up, trained as an extra run) and the tables and
notes built on them: the emphasis ablation, the runs that drew no vessels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmdm.config import ConfigError, to_dict
from mmdm.study import api
from mmdm.study.profiles import get_profile


def test_option_run_is_named_after_its_run_and_fills_no_table():
    from mmdm.study.runs import find_run, option_spec, run_name

    spec = option_spec(find_run("mmdm-full"), "no-emphasis")
    assert (spec.name, spec.method, spec.variant, spec.option, spec.tables) == (
        "mmdm-full-no-emphasis", "mmdm", "full", "no-emphasis", ())
    assert run_name("mmdm", "full", ("T1w", "T2w"), ("T1w", "T2w", "FLAIR"), seed=2, option="no-emphasis") \
        == "mmdm-full-T1w+T2w-no-emphasis-s2"
    with pytest.raises(KeyError, match="known: no-emphasis"):
        option_spec(find_run("bbdm"), "no-such-option")
    with pytest.raises(ValueError, match="already has the option"):
        option_spec(spec, "no-emphasis")


def test_no_emphasis_changes_only_the_emphasis_of_the_training_config():
    prof = get_profile("standard")
    plain = api.train_config(api.make_spec("pix2pix", None, "", prof), prof)
    spec = api.make_spec("pix2pix", None, "", prof, 0, "no-emphasis")
    assert spec.name == "pix2pix-no-emphasis"
    changed = api.train_config(spec, prof)
    assert plain.emphasis.kind == "top_fraction" and changed.emphasis.kind == "none"
    a, b = to_dict(plain), to_dict(changed)
    assert {k for k in a if a[k] != b[k]} == {"emphasis"}
    with pytest.raises(ConfigError, match="unknown run option 'bogus'"):
        api.make_spec("pix2pix", None, "", prof, 0, "bogus")


def _per_subject(values: dict[str, list[float]], metric: str = "psnr") -> pd.DataFrame:
    return pd.DataFrame([{"run": run, "subject": f"sub-{i:03d}", metric: v} for run, vs in values.items()
                         for i, v in enumerate(vs)])


def test_option_runs_resolve_the_strongest_baseline_from_seed_zero_records(monkeypatch):
    from mmdm.study import runner
    from mmdm.study.runs import baselines

    prof = get_profile("standard")
    values = {b: [20.0, 21.0] for b in baselines()}
    values["bbdm"] = [30.0, 31.0]
    monkeypatch.setattr(runner, "load_records", lambda _: (_per_subject(values), pd.DataFrame()))
    items = runner.select_option_runs(prof)
    assert [(s.name, s.option, seed) for s, seed in items] == [("mmdm-full-no-emphasis", "no-emphasis", 0),
                                                              ("bbdm-no-emphasis", "no-emphasis", 0),
                                                              ("ddpm-x0-prediction", "x0-prediction", 0)]
    assert runner.run_parameters(items[1][0], prof, 0, None)["option"] == "no-emphasis"
    assert [s.name for s, _ in runner.select_option_runs(prof, only=["bbdm-no-emphasis"])] == ["bbdm-no-emphasis"]
    # --only accepts option runs, and still rejects names that are none of the profile's runs
    assert runner.select_runs(prof, ["bbdm-no-emphasis"]) == []
    with pytest.raises(KeyError, match="run options: no-emphasis, x0-prediction"):
        runner.select_runs(prof, ["bbdm-no-such"])
    # while a baseline has no record, the strongest one is not decided: only MMDM full's extra run
    del values["rddm"]
    notes = []
    assert [s.name for s, _ in runner.select_option_runs(prof, log=notes.append)] == ["mmdm-full-no-emphasis",
                                                                                    "ddpm-x0-prediction"]
    assert "rddm" in notes[0]


def test_option_table_pairs_each_run_with_its_option_run_by_subject():
    from mmdm.stats import holm, wilcoxon_p
    from mmdm.study.tables import option_pairs, option_table

    rng = np.random.default_rng(0)
    a, b = rng.normal(25, 1, 8), rng.normal(24, 1, 8)
    c = rng.normal(30, 1, 8)
    ps = _per_subject({"mmdm-full": list(a), "mmdm-full-no-emphasis": list(b), "bbdm": list(c)})
    ps = ps.sample(frac=1.0, random_state=1)  # order must not matter: pairs are matched by subject
    assert option_pairs(ps, "no-emphasis") == [("mmdm-full", "mmdm-full-no-emphasis")]
    t = option_table(ps, "no-emphasis", metrics=("psnr",), n_boot=200)
    row = t.loc[("mmdm-full", "PSNR")]
    assert row["as in Tables 1-3"] == f"{a.mean():.2f} ± {a.std(ddof=1):.2f}"
    assert row["no-emphasis run"] == f"{b.mean():.2f} ± {b.std(ddof=1):.2f}"
    assert row["difference (95 % CI)"].startswith(f"{(a - b).mean():.2f} [")
    assert row["p (Holm)"] == f"{holm([wilcoxon_p(a - b)])[0]:.3g}"
    assert option_table(_per_subject({"bbdm": [1.0, 2.0]}), "no-emphasis").empty


def test_vessel_shortfalls_list_table_runs_below_the_threshold_with_their_curve_and_reason():
    from mmdm.study.records import NO_VESSELS_WHY, vessel_shortfalls

    runs = pd.DataFrame({"run": ["mmdm-full", "pix2pix", "pix2pix-s1", "bbdm"], "method": ["mmdm", "pix2pix",
                                                                                       "pix2pix", "bbdm"],
                         "vessel_recovery": [0.6, 0.01, 0.02, 0.1]})
    curves = pd.DataFrame({"run": ["pix2pix"] * 3 + ["mmdm-full"], "method": ["pix2pix"] * 3 + ["mmdm"],
                           "step": [200, 400, 600, 200], "recovery": [0.02, 0.07, np.nan, 0.5], "psnr": np.nan})
    short = vessel_shortfalls(runs, curves, only=["mmdm-full", "pix2pix", "bbdm"]).set_index("run")
    assert list(short.index) == ["pix2pix", "bbdm"]  # mmdm-full is above, pix2pix-s1 is no table row
    assert short.loc["pix2pix", "best_validation"] == pytest.approx(0.07)
    assert (short.loc["pix2pix", "best_step"], short.loc["pix2pix", "last_step"]) == (400, 600)
    assert short.loc["pix2pix", "why"] == NO_VESSELS_WHY["pix2pix"]
    assert np.isnan(short.loc["bbdm", "best_validation"]) and short.loc["bbdm", "why"] == ""


def test_labelled_row_follows_its_published_row_only_where_its_record_exists():
    from mmdm.study.runs import find_run, labelled_rows, option_spec
    from mmdm.study.tables import results_table, table_rows

    spec = option_spec(find_run("ddpm"), "x0-prediction")
    assert spec.name == "ddpm-x0-prediction" and spec.tables == ("table1",)
    assert spec.labels["table1"].startswith("DDPM (") and "not the published" in spec.labels["table1"]
    assert option_spec(find_run("mmdm-base"), "x0-prediction").tables == ()  # only tables of its run
    assert [r.name for r in labelled_rows()] == ["ddpm-x0-prediction"]
    plain = [run for _, run in table_rows("table1")]
    assert "ddpm-x0-prediction" not in plain and table_rows("table1", present={"bbdm"}) == table_rows("table1")
    rows = [run for _, run in table_rows("table1", present={"ddpm-x0-prediction"})]
    assert rows == plain[:2] + ["ddpm-x0-prediction"] + plain[2:] and plain[1] == "ddpm"
    ps = _per_subject({"ddpm": [6.0, 7.0], "ddpm-x0-prediction": [20.0, 22.0], "mmdm-full": [25.0, 26.0]})
    t = results_table("table1", ps, metrics=("psnr",), with_paper=True)
    assert t.loc[spec.labels["table1"], "PSNR (ours)"] == "21.00 ± 1.41"
    assert t.loc[spec.labels["table1"], "PSNR (paper)"] == "–"  # the paper has no such row


def test_x0_prediction_option_trains_ddpm_on_x0_and_says_so():
    from mmdm.methods import build_method

    prof = get_profile("standard")
    spec = api.make_spec("ddpm", None, "", prof, 0, "x0-prediction")
    cfg = api.train_config(spec, prof)
    assert cfg.method_kwargs["prediction"] == "x0" and cfg.emphasis.kind == "top_fraction"
    method = build_method(cfg.method, **cfg.method_kwargs)
    assert method.cfg.prediction == "x0" and method.objective().startswith("x0 prediction")
    plain = build_method("ddpm", **api.train_config(api.make_spec("ddpm", None, "", prof), prof).method_kwargs)
    assert plain.objective().startswith("eps prediction")


def test_figure_labels_name_a_labelled_row_by_its_option():
    from mmdm.study.tables import short_labels

    labels = short_labels("table1", present={"ddpm-x0-prediction"})
    assert labels["ddpm"] == "DDPM" and labels["ddpm-x0-prediction"] == "DDPM (x0-prediction)"
    assert labels["mmdm-full"] == "MMDM" and "ddpm-x0-prediction" not in short_labels("table1")


def test_records_carry_the_distance_of_the_recovery_from_one(tmp_path):
    import json

    from mmdm.study.records import VESSEL_SCORE_HIGHER_IS_BETTER, load_records
    from mmdm.study.tables import OPTION_METRICS

    rec = tmp_path / "mmdm-full"
    rec.mkdir()
    (rec / "summary.json").write_text(json.dumps({"method": "mmdm"}))
    pd.DataFrame({"subject": ["a", "b", "c"], "psnr": [20.0, 21.0, 22.0]}).to_csv(rec / "metrics.csv", index=False)
    pd.DataFrame({"subject": ["a", "b", "c"], "vessel_recovery": [1.3, 0.8, np.nan]}).to_csv(
        rec / "vessel_metrics.csv", index=False)
    ps, _ = load_records(tmp_path)
    err = ps.set_index("subject")["vessel_contrast_error"]
    assert err["a"] == pytest.approx(0.3) and err["b"] == pytest.approx(0.2) and np.isnan(err["c"])
    assert VESSEL_SCORE_HIGHER_IS_BETTER["vessel_contrast_error"] is False  # an overshoot is a miss
    assert OPTION_METRICS.index("vessel_contrast_error") == OPTION_METRICS.index("vessel_recovery") + 1
