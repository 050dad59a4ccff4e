"""Tests of mmdm.engine: training loop, checkpoints, SIGKILL/resume bit-identity, optimiser groups."""

from __future__ import annotations

import json

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import make_dataset
from mmdm.config import ConfigError, from_dict, load_yaml, save_yaml, to_dict
from mmdm.data.dataset import DataConfig
from mmdm.engine import checkpoint as ckpt_mod
from mmdm.engine.checkpoint import CheckpointManager, capture_rng, load_checkpoint, restore_rng
from mmdm.engine.batches import epoch_batches
from mmdm.engine.panels import window_panel
from mmdm.engine.rundir import run_status
from mmdm.engine.spec import TrainConfig, load_run_config
from mmdm.engine.train import Trainer, train
from mmdm.optim import EMAConfig
from mmdm.methods.base import OptimConfig, SynthesisMethod

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# ----------------------------------------------------------------------------
# stand-in methods


class ConvStub(SynthesisMethod):
    """A 3x3 conv regression. ``noisy`` makes the loss depend on every RNG the trainer must
    checkpoint: its own generator (a timestep-like draw), torch's global RNG, numpy and Python."""

    name = "conv-stub"

    def __init__(self, sources=("T1w", "T2w"), window: int = 5, noisy: bool = True, delay: float = 0.0,
                 lr: float = 1e-2, grad_clip: float | None = None):
        super().__init__()
        self.sources = tuple(sources)
        self.window = window
        self.conv = nn.Conv2d(len(self.sources) * window, window, 3, padding=1)
        self.lr = lr
        self.grad_clip = grad_clip
        self.noisy = noisy
        self.delay = delay

    def training_losses(self, batch, generator=None, group="main"):
        x0, ys = self.check_batch(batch)
        pred = self.conv(torch.cat(ys, 1))
        target = x0
        scale = 1.0
        if self.noisy:
            t = torch.rand(x0.shape[0], 1, 1, 1, generator=generator)
            target = (1 - t) * x0 + t * ys[0] + 0.01 * torch.randn_like(x0)
            scale = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
        if self.delay:
            time.sleep(self.delay)
        loss = scale * (pred - target).pow(2).mean()
        return {"loss": loss, "mse": (pred.detach() - x0).pow(2).mean()}

    def optim_configs(self):
        return {g: OptimConfig(lr=self.lr, grad_clip=self.grad_clip) for g in self.optimizer_groups()}

    @torch.no_grad()
    def sample(self, sources, steps=None, eta=None, generator=None, progress=False):
        return self.conv(torch.cat(self.source_list(sources), 1)).clamp(-1, 1)

    def log_scalars(self):
        return {"stub/weight_mean": float(self.conv.weight.detach().mean())}


def build_conv_stub(**kw) -> ConvStub:
    return ConvStub(**kw)


class TwoGroupStub(SynthesisMethod):
    """Two optimiser groups ('gen' then 'disc'); each group's loss depends on both modules."""

    name = "two-group-stub"

    def __init__(self, sources=("T1w", "T2w"), window: int = 5):
        super().__init__()
        self.sources = tuple(sources)
        self.window = window
        self.a = nn.Conv2d(len(self.sources) * window, window, 1)
        self.b = nn.Conv2d(window, 1, 1)
        self.lr = 1e-2
        self.calls: list[dict] = []

    def optimizer_groups(self):
        return {"gen": list(self.a.parameters()), "disc": list(self.b.parameters())}

    def training_losses(self, batch, generator=None, group="main"):
        self.calls.append({"group": group, "a": self.a.weight.detach().clone(), "b": self.b.weight.detach().clone(),
                           "grads": [p.grad for p in self.parameters()]})
        x0, ys = self.check_batch(batch)
        fake = self.a(torch.cat(ys, 1))
        if group == "gen":
            loss = -self.b(fake).mean() + (fake - x0).pow(2).mean()
        else:
            loss = self.b(fake).mean() - self.b(x0).mean() + self.b.weight.pow(2).sum()
        return {"loss": loss}

    def optim_configs(self):
        return {g: OptimConfig(lr=self.lr) for g in self.optimizer_groups()}

    @torch.no_grad()
    def sample(self, sources, steps=None, eta=None, generator=None, progress=False):
        return self.a(torch.cat(self.source_list(sources), 1))


