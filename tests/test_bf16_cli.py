"""`mmdm train --set amp=bf16` on a CPU with native bf16 (faked where the test machine has none): every
method trains two steps and says bf16 in its provenance."""

from __future__ import annotations

import json

import pytest
import torch

from mmdm.cli import main

METHODS = [("mmdm", "full"), ("pix2pix", None), ("ddpm", None), ("resvit", None), ("bbdm", None), ("unest", None),
           ("rddm", None)]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method,variant", METHODS, ids=[m for m, _ in METHODS])
def test_two_bf16_steps_of_every_method_from_the_command_line(tmp_path, tiny_cohort, method, variant,
                                                                native_bf16_cpu):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path / "run"
        args = ["train", "--method", method, "--method-config", "small", "--data", str(tiny_cohort), "--steps", "2",
                "--batch-size", "1", "--run-dir", str(run), "--device", "cpu", "--set", "amp=bf16",
                "--set", "checkpoint_every=2", "--set", "image_every=0", "--set", "log_every=1"]
        if variant:
            args[3:3] = ["--variant", variant]
        assert main(args) == 0
    finally:
        torch.set_num_threads(n)
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["amp"] == "bf16" and prov["sessions"][-1]["amp"] == "bf16"
    assert (run / "train_complete.json").is_file()
    ckpt = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert ckpt["step"] == 2
    assert all(v.dtype == torch.float32 for k, v in ckpt["model"].items() if v.is_floating_point())  # fp32 weights
