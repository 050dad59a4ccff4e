"""benchmarks/gpu_check.py: its CPU dry run, so the GPU check cannot rot while no GPU is around."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gpu_check():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _load()
    torch.set_num_threads(n)


def test_dry_run_measures_every_method_and_the_synthesis(gpu_check, tmp_path) -> None:
    rc = gpu_check.main(["--dry-run", "--device", "cpu", "--out", str(tmp_path), "--parts", "env", "train",
                         "synthesis", "nets"])
    assert rc == 0
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["dry_run"] is True and set(res["parts"]) == {"env", "train", "synthesis", "nets"}
    train = res["parts"]["train"]["entries"]
    assert {e["method"] for e in train} == {m for m, _ in gpu_check.METHODS}
    assert all(e["loss_finite"] and e["step_s_median"] > 0 and e["height_width"] == [32, 32] for e in train)
    syn = res["parts"]["synthesis"]
    assert syn["recommended"]["finite_and_shaped"] and syn["paper"]["finite_and_shaped"]
    assert syn["recommended"]["depth"] == gpu_check.Sizes.dry().volume_depth
    # the paper setting is measured on a slab and extrapolated by window count when it would take long
    p = syn["paper"]
    if p["extrapolated"]:
        expect = p["seconds"] * (p["volume_depth"] - 5 + 1) / p["windows"]
        assert p["volume_seconds_estimate"] == pytest.approx(expect, rel=1e-3)
    nets = res["parts"]["nets"]["entries"]
    assert {(e["bf16"], e["channels_last"]) for e in nets} == {(a, b) for a in (False, True) for b in (False, True)}
    summary = (tmp_path / "summary.md").read_text()
    assert "(dry run)" in summary and "| mmdm | fp32 |" in summary and "**synthesis**: ok" in summary
    assert (tmp_path / "log.txt").read_text().count("== ") == 4


def test_a_failing_part_is_recorded_and_the_others_still_run(gpu_check, tmp_path, monkeypatch) -> None:
    def broken(check):
        raise RuntimeError("simulated CUDA error")

    monkeypatch.setitem(gpu_check.PART_FUNCS, "train", broken)
    rc = gpu_check.main(["--dry-run", "--device", "cpu", "--out", str(tmp_path), "--parts", "env", "train", "ddp"])
    assert rc == 1
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["parts"]["train"]["ok"] is False and "simulated CUDA error" in res["parts"]["train"]["error"]
    assert res["parts"]["env"]["ok"] and "skipped" in res["parts"]["ddp"]
    assert "**train**: FAILED" in (tmp_path / "summary.md").read_text()


def test_without_a_gpu_the_real_check_refuses_with_a_hint(gpu_check, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", "/tmp/unused"])
    assert "--dry-run" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_dry_run_includes_a_tiny_trained_and_evaluated_run(gpu_check, tmp_path) -> None:
    rc = gpu_check.main(["--dry-run", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    run = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["run"]
    assert run["ok"] and run["steps"] == gpu_check.Sizes.dry().run_steps
    assert set(run["summary"]["metrics"]) >= {"psnr", "ssim", "mip_psnr"}
    assert run["loss"]["logged"] >= 1


def test_the_frontier_setting_is_the_recommended_choice_of_the_committed_frontier(gpu_check, tmp_path,
                                                                                 monkeypatch) -> None:
    import pandas as pd

    from mmdm.study.frontier import recommend

    rows = [{"subject": "sub-a", "mode": mode, "stride": stride, "steps": steps, "windows": 100 // stride,
             "wall_s": steps / stride * (2 if mode == "independent" else 1), "psnr": 30 - 3 / steps - 0.01 * stride,
             "mip_psnr": 25.0, "ssim": 0.9, "cldice": 0.5, "dice": 0.5}
            for mode in ("coupled", "independent") for stride in (1, 2, 5) for steps in (5, 10, 50)]
    path = tmp_path / "results" / "standard" / "analysis" / "frontier"
    path.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path / "frontier.csv", index=False)
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    got = gpu_check.frontier_recommendation()
    choice = recommend(pd.DataFrame(rows))["choice"]
    assert (got["steps"], got["stride"], got["mode"]) == (choice["steps"], choice["stride"], choice["mode"])
    assert got["source"].startswith("results/standard")  # not the fallback default