def build_two_group_stub(**kw) -> TwoGroupStub:
    return TwoGroupStub(**kw)


# ----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine-data")
    make_dataset(root, n=5, shape=(16, 16, 12))  # 3 training subjects x 5 windows (stride 2)
    return root


def stub_config(data_root: Path, **kw) -> TrainConfig:
    base = dict(method="test_engine_train:build_conv_stub", method_kwargs={},
                data=DataConfig(root=str(data_root), sources=("T1w", "T2w")), steps=6, epochs=None,
                batch_size=2, seed=3, device="cpu", checkpoint_every=2, keep_last=2, log_every=1,
                image_every=0, val_every=0)
    base.update(kw)
    return TrainConfig(**base)


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(CheckpointManager(run_dir / "checkpoints").latest())["model"]


# ----------------------------------------------------------------------------
# checkpoints


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.5, 0.999))
    return model, opt


def _step(model, opt):
    opt.zero_grad()
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()


def test_checkpoint_round_trip_restores_weights_optimiser_and_rng(tmp_path):
    model, opt = _model_and_opt(0)
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):
        _step(model, opt)
    torch.rand(3, generator=gen)
    mgr = CheckpointManager(tmp_path / "ck", keep_last=2)
    path = mgr.save(2, {"model": model.state_dict(), "optim": opt.state_dict(), "rng": capture_rng({"g": gen})})
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(2), torch.rand(2, generator=gen))
    torch.manual_seed(1)
    _step(model, opt)  # the original's next step from the checkpointed state
    expected_next = {k: v.clone() for k, v in model.state_dict().items()}
    np.random.rand(7)
    random.random()

    state = torch.load(path, weights_only=True)  # plain types + tensors only
    model2, opt2 = _model_and_opt(99)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optim"])
    assert int(opt2.state_dict()["state"][0]["step"]) == 2
    gen2 = torch.Generator().manual_seed(0)
    restore_rng(state["rng"], {"g": gen2})
    draws = (random.random(), float(np.random.rand()), torch.rand(2), torch.rand(2, generator=gen2))
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1]
    assert torch.equal(draws[2], expected_draws[2]) and torch.equal(draws[3], expected_draws[3])
    torch.manual_seed(1)
    _step(model2, opt2)  # Adam moments restored => the very same update
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_next[k]), k
    assert not torch.equal(model2.weight, state["model"]["weight"])


def test_checkpoint_manager_keeps_last_k_and_survives_a_crash_while_writing(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path / "ck", keep_last=2)
    for s in range(1, 6):
        mgr.save(s, {"step": s, "w": torch.full((3,), float(s))})
    assert mgr.steps() == [4, 5]
    assert sorted(p.name for p in mgr.dir.iterdir()) == ["step-00000004.pt", "step-00000005.pt"]

    def crashing_save(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        mgr.save(6, {"step": 6})
    monkeypatch.undo()
    assert mgr.steps() == [4, 5]
    assert sorted(p.name for p in mgr.dir.iterdir()) == ["step-00000004.pt", "step-00000005.pt"]
    state = mgr.load_newest()[1]
    assert state["step"] == 5 and torch.equal(state["w"], torch.full((3,), 5.0))
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_unreadable_checkpoint_has_a_clear_error_and_falls_back(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, {"step": 1})
    mgr.path(2).write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="cannot be read"):
        load_checkpoint(mgr.path(2))
    with pytest.warns(UserWarning, match=r"using checkpoint step-00000001\.pt: .*step-00000002\.pt cannot be read"):
        assert mgr.load_newest()[1]["step"] == 1


# ----------------------------------------------------------------------------
# data order


