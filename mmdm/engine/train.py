"""Training engine shared by every synthesis method.

``train(cfg, run_dir)`` trains the registered method ``cfg.method`` on 2.5D
windows of ``cfg.data`` with Adam (the method's :class:`OptimConfig`; paper:
lr 1e-4, batch 4, 200 epochs), writes TensorBoard logs, checkpoints every
``checkpoint_every`` steps and at the end, and resumes an interrupted run
from its latest checkpoint.

Reproducibility contract (tested): on the CPU, a run killed at any point and
resumed ends with weights bit-identical to an uninterrupted run. This holds
because

* the data order is a pure function of ``(seed, epoch)`` (:func:`epoch_batches`),
  and the position inside an epoch is ``step % steps_per_epoch``;
* every RNG (Python, numpy, torch CPU/CUDA and the trainer's own
  ``torch.Generator`` passed to ``training_losses``) is checkpointed;
* image panels and validation run inside :func:`isolated_rng` with their own
  generators, and the DataLoader gets its own generator, so none of them
  changes the training stream.

Optimiser groups: a method whose ``optimizer_groups()`` returns several groups
(GANs) is stepped group by group, in dict order: all gradients are zeroed,
``training_losses(batch, generator, group=name)`` is called, its ``"loss"`` is
back-propagated and only that group's optimiser steps.
"""

from __future__ import annotations

import contextlib
import importlib
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from mmdm.config import ConfigError, from_dict, load_yaml, save_yaml, to_dict
from mmdm.data.dataset import DataConfig, WindowDataset
from mmdm.engine.checkpoint import CheckpointManager, capture_rng, restore_rng
from mmdm.engine.distributed import DistInfo, barrier, broadcast_object, cleanup, gather_objects, init_distributed
from mmdm.engine.runs import end_session, run_paths, start_session, utc_now
from mmdm.io import write_json
from mmdm.methods.base import MAIN, SynthesisMethod
from mmdm.optim import EMAConfig, OptimConfig

#: Keys that may differ between the stored config and the one given on resume
#: (they change how a run is executed or logged, never its numbers).
RUNTIME_KEYS = frozenset({"device", "num_workers", "log_every", "image_every", "image_steps", "checkpoint_every",
                          "keep_last", "val_every", "val_batches", "deterministic"})


