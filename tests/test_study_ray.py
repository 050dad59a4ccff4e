"""`mmdm study --backend ray`: the smoke study's runs as tasks of a local Ray instance give
the same records as the local backend."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers import study_copy as copy_of_study

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
RUNS = ["mmdm-full", "pix2pix"]


@pytest.fixture()
def study_copy(tmp_path, tiny_cohort):
    with copy_of_study(tmp_path, ROOT, {"phantom-tiny": tiny_cohort}) as work:
        yield work


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ray_backend_gives_the_local_backends_records(study_copy, monkeypatch) -> None:
    import ray

    # one thread per run in both backends (Ray gives each 1-CPU task OMP_NUM_THREADS=1; the local
    # backend keeps a value the user set): the same thread count makes the same floating-point sums
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from mmdm.study.runner import run_study

    work = study_copy
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        lines: list[str] = []
        status = run_study("smoke", only=RUNS, book=False, backend="ray", log=lines.append)
    finally:
        ray.shutdown()
    assert status == {r: "done" for r in RUNS}
    assert sum("[ray]" in line and ": done on" in line for line in lines) == len(RUNS)
    ray_metrics = {r: pd.read_csv(work / "results" / "smoke" / r / "metrics.csv") for r in RUNS}
    # a finished run is skipped on a second call, as with the local backend
    again = run_study("smoke", only=RUNS, book=False, backend="ray", log=lambda s: None)
    assert again == {r: "skipped" for r in RUNS}
    # the same runs with the local backend (2 parallel 1-thread jobs, as Ray's 1-CPU tasks)
    for r in RUNS:
        shutil.rmtree(work / "results" / "smoke" / r)
        shutil.rmtree(work / "runs" / "smoke" / r)
    assert run_study("smoke", only=RUNS, jobs=2, book=False, log=lambda s: None) == {r: "done" for r in RUNS}
    for r in RUNS:
        local = pd.read_csv(work / "results" / "smoke" / r / "metrics.csv")
        pd.testing.assert_frame_equal(local, ray_metrics[r], check_exact=True)