def test_epoch_batches_are_a_pure_function_and_shards_form_the_combined_batch():
    n, b, w = 23, 3, 2
    e0 = epoch_batches(n, b * w, seed=4, epoch=0)
    assert e0 == epoch_batches(n, b * w, seed=4, epoch=0)
    assert e0 != epoch_batches(n, b * w, seed=4, epoch=1)
    assert len(e0) == n // (b * w)
    flat = [i for batch in e0 for i in batch]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(n))
    shards = [epoch_batches(n, b, seed=4, epoch=0, world_size=w, rank=r) for r in range(w)]
    for i, combined in enumerate(e0):
        assert sorted(shards[0][i] + shards[1][i]) == sorted(combined)
        assert len(shards[0][i]) == len(shards[1][i]) == b
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        epoch_batches(3, 2, seed=0, epoch=0, world_size=2)


# ----------------------------------------------------------------------------
# configs and run directories


def test_train_config_yaml_round_trip(tmp_path, dataset):
    cfg = stub_config(dataset, ema=EMAConfig(decay=0.9, start_step=2), grad_clip=1.0,
                      method_kwargs={"lr": 0.5})
    save_yaml(cfg, tmp_path / "c.yaml")
    back = load_yaml(TrainConfig, tmp_path / "c.yaml")
    assert to_dict(back) == to_dict(cfg)
    assert isinstance(back.data, DataConfig) and isinstance(back.ema, EMAConfig)
    with pytest.raises(ConfigError, match="valid keys"):
        from_dict(TrainConfig, {"stepz": 3})
    with pytest.raises(ConfigError, match="use one of auto, bf16, none, fp32"):
        stub_config(dataset, amp="fp16").validate()


def test_bf16_and_channels_last_on_cpu_train_in_bf16_and_say_so(tmp_path, dataset, monkeypatch, native_bf16_cpu):
    """amp bf16 autocasts the forward on the CPU (the conv computes in bf16), weights and Adam's
    state stay fp32, channels-last reaches the weights and the batches, provenance records both."""
    import json

    seen = []
    real = ConvStub.training_losses

    def spy(self, batch, generator=None, group="main"):
        ys = self.source_list(batch["sources"])
        seen.append((self.conv(torch.cat(ys, 1)).dtype, ys[0].is_contiguous(memory_format=torch.channels_last),
                     self.conv.weight.is_contiguous(memory_format=torch.channels_last)))
        return real(self, batch, generator, group)

    monkeypatch.setattr(ConvStub, "training_losses", spy)
    run = tmp_path / "run"
    train(stub_config(dataset, steps=2, amp="bf16", channels_last=True), run, progress=False)
    assert seen and all(s == (torch.bfloat16, True, True) for s in seen)
    state = load_checkpoint(CheckpointManager(run / "checkpoints").latest())
    assert all(v.dtype == torch.float32 for v in state["model"].values())
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["amp"] == "bf16" and prov["channels_last"] is True
    assert prov["sessions"][0]["amp"] == "bf16"
    # bf16 changes the arithmetic: the same run in fp32 ends at other weights
    fp32 = tmp_path / "fp32"
    train(stub_config(dataset, steps=2, amp="none"), fp32, progress=False)
    assert not torch.equal(params(fp32)["conv.weight"], state["model"]["conv.weight"])


def test_progress_bar_shows_the_generator_loss_of_a_multi_group_method(tmp_path, dataset):
    tr = Trainer(stub_config(dataset), tmp_path / "run", progress=False)
    tr.last_losses = {"discriminator/loss": 0.5, "generator/loss": 2.0, "generator/loss_l1": 0.1}
    assert tr.headline_loss() == 2.0
    tr.last_losses = {"disc/loss": 0.5, "gen/loss": 2.0}
    assert tr.headline_loss() == 0.5  # no generator group: the first group's, alphabetically
    tr.last_losses = {"loss": 1.5, "gen/loss": 2.0}
    assert tr.headline_loss() == 1.5