@dataclass
class TrainConfig:
    """One training run (YAML-loadable with :func:`mmdm.config.load_yaml`).

    ``batch_size`` is per process (paper: 4). Exactly one of ``steps`` (total
    optimiser steps) and ``epochs`` is used; ``steps`` wins when both are set.
    ``method_kwargs`` go to the method's factory (e.g. ``variant``, ``config``,
    overrides); ``sources`` defaults to ``data.sources``. ``method`` is a
    registry name (``mmdm``) or ``"module:factory"`` for a method defined
    outside the package. ``amp="bf16"`` autocasts on CUDA only.
    ``image_every``/``val_every``/``checkpoint_every`` = 0 disables them.
    """

    method: str = "mmdm"
    method_kwargs: dict[str, Any] = field(default_factory=lambda: {"variant": "full", "config": "paper"})
    data: DataConfig = field(default_factory=DataConfig)
    steps: int | None = None
    epochs: int | None = 200
    batch_size: int = 4
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    grad_clip: float | None = None
    ema: EMAConfig | None = None  # None: the method's own default (method.ema_config())
    deterministic: bool = False
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    image_every: int = 1000
    image_steps: int = 10
    val_every: int = 0
    val_batches: int = 8

    def validate(self) -> None:
        if self.steps is None and self.epochs is None:
            raise ConfigError("TrainConfig: set steps (total optimiser steps) or epochs")
        for k in ("steps", "epochs"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"TrainConfig.{k} must be >= 1, got {v}")
        if self.batch_size < 1:
            raise ConfigError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.amp not in ("none", "bf16"):
            raise ConfigError(f"TrainConfig.amp: unknown value {self.amp!r}; use 'none' or 'bf16'")
        if self.keep_last < 1:
            raise ConfigError(f"TrainConfig.keep_last must be >= 1, got {self.keep_last}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"TrainConfig.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.ema is not None:
            self.ema.validate("TrainConfig.ema")


# ----------------------------------------------------------------------------
# methods


def method_factory(name: str) -> Callable[..., nn.Module]:
    """Registry name -> factory; ``"package.module:function"`` imports the function."""
    if ":" in name:
        mod, attr = name.split(":", 1)
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"method '{name}': cannot import {attr} from module {mod} ({e}); check the "
                              "module is on PYTHONPATH or use a registered method name") from e
    from mmdm.methods import METHODS

    try:
        return METHODS.get(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None


def build_method_from_config(cfg: TrainConfig) -> nn.Module:
    """Build ``cfg.method`` with ``cfg.method_kwargs`` (``sources`` defaulting to ``cfg.data.sources``)
    and check it against the data (sources available, window size)."""
    kw = dict(cfg.method_kwargs)
    kw.setdefault("sources", tuple(cfg.data.sources))
    method = method_factory(cfg.method)(**kw)
    missing = [m for m in getattr(method, "sources", ()) if m not in cfg.data.sources]
    if missing:
        raise ConfigError(f"method '{cfg.method}' expects source modality(ies) {missing} that data.sources "
                          f"{list(cfg.data.sources)} does not provide; add them to data.sources or change "
                          "method_kwargs.sources")
    win = getattr(method, "window", None)
    if win is not None and win != cfg.data.window:
        raise ConfigError(f"method '{cfg.method}' is built for {win}-slice windows but data.window is "
                          f"{cfg.data.window}; make them equal")
    return method


def method_optim_configs(method: SynthesisMethod) -> dict[str, OptimConfig]:
    """``method.optim_configs()``, checked to name exactly the groups of ``method.optimizer_groups()``."""
    groups, configs = list(method.optimizer_groups()), method.optim_configs()
    if sorted(configs) != sorted(groups):
        raise ConfigError(f"method '{method.name}': optim_configs() names the groups {sorted(configs)} but "
                          f"optimizer_groups() returns {sorted(groups)}; they must match")
    return configs


class _LossModule(nn.Module):
    """Wraps a method so that DistributedDataParallel's forward is ``training_losses``."""

    def __init__(self, method: SynthesisMethod):
        super().__init__()
        self.method = method

    def forward(self, batch: dict, generator: torch.Generator | None = None, group: str = MAIN):
        return self.method.training_losses(batch, generator, group=group)


# ----------------------------------------------------------------------------
# data order


def steps_per_epoch(n_items: int, batch_size: int, world_size: int = 1) -> int:
    """Global batches per epoch (the last incomplete one is dropped)."""
    g = batch_size * world_size
    if n_items < g:
        raise ConfigError(f"the training split has {n_items} windows, fewer than one global batch of {g} "
                          f"(batch_size {batch_size} x {world_size} process(es)); lower batch_size or add data")
    return n_items // g


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int, world_size: int = 1,
                  rank: int = 0) -> list[list[int]]:
    """This rank's batches of one epoch: a pure function of ``(seed, epoch)``.

    The epoch's permutation is drawn from ``numpy.random.default_rng([seed, epoch])``
    and truncated to whole global batches; rank ``r`` takes every
    ``world_size``-th index from ``r`` (DistributedSampler semantics), so the
    union of the ranks' i-th batches is the i-th block of ``batch_size x
    world_size`` indices of the permutation -- the batch a single process with
    the combined batch size sees.
    """
    spe = steps_per_epoch(n_items, batch_size, world_size)
    perm = np.random.default_rng([seed, epoch]).permutation(n_items)[: spe * batch_size * world_size]
    mine = perm[rank::world_size]
    return [mine[i * batch_size:(i + 1) * batch_size].tolist() for i in range(spe)]


