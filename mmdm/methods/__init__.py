"""Synthesis methods behind one registry.

``build_method("mmdm", variant="full", sources=("T1w", "T2w"), config="small")``
builds a method by name; each method module registers its factory in
:data:`METHODS` when imported (import it below to make it available).
"""

from __future__ import annotations

from typing import Any

from mmdm.registry import Registry

METHODS = Registry("method")


def build_method(name: str, **kw: Any):
    """Build the registered method ``name`` with its factory's keyword arguments."""
    return METHODS.get(name)(**kw)


from mmdm.methods.base import Batch, OptimConfig, SynthesisMethod  # noqa: E402
from mmdm.methods import mmdm as _mmdm  # noqa: E402,F401  (registers "mmdm")
# The comparison methods of Table 1; each module registers itself on import.
from mmdm.methods import bbdm as _bbdm, ddpm as _ddpm, pix2pix as _pix2pix  # noqa: E402,F401
from mmdm.methods import rddm as _rddm, resvit as _resvit, unest as _unest  # noqa: E402,F401
from mmdm.methods.mmdm import MMDM, NAMED_CONFIGS, VARIANTS, MMDMConfig, mmdm_config  # noqa: E402

__all__ = ["METHODS", "MMDM", "NAMED_CONFIGS", "VARIANTS", "Batch", "MMDMConfig", "OptimConfig",
           "SynthesisMethod", "build_method", "mmdm_config"]
