"""The interface every synthesis method of the study implements, and the method registry.

A method is an ``nn.Module`` that turns a training batch into losses and
source windows into a synthesised target window. The training engine, the
evaluation code and the CLI only talk to this interface (:class:`SynthesisMethod`):
``train_step``, ``training_losses``, ``sample``, ``optimizer_groups``, ``optim_configs``,
``ema_config``, ``log_scalars`` and the attributes ``sources``, ``window``,
``spatial_multiple``; they never read a method's own config.

A new method subclasses :class:`SynthesisMethod`, declares everything about
itself once as class attributes (``config_class``, ``named_configs``,
``display_name``, ``family``, ``table1``, ``variants``) and registers with
:func:`register_method`; :meth:`SynthesisMethod.make_config` is the one config
assembly and :meth:`SynthesisMethod.build` the one builder behind
``build_method(name, config=..., sources=..., variant=..., **overrides)``. The
study, its tables, the benchmarks and the book read these declarations
(:func:`method_class`), so a new method is its module plus one import line in
:mod:`mmdm.methods`.

A batch is a dict::

    {"sources": {modality: Tensor (B, K, H, W)}, "target": Tensor (B, K, H, W)}

with K adjacent axial slices (the 2.5D window) and intensities in [-1, 1].

Training step: the engine calls :meth:`SynthesisMethod.train_step` once per
batch with a :class:`StepContext` (the optimisers, the training RNG, the
autocast and the step). The default runs the single-loss path: per optimiser
group, :meth:`~SynthesisMethod.training_losses` and one optimiser step. A
method with several optimisers that share one forward pass (the GANs,
:class:`mmdm.methods.pix2pix.ConditionalGAN`) overrides it, as CycleGAN's
``optimize_parameters``.

Per-pixel terms go through :attr:`SynthesisMethod.pixel_loss`, a
:class:`mmdm.losses.emphasis.PixelLoss` the engine sets (default: the
published, unweighted loss); ``self.pixel_loss.bind(x0)`` once per batch.
A method whose objective has no per-pixel term against its target declares
``uses_pixel_loss = False``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Mapping, Sequence, TypeVar

import torch
from torch import Tensor, nn

from mmdm.config import ConfigError, from_dict, replace, to_dict
from mmdm.diffusion.sampling import SamplerConfig
from mmdm.losses.emphasis import PixelLoss
from mmdm.nets.gating import ModalityGating
from mmdm.optim import EMAConfig, OptimConfig
from mmdm.registry import Registry

Batch = dict  # {"sources": {modality: Tensor (B, K, H, W)}, "target": Tensor (B, K, H, W)}
#: The optimiser group of a one-optimiser method; for any method, the losses of the whole model.
MAIN = "main"

#: Registered method name -> factory ``(**kw) -> SynthesisMethod`` (see :func:`register_method`).
METHODS: Registry[Callable[..., "SynthesisMethod"]] = Registry("method")
M = TypeVar("M", bound=type)


@dataclass(frozen=True)
class Variant:
    """A named change of a method's config: field ``overrides`` (nested dicts merge) applied on
    top of a named configuration, and the ``label`` of its table row (e.g. MMDM's ablation
    flags, Table 2; UNest's objective presets)."""

    overrides: dict[str, Any]
    label: str


@dataclass
class StepContext:
    """What one training step gets from the engine (:meth:`SynthesisMethod.train_step`).

    ``optimizers``: one per optimiser group, in the order of ``optimizer_groups()``;
    ``generator``: the training RNG (checkpointed: draw every random number of a step from it);
    ``step``: the number of the step being taken (1 for the first); ``autocast``: a context
    for the forward pass and the losses (bf16 autocast or none); ``forward``: runs
    ``fn(*args)`` for a forward pass (through DistributedDataParallel under torchrun, so
    the gradients are averaged across processes); ``params`` / ``grad_clip``: per group,
    the parameters and the gradient-norm clip (None: none); ``label``: the method in messages.
    """

    optimizers: dict[str, torch.optim.Optimizer]
    generator: torch.Generator | None = None
    step: int = 1
    autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext
    forward: Callable[..., Any] | None = None
    params: dict[str, list[nn.Parameter]] = field(default_factory=dict)
    grad_clip: dict[str, float | None] = field(default_factory=dict)
    label: str = "method"

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``: one forward pass of the method (see ``forward``)."""
        return self.forward(fn, *args) if self.forward is not None else fn(*args)

    def zero_grad(self) -> None:
        """Clear the gradients of every group."""
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)

    def optimize(self, group: str, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """Back-propagate ``losses["loss"]``, clip and step ``group``'s optimiser, clear every
        gradient; returns the detached scalars to log (keys ``<group>/...`` with several groups)."""
        if "loss" not in losses:
            raise KeyError(f"method '{self.label}' returned the losses {sorted(losses)}; they must contain "
                           "'loss' (the scalar to back-propagate)")
        loss = losses["loss"]
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"non-finite loss {float(loss.detach())} at step {self.step} (group '{group}'). Lower the learning "
                "rate, set grad_clip, or check the data for extreme values; resume from the last checkpoint.")
        multi = len(self.optimizers) > 1
        logs: dict[str, Tensor] = {}
        loss.backward()
        clip = self.grad_clip.get(group)
        if clip is not None:
            gn = torch.nn.utils.clip_grad_norm_(self.params[group], clip)
            logs[f"{group}/grad_norm" if multi else "grad_norm"] = gn.detach()
        self.optimizers[group].step()
        self.zero_grad()
        for k, v in losses.items():
            logs[f"{group}/{k}" if multi else k] = v.detach().float()
        return logs


class SynthesisMethod(nn.Module):
    """Base class: subclasses set ``sources`` (and usually ``window``) and implement
    :meth:`training_losses` and :meth:`sample`; ``name`` is set by :func:`register_method`."""

    name: str = "method"
    #: The method's config dataclass and its named configurations (e.g. ``paper``, ``small``).
    config_class: ClassVar[type | None] = None
    named_configs: ClassVar[dict[str, Callable[[], Any]]] = {}
    #: The method's name in the paper and the tables (empty: the registry name).
    display_name: ClassVar[str] = ""
    #: What kind of model it is: ``"diffusion"``, ``"bridge"``, ``"GAN"``, ... (the book groups by it).
    family: ClassVar[str] = ""
    #: Its position among the rows of the paper's Table 1 (sorted ascending); None: not a row of Table 1.
    table1: ClassVar[float | None] = None
    #: Named changes of the config (:class:`Variant`), in the order of their table rows.
    variants: ClassVar[dict[str, Variant]] = {}
    #: The variant a *named* config gets when none is given (None: the config as it is).
    default_variant: ClassVar[str | None] = None
    #: Source modality names this instance expects, in the order it uses them.
    sources: tuple[str, ...] = ()
    #: Slices per window K, or None if any K is accepted.
    window: int | None = None
    #: Height and width must be multiples of this (network down-sampling).
    spatial_multiple: int = 1
    #: Sampling modes :attr:`sampling_mode` can take (MMDM: coupled, independent); empty: none.
    sampling_modes: tuple[str, ...] = ()
    #: The per-pixel reconstruction term (the engine sets it from ``TrainConfig.emphasis``).
    pixel_loss: PixelLoss = PixelLoss()
    #: Whether the objective has a per-pixel term against the target that :attr:`pixel_loss` computes
    #: (False for UNest's unpaired objective: it never compares a prediction with its own target).
    uses_pixel_loss: ClassVar[bool] = True

    def param_groups(self, group: str, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        """Adam's parameter groups of optimiser group ``group`` (default: one, at the group's
        learning rate); a method may give some parameters their own ``lr`` (MMDM's NAWS)."""
        return [{"params": params}]

    @property
    def sampling_mode(self) -> str | None:
        """The current sampling mode, or None for a method with one way to sample."""
        return None

    @sampling_mode.setter
    def sampling_mode(self, mode: str | None) -> None:
        if mode is not None:
            raise ValueError(f"{self.name} has one way to sample; it cannot switch to mode {mode!r}")

    @classmethod
    def config_from_dict(cls, data: dict[str, Any]) -> Any:
        """A ``config_class`` instance from a plain dict (e.g. YAML); a method whose stored configs
        changed shape over time reads the older ones here."""
        return from_dict(cls.config_class, data)

    @classmethod
    def make_config(cls, config: Any = "paper", sources: Sequence[str] | None = None, variant: str | None = None,
                    **overrides: Any) -> Any:
        """The method's config, the same way for every method.

        ``config``: a name in :attr:`named_configs` (e.g. ``"paper"``, ``"small"``), a
        ``config_class`` instance or a plain dict; then the overrides of ``variant`` (a key of
        :attr:`variants`; a named config without one gets :attr:`default_variant`), then
        ``sources`` and keyword ``overrides`` (nested dicts merge); ``validate()`` runs last.
        """
        if cls.config_class is None:
            raise TypeError(f"{cls.__name__} declares no config_class")
        label = cls.__name__
        if isinstance(config, str):
            if config not in cls.named_configs:
                raise ConfigError(f"unknown {label} configuration {config!r}; known: "
                                  f"{', '.join(sorted(cls.named_configs))}")
            cfg = cls.named_configs[config]()
            variant = variant if variant is not None else cls.default_variant
        elif isinstance(config, cls.config_class):
            cfg = config
        elif isinstance(config, dict):
            cfg = cls.config_from_dict(config)
        else:
            raise ConfigError(f"config must be a name, a {cls.config_class.__name__} or a dict, "
                              f"got {type(config).__name__}")
        if variant is not None:
            if variant not in cls.variants:
                known = ", ".join(cls.variants) or "none"
                raise ConfigError(f"unknown {label} variant {variant!r}; known: {known}")
            cfg = replace(cfg, cls.variants[variant].overrides)
        overrides = dict(overrides)
        if sources is not None:
            overrides["sources"] = list(sources)
        cfg = replace(cfg, overrides) if overrides else cfg
        cfg.validate()
        return cfg

    @classmethod
    def build(cls, *args: Any, **kw: Any) -> "SynthesisMethod":
        """The generic builder: ``cls(cls.make_config(*args, **kw))``."""
        return cls(cls.make_config(*args, **kw))

    @classmethod
    def from_resolved(cls, data: Mapping[str, Any]) -> "SynthesisMethod":
        """Rebuild the method from a resolved config (every field, the plain dict of
        :meth:`resolved_config`), with no named configuration, variant or default involved:
        what a run record holds is what is built."""
        if cls.config_class is None:
            raise TypeError(f"{cls.__name__} declares no config_class; it cannot be rebuilt from a resolved config")
        cfg = from_dict(cls.config_class, dict(data), f"{cls.__name__} resolved config")
        cfg.validate()
        return cls(cfg)

    def resolved_config(self) -> dict[str, Any] | None:
        """This instance's config, every field, as a plain dict (YAML/JSON-ready); the run
        records keep it and :meth:`from_resolved` rebuilds the method from it. None for a
        method without a ``config_class`` instance in ``cfg`` (it is rebuilt from its factory's
        keyword arguments instead)."""
        cfg = getattr(self, "cfg", None)
        if self.config_class is None or not isinstance(cfg, self.config_class):
            return None
        return to_dict(cfg)

    def sampler_settings(self, steps: int | None = None, eta: float | None = None) -> dict[str, Any] | None:
        """The settings :meth:`sample` uses when called with ``steps``/``eta`` (None: the config's):
        ``sample_steps``, ``spacing``, ``eta``, ``clip_x0`` of the method's sampler
        (:class:`~mmdm.diffusion.sampling.SamplerConfig`), so that a record holds the values used,
        not a null meaning "the default". None for a method with no iterative sampler (one pass)."""
        cfg = getattr(self, "cfg", None)
        found = [getattr(cfg, f.name) for f in dataclasses.fields(cfg)] if dataclasses.is_dataclass(cfg) else []
        samplers = [v for v in found if isinstance(v, SamplerConfig)]
        if not samplers:
            return None
        sc = samplers[0]
        return {"sample_steps": int(sc.sample_steps if steps is None else steps),
                "eta": float(sc.eta if eta is None else eta), "spacing": sc.spacing, "clip_x0": bool(sc.clip_x0)}

    def training_losses(self, batch: Batch, generator: torch.Generator | None = None,
                        group: str = MAIN) -> dict[str, Tensor]:
        """The losses of optimiser group ``group`` (a key of :meth:`optimizer_groups`; ``"main"``:
        the whole model): ``{"loss": scalar to backpropagate, ...other scalars for logging}``."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_losses(batch, generator, group)")

    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        """One optimiser step of every group on ``batch``; returns the detached scalars to log.

        The single-loss path: per group of ``ctx.optimizers`` in order,
        ``training_losses(batch, ctx.generator, group)`` under ``ctx.autocast()`` and
        ``ctx.optimize(group, losses)``. Override it when the groups share one forward pass.
        """
        logs: dict[str, Tensor] = {}
        ctx.zero_grad()
        for group in ctx.optimizers:
            with ctx.autocast():
                losses = ctx.run(self.training_losses, batch, ctx.generator, group)
            logs.update(ctx.optimize(group, losses))
        return logs

    @torch.no_grad()
    def sample(self, sources: dict[str, Tensor], steps: int | None = None, eta: float | None = None,
               generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
        """Synthesise the target window (B, K, H, W) in [-1, 1]."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample(sources, ...)")

    def objective(self) -> str | None:
        """The training objective of this instance in one line: what is predicted, which loss terms
        with which weights. Every run record keeps it (``summary.json``, key ``objective``). Every
        registered method states it; None: a method that does not (its record then says null)."""
        return None

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimiser: ``{"main": all trainable parameters}`` (GANs override).
        The engine steps the groups in this order."""
        return {MAIN: [p for p in self.parameters() if p.requires_grad]}

    def optim_configs(self) -> dict[str, OptimConfig]:
        """Optimiser settings keyed like :meth:`optimizer_groups` (default: Adam defaults for each)."""
        return {g: OptimConfig() for g in self.optimizer_groups()}

    def ema_config(self) -> EMAConfig | None:
        """The weight average the engine keeps for this method by default (None: none)."""
        return None

    def check_group(self, group: str) -> None:
        """Raise ``ValueError`` unless ``group`` is ``"main"`` or one of :meth:`optimizer_groups`."""
        groups = list(self.optimizer_groups())
        if group != MAIN and group not in groups:
            raise ValueError(f"{self.name}: unknown optimiser group {group!r}; use one of "
                             f"{sorted(set(groups) | {MAIN})}")

    def log_scalars(self) -> dict[str, float]:
        """Extra scalars to log after a training step (e.g. learned loss weights)."""
        return {}

    # -- input checks ------------------------------------------------------------
    def check_sources(self, sources: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` naming expected vs given modalities and shapes.

        Extra modalities are allowed (a two-modality model may be fed a
        three-modality batch); missing ones are not.
        """
        if not isinstance(sources, Mapping):
            raise ValueError(f"{self.name}: sources must be a dict {{modality: tensor}}, got {type(sources).__name__}")
        missing = [m for m in self.sources if m not in sources]
        if missing:
            raise ValueError(f"{self.name}: missing source modality(ies) {missing}; this model expects "
                             f"{list(self.sources)} but was given {sorted(sources)}. Pass every expected "
                             "modality, or build the method with sources= matching your data.")
        shapes = {m: tuple(sources[m].shape) for m in self.sources}
        ref = shapes[self.sources[0]] if self.sources else None
        for m, shape in shapes.items():
            k = "K" if self.window is None else str(self.window)
            if len(shape) != 4 or (self.window is not None and shape[1] != self.window):
                raise ValueError(f"{self.name}: source '{m}' has shape {shape}; expected (B, {k}, H, W). "
                                 f"Given shapes: {shapes}")
            if shape != ref:
                raise ValueError(f"{self.name}: all sources must share one shape; got {shapes}")
            f = self.spatial_multiple
            if shape[2] % f or shape[3] % f:
                raise ValueError(f"{self.name}: source '{m}' is {shape[2]}x{shape[3]} pixels; height and width "
                                 f"must be multiples of {f} for this network: crop or pad the windows")

    def check_batch(self, batch: Batch) -> tuple[Tensor, list[Tensor]]:
        """Validate a training batch; return ``(target, [source tensors in self.sources order])``."""
        if not isinstance(batch, Mapping) or "sources" not in batch or "target" not in batch:
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"{self.name}: a batch must be a dict with keys 'sources' and 'target'; got {got}")
        self.check_sources(batch["sources"])
        target = batch["target"]
        ys = self.source_list(batch["sources"])
        if tuple(target.shape) != tuple(ys[0].shape):
            raise ValueError(f"{self.name}: target has shape {tuple(target.shape)} but the sources have "
                             f"{tuple(ys[0].shape)}; they must match (B, K, H, W)")
        return target, ys

    def source_list(self, sources: Mapping[str, Tensor]) -> list[Tensor]:
        """The source tensors in the order of ``self.sources``."""
        return [sources[m] for m in self.sources]


