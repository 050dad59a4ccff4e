"""The interface every synthesis method of the study implements, and the method registry.

A method is an ``nn.Module`` that turns a training batch into losses and
source windows into a synthesised target window. The training engine, the
evaluation code and the CLI only talk to this interface (:class:`SynthesisMethod`):
``training_losses``, ``sample``, ``optimizer_groups``, ``optim_configs``,
``ema_config``, ``log_scalars`` and the attributes ``sources``, ``window``,
``spatial_multiple``; they never read a method's own config.

A new method subclasses :class:`SynthesisMethod`, declares its config
dataclass and named configurations once as class attributes
(``config_class``, ``named_configs``) and registers with
:func:`register_method`; :meth:`SynthesisMethod.build` is the one generic
builder behind ``build_method(name, config=..., sources=..., **overrides)``.

A batch is a dict::

    {"sources": {modality: Tensor (B, K, H, W)}, "target": Tensor (B, K, H, W)}

with K adjacent axial slices (the 2.5D window) and intensities in [-1, 1].
The engine may add ``"weights"`` (B, K, H, W): the vessel-emphasis map of the
target (:attr:`SynthesisMethod.emphasis`), computed once per batch.

Vessel emphasis, the same for every method: each method's per-pixel
reconstruction term goes through :meth:`SynthesisMethod.pixel_loss` with the
map of :meth:`SynthesisMethod.emphasis_map` (weights from the **target** x0,
whatever the term compares: x0, noise, residual or bridge gradient), and its
image-space prediction of x0 through :meth:`SynthesisMethod.image_emphasis`
(the ``steerable`` kind's feature term). With ``emphasis.kind == "none"`` (the
default and the ``paper`` profile) both are the plain published objective.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

import torch
from torch import Tensor, nn

import torch.nn.functional as F

from mmdm.config import ConfigError, from_dict, replace, to_dict
from mmdm.diffusion.sampling import SamplerConfig
from mmdm.losses.emphasis import EmphasisConfig, emphasis_weights, steerable_loss, weighted_l1, weighted_mse
from mmdm.nets.gating import ModalityGating
from mmdm.optim import EMAConfig, OptimConfig
from mmdm.registry import Registry

Batch = dict  # {"sources": {modality: Tensor (B, K, H, W)}, "target": Tensor (B, K, H, W)}
#: The optimiser group of a one-optimiser method; for any method, the losses of the whole model.
MAIN = "main"

#: Registered method name -> factory ``(**kw) -> SynthesisMethod`` (see :func:`register_method`).
METHODS: Registry[Callable[..., "SynthesisMethod"]] = Registry("method")
M = TypeVar("M", bound=type)


class SynthesisMethod(nn.Module):
    """Base class: subclasses set ``sources`` (and usually ``window``) and implement
    :meth:`training_losses` and :meth:`sample`; ``name`` is set by :func:`register_method`."""

    name: str = "method"
    #: The method's config dataclass and its named configurations (e.g. ``paper``, ``small``).
    config_class: ClassVar[type | None] = None
    named_configs: ClassVar[dict[str, Callable[[], Any]]] = {}
    #: Source modality names this instance expects, in the order it uses them.
    sources: tuple[str, ...] = ()
    #: Slices per window K, or None if any K is accepted.
    window: int | None = None
    #: Height and width must be multiples of this (network down-sampling).
    spatial_multiple: int = 1
    #: Sampling modes :attr:`sampling_mode` can take (MMDM: coupled, independent); empty: none.
    sampling_modes: tuple[str, ...] = ()
    #: Vessel emphasis of the per-pixel terms; the engine sets it from ``TrainConfig.emphasis``.
    emphasis: EmphasisConfig = EmphasisConfig()
    #: Whether the objective has a per-pixel term against the target that the emphasis can weight
    #: (False for UNest's unpaired objective: it never compares a prediction with its own target).
    supports_emphasis: ClassVar[bool] = True

    # -- vessel emphasis ---------------------------------------------------------------
    def emphasis_map(self, batch: Batch, x0: Tensor) -> Tensor | None:
        """The emphasis weights of this batch (``batch["weights"]`` when the engine computed them,
        else from ``x0``), or None when :attr:`emphasis` builds no map (every weight 1)."""
        if not self.emphasis.has_map:
            return None
        w = batch.get("weights") if isinstance(batch, Mapping) else None
        return w if w is not None else emphasis_weights(x0, self.emphasis)

    @staticmethod
    def pixel_loss(pred: Tensor, ref: Tensor, weights: Tensor | None, base: str = "mse",
                   reduction: str = "mean") -> Tensor:
        """The per-pixel term ``mean(w * |pred - ref|^p)`` (p = 2 for ``"mse"``, 1 for ``"l1"``);
        ``weights=None`` is the unweighted loss exactly (``F.mse_loss`` / ``F.l1_loss``)."""
        if base not in ("mse", "l1"):
            raise ValueError(f"pixel_loss: base must be 'mse' or 'l1', got {base!r}")
        if weights is None and reduction == "mean":
            return F.mse_loss(pred, ref) if base == "mse" else F.l1_loss(pred, ref)
        return (weighted_mse if base == "mse" else weighted_l1)(pred, ref, weights, reduction)

    def image_emphasis(self, x0_pred: Tensor, x0: Tensor, reduction: str = "mean") -> Tensor | None:
        """``emphasis.weight x`` the steerable-feature loss between a prediction of x0 and x0 for the
        ``steerable`` kind; None for every other kind (nothing to add)."""
        e = self.emphasis
        if e.kind != "steerable" or e.weight == 0:
            return None
        return float(e.weight) * steerable_loss(x0_pred, x0, e.sigmas, e.delta, reduction)

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
    def make_config(cls, config: Any = "paper", sources: Sequence[str] | None = None, **overrides: Any) -> Any:
        """The method's config: a name in :attr:`named_configs`, a ``config_class`` instance or
        a dict, then ``sources`` and keyword ``overrides`` (:func:`assemble_config`)."""
        if cls.config_class is None:
            raise TypeError(f"{cls.__name__} declares no config_class")
        return assemble_config(cls.config_class, cls.named_configs, config, sources, overrides,
                               cls.__name__)

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


def assemble_config(cls: type, named: Mapping[str, Callable[[], Any]], config: Any = "paper",
                    sources: Sequence[str] | None = None, overrides: dict[str, Any] | None = None,
                    label: str | None = None) -> Any:
    """Build a method's config dataclass ``cls``, the same way for every method.

    ``config``: a name in ``named`` (e.g. ``"paper"``, ``"small"``), a ``cls``
    instance or a plain dict (e.g. from YAML); then ``sources`` and keyword
    ``overrides`` (nested dicts merge) are applied and ``cfg.validate()`` runs.
    """
    label = label or cls.__name__.removesuffix("Config")
    if isinstance(config, str):
        if config not in named:
            raise ConfigError(f"unknown {label} configuration {config!r}; known: {', '.join(sorted(named))}")
        cfg = named[config]()
    elif isinstance(config, cls):
        cfg = config
    elif isinstance(config, dict):
        cfg = from_dict(cls, config)
    else:
        raise ConfigError(f"config must be a name, a {cls.__name__} or a dict, got {type(config).__name__}")
    overrides = dict(overrides or {})
    if sources is not None:
        overrides["sources"] = list(sources)
    cfg = replace(cfg, overrides) if overrides else cfg
    cfg.validate()
    return cfg


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
    its factory is the generic :meth:`SynthesisMethod.build`."""

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