def _collate(items: list[dict]) -> dict:
    return {"sources": {m: torch.stack([it["sources"][m] for it in items]) for m in items[0]["sources"]},
            "target": torch.stack([it["target"] for it in items]),
            "subject": [it["subject"] for it in items], "z0": torch.tensor([it["z0"] for it in items])}


def _to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {"sources": {m: v.to(device, non_blocking=nb) for m, v in batch["sources"].items()},
            "target": batch["target"].to(device, non_blocking=nb)}


# ----------------------------------------------------------------------------
# EMA


class EMA:
    """Shadow copy of the floating-point parameters and buffers (BBDM-style)."""

    def __init__(self, model: nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step % self.cfg.every:
            return
        for k, v in model.state_dict().items():
            if k not in self.shadow:
                continue
            if step < self.cfg.start_step:
                self.shadow[k].copy_(v)
            else:
                self.shadow[k].lerp_(v.detach(), 1.0 - self.cfg.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without touching any global RNG stream (Python, numpy, torch CPU and CUDA)."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


# ----------------------------------------------------------------------------
# image panels


def _to_unit(x: Tensor) -> Tensor:
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


def window_panel(sources: dict[str, Tensor], prediction: Tensor, target: Tensor) -> Tensor:
    """A (1, rows*H, 2*W) image in [0, 1]: one row per source, then the prediction and
    the target; left the window's centre slice, right its MIP over the K slices."""
    rows = []
    for x in [*sources.values(), prediction, target]:
        x = _to_unit(x)  # (K, H, W)
        rows.append(torch.cat([x[x.shape[0] // 2], x.amax(0)], dim=1))
    return torch.cat(rows, dim=0)[None]


# ----------------------------------------------------------------------------
# the trainer


def _diff_configs(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff_configs(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{prefix[:-1]}: stored {a!r} != given {b!r}"]


def check_run_dir(run_dir: str | Path, cfg: TrainConfig, resume: bool) -> bool:
    """Refuse to mix runs: returns True when ``run_dir`` already holds this run.

    A stored config that differs (outside :data:`RUNTIME_KEYS`) raises; an
    existing run with checkpoints and ``resume=False`` raises too.
    """
    p = run_paths(run_dir)
    if not p.config.is_file():
        return False
    stored = load_yaml(TrainConfig, p.config)
    a = {k: v for k, v in to_dict(stored).items() if k not in RUNTIME_KEYS}
    b = {k: v for k, v in to_dict(cfg).items() if k not in RUNTIME_KEYS}
    diff = _diff_configs(a, b)
    if diff:
        raise ConfigError(f"{run_dir} holds a run with a different config ({'; '.join(diff[:8])}). "
                          "Use another --run-dir for a new run, or resume this one with its own config "
                          f"(`mmdm train --config {p.config} --run-dir {run_dir} --resume`).")
    has_ckpt = bool(CheckpointManager(p.checkpoints).steps()) or p.train_complete.is_file()
    if has_ckpt and not resume:
        raise ConfigError(f"{run_dir} already holds this run (checkpoints or train_complete.json). Pass --resume "
                          "(resume=True) to continue it, or choose another --run-dir.")
    return True


class Trainer:
    """Owns the method, the optimisers, the data order and the run directory's training files."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, info: DistInfo | None = None,
                 progress: bool = True, profile: str | None = None):
        cfg.validate()
        self.cfg = cfg
        self.paths = run_paths(run_dir)
        self.info = info or DistInfo(device=torch.device("cpu"))
        self.device = self.info.device
        self.progress = progress
        self.profile = profile
        if cfg.amp == "bf16" and self.device.type != "cuda":
            raise ConfigError("amp 'bf16' autocasts on CUDA only; this run is on the CPU. Set amp: none "
                              "(CPU training is fp32), or train on a GPU.")
        if cfg.deterministic:
            import os

            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self._seed_everything(cfg.seed)
        self.dataset = WindowDataset(cfg.data, "train")
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), cfg.batch_size, self.info.world_size)
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
        self.method = build_method_from_config(cfg).to(self.device)
        self.groups = {k: list(v) for k, v in self.method.optimizer_groups().items()}
        if not self.groups:
            raise ConfigError(f"method '{cfg.method}' returned no optimiser groups")
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.grad_clip: dict[str, float | None] = {}
        optim_configs = method_optim_configs(self.method)
        for name, params in self.groups.items():
            oc = optim_configs[name]
            self.optimizers[name] = torch.optim.Adam(params, lr=oc.lr, betas=tuple(oc.betas),
                                                     weight_decay=oc.weight_decay)
            self.grad_clip[name] = cfg.grad_clip if cfg.grad_clip is not None else oc.grad_clip
        self.ema_cfg = cfg.ema if cfg.ema is not None else self.method.ema_config()
        self.ema = EMA(self.method, self.ema_cfg) if self.ema_cfg is not None else None
        seed = int(np.random.SeedSequence([cfg.seed, self.info.rank, 17]).generate_state(1)[0])
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.loss_module: nn.Module = _LossModule(self.method)
        if self.info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.loss_module = DDP(self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda"
                                   else None, find_unused_parameters=len(self.groups) > 1)
        self.step = 0
        self.ckpt = CheckpointManager(self.paths.checkpoints, cfg.keep_last)
        self.writer = None
        self._panel_batch: dict | None = None
        self._val_dataset: WindowDataset | None = None
        self.last_losses: dict[str, float] = {}

    # -- state ------------------------------------------------------------------
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        rngs = gather_objects(self.info, capture_rng({"train": self.generator}))
        return {
            "format": 1,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "batch_in_epoch": self.step % self.steps_per_epoch,
            "total_steps": self.total_steps,
            "world_size": self.info.world_size,
            "method": self.cfg.method,
            "model": self.method.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rngs,
            "config": to_dict(self.cfg),
            "losses": dict(self.last_losses),
            "time": utc_now(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["model"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        rngs = state["rng"]
        if state.get("world_size", 1) == self.info.world_size and self.info.rank < len(rngs):
            restore_rng(rngs[self.info.rank], {"train": self.generator})
        else:
            warnings.warn(f"checkpoint was written by {state.get('world_size')} process(es), this run has "
                          f"{self.info.world_size}: the global batch, the data order and the RNG streams (re-seeded "
                          "from seed, rank and step) change, so the resumed run is not bit-identical to an "
                          "uninterrupted one", stacklevel=2)
            self._seed_everything(self.cfg.seed + 1000003 * self.step + self.info.rank)
            self.generator.manual_seed(int(np.random.SeedSequence([self.cfg.seed, self.info.rank,
                                                                   self.step]).generate_state(1)[0]))

    def save_checkpoint(self) -> Path | None:
        state = self.state_dict()  # every rank takes part in gathering the RNG states
        path = self.ckpt.save(self.step, state) if self.info.is_main else None
        barrier(self.info)
        return path

    # -- data ---------------------------------------------------------------------
    def batches(self, start_step: int) -> Iterator[dict]:
        """Batches from ``start_step`` to the end, epoch by epoch (pure function of seed, epoch)."""
        from torch.utils.data import DataLoader

        step = start_step
        while step < self.total_steps:
            epoch, pos = divmod(step, self.steps_per_epoch)
            order = epoch_batches(len(self.dataset), self.cfg.batch_size, self.cfg.seed, epoch,
                                  self.info.world_size, self.info.rank)[pos:]
            order = order[: self.total_steps - step]
            # the loader's own generator: creating its iterator must not draw from the global torch RNG
            # (that draw would happen at a different point in a resumed run)
            loader_gen = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
            loader = DataLoader(self.dataset, batch_sampler=order, num_workers=self.cfg.num_workers,
                                collate_fn=_collate, pin_memory=self.device.type == "cuda", generator=loader_gen)
            for b in loader:
                yield b
                step += 1

    # -- one step -------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.amp == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch: dict) -> dict[str, Tensor]:
        """One optimiser step per group (see the module docstring); returns detached scalars."""
        batch = _to_device(batch, self.device)
        self.method.train()
        multi = len(self.optimizers) > 1
        logs: dict[str, Tensor] = {}
        for name, opt in self.optimizers.items():
            for o in self.optimizers.values():
                o.zero_grad(set_to_none=True)
            with self._autocast():
                losses = self.loss_module(batch, self.generator, name)
            if "loss" not in losses:
                raise KeyError(f"method '{self.cfg.method}'.training_losses returned {sorted(losses)}; it must "
                               "contain 'loss' (the scalar to back-propagate)")
            loss = losses["loss"]
            if not torch.isfinite(loss.detach()).all():
                raise FloatingPointError(
                    f"non-finite loss {float(loss)} at step {self.step + 1} (group '{name}'). Lower the learning "
                    "rate, set grad_clip, or check the data for extreme values; resume from the last checkpoint.")
            loss.backward()
            clip = self.grad_clip[name]
            if clip is not None:
                gn = torch.nn.utils.clip_grad_norm_(self.groups[name], clip)
                logs[f"{name}/grad_norm" if multi else "grad_norm"] = gn.detach()
            opt.step()
            for k, v in losses.items():
                logs[f"{name}/{k}" if multi else k] = v.detach().float()
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)
        return logs

    # -- logging ------------------------------------------------------------------
    def _log_scalars(self, logs: dict[str, Tensor]) -> None:
        self.last_losses = {k: float(v) for k, v in logs.items()}
        if self.writer is None:
            return
        for k, v in self.last_losses.items():
            self.writer.add_scalar(f"train/{k}", v, self.step)
        for k, v in self.method.log_scalars().items():
            self.writer.add_scalar(k, v, self.step)
        for name, o in self.optimizers.items():
            self.writer.add_scalar(f"lr/{name}", o.param_groups[0]["lr"], self.step)

    def _panel_source(self) -> dict:
        if self._panel_batch is None:
            ds = self._validation_dataset() or self.dataset
            first = ds.index[0][0]
            idx = [i for i, (s, _) in enumerate(ds.index) if s == first]
            self._panel_batch = _collate([ds[idx[len(idx) // 2]]])
        return self._panel_batch

    def _validation_dataset(self) -> WindowDataset | None:
        if self._val_dataset is None:
            try:
                self._val_dataset = WindowDataset(self.cfg.data, "val")
            except Exception:  # noqa: BLE001 - no val split: panels use the training set
                return None
        return self._val_dataset

    @torch.no_grad()
    def log_images(self) -> None:
        """Source / prediction (``method.sample`` with ``image_steps`` steps) / target panel."""
        if self.writer is None:
            return
        batch = _to_device(self._panel_source(), self.device)
        with isolated_rng():
            self.method.eval()
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
            pred = self.method.sample(batch["sources"], steps=self.cfg.image_steps, generator=gen)
            self.method.train()
        panel = window_panel({m: v[0] for m, v in batch["sources"].items()}, pred[0], batch["target"][0])
        self.writer.add_image("panel/sources_pred_target", panel, self.step)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean training losses on the first ``val_batches`` validation batches (fixed order and noise)."""
        ds = self._validation_dataset()
        if ds is None:
            return {}
        sums: dict[str, float] = {}
        n = 0
        with isolated_rng():
            self.method.eval()
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
            group = next(iter(self.optimizers))
            for i in range(0, min(len(ds), self.cfg.val_batches * self.cfg.batch_size), self.cfg.batch_size):
                b = _to_device(_collate([ds[j] for j in range(i, min(i + self.cfg.batch_size, len(ds)))]),
                               self.device)
                for k, v in self.method.training_losses(b, gen, group=group).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
            self.method.train()
        out = {k: v / max(n, 1) for k, v in sums.items()}
        if self.writer is not None:
            for k, v in out.items():
                self.writer.add_scalar(f"val/{k}", v, self.step)
        return out

    # -- the loop -------------------------------------------------------------------
    def run(self, resume: bool = True) -> Path:
        """Train to ``total_steps`` (resuming from the latest checkpoint); returns the run directory."""
        p, cfg, main = self.paths, self.cfg, self.info.is_main
        error = None
        if main:
            try:
                exists = check_run_dir(p.root, cfg, resume)
                if exists and p.train_complete.is_file():
                    print(f"{p.root}: training already complete", file=sys.stderr)
                p.root.mkdir(parents=True, exist_ok=True)
                if not exists:
                    save_yaml(cfg, p.config)
            except ConfigError as e:
                error = str(e)
        error = broadcast_object(self.info, error)
        if error is not None:
            raise ConfigError(error)
        if p.train_complete.is_file():
            return p.root
        state = self.ckpt.load_latest(map_location="cpu") if resume else None  # RNG states must stay on the CPU
        if state is not None:
            self.load_state_dict(state)
            del state
        start = self.step
        if main:
            from torch.utils.tensorboard import SummaryWriter

            start_session(p.root, profile=self.profile, seed=cfg.seed, device=self.device,
                          world_size=self.info.world_size, resumed_from_step=start)
            self.writer = SummaryWriter(str(p.tb), purge_step=start if start else None)
        bar = None
        if main and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=start, desc=f"train {cfg.method}", unit="step",
                       dynamic_ncols=True)
        t0, n0 = time.time(), start
        try:
            for batch in self.batches(start):
                logs = self.train_step(batch)
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.method, self.step)
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                    self._log_scalars(logs)
                    if bar is not None:
                        rate = (self.step - n0) / max(time.time() - t0, 1e-9)
                        bar.set_postfix(loss=f"{self.last_losses.get('loss', float('nan')):.4g}",
                                        steps_s=f"{rate:.2f}")
                if main and cfg.image_every and self.step % cfg.image_every == 0:
                    self.log_images()
                if main and cfg.val_every and self.step % cfg.val_every == 0:
                    self.validate()
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == self.total_steps:
                    if not self.last_losses:
                        self.last_losses = {k: float(v) for k, v in logs.items()}
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.flush()
                self.writer.close()
        if main:
            end_session(p.root, steps_done=self.step - start)
            write_json(p.train_complete, {
                "steps": self.step, "epochs": self.step / self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch, "world_size": self.info.world_size,
                "checkpoint": str(self.ckpt.latest().relative_to(p.root)), "final_losses": self.last_losses,
                "finished": utc_now()})
        barrier(self.info)
        return p.root


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = True, progress: bool = True,
          profile: str | None = None) -> Path:
    """Train (or resume) the run ``run_dir`` with ``cfg``; works under torchrun (one process per GPU)."""
    cfg.validate()
    info = init_distributed(cfg.device)
    try:
        return Trainer(cfg, run_dir, info, progress=progress, profile=profile).run(resume=resume)
    finally:
        cleanup(info)


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a TrainConfig from YAML with optional nested overrides."""
    cfg = load_yaml(TrainConfig, path)
    if overrides:
        from mmdm.config import replace

        cfg = replace(cfg, overrides)
    return cfg


__all__ = ["EMA", "EMAConfig", "RUNTIME_KEYS", "TrainConfig", "Trainer", "build_method_from_config",
           "check_run_dir", "epoch_batches", "load_train_config", "method_factory", "method_optim_configs", "steps_per_epoch", "train",
           "window_panel"]