def test_bf16_run_resumes_bit_identically_on_cpu(tmp_path, dataset, monkeypatch, native_bf16_cpu):
    whole, split = tmp_path / "whole", tmp_path / "split"
    cfg = stub_config(dataset, steps=4, amp="bf16")
    train(cfg, whole, progress=False)
    real, calls = Trainer.train_step, []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 3:  # after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, split, progress=False)
    monkeypatch.setattr(Trainer, "train_step", real)
    train(cfg, split, resume=True, progress=False)
    a, b = params(whole), params(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_mismatch_and_missing_resume_flag_are_refused(tmp_path, dataset):
    run = tmp_path / "run"
    cfg = stub_config(dataset, steps=2)
    train(cfg, run, resume=False, progress=False)
    assert run_status(run) == "trained"
    with pytest.raises(ConfigError, match=r"different config \(seed: stored 3 != given 4"):
        train(stub_config(dataset, steps=2, seed=4), run, resume=True, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, run, resume=False, progress=False)
    before = params(run)
    train(stub_config(dataset, steps=2, log_every=5), run, resume=True, progress=False)  # runtime key: allowed
    assert all(torch.equal(before[k], v) for k, v in params(run).items())


def test_training_writes_records_and_logs(tmp_path, dataset):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = stub_config(dataset, steps=4, image_every=2, val_every=2, ema=EMAConfig(decay=0.5, start_step=2))
    train(cfg, run, progress=False, profile="unit-test")
    for name in ("config.yaml", "provenance.json", "train_complete.json"):
        assert (run / name).is_file()
    assert to_dict(load_yaml(TrainConfig, run / "config.yaml")) == to_dict(cfg)
    import json

    prov = json.loads((run / "provenance.json").read_text())
    assert prov["profile"] == "unit-test" and prov["seeds"]["train"] == 3
    assert prov["sessions"][0]["end"] >= prov["sessions"][0]["start"] and prov["torch"] == torch.__version__
    assert prov["sessions"][0]["packages"]["numpy"] == np.__version__
    state = load_checkpoint(run / "checkpoints" / "step-00000004.pt")
    assert state["step"] == 4 and state["ema"] is not None
    # EMA: reset to the weights before start_step 2, then 0.5-averaged at steps 2, 3, 4
    assert not torch.equal(state["ema"]["conv.weight"], state["model"]["conv.weight"])
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "stub/weight_mean" in tags["scalars"] and "lr/main" in tags["scalars"] and "val/loss" in tags["scalars"]
    assert acc.Scalars("lr/main")[0].value == pytest.approx(1e-2)
    assert [e.step for e in acc.Images("panel/sources_pred_target")] == [2, 4]
    img = acc.Images("panel/sources_pred_target")[0]
    assert (img.height, img.width) == (4 * 16, 2 * 16)  # 2 sources + prediction + target; slice | MIP


def test_window_panel_layout():
    k, h, w = 5, 4, 6
    src = {"T1w": torch.linspace(-1, 1, k * h * w).reshape(k, h, w)}
    pred, tgt = -torch.ones(k, h, w), torch.ones(k, h, w)
    panel = window_panel(src, pred, tgt)
    assert panel.shape == (1, 3 * h, 2 * w)
    x = (src["T1w"] + 1) / 2
    assert torch.allclose(panel[0, :h, :w], x[k // 2]) and torch.allclose(panel[0, :h, w:], x.amax(0))
    assert panel[0, h:2 * h].eq(0).all() and panel[0, 2 * h:].eq(1).all()


# ----------------------------------------------------------------------------
# optimiser groups


def test_each_group_steps_alone_in_dict_order(tmp_path, dataset):
    cfg = stub_config(dataset, method="test_engine_train:build_two_group_stub")
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    m = tr.method
    a0, b0 = m.a.weight.detach().clone(), m.b.weight.detach().clone()
    batch = next(tr.batches(0))
    logs = tr.train_step(batch)
    assert [c["group"] for c in m.calls] == ["gen", "disc"]
    gen_call, disc_call = m.calls
    assert torch.equal(gen_call["a"], a0) and torch.equal(gen_call["b"], b0)
    assert not torch.equal(disc_call["a"], a0)  # 'gen' stepped ...
    assert torch.equal(disc_call["b"], b0)  # ... and left 'disc' untouched although its loss reaches b
    assert all(g is None for g in disc_call["grads"])  # 'gen' gradients zeroed before 'disc'
    assert torch.equal(m.a.weight, disc_call["a"])  # 'disc' step leaves 'gen' untouched
    assert not torch.equal(m.b.weight, b0)
    assert set(logs) == {"gen/loss", "disc/loss"}


def test_multi_tensor_adam_trains_the_weights_of_the_per_parameter_loop_and_keeps_it_on_resume(tmp_path, dataset,
                                                                                          monkeypatch):
    cfg = stub_config(dataset, method="test_engine_train:build_two_group_stub", steps=5, checkpoint_every=3)
    fast = train(cfg, tmp_path / "foreach", progress=False)

    class LoopAdam(torch.optim.Adam):  # Adam's per-parameter Python loop, whatever the caller asks for
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "foreach": False})

    monkeypatch.setattr(torch.optim, "Adam", LoopAdam)
    slow = train(cfg, tmp_path / "loop", progress=False)
    monkeypatch.undo()
    a, b = params(fast), params(slow)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a run resumed from a checkpoint written by the loop still takes the multi-tensor update
    tr = Trainer(cfg, tmp_path / "loop", progress=False)
    tr.load_state_dict(load_checkpoint(CheckpointManager(tmp_path / "loop" / "checkpoints").latest()))
    assert all(g["foreach"] for o in tr.optimizers.values() for g in o.param_groups)
    assert not any(g["foreach"] for g in load_checkpoint(CheckpointManager(tmp_path / "loop" / "checkpoints")
                                                         .latest())["optimizers"]["gen"]["param_groups"])


# ----------------------------------------------------------------------------
# SIGKILL + resume == uninterrupted (CPU, bit-identical)


def test_sigkill_and_resume_gives_bit_identical_weights(tmp_path, dataset):
    total = 17  # 7 steps per epoch: crosses two epoch boundaries
    cfg = stub_config(dataset, steps=total, checkpoint_every=3, keep_last=2, method_kwargs={"delay": 0.2})
    # reference: uninterrupted, with image panels and validation (which must not perturb training)
    ref_cfg = stub_config(dataset, steps=total, checkpoint_every=3, keep_last=2, method_kwargs={"delay": 0.0},
                          image_every=4, val_every=5)
    ref = train(ref_cfg, tmp_path / "ref", progress=False)

    run = tmp_path / "killed"
    cfg_path = tmp_path / "killed.yaml"
    save_yaml(cfg, cfg_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    proc = subprocess.Popen([sys.executable, "-m", "mmdm.engine.cli", "train", "--config", str(cfg_path),
                             "--run-dir", str(run), "--quiet"], env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    mgr = CheckpointManager(run / "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 6 for s in mgr.steps()):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = mgr.steps()[-1]
    assert 6 <= killed_at < total, mgr.steps()
    assert run_status(run) == "training" and not (run / "train_complete.json").exists()
    mid = load_checkpoint(mgr.path(killed_at))  # read now: keep_last=2 removes it when the run goes on

    # the reference differs from the killed run's only in runtime keys and the stub's sleep
    final = stub_config(dataset, steps=total, checkpoint_every=3, keep_last=2, method_kwargs={"delay": 0.2})
    train(final, run, resume=True, progress=False)
    assert (run / "train_complete.json").is_file()
    a, b = params(ref), params(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the killed run's checkpoint was really mid-run (its weights differ from the final ones), and
    # the resumed session started from it
    import json

    assert not torch.equal(mid["model"]["conv.weight"], b["conv.weight"])
    sessions = json.loads((run / "provenance.json").read_text())["sessions"]
    assert [s["resumed_from_step"] for s in sessions] == [0, killed_at]


def test_ema_follows_its_formula_and_inference_uses_the_average(tmp_path, dataset):
    """shadow = weights before start_step; then shadow <- decay shadow + (1 - decay) weights every step;
    a trained run is loaded with the shadow unless use_ema=False."""
    from mmdm.engine.infer import load_run_method

    run = tmp_path / "ema"
    train(stub_config(dataset, steps=4, checkpoint_every=1, keep_last=4, ema=EMAConfig(decay=0.5, start_step=2)),
          run, progress=False)
    mgr = CheckpointManager(run / "checkpoints")
    st = {s: load_checkpoint(mgr.path(s)) for s in (1, 2, 3, 4)}
    for k, e4 in st[4]["ema"].items():
        w = {s: st[s]["model"][k] for s in st}
        e = {s: st[s]["ema"][k] for s in st}
        assert torch.equal(e[1], w[1]), k  # step 1 < start_step 2: the average is the weights
        for s in (2, 3, 4):
            torch.testing.assert_close(e[s], 0.5 * e[s - 1] + 0.5 * w[s], rtol=0, atol=1e-7)
        assert not torch.equal(e4, w[4]), k
    with_ema, _, info = load_run_method(run, device="cpu", allow_code=True)
    plain, _, info_plain = load_run_method(run, device="cpu", use_ema=False, allow_code=True)
    assert info["ema_used"] and not info_plain["ema_used"]
    assert torch.equal(with_ema.conv.weight, st[4]["ema"]["conv.weight"])
    assert torch.equal(plain.conv.weight, st[4]["model"]["conv.weight"])


def test_ema_updates_only_every_n_steps():
    from mmdm.engine.ema import EMA

    model = nn.Linear(2, 1)
    ema = EMA(model, EMAConfig(decay=0.75, start_step=0, every=2))
    start = ema.state_dict()["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 1)  # not a multiple of 2: untouched
    assert torch.equal(ema.state_dict()["weight"], start)
    ema.update(model, 2)
    torch.testing.assert_close(ema.state_dict()["weight"], 0.75 * start + 0.25 * model.weight.detach())


@pytest.mark.parametrize("where", ["run", "method"])
def test_grad_clip_bounds_the_gradient_the_optimiser_sees(tmp_path, dataset, where):
    """``TrainConfig.grad_clip`` (or the method's ``OptimConfig.grad_clip``) clips the global gradient
    norm before each optimiser step; the logged ``grad_norm`` is the norm before clipping."""
    clip = 1e-3
    kw = {"grad_clip": clip} if where == "run" else {"method_kwargs": {"grad_clip": clip}}
    seen: dict[str, list[float]] = {}
    for name, extra in (("clipped", kw), ("free", {})):
        trainer = Trainer(stub_config(dataset, **extra), tmp_path / name)
        params_ = trainer.groups["main"]
        opt = trainer.optimizers["main"]
        seen[name] = []

        def record(*a, _opt_step=opt.step, _seen=seen[name], _params=params_, **k):
            _seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in _params]))))
            return _opt_step(*a, **k)

        opt.step = record
        logs = trainer.train_step(next(trainer.batches(0)))
        if name == "clipped":
            assert float(logs["grad_norm"]) > 10 * clip  # the raw norm, well above the bound
        else:
            assert "grad_norm" not in logs
    assert seen["clipped"][0] == pytest.approx(clip, rel=1e-4)
    assert seen["free"][0] > 10 * clip


def test_method_default_ema_is_used_unless_the_run_overrides_it():
    from mmdm.methods import build_method

    bbdm = build_method("bbdm", config="small")
    ema = bbdm.ema_config()
    assert isinstance(ema, EMAConfig) and ema == EMAConfig(decay=0.995, start_step=100, every=1)
    assert build_method("mmdm", variant="base", config="small").ema_config() is None  # the MMDM authors use none
    assert build_method("bbdm", config="small", ema=None).ema_config() is None


# ----------------------------------------------------------------------------
# run directories: one writer, checkpoints tied to their config, nothing lost after a kill


def _interrupt_after(monkeypatch, n_steps: int) -> None:
    """Make the next training raise KeyboardInterrupt (as a kill would stop it) in step ``n_steps + 1``."""
    real, calls = Trainer.train_step, []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == n_steps + 1:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupted)