class GatedMethod(SynthesisMethod):
    """Shared set-up of the one-network diffusion baselines (DDPM, BBDM, RDDM): the
    config, the sources, and the gating module through which they see the sources
    (the paper's gating strategy, :mod:`mmdm.nets.gating`)."""

    def _setup_gated(self, cfg: Any) -> int:
        """Validate ``cfg`` (fields sources, window, gating, unet, optim, ema), build the gating; returns K."""
        cfg.validate()
        self.cfg = cfg
        self.sources = tuple(cfg.sources)
        self.window = cfg.window
        self.gating = ModalityGating(len(self.sources), cfg.window, cfg.gating)
        self.spatial_multiple = 2 ** (len(cfg.unet.mult) - 1)
        return cfg.window

    def condition(self, sources: dict[str, Tensor]) -> Tensor:
        """The gated source window (B, K, H, W)."""
        return self.gating(self.source_list(sources))

    def optim_configs(self) -> dict[str, OptimConfig]:
        """``{"main": cfg.optim}``."""
        return {MAIN: self.cfg.optim}

    def ema_config(self) -> EMAConfig | None:
        """``cfg.ema`` (each baseline's official average)."""
        return self.cfg.ema


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`SynthesisMethod` subclass as ``name`` (sets ``cls.name``);
    its factory is the generic :meth:`SynthesisMethod.build` (``factory.method_class`` is ``cls``)."""

    def deco(cls: M) -> M:
        cls.name = name

        def factory(*args: Any, **kw: Any) -> SynthesisMethod:
            return cls.build(*args, **kw)

        factory.__module__, factory.__qualname__ = cls.__module__, f"{cls.__name__}.build"
        factory.method_class = cls  # the class behind the name: rebuilding a record uses cls.from_resolved
        factory.__doc__ = f"Build {cls.__name__}: ``build_method({name!r}, config=..., sources=..., **overrides)``."
        METHODS.register(name)(factory)
        return cls

    return deco


def method_class(name: str) -> type[SynthesisMethod]:
    """The class registered as ``name`` (``KeyError`` listing the known names otherwise)."""
    return METHODS.get(name).method_class  # type: ignore[attr-defined]
