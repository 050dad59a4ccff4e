"""Synthesis methods behind one registry.

``build_method("mmdm", variant="full", sources=("T1w", "T2w"), config="small")``
builds a method by name. Each method class registers itself with
``@register_method(name)`` (:mod:`mmdm.methods.base`, which holds
:data:`METHODS`) when its module is imported; this package imports them all.
A new method: a module here with a :class:`SynthesisMethod` subclass that
declares itself (``config_class``, ``named_configs``, ``display_name``,
``family``, ``table1``, ``variants``), plus one import line below; the study's
run list, the tables, the benchmarks and the book read those declarations.
"""

from __future__ import annotations

from typing import Any, Sequence

from mmdm.methods import bbdm as _bbdm, ddpm as _ddpm, pix2pix as _pix2pix  # noqa: F401  (the Table 1 baselines)
from mmdm.methods import rddm as _rddm, resvit as _resvit, unest as _unest  # noqa: F401
from mmdm.methods.base import METHODS, Batch, OptimConfig, SynthesisMethod, Variant, method_class, register_method
from mmdm.methods.mmdm import MMDM, VARIANTS, MMDMConfig



def build_method(name: str, **kw: Any) -> SynthesisMethod:
    """Build the registered method ``name`` with the keyword arguments of
    :meth:`~SynthesisMethod.make_config` (``config``, ``sources``, ``variant``, overrides)."""
    return METHODS.get(name)(**kw)


def display_name(name: str) -> str:
    """The paper's name of the registered method ``name`` (its ``display_name``; else ``name``)."""
    return method_class(name).display_name or name


def table1_methods() -> list[str]:
    """The registered methods that are rows of Table 1, in the paper's row order (``table1``)."""
    rows = [(method_class(n).table1, n) for n in METHODS.names() if method_class(n).table1 is not None]
    return [n for _, n in sorted(rows)]


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
    rows = table1_methods()
    lines += ["## The methods", "", "As each method module declares itself (`display_name`, `family`, `table1`, "
              "`variants` of its class).", "", "| Method | Registry name | Family | Table 1 row | Variants |",
              "|---|---|---|---|---|"]
    for name in rows + [n for n in METHODS.names() if n not in rows]:
        cls = method_class(name)
        row = rows.index(name) + 1 if name in rows else "-"
        variants = "; ".join(f"`{v}` ({x.label})" for v, x in cls.variants.items()) or "-"
        lines.append(f"| {display_name(name)} | `{name}` | {cls.family or '-'} | {row} | {variants} |")
    lines.append("")
    order = [n for n in rows if n in devs] + [n for n in devs if n not in rows]
    for name in order:
        lines += [f"## {display_name(name)}", "", f"Registry name `{name}`, module `mmdm/methods/{name}.py`.", ""]
        lines += [f"- {d}" for d in devs[name]] or ["- none recorded"]
        lines.append("")
    return "\n".join(lines)


__all__ = ["deviations_markdown", "display_name", "method_class", "method_deviations", "METHODS", "MMDM",
           "VARIANTS", "Batch", "MMDMConfig", "OptimConfig", "SynthesisMethod", "Variant",
           "build_method", "register_method", "table1_methods"]
