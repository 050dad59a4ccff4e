"""The Ray backend of the study runner (mmdm.study.backends) on a local Ray instance."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from mmdm.study.backends import RayBackend, require_ray

ray = pytest.importorskip("ray")


def _ok(name: str, value: int, env: dict) -> dict:
    return {"node": "here", "seconds": 0.0, "value": value, "threads": env.get("OMP_NUM_THREADS")}


def _fails(name: str, value: int, env: dict) -> dict:
    if value == 1:
        raise RuntimeError(f"notebook 02_train failed for {name}; see runs/x/02_train.ipynb")
    return {"node": "here", "seconds": 0.0}


def _dies_once(name: str, marker: str, env: dict) -> dict:
    """Kills its own worker process on the first attempt (as a lost node would)."""
    path = Path(marker)
    attempts = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempts))
    if attempts == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"node": "here", "seconds": 0.0, "attempts": attempts}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    yield
    ray.shutdown()


@pytest.mark.timeout(300)
def test_failing_run_is_reported_and_the_others_finish(local_ray) -> None:
    lines: list[str] = []
    out = RayBackend().map(_fails, [(f"run{i}", (i, {})) for i in range(3)], log=lines.append)
    assert set(out) == {"run0", "run1", "run2"}
    assert out["run0"].ok and out["run2"].ok and not out["run1"].ok
    assert "RuntimeError" in out["run1"].error and "02_train.ipynb" in out["run1"].error
    assert any("run1: FAILED" in line for line in lines)


@pytest.mark.timeout(300)
def test_a_task_whose_worker_dies_is_retried(local_ray, tmp_path) -> None:
    marker = tmp_path / "attempts"
    out = RayBackend(max_retries=2).map(_dies_once, [("run", (str(marker), {}))], log=lambda s: None)
    assert out["run"].ok
    assert marker.read_text() == "2"  # killed once, then run again


@pytest.mark.timeout(300)
def test_cpu_runs_share_the_cores(local_ray) -> None:
    backend = RayBackend()
    opts = backend.resources(ray, n_runs=2)
    assert opts == {"num_gpus": 0, "num_cpus": 1}  # 2 cores over 2 runs
    assert backend.resources(ray, n_runs=1)["num_cpus"] == 2
    assert RayBackend(cpus_per_run=1).resources(ray, n_runs=1)["num_cpus"] == 1


def test_missing_ray_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[cluster\]'"):
        require_ray()
