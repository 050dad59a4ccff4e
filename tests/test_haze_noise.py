"""benchmarks/haze_noise.py (the start noises it compares, its recorded verdict against its own rule) and
benchmarks/grid_lines.py (lines along the slice axis, a pattern on the patch grid)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """A benchmark script as a module (benchmarks/ is not a package the tests import from)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def haze_noise():
    return _load("haze_noise")


class _Process:
    """RDDM's start ``I_in + betabar_T eps`` with betabar_T = 0.5."""

    def start(self, x_in, noise):
        return x_in + 0.5 * noise


def test_volume_noise_gives_every_window_of_a_slice_the_same_noise(haze_noise):
    window, starts = 3, [0, 1, 2, 3]
    vol = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(0))  # (H, W, Z)
    starter = haze_noise.StartNoise(_Process(), "volume", starts, window, 3, vol)
    x_in = torch.zeros(3, window, 4, 6)
    first = starter(x_in, torch.randn(3, window, 4, 6))  # windows starting at 0, 1, 2
    second = starter(torch.zeros(1, window, 4, 6), torch.randn(1, window, 4, 6))  # the window at 3
    # slice 2 lies in all four windows (its position 2, 1, 0 in the first three, 2 - 3 < 0 not in the last)
    torch.testing.assert_close(first[0, 2], first[1, 1])
    torch.testing.assert_close(first[1, 1], first[2, 0])
    torch.testing.assert_close(first[2, 1], second[0, 0])  # slice 3
    torch.testing.assert_close(first[0, 2], 0.5 * vol[:, :, 2])
    assert starter.calls == 2
    with pytest.raises(IndexError):
        starter(x_in, torch.randn(3, window, 4, 6))  # more chunks than the subject has


def test_no_start_noise_and_the_window_noise(haze_noise):
    x_in = torch.randn(2, 3, 4, 4)
    noise = torch.randn(2, 3, 4, 4)
    none = haze_noise.StartNoise(_Process(), "none", [0, 1], 3, 8, None)
    torch.testing.assert_close(none(x_in, noise), x_in)
    own = haze_noise.StartNoise(_Process(), "window", [0, 1], 3, 8, None)
    torch.testing.assert_close(own(x_in, noise), x_in + 0.5 * noise)
    wrong = haze_noise.StartNoise(_Process(), "window", [0, 1, 2], 3, 8, None)
    with pytest.raises(RuntimeError, match="2 windows sampled, 3 expected"):
        wrong(x_in, noise)


def test_start_noise_replaces_a_real_rddm_start_once_per_chunk(haze_noise):
    from mmdm.data.dataset import window_starts
    from mmdm.engine.infer import synthesize_volume
    from mmdm.methods import build_method

    torch.manual_seed(0)
    method = build_method("rddm", config="small", sources=["T1w"])
    src = {"T1w": np.random.default_rng(0).random((16, 16, 9)).astype(np.float32)}
    starts = window_starts(9, 5, 1)
    outs = {}
    for kind in ("window", "none"):
        starter = haze_noise.StartNoise(method.process, kind, starts, 5, 2, torch.zeros(16, 16, 9))
        method.process.start = starter
        try:
            outs[kind] = synthesize_volume(method, src, window=5, stride=1, batch_size=2, steps=2, progress=False,
                                           generator=torch.Generator().manual_seed(0))["mean"]
        finally:
            del method.process.start
        assert starter.calls == len(starter.chunks) == 3
    plain = synthesize_volume(method, src, window=5, stride=1, batch_size=2, steps=2, progress=False,
                              generator=torch.Generator().manual_seed(0))["mean"]
    np.testing.assert_array_equal(outs["window"], plain)  # 'window' is the study's synthesis
    assert not np.array_equal(outs["none"], plain)


def test_recorded_noise_verdict_follows_its_rule(haze_noise):
    from mmdm.regions import MAX_SLICE_BANDING

    path = ROOT / "benchmarks" / "results" / "haze" / "noise-rddm.json"
    if not path.is_file():
        pytest.skip("no recorded noise measurement")
    rec = json.loads(path.read_text())
    means = {k: {c: float(np.mean([r[c] for r in v["rows"]])) for c in ("psnr", "slice_banding")}
             for k, v in rec["starts"].items()}
    adopt = (means["volume"]["slice_banding"] <= MAX_SLICE_BANDING
             and means["volume"]["psnr"] >= means["window"]["psnr"] - haze_noise.PSNR_MARGIN)
    assert rec["verdict"]["volume_noise"] == ("adopted" if adopt else "rejected")
    for k in means:
        assert rec["starts"][k]["means"]["slice_banding"] == pytest.approx(means[k]["slice_banding"])


@pytest.fixture(scope="module")
def grid_lines():
    return _load("grid_lines")


def test_grid_amplitude_sees_a_pattern_that_repeats_with_the_patch_grid(grid_lines):
    rng = np.random.default_rng(0)
    head = np.ones((64, 64), dtype=bool)
    periodic = np.zeros((64, 64))
    periodic[2::8, 4::8] = 0.1  # one bright offset in every 8x8 patch
    # the 64 offset means are 0.1 once and 0 otherwise: their std is 0.1 * sqrt(63) / 64
    assert grid_lines.grid_amplitude(periodic, head, 8) == pytest.approx(0.1 * np.sqrt(63) / 64)
    scattered = np.zeros((64, 64))
    idx = rng.choice(64 * 64, size=64, replace=False)
    scattered.flat[idx] = 0.1  # as many bright pixels, anywhere
    assert grid_lines.grid_amplitude(scattered, head, 8) < 0.5 * grid_lines.grid_amplitude(periodic, head, 8)
    # a pattern with another period is not on an 8-grid
    assert grid_lines.grid_amplitude(periodic, head, 7) < 0.5 * grid_lines.grid_amplitude(periodic, head, 8)


def test_line_map_finds_a_pixel_bright_through_the_stack(grid_lines):
    target = np.full((32, 32, 10), 0.3)
    vol = target.copy()
    vol[10, 12, :] += 0.2  # a line along z
    vol[20, 20, 3] += 0.2  # a dot in one slice: a tenth of the line's strength in the z-mean
    lines, head = grid_lines.line_map(vol, target)
    assert head.all()
    found = np.argwhere(lines > grid_lines.LINE_THRESHOLD)
    assert found.tolist() == [[10, 12]]
