"""DistributedDataParallel on the CPU (gloo): 2 processes x batch B == 1 process x batch 2B."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from helpers import make_dataset
from mmdm.config import from_dict, to_dict
from mmdm.data.dataset import DataConfig
from mmdm.engine.checkpoint import CheckpointManager, load_checkpoint
from mmdm.engine.spec import TrainConfig
from mmdm.engine.train import train
from mmdm.methods.base import OptimConfig, SynthesisMethod


class DetStub(SynthesisMethod):
    """Deterministic 3x3-conv regression (no per-sample randomness), so both set-ups see the same losses."""

    name = "det-stub"

    def __init__(self, sources=("T1w", "T2w"), window=5):
        super().__init__()
        self.sources = tuple(sources)
        self.window = window
        self.conv = nn.Conv2d(len(self.sources) * window, window, 3, padding=1)
        self.lr = 1e-2

    def training_losses(self, batch, generator=None, group="main"):
        x0, ys = self.check_batch(batch)
        return {"loss": (self.conv(torch.cat(ys, 1)) - x0).pow(2).mean()}

    def optim_configs(self):
        return {g: OptimConfig(lr=self.lr) for g in self.optimizer_groups()}

    @torch.no_grad()
    def sample(self, sources, steps=None, eta=None, generator=None, progress=False):
        return self.conv(torch.cat(self.source_list(sources), 1))


def build_det_stub(**kw) -> DetStub:
    return DetStub(**kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict, run_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    train(from_dict(TrainConfig, cfg_dict), run_dir, progress=False)
    assert not dist.is_initialized()  # train() tears down the group it started


def _cfg(data: Path, batch_size: int) -> TrainConfig:
    return TrainConfig(method="test_engine_ddp:build_det_stub", method_kwargs={},
                       data=DataConfig(root=str(data), sources=("T1w", "T2w")), steps=8, epochs=None,
                       batch_size=batch_size, seed=5, device="cpu", checkpoint_every=4, keep_last=5, log_every=2,
                       image_every=4, image_steps=1)


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")
def test_two_gloo_processes_equal_one_process_with_the_combined_batch(tmp_path):
    make_dataset(tmp_path / "data", n=5, shape=(16, 16, 12))  # 15 training windows: 3 global batches of 4/epoch
    single = train(_cfg(tmp_path / "data", 4), tmp_path / "single", progress=False)
    ddp_run = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, _free_port(), to_dict(_cfg(tmp_path / "data", 2)), str(ddp_run)), nprocs=2,
             join=True)

    a = load_checkpoint(CheckpointManager(single / "checkpoints").latest())
    b = load_checkpoint(CheckpointManager(ddp_run / "checkpoints").latest())
    assert a["step"] == b["step"] == 8 and b["world_size"] == 2
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5)
    # the comparison is not vacuous: training moved the weights far beyond the tolerance, and one
    # process with only the per-rank batch (half the data per step) ends elsewhere
    torch.manual_seed(5)
    init = DetStub().state_dict()
    assert (a["model"]["conv.weight"] - init["conv.weight"]).abs().max() > 1e-2
    half = train(_cfg(tmp_path / "data", 2), tmp_path / "half", progress=False)
    c = load_checkpoint(CheckpointManager(half / "checkpoints").latest())
    assert (c["model"]["conv.weight"] - b["model"]["conv.weight"]).abs().max() > 1e-3
    # each rank's RNG state is stored, and only rank 0 wrote files
    assert len(b["rng"]) == 2 and not torch.equal(b["rng"][0]["generators"]["train"],
                                                  b["rng"][1]["generators"]["train"])
    assert CheckpointManager(ddp_run / "checkpoints").steps() == [4, 8]
    assert len(list((ddp_run / "tb").glob("events.out.tfevents.*"))) == 1
    done = json.loads((ddp_run / "train_complete.json").read_text())
    assert done["world_size"] == 2 and done["steps"] == 8 and done["steps_per_epoch"] == 3
    prov = json.loads((ddp_run / "provenance.json").read_text())
    assert len(prov["sessions"]) == 1 and prov["sessions"][0]["world_size"] == 2


NO_NORM = {"generator": {"norm": "none", "dropout": 0.0}, "discriminator": {"norm": "none"}}


def _gan_cfg(data: Path, batch_size: int) -> TrainConfig:
    # no normalisation and no dropout: the only coupling between samples is the mean of the losses (and
    # no bias ahead of a norm, whose gradient is rounding noise that Adam would blow up to a full step)
    kw = {"config": "small", **NO_NORM}
    return TrainConfig(method="pix2pix", method_kwargs=kw, data=DataConfig(root=str(data), sources=("T1w", "T2w")),
                       steps=3, epochs=None, batch_size=batch_size, seed=5, device="cpu", checkpoint_every=3,
                       image_every=0, log_every=1)


@pytest.mark.slow  # about a minute: two trainings and two spawned processes
@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")
def test_a_gans_discriminator_then_generator_step_under_ddp_equals_one_process(tmp_path):
    """The GAN step runs two forward passes through DDP (D's, which makes the fake, then G's, which
    scores the same fake): both groups' gradients are averaged across processes as in one process."""
    make_dataset(tmp_path / "data", n=5, shape=(32, 32, 8))
    single = train(_gan_cfg(tmp_path / "data", 4), tmp_path / "single", progress=False)
    ddp_run = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, _free_port(), to_dict(_gan_cfg(tmp_path / "data", 2)), str(ddp_run)), nprocs=2,
             join=True)
    a = load_checkpoint(CheckpointManager(single / "checkpoints").latest())
    b = load_checkpoint(CheckpointManager(ddp_run / "checkpoints").latest())
    assert a["step"] == b["step"] == 3 and b["world_size"] == 2
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5)
    for group in ("discriminator", "generator"):  # Adam's moments: both groups stepped on averaged gradients
        for i, st in a["optimizers"][group]["state"].items():
            torch.testing.assert_close(b["optimizers"][group]["state"][i]["exp_avg"], st["exp_avg"],
                                       rtol=1e-3, atol=1e-6)
    init = build_method_small_pix2pix()
    for net in ("net.", "discriminator."):  # both networks moved far beyond the tolerance (3 steps at lr 2e-4)
        assert max((v - init[k]).abs().max() for k, v in a["model"].items() if k.startswith(net)) > 3e-4, net


def build_method_small_pix2pix() -> dict:
    from mmdm.methods import build_method

    torch.manual_seed(5)
    return build_method("pix2pix", config="small", sources=("T1w", "T2w"), **NO_NORM).state_dict()
