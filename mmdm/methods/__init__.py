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

from typing import Any

from mmdm.methods import bbdm as _bbdm, ddpm as _ddpm, pix2pix as _pix2pix  # noqa: F401  (the Table 1 baselines)
from mmdm.methods import rddm as _rddm, resvit as _resvit, unest as _unest  # noqa: F401
from mmdm.methods.base import METHODS, Batch, OptimConfig, SynthesisMethod, Variant, method_class, register_method
from mmdm.methods.mmdm import MMDM, VARIANTS, MMDMConfig

#: MMDM's named configurations (``MMDM.named_configs``), kept under its former name.
NAMED_CONFIGS = MMDM.named_configs


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


#: Where the training set-up of the CPU profiles (smoke, quick, standard) departs from every method's
#: published one (issue #15); the `paper` profile keeps the published objectives.
SETUP_DEVIATIONS = [
    "**Vessel emphasis (every method).** In each method's per-pixel reconstruction term the brightest 1 % of "
    "each training window's target voxels weigh x20, computed from the target image alone: MMDM's MSE part "
    "of eq. (7) for the fused and every branch prediction (the MIP part as published), the L1 of Pix2Pix, "
    "ResViT and UNest's paired variant, DDPM's noise MSE, BBDM's objective and both RDDM terms at the same "
    "pixels. Why: at a CPU budget an unweighted loss learns no artery; the form and strength were chosen on "
    "the validation split by the recorded sweeps (the sweeps page). UNest's published objective is unpaired "
    "and has no term that compares a synthesis with its own target, so the emphasis does not apply to it.",
    "**2.5D crops (every method).** Training windows are 48x48 in-plane crops of 5 slices, 70 % of them "
    "centred on the target's brightest voxels, instead of whole slices (the sweeps page: more vessel "
    "recovery per step, at a fifth of the pixels). Synthesis still slides over whole slices.",
    "**Learning rate 3e-4 for MMDM and the diffusion baselines** (DDPM, BBDM, RDDM), chosen for MMDM on "
    "the validation split and given to the diffusion baselines for the same set-up; the GANs keep their "
    "published 2e-4.",
    "**NAWS's p_i at their own learning rate, 1e-2** (`naws_lr`; the paper is silent, the authors' code "
    "uses the model's): at the model's rate they move by at most that rate per step, so in a short run "
    "the learnt weighting stays at its start.",
    "**Extra runs beside the tables (standard profile).** MMDM full and the strongest baseline are trained "
    "once more without the emphasis, everything else equal (the emphasis ablation on the results page), and "
    "DDPM with x0 prediction fills a labelled extra row of Table 1 after the published eps row (the sweep "
    "ddpm-prediction chose x0 over v and eps on the validation split); `RUN_OPTIONS` in `mmdm/study/runs.py`.",
    "**Precision.** The CPU profiles train in fp32: bf16 autocast agreed with fp32 within the seed "
    "spread (the sweeps page) but was hardly faster for the small networks on crops. The `paper` profile "
    "uses bf16 autocast, the usual practice on GPUs.",
]


def deviations_markdown() -> str:
    """A MyST page listing every method's deviations (written into the book by `mmdm methods --deviations`)."""
    lines = ["# Deviations from the official implementations", "",
             "Generated from the `DEVIATIONS` list of each method module in `mmdm/methods/` and the study's "
             "training set-up (`SETUP_DEVIATIONS` in `mmdm/methods/__init__.py`).", "",
             "## The training set-up of the CPU profiles", "",
             *[f"- {d}" for d in SETUP_DEVIATIONS], ""]
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
           "NAMED_CONFIGS", "VARIANTS", "Batch", "MMDMConfig", "OptimConfig", "SynthesisMethod", "Variant",
           "build_method", "register_method", "table1_methods"]
