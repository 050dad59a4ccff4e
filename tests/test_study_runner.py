"""Units of the study runner that need no trained model."""

from __future__ import annotations

from pathlib import Path

from mmdm.study.runner import job_env


def test_parallel_cpu_jobs_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    env = job_env(1, 4, 0, Path("/repo"))
    assert env == {"MMDM_ROOT": "/repo", "OMP_NUM_THREADS": "2"}
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert job_env(0, 3, 0, Path("/repo"))["OMP_NUM_THREADS"] == "1"  # never zero threads


def test_parallel_gpu_jobs_get_one_gpu_each_and_the_users_threads_are_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert [job_env(i, 3, 2, Path("/r"))["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0", "1", "0"]
    assert "OMP_NUM_THREADS" not in job_env(0, 2, 0, Path("/r"))  # the user's setting wins
