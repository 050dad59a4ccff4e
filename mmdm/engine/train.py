"""The trainer shared by every synthesis method.

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
  ``torch.Generator`` passed to ``train_step``) is checkpointed;
* image panels and validation run inside :func:`isolated_rng` with their own
  generators, and the DataLoader gets its own generator, so none of them
  changes the training stream.

Optimiser groups: the trainer builds one Adam per group of
``method.optimizer_groups()`` (one, ``"main"``, for most methods; two for GANs),
set from ``method.optim_configs()[group]``, and calls ``method.train_step(batch,
ctx)`` once per batch with a :class:`~mmdm.methods.base.StepContext` (the
optimisers, the training RNG, autocast, gradient clipping). The default step
runs ``training_losses`` and one optimiser step per group; the GANs run their
generator once and step D, then G. The method's per-pixel terms use the
:class:`~mmdm.losses.emphasis.PixelLoss` the trainer builds from
``TrainConfig.emphasis``. The weight average is ``TrainConfig.ema`` or else
``method.ema_config()``. The trainer talks to the method only through
:class:`~mmdm.methods.base.SynthesisMethod`.

The run's config and method (:mod:`mmdm.engine.spec`), its directory and
provenance (:mod:`mmdm.engine.rundir`), data order (:mod:`mmdm.engine.batches`),
EMA (:mod:`mmdm.engine.ema`) and checkpoints with RNG state
(:mod:`mmdm.engine.checkpoint`) live in their own modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm  # not tqdm.auto: in a kernel without ipywidgets it warns with a path on import

from mmdm.config import ConfigError, save_yaml, to_dict
from mmdm.data.crops import CropSampler
from mmdm.data.dataset import WindowDataset
from mmdm.engine.batches import collate, epoch_batches, steps_per_epoch, to_device
from mmdm.engine.checkpoint import CheckpointManager, capture_rng, isolated_rng, restore_rng
from mmdm.engine.distributed import DistInfo, barrier, broadcast_object, cleanup, gather_objects, init_distributed
from mmdm.engine.ema import EMA
from mmdm.engine.panels import window_panel
from mmdm.engine.precision import PrecisionError, precision_info
from mmdm.engine.rundir import (RunLockedError, end_session, heartbeat, run_lock, run_paths, start_session, supersede,
                                truncate_validation_log, utc_now)
from mmdm.engine.spec import (TrainConfig, build_method_from_config, check_checkpoint_config, check_run_dir,
                              extend_run_dir, method_optim_configs, resolve_ema, resolve_method_config)
from mmdm.engine.validation import ValidationVessels
from mmdm.engine.volume_validation import ValidationVolumes
from mmdm.io import os_error_message, write_json
from mmdm.losses.emphasis import PixelLoss
from mmdm.methods.base import MAIN, StepContext, SynthesisMethod
from mmdm.optim import EMAConfig


class _LossModule(nn.Module):
    """Wraps a method so that a forward pass the method's ``train_step`` runs through
    ``ctx.run(fn, *args)`` is DistributedDataParallel's forward (gradients averaged)."""

    def __init__(self, method: SynthesisMethod):
        super().__init__()
        self.method = method

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