def test_a_second_process_cannot_write_a_locked_run_directory(tmp_path, dataset, capsys):
    """A real second process holds the run's lock: training and evaluation are refused with its pid,
    host, command and start time; once it exits, training proceeds with one clean session."""
    import json

    from mmdm.engine import cli as engine_cli
    from mmdm.engine.evaluate import evaluate_run
    from mmdm.engine.rundir import RunLockedError

    run, fresh = tmp_path / "run", tmp_path / "fresh"
    cfg = stub_config(dataset, steps=2)
    cfg_path = tmp_path / "cfg.yaml"
    save_yaml(cfg, cfg_path)
    train(cfg, run, progress=False)
    prov = (run / "provenance.json").read_text()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mmdm.engine.rundir import run_lock\n"
         "with run_lock(sys.argv[1], 'training'), run_lock(sys.argv[2], 'training'):\n"
         "    print('locked', flush=True); sys.stdin.read()", str(run), str(fresh)],
        env=dict(os.environ, PYTHONPATH=str(ROOT), MMDM_INVOCATION="mmdm train --run-dir run (holder)"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"in use by pid {holder.pid} on .* since .*\(training: mmdm train "
                                                 r"--run-dir run \(holder\)\)"):
            train(cfg, fresh, progress=False)
        assert not (fresh / "config.yaml").exists() and not (fresh / "provenance.json").exists()
        assert engine_cli.main(["train", "--config", str(cfg_path), "--run-dir", str(run), "--resume", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {holder.pid}" in err and len(err.strip().splitlines()) == 1
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            evaluate_run(run, device="cpu", progress=False, allow_code=True)
        assert (run / "provenance.json").read_text() == prov and not (run / "predictions").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert (run / ".lock").read_text() == ""  # released: no holder named
    train(cfg, fresh, progress=False)
    assert len(json.loads((fresh / "provenance.json").read_text())["sessions"]) == 1
    assert evaluate_run(run, device="cpu", progress=False, allow_code=True)["checkpoint"]["step"] == 2


def test_checkpoints_without_their_config_are_refused_and_force_new_moves_them_aside(tmp_path, dataset):
    run = tmp_path / "run"
    train(stub_config(dataset, steps=2, checkpoint_every=1, keep_last=2), run, progress=False)
    old = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    (run / "config.yaml").unlink()
    other = stub_config(dataset, steps=3, seed=7)
    for resume in (False, True):
        with pytest.raises(ConfigError, match="no config.yaml.*--force-new"):
            train(other, run, resume=resume, progress=False)
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == old  # untouched
    train(other, run, progress=False, force_new=True)
    moved = list(run.glob("superseded-*"))
    assert len(moved) == 1
    assert {p.name: p.read_bytes() for p in (moved[0] / "checkpoints").iterdir()} == old
    assert (moved[0] / "train_complete.json").is_file() and (moved[0] / "provenance.json").is_file()
    import json

    done = json.loads((run / "train_complete.json").read_text())
    assert done["steps"] == 3 and done["checkpoint"] == "checkpoints/step-00000003.pt"
    assert load_checkpoint(run / done["checkpoint"])["config"]["seed"] == 7


def test_resume_under_another_seed_than_the_checkpoints_is_refused(tmp_path, dataset, monkeypatch):
    run = tmp_path / "run"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(stub_config(dataset, steps=4), run, progress=False)
    monkeypatch.undo()
    reseeded = stub_config(dataset, steps=4, seed=9)
    save_yaml(reseeded, run / "config.yaml")  # the config swapped under the checkpoints
    with pytest.raises(ConfigError, match=r"checkpoint .*step-00000002\.pt.*different config \(seed: stored 3 != "
                                          r"given 9.*--force-new"):
        train(reseeded, run, resume=True, progress=False)
    assert CheckpointManager(run / "checkpoints").steps() == [2]


def test_a_killed_session_keeps_its_time_its_orphans_go_and_validation_has_no_duplicates(tmp_path, dataset,
                                                                                        monkeypatch):
    """After a kill at step 5 (last checkpoint: 4): the killed session's wall time (last heartbeat)
    counts in train_wall_s, the half-written checkpoint's temporary file is removed on resume, an
    unreadable newest checkpoint falls back to the previous one with a warning, and
    validation.jsonl holds every step once."""
    import json

    run = tmp_path / "run"
    cfg = stub_config(dataset, steps=6, checkpoint_every=2, keep_last=3, val_every=1)
    _interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False)
    monkeypatch.undo()
    prov = json.loads((run / "provenance.json").read_text())
    killed = prov["sessions"][0]
    assert killed["end"] is None and killed["wall_s"] > 0 and killed["last_step"] == 4 and killed["last_seen"]
    assert [json.loads(x)["step"] for x in (run / "validation.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    orphan = run / "checkpoints" / ".step-00000006.abc123.pt"
    orphan.write_bytes(b"half a checkpoint")
    (run / "checkpoints" / "step-00000005.pt").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match=r"using checkpoint step-00000004\.pt.*step-00000005\.pt cannot be read"):
        train(cfg, run, resume=True, progress=False)
    assert not orphan.exists()
    assert [json.loads(x)["step"] for x in (run / "validation.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    prov = json.loads((run / "provenance.json").read_text())
    first, second = prov["sessions"]
    assert first["interrupted"] and first["wall_s"] == killed["wall_s"] and second["resumed_from_step"] == 4
    assert prov["train_wall_s"] == pytest.approx(first["wall_s"] + second["wall_s"], abs=2e-3)


def test_a_full_disk_during_training_is_one_line_that_says_what_to_do(tmp_path, dataset, monkeypatch, capsys):
    from mmdm.engine import cli as engine_cli

    cfg_path = tmp_path / "cfg.yaml"
    save_yaml(stub_config(dataset, steps=4), cfg_path)

    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1024 vs 960")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    assert engine_cli.main(["train", "--config", str(cfg_path), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "step-00000002.pt failed (" in err and "unexpected pos" in err and "disk is most likely full" in err
    assert "mmdm train --resume" in err
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # no partial file under any name


def test_resume_with_a_larger_budget_continues_to_the_run_trained_that_long(tmp_path, dataset, capsys):
    short, run, ref = stub_config(dataset, steps=4), tmp_path / "run", tmp_path / "ref"
    train(short, run, progress=False)
    (run / "summary.json").write_text("{}")  # as if evaluated at 4 steps
    longer = stub_config(dataset, steps=7)
    with pytest.raises(ConfigError, match="steps"):
        train(longer, run, resume=False, progress=False)  # without --resume it stays a different run
    train(longer, run, resume=True, progress=False)
    assert "continuing its training from 4 to 7 steps" in capsys.readouterr().err
    train(longer, ref, progress=False)
    a, b = params(run), params(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sessions = json.loads((run / "provenance.json").read_text())["sessions"]
    assert [s.get("resumed_from_step") for s in sessions][-1] == 4  # continued, not trained again
    moved = list(run.glob("superseded-extension-*"))
    assert len(moved) == 1 and {f.name for f in moved[0].iterdir()} == {"train_complete.json", "summary.json"}
    assert json.loads((run / "train_complete.json").read_text())["steps"] == 7
    assert load_run_config(run / "config.yaml").steps == 7
    with pytest.raises(ConfigError, match="steps"):
        train(stub_config(dataset, steps=5), run, resume=True, progress=False)  # past a smaller budget: refused
