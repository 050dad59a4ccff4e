"""The run spec: :class:`TrainConfig` (one training run, YAML-loadable), the method it builds,
and the guard that keeps two different runs out of one run directory.

A run directory's ``config.yaml`` is a :class:`TrainConfig`; :func:`build_method_from_config`
turns it into the :class:`~mmdm.methods.base.SynthesisMethod` both the trainer and
whole-volume synthesis use.
"""

from __future__ import annotations

import copy

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmdm.config import ConfigError, deep_merge, from_dict, load_yaml, save_yaml, to_dict
from mmdm.data.crops import CropConfig
from mmdm.data.dataset import DataConfig
from mmdm.engine.checkpoint import CheckpointManager
from mmdm.engine.distributed import resolve_device
from mmdm.engine.precision import AMP_REQUESTS, resolve_amp
from mmdm.engine.migrate import migrate_record
from mmdm.engine.rundir import run_paths, supersede
from mmdm.losses.emphasis import EmphasisConfig
from mmdm.methods import METHODS, SynthesisMethod
from mmdm.optim import EMAConfig, OptimConfig

#: Keys that may differ between the stored config and the one given on resume
#: (they change how a run is executed or logged, never its numbers).
RUNTIME_KEYS = frozenset({"device", "num_workers", "log_every", "image_every", "image_steps", "checkpoint_every",
                          "keep_last", "val_every", "val_batches", "val_windows", "val_volumes", "val_volume_stride",
                          "val_volume_steps", "deterministic"})

#: Fields that change only how a trained model is evaluated (the test split's sliding-window stride), never
#: its training: a checkpoint continues whatever they are, and a study re-evaluates a trained run that
#: differs in these alone (:func:`mmdm.study.stale.prepare_re_evaluation`).
EVALUATION_ONLY = ("data.eval_stride",)


# A larger total of steps does not bind a run either: nothing in training depends on the total (the learning
# rate is constant, a step's batch is a function of seed and step, and a resumed run is bit-identical to an
# uninterrupted one), so a run trained to N steps and continued to M is the run trained to M
# (:func:`continues_to`, :func:`extend_run_dir`; `mmdm study` resumes such a run). Runs counted in epochs are
# not extended.
def continues_to(stored: dict[str, Any], step: int, cfg: "TrainConfig") -> bool:
    """Whether a run stored with ``stored`` (a config dict) and now at ``step`` may continue under ``cfg``'s
    total of steps: both count steps, not epochs, and ``cfg`` does not end before ``step``."""
    return (stored.get("epochs") is None and cfg.epochs is None and stored.get("steps") is not None
            and cfg.steps is not None and int(step) <= int(cfg.steps))


#: How the weight average is decided (``TrainConfig.ema_mode``): ``method`` each method's own default
#: (its official code's average, or none), ``all`` the same average for every method (``TrainConfig.ema``,
#: or :data:`SHARED_EMA`), ``none`` raw weights for every method.
EMA_MODES = ("method", "all", "none")
#: The average every method keeps under ``ema_mode="all"`` when ``TrainConfig.ema`` is not set: the one the
#: diffusion baselines' CPU-sized configurations keep (decay 0.995 every step from step 100).
SHARED_EMA = EMAConfig(decay=0.995, start_step=100, every=1)


