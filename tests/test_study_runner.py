"""Units of the study runner that need no trained model."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmdm.study.runner import job_env, jobs_message


def test_parallel_cpu_jobs_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    env = job_env(1, 4, 0, Path("/repo"))
    assert env == {"MMDM_ROOT": "/repo", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    assert job_env(0, 1, 0, Path("/repo"))["OMP_NUM_THREADS"] == "8"  # one job: every core, said explicitly
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert job_env(0, 3, 0, Path("/repo"))["OMP_NUM_THREADS"] == "1"  # never zero threads


def test_job_threads_is_cores_divided_by_jobs_and_the_log_says_so(monkeypatch):
    from mmdm.study.backends import job_threads
    from mmdm.study.runner import jobs_message

    assert [job_threads(n, 16) for n in (1, 2, 3, 4, 16, 40)] == [16, 8, 5, 4, 1, 1]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert jobs_message(2, 0).startswith("[jobs] 2 jobs on 2 cores: 1 thread each")
    assert "2 threads each" in jobs_message(1, 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "set by the user" in jobs_message(1, 0)


@pytest.mark.parametrize("jobs,cores,expected", [(2, 4, 2), (4, 4, 1)])
def test_a_job_process_runs_torch_on_its_share_of_the_cores(monkeypatch, jobs, cores, expected):
    """The environment a job gets, seen from inside a new process (as a notebook's kernel or a
    papermill subprocess sees it): torch's intra-op pool has cores // jobs threads."""
    import os
    import subprocess
    import sys

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    env = job_env(0, jobs, 0, Path("/repo"))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = "import os, torch; print(torch.get_num_threads(), os.environ['MKL_NUM_THREADS'])"
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(expected), str(expected)]


