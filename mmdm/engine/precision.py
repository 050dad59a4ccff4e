"""Which precision a run computes in: ``amp`` resolved against the device it runs on.

bf16 autocast pays only where the hardware computes bf16 natively: a CUDA device with
bf16 support, or a CPU with AVX512_BF16 or AMX instructions. Elsewhere (e.g. an AVX2-only
CPU) torch emulates bf16 by converting every operand, and a training step of the authors'
network ran about 11x slower than in fp32. ``amp="auto"`` (the default) therefore picks
bf16 only on such hardware; an explicit ``"bf16"`` on a CPU without it is refused before
any work, with a message that says why and what to use instead.

Values of ``amp``: ``"auto"``, ``"bf16"``, ``"none"`` (fp32; ``"fp32"`` is accepted as
its synonym). :func:`resolve_amp` returns the precision actually used (``"bf16"`` or
``"none"``) and the reason, which the run's provenance records.
"""

from __future__ import annotations

from typing import Any

import torch

#: the values a config or a command line may give for ``amp``
AMP_REQUESTS = ("auto", "bf16", "none", "fp32")


class PrecisionError(ValueError):
    """A requested precision that the device cannot compute natively (or an unknown one)."""


def cpu_capability() -> str:
    """The vector instruction set torch dispatches to on this CPU (``AVX2``, ``AVX512``, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - an old or exotic build: say so instead of failing
        return "unknown"


def cpu_bf16_features() -> list[str]:
    """The native-bf16 features of this CPU that torch detects: ``AVX512_BF16`` and/or ``AMX``."""
    found = []
    for name, probe in (("AVX512_BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported")):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                found.append(name)
        except Exception:  # noqa: BLE001 - a probe that cannot run means the feature is not known to be there
            pass
    return found


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX)."""
    return bool(cpu_bf16_features())


def _cpu_description() -> str:
    feats = cpu_bf16_features()
    return f"CPU capability {cpu_capability()}" + (f" with {'+'.join(feats)}" if feats else ", no AVX512_BF16/AMX")


def resolve_amp(requested: str, device: torch.device | str) -> tuple[str, str]:
    """``(amp, reason)``: the precision a run on ``device`` uses for ``requested`` (``"bf16"`` or
    ``"none"`` = fp32) and why. Raises :class:`PrecisionError` for an unknown value, and for
    ``"bf16"`` on a device that cannot compute it natively (a CPU without AVX512_BF16/AMX, a
    CUDA device without bf16 support, any other device type)."""
    req = str(requested).strip().lower()
    if req not in AMP_REQUESTS:
        raise PrecisionError(f"unknown amp {requested!r}; use one of {', '.join(AMP_REQUESTS)} "
                             "(auto: bf16 where the device computes it natively, else fp32)")
    dev = torch.device(device)
    if req in ("none", "fp32"):
        return "none", "fp32 requested"
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        where = f"{dev} ({torch.cuda.get_device_name(dev)})" if torch.cuda.is_available() else str(dev)
        if ok:
            return "bf16", f"{'auto: ' if req == 'auto' else ''}{where} supports bf16 natively"
        if req == "auto":
            return "none", f"auto: {where} has no native bf16, fp32"
        raise PrecisionError(f"amp 'bf16': {where} does not support bf16; use amp 'auto' or 'none' (fp32)")
    if dev.type == "cpu":
        what = _cpu_description()
        if cpu_has_native_bf16():
            return "bf16", f"{'auto: ' if req == 'auto' else ''}{what}: native bf16"
        if req == "auto":
            return "none", f"auto: {what}: bf16 would be emulated (slower than fp32), fp32"
        raise PrecisionError(f"amp 'bf16' refused: this CPU ({what}) has no native bf16, so torch would emulate it "
                             "and run many times slower than fp32 (about 11x for a training step on an AVX2 CPU). "
                             "Use amp 'auto' (bf16 only where native) or 'none' (fp32).")
    if req == "auto":
        return "none", f"auto: bf16 autocast is used on CUDA or a CPU only; {dev} computes in fp32"
    raise PrecisionError(f"amp 'bf16' autocasts on CUDA or the CPU; this model is on {dev}. Use amp 'auto' or 'none'.")


def precision_info(requested: str, device: torch.device | str, channels_last: bool = False) -> dict[str, Any]:
    """What a run's provenance records about its precision: the ``amp`` used, the one requested,
    why, and the CPU capability (which decides it on a CPU and how fast fp32 runs)."""
    amp, reason = resolve_amp(requested, device)
    return {"amp": amp, "amp_requested": str(requested), "amp_reason": reason, "cpu_capability": cpu_capability(),
            "channels_last": channels_last}


__all__ = ["AMP_REQUESTS", "PrecisionError", "cpu_bf16_features", "cpu_capability", "cpu_has_native_bf16",
           "precision_info", "resolve_amp"]
