"""The tolerances of the standard-run benchmark (benchmarks/bench_standard_run.py), and that the
same weights evaluate alike with the fused convolution pairs as with the two convolutions: the
exactness the benchmark's fixed-checkpoint check relies on."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_standard_run import fixed_checkpoint_agreement, seed_tolerance  # noqa: E402

from mmdm.engine.infer import synthesize_volume  # noqa: E402
from mmdm.methods import build_method  # noqa: E402
from mmdm.metrics import evaluate_volumes  # noqa: E402
from mmdm.nets.resunet import unfused_conv_pairs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _row(subject, psnr, ssim=0.5):
    return {"subject": subject, "psnr": psnr, "mip_psnr": psnr + 1, "ssim": ssim, "mip_ssim": ssim}


def test_fixed_checkpoint_agreement_holds_to_the_tolerance_and_fails_beyond_it():
    base = [_row("a", 25.0), _row("b", 30.0)]
    assert fixed_checkpoint_agreement(base, [_row("a", 25.0004), _row("b", 30.0)], 1e-3)["ok"]
    off = fixed_checkpoint_agreement(base, [_row("a", 25.002), _row("b", 30.0)], 1e-3)
    assert not off["ok"] and off["max_abs_diff"]["psnr"] == pytest.approx(0.002)
    assert not fixed_checkpoint_agreement(base, [_row("a", 25.0, ssim=0.5001), _row("b", 30.0)])["ok"]
    assert not fixed_checkpoint_agreement(base, [_row("a", 25.0)])["ok"]  # a subject missing


def test_seed_tolerance_is_the_seed_interval_widened_by_its_range():
    seeds = [22.26, 25.48, 25.50]
    assert seed_tolerance(seeds, 24.0)["ok"] and seed_tolerance(seeds, 28.7)["ok"]
    assert not seed_tolerance(seeds, 28.8)["ok"] and not seed_tolerance(seeds, 19.0)["ok"]


def test_the_same_weights_evaluate_alike_fused_and_unfused():
    """MMDM (small, the standard profile's network) synthesises a volume with 4 sampler steps and
    overlapping windows; the metrics of the fused and the two-convolution forms differ only by
    float32 rounding carried through the sampler: well under the benchmark's 1e-3 dB."""
    torch.manual_seed(0)
    method = build_method("mmdm", config="small", variant="full", sources=("T1w", "T2w", "FLAIR"))
    rng = np.random.default_rng(0)
    src = {m: rng.random((16, 16, 9), dtype=np.float32) * 100 for m in method.sources}
    target = rng.random((16, 16, 9)).astype(np.float32)
    fused = synthesize_volume(method, src, window=5, stride=2, steps=4, progress=False)["mean"]
    with unfused_conv_pairs():
        ref = synthesize_volume(method, src, window=5, stride=2, steps=4, progress=False)["mean"]
    assert 0 < np.abs(fused - ref).max() < 1e-4  # not bit-identical (other sums), but close
    a, b = evaluate_volumes(fused, target), evaluate_volumes(ref, target)
    for k in ("psnr", "mip_psnr"):
        assert abs(a[k] - b[k]) < 1e-3
    assert abs(a["ssim"] - b["ssim"]) < 1e-5