def test_the_in_process_job_environment_is_set_for_the_block_only(monkeypatch):
    import os

    from mmdm.study.runner import environ_set

    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with environ_set({"MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}):
        assert os.environ["MKL_NUM_THREADS"] == os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert os.environ["MKL_NUM_THREADS"] == "7" and "OPENBLAS_NUM_THREADS" not in os.environ


def test_ray_tasks_get_their_cpus_as_threads_and_apply_them(monkeypatch):
    import os

    import torch

    monkeypatch.setattr(os, "environ", dict(os.environ))  # set_job_threads writes the environment

    from mmdm.study.backends import RayBackend, set_job_threads

    env = RayBackend.task_env({"MMDM_ROOT": "/r"}, {"num_gpus": 0, "num_cpus": 3})
    assert env == {"MMDM_ROOT": "/r", "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3"}
    assert RayBackend.task_env({"OMP_NUM_THREADS": "1"}, {"num_gpus": 0, "num_cpus": 3}) == {"OMP_NUM_THREADS": "1"}
    assert "OMP_NUM_THREADS" not in RayBackend.task_env({}, {"num_gpus": 1, "num_cpus": 4})
    n = torch.get_num_threads()
    try:
        assert set_job_threads({"OMP_NUM_THREADS": "1"}) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
    assert set_job_threads({}) is None


def test_parallel_gpu_jobs_get_one_gpu_each_and_the_users_threads_are_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert [job_env(i, 3, 2, Path("/r"))["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0", "1", "0"]
    assert "OMP_NUM_THREADS" not in job_env(0, 2, 0, Path("/r"))  # the user's setting wins
    assert "OMP_NUM_THREADS" not in job_env(0, 2, 1, Path("/r"))
    assert "up to 2 per GPU" in jobs_message(3, 2) and "one GPU each" in jobs_message(2, 2)


def test_jobs_sharing_a_gpu_share_the_cpu_cores_too(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    envs = [job_env(i, 8, 1, Path("/r")) for i in range(8)]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} == {"0"}
    assert {e["OMP_NUM_THREADS"] for e in envs} == {"2"}  # 16 cores // 8 jobs


def test_invocation_is_a_papermill_command_that_reproduces_the_parameters(monkeypatch):
    import shlex

    from mmdm.study.runner import notebook_invocation

    monkeypatch.setattr("sys.argv", ["/some/bin/mmdm", "study", "--profile", "standard"])
    cmd = notebook_invocation("02_train", {"profile": "standard", "variant": "", "sources": "T1w,T2w", "seed": 2})
    papermill, run_by = cmd.split(" (run by: ")
    args = shlex.split(papermill)
    assert args[:3] == ["papermill", "notebooks/02_train.ipynb", "OUT.ipynb"]
    pairs = {args[i + 1]: args[i + 2] for i in range(3, len(args), 3) if args[i] == "-p"}
    assert pairs == {"profile": "standard", "variant": "", "sources": "T1w,T2w", "seed": "2"}
    assert run_by == "mmdm study --profile standard)"


def test_run_provenance_records_the_drivers_invocation(tmp_path, monkeypatch):
    import json

    from mmdm.engine.rundir import INVOCATION_ENV, start_session

    monkeypatch.setenv(INVOCATION_ENV, "papermill notebooks/02_train.ipynb OUT.ipynb -p seed 1")
    start_session(tmp_path / "a", profile="smoke", seed=1, device="cpu")
    assert json.loads((tmp_path / "a" / "provenance.json").read_text())["command"].endswith("-p seed 1")
    monkeypatch.delenv(INVOCATION_ENV)
    monkeypatch.setattr("sys.argv", ["mmdm", "train", "--steps", "3"])
    start_session(tmp_path / "b", profile=None, seed=0, device="cpu")
    assert json.loads((tmp_path / "b" / "provenance.json").read_text())["command"] == "mmdm train --steps 3"


# ---------------------------------------------------------------------------- seeds

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402


def _per_subject(values: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"run": run, "subject": f"sub-{i}", "psnr": v} for run, vs in values.items()
                         for i, v in enumerate(vs)])


def test_seed_names_round_trip():
    from mmdm.study.seeds import seeded_name, split_seed

    for run in ("mmdm-full", "mmdm-full-T1w+T2w", "pix2pix"):
        for seed in (0, 1, 12):
            assert split_seed(seeded_name(run, seed)) == (run, seed)
    assert split_seed("mmdm-s0") == ("mmdm-s0", 0)  # -s0 is not a seed suffix: seed 0 has none


def test_strongest_baseline_is_decided_by_seed_zero_records_of_every_baseline():
    from mmdm.study.runs import baselines
    from mmdm.study.seeds import resolve_seed_runs, strongest_baseline

    values = {b: [20.0 + i, 20.0 + i] for i, b in enumerate(baselines())}
    values["resvit"] = [40.0, 41.0]
    values["mmdm-full"] = [50.0, 50.0]  # not a baseline
    per_subject = _per_subject(values)
    assert strongest_baseline(per_subject) == "resvit"
    names, notes = resolve_seed_runs(["mmdm-full", "strongest-baseline", "mmdm-full"], per_subject)
    assert names == ["mmdm-full", "resvit"] and not notes
    partial = per_subject[per_subject.run != "rddm"]
    names, notes = resolve_seed_runs(["strongest-baseline"], partial)
    assert names == [] and "rddm" in notes[0]
    with pytest.raises(KeyError, match="not a run of the study"):
        resolve_seed_runs(["mmdm-fast"], per_subject)


def test_seed_specs_repeat_the_run_with_seeded_names():
    from mmdm.study.seeds import seed_specs

    specs = seed_specs(["mmdm-base", "bbdm"], (0, 1, 2))
    assert [(s.name, seed) for s, seed in specs] == [("mmdm-base-s1", 1), ("mmdm-base-s2", 2), ("bbdm-s1", 1),
                                                      ("bbdm-s2", 2)]
    assert specs[0][0].method == "mmdm" and specs[0][0].variant == "base" and specs[2][0].variant is None


def test_seed_spread_and_differences_against_a_direct_computation():
    from mmdm.study.seeds import seed_differences, seed_spread

    per_subject = _per_subject({"mmdm-full": [30, 32], "mmdm-full-s1": [31, 35], "mmdm-full-s2": [29, 29],
                                "mmdm-base": [28, 28], "mmdm-base-s1": [27, 29], "bbdm": [10, 12]})
    spread = seed_spread(per_subject, ["psnr"]).set_index("run")
    assert set(spread.index) == {"mmdm-full", "mmdm-base"}  # bbdm has one seed only
    full_means = np.array([31.0, 33.0, 29.0])
    assert spread.loc["mmdm-full", "psnr_mean"] == pytest.approx(full_means.mean())
    assert spread.loc["mmdm-full", "psnr_sd"] == pytest.approx(full_means.std(ddof=1))
    assert spread.loc["mmdm-full", "seeds"] == "0,1,2"
    d = seed_differences(per_subject, ["psnr"]).iloc[0]
    base_means = np.array([28.0, 28.0])
    assert d.other == "mmdm-base" and d.difference == pytest.approx(full_means.mean() - base_means.mean())
    se = np.sqrt(full_means.var(ddof=1) / 3 + base_means.var(ddof=1) / 2)
    assert d.se_difference == pytest.approx(se)


def test_seed_tables_are_empty_but_well_formed_with_one_seed_per_run():
    from mmdm.study.seeds import seed_differences, seed_spread
    from mmdm.study.tables import seed_difference_table, seed_table

    for per_subject in (_per_subject({"mmdm-full": [30, 31], "bbdm": [20, 21]}), _per_subject({})):
        assert seed_spread(per_subject, ["psnr"]).empty and seed_differences(per_subject, ["psnr"]).empty
        assert seed_table(per_subject).empty and seed_difference_table(per_subject).empty


def test_select_runs_accepts_seed_runs_and_analyses_and_rejects_the_rest():
    from mmdm.study.profiles import get_profile
    from mmdm.study.runner import select_runs

    prof = get_profile("standard")
    assert [r.name for r in select_runs(prof, ["bbdm", "mmdm-full-s2", "frontier"])] == ["bbdm"]
    with pytest.raises(KeyError, match="mmdm-full-s7"):
        select_runs(prof, ["mmdm-full-s7"])  # seed 7 is not one of the profile's seeds


# ---------------------------------------------------------------------------- uncertainty


def test_uncertainty_that_equals_the_error_correlates_perfectly():
    from mmdm.study.uncertainty import uncertainty_stats

    rng = np.random.default_rng(0)
    target = rng.uniform(size=(20, 20, 10))
    err = rng.uniform(0, 0.2, size=target.shape)
    stats, bins = uncertainty_stats(target + err, err, target)
    assert stats["pearson_r"] == pytest.approx(1.0) and stats["spearman_rho"] == pytest.approx(1.0)
    assert stats["mean_abs_error"] == pytest.approx(err.mean())
    top = np.sort(err.ravel())[-len(err.ravel()) // 10:]
    assert stats["top_decile_error_share"] == pytest.approx(top.sum() / err.sum())
    assert np.all(np.diff(bins.abs_error_mean) > 0) and bins.n_voxels.sum() == err.size


def test_uncertainty_unrelated_to_the_error_does_not_correlate_and_the_mask_counts():
    from mmdm.study.uncertainty import uncertainty_stats

    rng = np.random.default_rng(1)
    target = np.zeros((40, 40, 20))
    pred = rng.normal(0, 0.1, size=target.shape)
    std = rng.uniform(size=target.shape)
    mask = np.zeros(target.shape, bool)
    mask[5:35, 5:35, 2:18] = True
    stats, _ = uncertainty_stats(pred, std, target, mask)
    assert abs(stats["pearson_r"]) < 0.05 and abs(stats["spearman_rho"]) < 0.05
    assert stats["top_decile_error_share"] == pytest.approx(0.1, abs=0.02)
    assert stats["n_voxels"] == mask.sum()
    const, _ = uncertainty_stats(pred, np.ones_like(std), target, mask)
    assert np.isnan(const["pearson_r"]) and np.isnan(const["spearman_rho"])
    with pytest.raises(ValueError, match="one shape"):
        uncertainty_stats(pred, std[:-1], target)


# ---------------------------------------------------------------------------- frontier


def _frontier_table() -> pd.DataFrame:
    rows = []
    for subject, bias in (("sub-a", 0.0), ("sub-b", 1.0)):
        for mode, mode_cost, mode_q in (("coupled", 1.0, 0.0), ("independent", 1.0, -0.5)):
            for stride in (1, 2, 5):
                for steps in (10, 50, 200):
                    wall = mode_cost * steps / stride
                    psnr = 30 + bias + mode_q - 2.0 / np.sqrt(steps) - 0.05 * stride
                    rows.append({"subject": subject, "mode": mode, "stride": stride, "steps": steps,
                                 "windows": 100 // stride, "wall_s": wall, "psnr": psnr, "mip_psnr": psnr - 5,
                                 "ssim": 0.9, "cldice": 0.5, "dice": 0.5})
    return pd.DataFrame(rows)


def test_frontier_recommendation_is_the_cheapest_setting_within_tolerance():
    from mmdm.study.frontier import recommend, summarise

    t = _frontier_table()
    rec = recommend(t, tol_db=0.2)
    assert rec["reference"]["steps"] == 200 and rec["reference"]["stride"] == 1
    assert rec["reference"]["mode"] == "coupled"
    s = summarise(t)
    ref_psnr = s[(s["mode"] == "coupled") & (s.stride == 1) & (s.steps == 200)].psnr.iloc[0]
    ok = s[s.psnr >= ref_psnr - 0.2]
    best = ok.loc[ok.wall_s.idxmin()]
    assert (rec["choice"]["mode"], rec["choice"]["stride"], rec["choice"]["steps"]) == (best["mode"], best.stride,
                                                                                           best.steps)
    assert rec["choice"]["psnr"] >= ref_psnr - 0.2 and rec["speedup"] == pytest.approx(200 / best.wall_s)
    # a zero tolerance keeps only settings at least as good as the reference
    strict = recommend(t, tol_db=0.0)
    assert strict["choice"]["psnr"] >= ref_psnr - 1e-12


def test_frontier_sensitivity_is_the_largest_effect_of_each_factor_alone():
    from mmdm.study.frontier import sensitivity

    t = _frontier_table()
    sens = sensitivity(t)
    # psnr = c + mode_q - 2/sqrt(steps) - 0.05 stride (constructed above): the effects are separable
    assert sens["steps"] == pytest.approx(2 / np.sqrt(10) - 2 / np.sqrt(200))
    assert sens["stride"] == pytest.approx(0.05 * 4)
    assert sens["mode"] == pytest.approx(0.5)
    assert np.isnan(sensitivity(t[t.stride == 2])["stride"])  # a factor with one value has no effect to measure


def test_frontier_pareto_set_has_no_dominated_setting():
    from mmdm.study.frontier import pareto, summarise

    t = _frontier_table()
    front, s = pareto(t), summarise(t)
    key = lambda r: (r["mode"], int(r["stride"]), int(r["steps"]))  # noqa: E731
    # brute force: the settings that no other setting beats on time (<=) and PSNR (>, or >= and faster)
    undominated = {key(r) for _, r in s.iterrows()
                   if not ((s.wall_s <= r.wall_s) & (s.psnr > r.psnr)).any()
                   and not ((s.wall_s < r.wall_s) & (s.psnr >= r.psnr)).any()}
    assert len(undominated) >= 2 and len(undominated) < len(s)  # a real trade-off, not everything
    assert {key(r) for _, r in front.iterrows()} == undominated
    assert front.wall_s.is_monotonic_increasing and front.psnr.is_monotonic_increasing


def test_frontier_grid_validates():
    from mmdm.study.frontier import grid

    g = grid([50, 10], [5, 1], ["coupled"])
    assert [(x["stride"], x["steps"]) for x in g] == [(1, 10), (1, 50), (5, 10), (5, 50)]
    with pytest.raises(ValueError, match=">= 1"):
        grid([0], [1], ["coupled"])
    with pytest.raises(ValueError, match="at least one"):
        grid([], [1], ["coupled"])


def test_records_only_executes_the_result_notebooks_and_trains_nothing(monkeypatch, tmp_path):
    import mmdm.study.api as api
    import mmdm.study.runner as runner

    monkeypatch.setenv("MMDM_ROOT", str(tmp_path))
    executed = []
    monkeypatch.setattr(runner, "execute", lambda name, out, params, log, env=None: executed.append(name))
    monkeypatch.setattr(api, "ensure_data", lambda profile: tmp_path)
    monkeypatch.setattr(runner, "build_book", lambda root, log, profile: executed.append("book"))
    status = runner.run_study("smoke", records_only=True, log=lambda s: None)
    assert status == {}
    assert executed == ["01_data", *runner.AGGREGATE_NOTEBOOKS, "book"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_runs_without_vessels_are_those_with_no_component_in_any_subject():
    from mmdm.study.records import runs_without_vessels

    ps = pd.DataFrame({"run": ["a", "a", "b", "b", "c"], "subject": ["s1", "s2", "s1", "s2", "s1"],
                       "components_pred": [0, 3, 0, 0, 0]})
    assert runs_without_vessels(ps) == (["b", "c"], 3)
    assert runs_without_vessels(ps.drop(columns="components_pred")) is None


def test_notebook_kernels_run_quietly_and_notebook_errors_stay_visible(monkeypatch, tmp_path, capfd):
    """The kernel's transport warning and the shutdown's "KeyboardInterrupt caught in kernel" no longer
    reach the study's output; a failing cell still raises with its traceback."""
    import nbformat
    from papermill.exceptions import PapermillExecutionError

    import mmdm.study.runner as runner

    def write(name: str, code: str) -> Path:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell(code)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        path = tmp_path / f"{name}.ipynb"
        nbformat.write(nb, str(path))
        return path

    books = {"ok": write("ok", "print(x + 1)"), "bad": write("bad", "raise ValueError('cell fails on purpose')")}
    monkeypatch.setattr(runner, "notebook", lambda name: books[name])
    capfd.readouterr()
    runner.execute("ok", tmp_path / "out" / "ok.ipynb", {"x": 41}, log=lambda s: None)
    err = capfd.readouterr().err
    assert not any(noise in err for noise in runner.KERNEL_NOISE), err
    assert "42" in (tmp_path / "out" / "ok.ipynb").read_text()  # it did run, with the parameter
    with pytest.raises(PapermillExecutionError, match="cell fails on purpose"):
        runner.execute("bad", tmp_path / "out" / "bad.ipynb", {"x": 1}, log=lambda s: None)
    assert runner.without_kernel_noise("a\n[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel\nb\n") == "a\nb\n"


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_run_never_stops_the_study(monkeypatch, tmp_path, jobs):
    """One run's notebook fails (and one analysis): the other runs finish, the aggregate notebooks and
    the book still run, and the study ends with an error naming each failure and its notebook."""
    import mmdm.study.api as api
    import mmdm.study.runner as runner
    from mmdm.study.backends import LocalBackend

    monkeypatch.setenv("MMDM_ROOT", str(tmp_path))
    executed, lock = [], __import__("threading").Lock()

    class CellError(Exception):  # what papermill raises for a failing cell
        ename, evalue = "ValueError", "loss is NaN"

    def execute(name, out, params, log, env=None):
        with lock:
            executed.append((name, params.get("method"), params.get("variant")))
        if name == "02_train" and params.get("method") == "pix2pix":
            raise CellError("long papermill traceback\n...")

    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(api, "ensure_data", lambda profile: tmp_path)
    monkeypatch.setattr(runner, "build_book", lambda root, log, profile: executed.append(("book", None, None)))
    monkeypatch.setattr(runner, "select_seed_runs", lambda profile, only, log: [])
    monkeypatch.setattr(runner, "select_option_runs", lambda profile, only, log: [])
    monkeypatch.setattr(runner, "ensure_uncertainty", lambda profile, device, log: None)

    def frontier(profile, device, log):
        raise FileNotFoundError("runs/smoke/mmdm-full has no checkpoint")

    monkeypatch.setattr(runner, "ensure_frontier", frontier)
    with pytest.raises(runner.StudyIncomplete) as info:
        runner.run_study("smoke", only=["mmdm-full", "pix2pix", "ddpm", "frontier"], jobs=jobs, log=lambda s: None)
    msg = str(info.value)
    assert set(info.value.failures) == {"pix2pix", "frontier"}
    assert "pix2pix: ValueError: loss is NaN (see " in msg and "pix2pix/02_train.ipynb" in msg
    assert "frontier: FileNotFoundError: runs/smoke/mmdm-full has no checkpoint" in msg
    trained = {m for n, m, _ in executed if n == "03_evaluate"}
    assert trained == {"mmdm", "ddpm"}  # the runs after the failing one still ran
    assert [n for n, _, _ in executed if n in (*runner.AGGREGATE_NOTEBOOKS, "book")] == \
        [*runner.AGGREGATE_NOTEBOOKS, "book"]
    # the CLI exits non-zero with that list
    from mmdm.cli import main as mmdm_main

    assert mmdm_main(["study", "--profile", "smoke", "--only", "pix2pix", "--no-book"]) == 2
    # and the local backend's outcomes are those of the Ray backend
    out = LocalBackend(jobs).map(lambda name, v: {"seconds": 0.0} if v else 1 / 0, [("a", (1,)), ("b", (0,))],
                                 log=lambda s: None)
    assert out["a"].ok and not out["b"].ok and out["b"].error == "ZeroDivisionError: division by zero"


def test_an_unknown_only_name_is_refused_before_the_cohort_is_built(monkeypatch, tmp_path):
    import mmdm.study.api as api
    import mmdm.study.runner as runner

    monkeypatch.setenv("MMDM_ROOT", str(tmp_path))

    def no_cohort(profile):
        raise AssertionError("the cohort was built before --only was checked")

    monkeypatch.setattr(api, "ensure_data", no_cohort)
    with pytest.raises(KeyError, match="unknown run\\(s\\) \\['bogus'\\]"):
        runner.run_study("smoke", only=["bogus"], log=lambda s: None)


def test_the_study_log_keeps_lines_whole_when_jobs_log_at_once():
    import threading
    import time

    from mmdm.study.runner import serialized

    out: list[str] = []

    def slow_print(msg: str) -> None:  # as print does: the text, then its newline, in two writes
        out.append(msg)
        time.sleep(0.002)
        out.append("\n")

    log = serialized(slow_print)
    threads = [threading.Thread(target=lambda k=k: [log(f"job {k} line {i}") for i in range(20)]) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = "".join(out).splitlines()
    assert len(lines) == 80 and all(line.startswith("job ") and line.count("line") == 1 for line in lines)