class Trainer:
    """Owns the method, the optimisers, the data order and the run directory's training files."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, info: DistInfo | None = None,
                 progress: bool = True, profile: str | None = None):
        cfg.validate()
        # the run is built from, and recorded with, its resolved method config (every field)
        cfg = resolve_method_config(cfg)
        self.cfg = cfg
        self.paths = run_paths(run_dir)
        self.info = info or DistInfo(device=torch.device("cpu"))
        self.device = self.info.device
        self.progress = progress
        self.profile = profile
        try:  # the precision this device computes natively (amp "auto"), or a clear refusal of bf16
            self.precision = precision_info(cfg.amp, self.device, cfg.channels_last)
        except PrecisionError as e:
            raise ConfigError(str(e)) from None
        self.amp = self.precision["amp"]
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self._seed_everything(cfg.seed)
        self.dataset = WindowDataset(cfg.data, "train")
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), cfg.batch_size, self.info.world_size)
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
        # the caller's own config: a "module:callable" method is the caller's code, so it may run
        self.method = build_method_from_config(cfg, allow_code=True).to(self.device)
        self.method.pixel_loss = PixelLoss(cfg.emphasis)
        self.crops: CropSampler | None = None
        if cfg.crops is not None:  # the crop sides must be multiples of what the network needs
            multiple = math.lcm(cfg.crops.multiple, self.method.spatial_multiple)
            self.crops = CropSampler.from_dataset(self.dataset, dataclasses.replace(cfg.crops, multiple=multiple),
                                                  seed=cfg.seed)
        if cfg.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.groups = {k: list(v) for k, v in self.method.optimizer_groups().items()}
        if not self.groups:
            raise ConfigError(f"method '{cfg.method}' returned no optimiser groups")
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.grad_clip: dict[str, float | None] = {}
        optim_configs = method_optim_configs(self.method)
        for name, params in self.groups.items():
            oc = optim_configs[name]
            # foreach: Adam's update as one multi-tensor op per step instead of a Python loop over the
            # (for MMDM ~1000) parameter tensors; the same arithmetic, so the same weights bit for bit
            self.optimizers[name] = torch.optim.Adam(self.method.param_groups(name, params), lr=oc.lr,
                                                     betas=tuple(oc.betas), weight_decay=oc.weight_decay,
                                                     foreach=True)
            self.grad_clip[name] = cfg.grad_clip if cfg.grad_clip is not None else oc.grad_clip
        self.ema_cfg = resolve_ema(cfg, self.method)
        self.ema = EMA(self.method, self.ema_cfg) if self.ema_cfg is not None else None
        seed = int(np.random.SeedSequence([cfg.seed, self.info.rank, 17]).generate_state(1)[0])
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.loss_module: nn.Module = _LossModule(self.method)
        if self.info.distributed:
            self.loss_module = DistributedDataParallel(self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda"
                                   else None, find_unused_parameters=len(self.groups) > 1)
        self.step = 0
        self.ckpt = CheckpointManager(self.paths.checkpoints, cfg.keep_last)
        self.writer = None
        self._panel_batch: dict | None = None
        self._val_dataset: WindowDataset | None = None
        self._val_vessels: ValidationVessels | None = None
        self._val_volumes: ValidationVolumes | None = None
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
            for group in o.param_groups:  # a checkpoint's groups carry their own flag; keep the multi-tensor update
                group["foreach"] = True
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
        path = None
        if self.info.is_main:
            path = self.ckpt.save(self.step, state)
            heartbeat(self.paths.root, last_step=self.step)  # a session killed later still counts its time
        barrier(self.info)
        return path

    # -- data ---------------------------------------------------------------------
    def batches(self, start_step: int) -> Iterator[dict]:
        """Batches from ``start_step`` to the end: whole-slice windows epoch by epoch (a pure function
        of seed and epoch) or, with ``cfg.crops``, the crops of each step (a pure function of seed,
        rank and step, :class:`mmdm.data.crops.CropSampler`)."""
        if self.crops is not None:
            for step in range(start_step, self.total_steps):
                yield collate(self.crops.batch(step, self.cfg.batch_size, self.info.rank))
            return
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
                                collate_fn=collate, pin_memory=self.device.type == "cuda", generator=loader_gen)
            for b in loader:
                yield b
                step += 1

    def headline_loss(self) -> float:
        """The loss the progress bar shows: ``loss``, or for several optimiser groups the
        generator's (else the first group's) ``<group>/loss``."""
        logs = self.last_losses
        if "loss" in logs:
            return logs["loss"]
        for key in ("generator/loss", *sorted(k for k in logs if k.endswith("/loss"))):
            if key in logs:
                return logs[key]
        return float("nan")

    # -- one step -------------------------------------------------------------------
    def _autocast(self):
        """bf16 autocast of the forward pass and the losses (CUDA or CPU); weights, gradients and
        Adam's state stay fp32. Ops that must not run in bf16 opt out themselves (e.g. the
        authors' channel attention, :func:`mmdm.nets.resunet.global_channel_attention`); the
        losses compare bf16 predictions with fp32 targets, so their differences and means are
        computed in fp32 by type promotion."""
        if self.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _memory_format(self, batch: dict) -> dict:
        if not self.cfg.channels_last:
            return batch
        cl = torch.channels_last
        return {**batch, "sources": {m: v.contiguous(memory_format=cl) for m, v in batch["sources"].items()},
                "target": batch["target"].contiguous(memory_format=cl)}

    def step_context(self) -> StepContext:
        """The :class:`StepContext` of the next step (its number is ``self.step + 1``)."""
        return StepContext(self.optimizers, generator=self.generator, step=self.step + 1, autocast=self._autocast,
                           forward=self.loss_module, params=self.groups, grad_clip=self.grad_clip,
                           label=self.cfg.method)

    def train_step(self, batch: dict) -> dict[str, Tensor]:
        """One training step (``method.train_step``, see the module docstring); returns detached scalars."""
        batch = self._memory_format(to_device(batch, self.device))
        self.method.train()
        ctx = self.step_context()
        try:
            return self.method.train_step(batch, ctx)
        finally:
            ctx.zero_grad()

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
            self._panel_batch = collate([ds[idx[len(idx) // 2]]])
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
        batch = to_device(self._panel_source(), self.device)
        with isolated_rng():
            self.method.eval()
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
            pred = self.method.sample(batch["sources"], steps=self.cfg.image_steps, generator=gen)
            self.method.train()
        panel = window_panel({m: v[0] for m, v in batch["sources"].items()}, pred[0], batch["target"][0])
        self.writer.add_image("panel/sources_pred_target", panel, self.step)

    @torch.no_grad()
    def validation_losses(self) -> dict[str, float]:
        """Mean losses of the whole model (group ``"main"``: for a GAN the generator's objective, with
        ``loss_d`` beside it) on the first ``val_batches`` validation batches (fixed order and noise)."""
        ds = self._validation_dataset()
        if ds is None:
            return {}
        sums: dict[str, float] = {}
        n = 0
        with isolated_rng():
            self.method.eval()
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
            for i in range(0, min(len(ds), self.cfg.val_batches * self.cfg.batch_size), self.cfg.batch_size):
                b = to_device(collate([ds[j] for j in range(i, min(i + self.cfg.batch_size, len(ds)))]),
                               self.device)
                for k, v in self.method.training_losses(b, gen, group=MAIN).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
            self.method.train()
        out = {k: v / max(n, 1) for k, v in sums.items()}
        if self.writer is not None:
            for k, v in out.items():
                self.writer.add_scalar(f"val/{k}", v, self.step)
        return out

    @torch.no_grad()
    def validation_vessels(self) -> dict[str, Any]:
        """The vessel score on ``val_windows`` fixed validation windows (:mod:`mmdm.engine.validation`),
        sampled with ``image_steps`` steps and the EMA weights when the run keeps them."""
        ds = self._validation_dataset()
        if ds is None or not self.cfg.val_windows:
            return {}
        if self._val_vessels is None:
            self._val_vessels = ValidationVessels(ds, self.cfg.val_windows)
        with isolated_rng():
            self.method.eval()
            try:
                with (self.ema.swapped(self.method) if self.ema is not None else contextlib.nullcontext()):
                    out = self._val_vessels.score(self.method, self.device, self.cfg.image_steps, self.cfg.seed,
                                                  self.cfg.batch_size)
            finally:
                self.method.train()
        if self.writer is not None and out:
            self.writer.add_scalar("val/vessel_recovery", out["recovery"], self.step)
            self.writer.add_scalar("val/vessel_psnr", out["psnr"], self.step)
        return out

    @torch.no_grad()
    def validation_volumes(self) -> dict[str, Any]:
        """Whole-volume scores of the first ``val_volumes`` validation subjects
        (:mod:`mmdm.engine.volume_validation`), with the weights evaluation will use (EMA when kept)."""
        if not self.cfg.val_volumes or self._validation_dataset() is None:
            return {}
        if self._val_volumes is None:
            steps = self.cfg.val_volume_steps if self.cfg.val_volume_steps is not None else self.cfg.image_steps
            self._val_volumes = ValidationVolumes(self.cfg.data, self.cfg.val_volumes, self.cfg.val_volume_stride,
                                                  steps)
        with isolated_rng():
            self.method.eval()
            try:
                with (self.ema.swapped(self.method) if self.ema is not None else contextlib.nullcontext()):
                    out = self._val_volumes.score(self.method, self.device, self.cfg.seed, self.cfg.batch_size)
            finally:
                self.method.train()
        if self.writer is not None:
            for k in ("psnr", "ssim", "mip_psnr", "mip_ssim", "vessel_recovery"):
                if k in out:
                    self.writer.add_scalar(f"val/volume_{k}", out[k], self.step)
        return out

    def validate(self) -> None:
        """Validation losses, vessel score and whole-volume scores; one line per validation in
        ``validation.jsonl``."""
        losses = self.validation_losses()
        vessel = self.validation_vessels()
        entry: dict[str, Any] = {"step": self.step, "losses": losses, "vessel": vessel}
        volume = self.validation_volumes()
        if volume:
            entry["volume"] = volume
        line = json.dumps(entry)
        with open(self.paths.validation, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    # -- the loop -------------------------------------------------------------------
    def run(self, resume: bool = True, force_new: bool = False) -> Path:
        """Train to ``total_steps`` (resuming from the latest checkpoint); returns the run directory.

        The main process holds the run directory's lock (:func:`mmdm.engine.rundir.run_lock`)
        throughout. ``force_new``: move the directory's old run files into
        ``superseded-<time>/`` and start over."""
        with contextlib.ExitStack() as stack:
            return self._run(stack, resume, force_new)

    def _run(self, stack: contextlib.ExitStack, resume: bool, force_new: bool) -> Path:
        p, cfg, main = self.paths, self.cfg, self.info.is_main
        error = None
        if main:
            try:
                stack.enter_context(run_lock(p.root, "training"))
                if force_new:
                    moved = supersede(p.root)
                    if moved is not None:
                        print(f"{p.root}: the previous run's files were moved to {moved}", file=sys.stderr)
                    resume = False
                grown = extend_run_dir(p.root, cfg) if resume else None
                if grown is not None:  # the same run with a larger budget: it continues from its last checkpoint
                    old, moved = grown
                    print(f"{p.root}: continuing its training from {old} to {cfg.steps} steps"
                          + (f" (its end-of-training record and evaluation moved to {moved})" if moved else ""),
                          file=sys.stderr)
                exists = check_run_dir(p.root, cfg, resume)
                if exists and p.train_complete.is_file():
                    print(f"{p.root}: training already complete", file=sys.stderr)
                if not exists:
                    save_yaml(cfg, p.config)
                self.ckpt.remove_orphans()  # temporary files of writes cut short by a kill
            except (ConfigError, RunLockedError) as e:
                error = (type(e).__name__, str(e), None)
            except OSError as e:  # e.g. a read-only or full disk: said in one line before any work
                error = ("OSError", os_error_message(e), e.errno)
        error = broadcast_object(self.info, error)
        if error is not None:
            kind, msg, err = error
            if kind == "RunLockedError":
                raise RunLockedError(msg)
            if err is not None:
                raise OSError(err, msg)
            raise ConfigError(msg)
        if p.train_complete.is_file():
            return p.root
        found = self.ckpt.load_newest(map_location="cpu") if resume else None  # RNG states must stay on the CPU
        if found is not None:
            path, state = found
            check_checkpoint_config(path, state, cfg)
            self.load_state_dict(state)
            del state
        start = self.step
        if main:
            from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is heavy and only rank 0 logs

            truncate_validation_log(p.root, start)  # the steps after the checkpoint are trained again
            start_session(p.root, profile=self.profile, seed=cfg.seed, device=self.device,
                          world_size=self.info.world_size, resumed_from_step=start,
                          precision=self.precision)
            self.writer = SummaryWriter(str(p.tb), purge_step=start if start else None)
        bar = None
        if main and self.progress:
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
                        bar.set_postfix(loss=f"{self.headline_loss():.4g}",
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
                "emphasis": {**to_dict(cfg.emphasis), "applied": bool(cfg.emphasis.active and
                                                                      self.method.uses_pixel_loss)},
                "crops": to_dict(cfg.crops) if cfg.crops is not None else None,
                "finished": utc_now()})
        barrier(self.info)
        return p.root


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = True, progress: bool = True,
          profile: str | None = None, force_new: bool = False) -> Path:
    """Train (or resume) the run ``run_dir`` with ``cfg``; works under torchrun (one process per GPU).
    ``force_new``: move an existing run's files aside (``superseded-<time>/``) and start over."""
    cfg.validate()
    info = init_distributed(cfg.device)
    try:
        return Trainer(cfg, run_dir, info, progress=progress, profile=profile).run(resume=resume, force_new=force_new)
    finally:
        cleanup(info)


__all__ = ["EMAConfig", "TrainConfig", "Trainer", "train"]  # EMAConfig, TrainConfig: re-exported for callers
