"""Sampling with bf16 autocast of the networks (``amp="bf16"``): synthesis, run evaluation and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from helpers import make_dataset
from mmdm.data.dataset import DataConfig
from mmdm.engine import cli as engine_cli
from mmdm.engine.evaluate import evaluate_run
from mmdm.engine.infer import check_amp, network_autocast, synthesize_volume
from mmdm.engine.spec import TrainConfig
from mmdm.engine.train import train
from mmdm.methods import build_method
from mmdm.methods.base import OptimConfig, SynthesisMethod


class ConvSampler(SynthesisMethod):
    """A network (``net``) and sampler arithmetic around it that records the dtype it was handed."""

    name = "conv-sampler"

    def __init__(self, sources=("T1w", "T2w"), window=5):
        super().__init__()
        self.sources = tuple(sources)
        self.window = window
        self.net = nn.Sequential(nn.Conv2d(len(self.sources) * window, 16, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(16, window, 3, padding=1))
        self.seen: list[torch.dtype] = []

    def objective(self):
        return "MSE of a two-layer CNN"

    def training_losses(self, batch, generator=None, group="main"):
        x0, ys = self.check_batch(batch)
        return {"loss": (self.net(torch.cat(ys, 1)) - x0).pow(2).mean()}

    def optim_configs(self):
        return {g: OptimConfig(lr=1e-3) for g in self.optimizer_groups()}

    @torch.no_grad()
    def sample(self, sources, steps=None, eta=None, generator=None, progress=False):
        out = self.net(torch.cat(self.source_list(sources), 1))
        self.seen.append(out.dtype)
        return (0.5 * out + 0.25).clamp(-1, 1)  # "sampler arithmetic"


def build_conv_sampler(**kw) -> ConvSampler:
    return ConvSampler(**kw)


def test_networks_run_in_bf16_and_hand_fp32_back(one_thread, native_bf16_cpu):
    torch.manual_seed(0)
    m = ConvSampler()
    x = torch.randn(2, 10, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf16 = m.net(x)
    assert ref_bf16.dtype == torch.bfloat16
    with network_autocast(m, "bf16"):
        out = m.net(x)
        assert "forward" in vars(m.net)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref_bf16.float())  # the convolutions ran in bf16 ...
    assert not torch.equal(out, m.net(x))  # ... not in fp32 (the restored forward)
    assert "forward" not in vars(m.net)  # the class's forward is back
    with network_autocast(m, "none"):
        assert torch.equal(m.net(x), m.net(x)) and "forward" not in vars(m.net)


def test_bf16_synthesis_of_mmdm_is_fp32_and_close_to_fp32(one_thread, native_bf16_cpu):
    """MMDM (small, random weights): the bf16 volume is float32, shaped like the sources, and
    within bf16's rounding of the fp32 volume. bf16 keeps 8 significant bits (unit roundoff
    2^-9 = 0.2 %); the error of each layer's rounded inputs accumulates over ~40 layers and the
    sampler's steps, but the window mean averages much of it away. Measured: mean |diff| 0.0023,
    max 0.019 on the [0, 1] scale (output std 0.12). The bounds (mean 0.01, max 0.05: 1 % and
    5 % of the range) leave room for other CPUs' kernels and still fail if bf16 were broken
    (e.g. a saturating softmax or a bf16 sampler, whose errors are of the size of the output)."""
    torch.manual_seed(0)
    m = build_method("mmdm", config="small", variant="full", sources=("T1w", "T2w", "FLAIR"))
    rng = np.random.default_rng(0)
    src = {k: rng.random((16, 16, 8), dtype=np.float32) * 100 for k in m.sources}
    fp32 = synthesize_volume(m, src, window=5, stride=1, steps=4, progress=False)["mean"]
    bf16 = synthesize_volume(m, src, window=5, stride=1, steps=4, progress=False, amp="bf16")["mean"]
    assert bf16.shape == (16, 16, 8) and bf16.dtype == np.float32
    diff = np.abs(bf16 - fp32)
    assert 0 < diff.mean() < 0.01 and diff.max() < 0.05, (diff.mean(), diff.max())
    assert bf16.min() >= 0 and bf16.max() <= 1
    assert all("forward" not in vars(n) for n in m.modules())


def test_bad_amp_and_devices_are_clear_errors(native_bf16_cpu):
    with pytest.raises(ValueError, match="unknown amp"):
        check_amp("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA or the CPU"):
        check_amp("bf16", torch.device("meta"))
    check_amp("none", torch.device("meta"))
    check_amp("bf16", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown amp"):
        synthesize_volume(ConvSampler(), {"T1w": np.zeros((8, 8, 5), np.float32),
                                          "T2w": np.zeros((8, 8, 5), np.float32)}, amp="fp16", progress=False)


def test_evaluate_run_records_amp_and_the_cli_passes_it(tmp_path, one_thread, capsys, native_bf16_cpu):
    make_dataset(tmp_path / "data", n=5, shape=(16, 16, 8))
    cfg = TrainConfig(method="test_bf16_sampling:build_conv_sampler", method_kwargs={},
                      data=DataConfig(root=str(tmp_path / "data"), sources=("T1w", "T2w")), steps=2, epochs=None,
                      batch_size=2, device="cpu", checkpoint_every=0, image_every=0)
    run = train(cfg, tmp_path / "run", progress=False)
    summary = evaluate_run(run, device="cpu", progress=False, amp="bf16", allow_code=True)
    assert summary["sampling"]["amp"] == "bf16"
    assert np.isfinite(summary["metrics"]["psnr"])
    assert evaluate_run(run, device="cpu", progress=False, allow_code=True)["sampling"]["amp"] == "none"

    parser = engine_cli.build_parser()
    args = parser.parse_args(["evaluate-run", str(run), "--device", "cpu", "--amp", "bf16", "--quiet",
                              "--allow-code"])
    assert args.amp == "bf16" and args.func(args) == 0
    assert json.loads((run / "summary.json").read_text())["sampling"]["amp"] == "bf16"
    src = tmp_path / "data" / "sub-005" / "anat"
    args = parser.parse_args(["synthesize", "--run", str(run), "--t1w", str(src / "sub-005_T1w.nii.gz"),
                              "--t2w", str(src / "sub-005_T2w.nii.gz"), "--out", str(tmp_path / "tof.nii.gz"),
                              "--device", "cpu", "--amp", "bf16", "--quiet", "--allow-code"])
    assert args.func(args) == 0 and (tmp_path / "tof.nii.gz").is_file()
    assert parser.parse_args(["synthesize", "--run", "r", "--out", "o"]).amp == "none"
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate-run", str(run), "--amp", "fp16"])
    assert "invalid choice" in capsys.readouterr().err
