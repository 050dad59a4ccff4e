"""Synthesis methods behind one registry.

``build_method("mmdm", variant="full", sources=("T1w", "T2w"), config="small")``
builds a method by name. Each method class registers itself with
``@register_method(name)`` (:mod:`mmdm.methods.base`, which holds
:data:`METHODS`) when its module is imported; this package imports them all.
A new method: a module here with a :class:`SynthesisMethod` subclass that
declares ``config_class`` and ``named_configs``, plus one import line below.
"""

from __future__ import annotations

from typing import Any, Sequence

from mmdm.methods import bbdm as _bbdm, ddpm as _ddpm, pix2pix as _pix2pix  # noqa: F401  (the Table 1 baselines)
from mmdm.methods import rddm as _rddm, resvit as _resvit, unest as _unest  # noqa: F401
from mmdm.methods.base import METHODS, Batch, OptimConfig, SynthesisMethod, register_method
from mmdm.methods.mmdm import MMDM, VARIANTS, MMDMConfig, mmdm_config


def build_method(name: str, **kw: Any) -> SynthesisMethod:
    """Build the registered method ``name`` with the keyword arguments of its class's
    :meth:`~SynthesisMethod.make_config` (``config``, ``sources``, overrides; MMDM: ``variant``)."""
    return METHODS.get(name)(**kw)

#: The paper's name of each registered method, in the order of its Table 1.
DISPLAY_NAMES = {"pix2pix": "Pix2Pix", "ddpm": "DDPM", "resvit": "ResViT", "bbdm": "BBDM", "unest": "UNest",
                 "rddm": "RDDM", "mmdm": "MMDM (ours in the paper)"}


def method_deviations() -> dict[str, list[str]]:
    """``DEVIATIONS`` of every registered method's module: where it departs from its official code."""
    import sys

    out = {}
    for name in METHODS.names():
        module = sys.modules[METHODS.get(name).__module__]
        out[name] = list(getattr(module, "DEVIATIONS", []))
    return out


def deviations_markdown(setup_deviations: Sequence[str] = ()) -> str:
    """A MyST page listing every method's deviations (written into the book by `mmdm methods --deviations`),
    after the study's ``setup_deviations`` (:func:`mmdm.study.profiles.setup_deviations`)."""
    lines = ["# Deviations from the official implementations", "",
             "Generated from the `DEVIATIONS` list of each method module in `mmdm/methods/` and the study's "
             "training set-up (`SETUP` in `mmdm/study/profiles.py`).", "",
             "## The training set-up of the CPU profiles", "",
             *[f"- {d}" for d in setup_deviations], ""]
    devs = method_deviations()
    order = [n for n in DISPLAY_NAMES if n in devs] + [n for n in devs if n not in DISPLAY_NAMES]
    for name in order:
        lines += [f"## {DISPLAY_NAMES.get(name, name)}", "", f"Registry name `{name}`, module `mmdm/methods/{name}.py`.", ""]
        lines += [f"- {d}" for d in devs[name]] or ["- none recorded"]
        lines.append("")
    return "\n".join(lines)


__all__ = ["DISPLAY_NAMES", "deviations_markdown", "method_deviations", "METHODS", "MMDM", "VARIANTS",
           "Batch", "MMDMConfig", "OptimConfig", "SynthesisMethod", "build_method", "mmdm_config", "register_method"]