@dataclass
class TrainConfig:
    """One training run (YAML-loadable with :func:`mmdm.config.load_yaml`).

    ``batch_size`` is per process (paper: 4). Exactly one of ``steps`` (total
    optimiser steps) and ``epochs`` is used; ``steps`` wins when both are set.
    ``method_kwargs`` go to the method's factory (e.g. ``variant``, ``config``,
    overrides); ``sources`` defaults to ``data.sources``. ``method_config``: the
    method's resolved config, every field (a plain dict); training fills it in from
    ``method_kwargs`` (:func:`resolve_method_config`) and every record keeps it. When it
    is set it is what is built (:meth:`~mmdm.methods.base.SynthesisMethod.from_resolved`)
    and ``method_kwargs`` only records how it was asked for, so editing a named
    configuration never changes a run that was made with it. ``method`` is a
    registry name (``mmdm``) or ``"module:factory"`` for a method defined
    outside the package (built when training from this config; a stored run naming one is
    loaded only with ``allow_code``, since that imports and runs the module).
    ``amp``: ``"auto"`` (default) = bf16 autocast where the run's device computes bf16
    natively (CUDA with bf16 support, a CPU with AVX512_BF16 or AMX), else fp32; ``"bf16"``
    = bf16 autocast of the forward pass and the losses, refused on a device without native bf16
    (:func:`mmdm.engine.precision.resolve_amp`); ``"none"`` (or ``"fp32"``) = fp32. Weights,
    gradients and optimiser state are fp32 in every case. ``channels_last``: the networks and batches in channels-last memory format.
    ``image_every``/``val_every``/``checkpoint_every`` = 0 disables them.

    ``ema_mode`` (:data:`EMA_MODES`): one rule for the weight average of every method -- each
    method's own (``method``; ``ema`` overrides it), the same for all (``all``: ``ema`` or
    :data:`SHARED_EMA`), or none (``none``); what evaluation loads follows it (:func:`resolve_ema`).

    ``emphasis``: the vessel emphasis of every method's per-pixel terms
    (:class:`mmdm.losses.emphasis.EmphasisConfig`, kind ``none`` = the published objective).
    ``crops``: 2.5D training crops (:class:`mmdm.data.crops.CropConfig`; their
    ``multiple`` is raised to the network's spatial multiple) instead of whole-slice
    windows (null). ``val_every``: validation losses on ``val_batches`` batches and the
    vessel score (:mod:`mmdm.engine.validation`) on ``val_windows`` windows sampled with
    ``image_steps`` steps (0 windows: losses only), and, with ``val_volumes`` > 0, whole-volume
    PSNR/SSIM (volume and axial MIP) and vessel recovery of the first ``val_volumes`` validation
    subjects (:mod:`mmdm.engine.volume_validation`), synthesised with the sliding window at axial
    stride ``val_volume_stride`` and ``val_volume_steps`` sampler steps (None: ``image_steps``).
    """

    method: str = "mmdm"
    method_kwargs: dict[str, Any] = field(default_factory=lambda: {"variant": "full", "config": "paper"})
    method_config: dict[str, Any] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    steps: int | None = None
    epochs: int | None = 200
    batch_size: int = 4
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    grad_clip: float | None = None
    ema: EMAConfig | None = None  # None: the method's own default (method.ema_config())
    ema_mode: str = "method"
    deterministic: bool = False
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    image_every: int = 1000
    image_steps: int = 10
    val_every: int = 0
    val_batches: int = 8
    val_windows: int = 8
    val_volumes: int = 0
    val_volume_stride: int = 4
    val_volume_steps: int | None = None
    emphasis: EmphasisConfig = field(default_factory=EmphasisConfig)
    crops: CropConfig | None = None

    def validate(self) -> None:
        if self.steps is None and self.epochs is None:
            raise ConfigError("TrainConfig: set steps (total optimiser steps) or epochs")
        for k in ("steps", "epochs"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"TrainConfig.{k} must be >= 1, got {v}")
        if self.batch_size < 1:
            raise ConfigError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.amp not in AMP_REQUESTS:
            raise ConfigError(f"TrainConfig.amp: unknown value {self.amp!r}; use one of {', '.join(AMP_REQUESTS)}")
        if self.keep_last < 1:
            raise ConfigError(f"TrainConfig.keep_last must be >= 1, got {self.keep_last}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"TrainConfig.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.ema is not None:
            self.ema.validate("TrainConfig.ema")
        if self.ema_mode not in EMA_MODES:
            raise ConfigError(f"TrainConfig.ema_mode: unknown value {self.ema_mode!r}; use one of {', '.join(EMA_MODES)}")
        if self.ema_mode == "none" and self.ema is not None:
            raise ConfigError("TrainConfig: ema_mode 'none' (raw weights for every method) contradicts the average "
                              "given in ema; drop one of them")
        if self.val_windows < 0:
            raise ConfigError(f"TrainConfig.val_windows must be >= 0, got {self.val_windows}")
        if self.val_volumes < 0:
            raise ConfigError(f"TrainConfig.val_volumes must be >= 0 (0: no whole-volume validation), got "
                              f"{self.val_volumes}")
        if self.val_volume_stride < 1:
            raise ConfigError(f"TrainConfig.val_volume_stride must be >= 1, got {self.val_volume_stride}")
        if self.val_volume_steps is not None and self.val_volume_steps < 1:
            raise ConfigError(f"TrainConfig.val_volume_steps must be >= 1 or null (image_steps), got "
                              f"{self.val_volume_steps}")
        self.emphasis.validate()
        if self.crops is not None:
            self.crops.validate()


def resolve(base: TrainConfig | dict[str, Any], *layers: dict[str, Any] | None) -> TrainConfig:
    """The one config resolution of the study, the sweeps and ``mmdm train``: ``base`` (a
    :class:`TrainConfig` or its dict), then each layer in order, each a dict shaped like a
    TrainConfig (e.g. ``{"method_kwargs": {"optim": {"lr": 3e-4}}}``, ``{"crops": None}``).

    Nested dicts merge key by key; any other value, None included, replaces what was there
    (``crops: None`` drops the crops). A layer that changes ``method`` or ``method_kwargs``
    without giving ``method_config`` drops the base's resolved ``method_config``, which no
    longer describes what is asked for (training resolves it again). The result is validated.
    """
    merged = to_dict(base) if not isinstance(base, dict) else dict(base)
    for layer in layers:
        if not layer:
            continue
        if ("method" in layer or "method_kwargs" in layer) and "method_config" not in layer:
            merged["method_config"] = None
        merged = deep_merge(merged, layer)
    cfg = from_dict(TrainConfig, merged)
    cfg.validate()
    return cfg


#: What a stored run may not do without the user's consent (the ``--allow-code`` flags' help).
ALLOW_CODE_HELP = ("let the run's config.yaml name a method as 'package.module:callable': that module is IMPORTED "
                   "AND ITS CODE EXECUTED with the config's arguments. Only for run directories you made or trust; "
                   "without it only registered methods (`mmdm methods`) are built")


def is_code_reference(name: str) -> bool:
    """Whether a method name is a ``"package.module:callable"`` reference (code to import)."""
    return ":" in str(name)


def method_factory(name: str, allow_code: bool = False) -> Callable[..., SynthesisMethod]:
    """Registry name -> factory; ``"package.module:function"`` imports the function, but only with
    ``allow_code`` (the caller vouches for the config: a user's own training config, or a stored
    run the user opted in to trust). Without it such a name is refused before anything is imported."""
    if is_code_reference(name):
        if not allow_code:
            raise ConfigError(f"method '{name}' names code to import and run ({name.split(':', 1)[0]}); a stored "
                              "run may only name a registered method (`mmdm methods`). If you made this run "
                              "directory or trust it, pass --allow-code (allow_code=True) to execute that code.")
        mod, attr = name.split(":", 1)
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"method '{name}': cannot import {attr} from module {mod} ({e}); check the "
                              "module is on PYTHONPATH or use a registered method name") from e
    try:
        return METHODS.get(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None


def _method_class(cfg: TrainConfig, allow_code: bool) -> type[SynthesisMethod] | None:
    """The registered class behind ``cfg.method`` (None for a ``"module:callable"`` factory, which
    is not imported here)."""
    if is_code_reference(cfg.method):
        return None
    return getattr(method_factory(cfg.method, allow_code=allow_code), "method_class", None)


def _factory_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    kw = dict(cfg.method_kwargs)
    kw.setdefault("sources", tuple(cfg.data.sources))
    return kw


def resolve_method_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``method_config`` filled in: the config ``method_kwargs`` resolve to now (named
    configuration, variant, sources, overrides), every field as a plain dict. Unchanged when it is
    already set or the method is a ``"module:callable"`` factory (rebuilt from its keyword arguments)."""
    if cfg.method_config is not None:
        return cfg
    cls = _method_class(cfg, allow_code=False)
    if cls is None or cls.config_class is None:
        return cfg
    return dataclasses.replace(cfg, method_config=to_dict(cls.make_config(**_factory_kwargs(cfg))))


def build_method_from_config(cfg: TrainConfig, allow_code: bool = False) -> SynthesisMethod:
    """Build ``cfg.method`` from ``cfg.method_config`` when set (nothing else is read), else with
    ``cfg.method_kwargs`` (``sources`` defaulting to ``cfg.data.sources``), and check it against
    the data (sources available, window size). A ``"module:callable"`` method needs
    ``allow_code`` (:func:`method_factory`)."""
    cls = _method_class(cfg, allow_code)
    if cfg.method_config is not None:
        if cls is None:
            raise ConfigError(f"method '{cfg.method}' is not a registered method class, so it cannot be rebuilt "
                              "from method_config; give its factory's arguments in method_kwargs instead")
        method = cls.from_resolved(cfg.method_config)
    else:
        method = method_factory(cfg.method, allow_code=allow_code)(**_factory_kwargs(cfg))
    if not isinstance(method, SynthesisMethod):
        raise ConfigError(f"method '{cfg.method}' built a {type(method).__name__}, not a "
                          "mmdm.methods.SynthesisMethod; subclass it (training_losses, sample, optim_configs, ...)")
    missing = [m for m in method.sources if m not in cfg.data.sources]
    if missing:
        raise ConfigError(f"method '{cfg.method}' expects source modality(ies) {missing} that data.sources "
                          f"{list(cfg.data.sources)} does not provide; add them to data.sources or change "
                          "method_kwargs.sources")
    win = method.window
    if win is not None and win != cfg.data.window:
        raise ConfigError(f"method '{cfg.method}' is built for {win}-slice windows but data.window is "
                          f"{cfg.data.window}; make them equal")
    return method


def resolve_ema(cfg: TrainConfig, method: SynthesisMethod) -> EMAConfig | None:
    """The weight average a run keeps under ``cfg.ema_mode`` (None: raw weights only)."""
    if cfg.ema_mode == "none":
        return None
    if cfg.ema_mode == "all":
        return cfg.ema if cfg.ema is not None else SHARED_EMA
    return cfg.ema if cfg.ema is not None else method.ema_config()


def method_optim_configs(method: SynthesisMethod) -> dict[str, OptimConfig]:
    """``method.optim_configs()``, checked to name exactly the groups of ``method.optimizer_groups()``."""
    groups, configs = list(method.optimizer_groups()), method.optim_configs()
    if sorted(configs) != sorted(groups):
        raise ConfigError(f"method '{method.name}': optim_configs() names the groups {sorted(configs)} but "
                          f"optimizer_groups() returns {sorted(groups)}; they must match")
    return configs


def load_run_config(path: str | Path) -> TrainConfig:
    """A stored run's TrainConfig (its ``config.yaml``), with ``method_config`` filled in for a
    record written before runs kept it (:func:`mmdm.engine.migrate.migrate_record`)."""
    cfg = load_yaml(TrainConfig, path)
    return from_dict(TrainConfig, migrate_record(to_dict(cfg)), str(path)) if cfg.method_config is None else cfg


def _diff_configs(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff_configs(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{prefix[:-1]}: stored {a!r} != given {b!r}"]


def config_differences(stored: dict[str, Any], cfg: TrainConfig, training_only: bool = False) -> list[str]:
    """The differences (outside :data:`RUNTIME_KEYS`) between a stored config (as a dict: a
    run's config.yaml or a checkpoint's ``config``) and ``cfg``, one ``key: stored != given`` each.
    Both sides are compared resolved: a stored record without ``method_config`` is migrated
    (:func:`mmdm.engine.migrate.migrate_record`), ``cfg`` resolved (:func:`resolve_method_config`).
    ``training_only``: leave out the fields of :data:`EVALUATION_ONLY` too."""
    a = {k: v for k, v in migrate_record(stored).items() if k not in RUNTIME_KEYS}
    b = {k: v for k, v in to_dict(resolve_method_config(cfg)).items() if k not in RUNTIME_KEYS}
    if training_only:
        a, b = copy.deepcopy(a), copy.deepcopy(b)  # the caller's dicts stay as they are
        for key in EVALUATION_ONLY:
            *parents, leaf = key.split(".")
            for side in (a, b):
                for k in parents:
                    side = side.get(k) if isinstance(side, dict) else None
                if isinstance(side, dict):
                    side.pop(leaf, None)
    if "amp" in a and a["amp"] != b.get("amp") and _same_precision(str(a["amp"]), str(b.get("amp")), cfg.device):
        a["amp"] = b["amp"]  # e.g. a run stored with "none" continued as "auto" on a CPU where auto is fp32
    if a.get("method_config") is not None and b.get("method_config") is not None:
        # the resolved configs decide; the keyword arguments only say how each was asked for
        a.pop("method_kwargs", None), b.pop("method_kwargs", None)
    return _diff_configs(a, b)


def _same_precision(a: str, b: str, device: str) -> bool:
    """Whether two ``amp`` values compute the same on ``device`` here (so one run may continue as the other)."""
    try:
        dev = resolve_device(device)
        return resolve_amp(a, dev)[0] == resolve_amp(b, dev)[0]
    except (ConfigError, ValueError):
        return False


def check_run_dir(run_dir: str | Path, cfg: TrainConfig, resume: bool) -> bool:
    """Refuse to mix runs: returns True when ``run_dir`` already holds this run.

    A stored config that differs (outside :data:`RUNTIME_KEYS`) raises; an
    existing run with checkpoints and ``resume=False`` raises too; so do checkpoints
    (or ``train_complete.json``) without a ``config.yaml``, which nothing ties to a config.
    """
    p = run_paths(run_dir)
    has_ckpt = bool(CheckpointManager(p.checkpoints).steps()) or p.train_complete.is_file()
    if not p.config.is_file():
        if has_ckpt:
            raise ConfigError(f"{run_dir} holds checkpoints (or train_complete.json) but no config.yaml, so they "
                              "cannot be matched to this run's config. Use another --run-dir, or pass --force-new "
                              "to move the old files aside (into superseded-<time>/) and start over.")
        return False
    stored = load_run_config(p.config)
    diff = config_differences(to_dict(stored), cfg)
    if diff:
        raise ConfigError(f"{run_dir} holds a run with a different config ({'; '.join(diff[:8])}). "
                          "Use another --run-dir for a new run, resume this one with its own config "
                          f"(`mmdm train --config {p.config} --run-dir {run_dir} --resume`), or pass --force-new to "
                          "move its files aside and start over.")
    if has_ckpt and not resume:
        raise ConfigError(f"{run_dir} already holds this run (checkpoints or train_complete.json). Pass --resume "
                          "(resume=True) to continue it, --force-new to start over, or choose another --run-dir.")
    return True


def extends(stored: dict[str, Any], cfg: TrainConfig) -> bool:
    """Whether ``cfg`` is the run stored as ``stored`` (its ``config.yaml`` as a dict) with a larger total of
    steps and nothing else changed but evaluation settings (:data:`EVALUATION_ONLY`)."""
    steps = stored.get("steps")
    if steps is None or not continues_to(stored, int(steps), cfg) or int(cfg.steps) <= int(steps):
        return False
    return not config_differences({**stored, "steps": cfg.steps}, cfg, training_only=True)


def extend_run_dir(run_dir: str | Path, cfg: TrainConfig) -> tuple[int, Path | None] | None:
    """When ``run_dir`` holds ``cfg``'s run trained to fewer steps (:func:`extends`): move its end-of-training
    record and its evaluation into ``RUN/superseded-extension-<time>/``, write ``cfg`` as its config, and return
    ``(old total, that folder or None)``, so that resuming continues it from its last checkpoint to ``cfg.steps``.
    None (nothing done) for any other run directory. The caller holds the run's lock."""
    p = run_paths(run_dir)
    if not p.config.is_file():
        return None
    stored = to_dict(load_run_config(p.config))
    if not extends(stored, cfg):
        return None
    moved = supersede(p.root, [p.train_complete, *p.evaluation_files()], "extension")
    save_yaml(cfg, p.config)
    return int(stored["steps"]), moved


def check_checkpoint_config(path: str | Path, state: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to continue a checkpoint written under another config (or seed) than ``cfg``."""
    stored = state.get("config")
    if not isinstance(stored, dict):
        return  # written before checkpoints carried their config
    if continues_to(stored, int(state.get("step", 0)), cfg):
        stored = {**stored, "steps": cfg.steps}  # a longer (or equal) budget continues it
    diff = config_differences(stored, cfg, training_only=True)  # the evaluation's settings do not bind it
    if diff:
        raise ConfigError(f"checkpoint {path} was written by a run with a different config ({'; '.join(diff[:8])}); "
                          "it cannot be continued under this one. Use another --run-dir, or pass --force-new to "
                          "move the old files aside and start over.")


__all__ = ["ALLOW_CODE_HELP", "EVALUATION_ONLY", "RUNTIME_KEYS", "build_method_from_config",
           "check_checkpoint_config", "check_run_dir", "config_differences", "continues_to", "extend_run_dir",
           "extends", "is_code_reference", "load_run_config", "method_factory", "method_optim_configs", "resolve",
           "resolve_method_config", "TrainConfig"]
