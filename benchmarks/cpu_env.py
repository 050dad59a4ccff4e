"""What the CPU benchmarks share: the machine's description and A/B-interleaved timing.

On a CPU shared with other jobs an absolute time says little; a ratio measured
by alternating the variants in one process (A, B, A, B, ...) with the same
thread count does, because both see the same load. :func:`interleaved` times
that way and reports medians; :func:`machine` records the CPU model, its bf16
flags, the thread count, versions, the git commit and the load average, which
every result file carries.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mmdm.engine.rundir import device_name, git_info, utc_now  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "cpu"


def cpu_flags() -> list[str]:
    """The CPU's bf16-related feature flags (``avx512_bf16``, ``amx_bf16``, ...) from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if "bf16" in f or f.startswith("amx"))
    except OSError:
        pass
    return []


def load_average() -> list[float] | None:
    """1-, 5- and 15-minute load averages (other jobs on the cores skew absolute times)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine() -> dict[str, Any]:
    """Device, threads, versions, commit and load, for a result file."""
    return {"device": "cpu", "device_name": device_name("cpu"), "cpu_bf16_flags": cpu_flags(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": sys.version.split()[0],
            "git": git_info(ROOT), "date": utc_now(), "load_average_start": load_average()}


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Run every variant ``repeats`` times, alternating (A, B, A, B, ...); per variant the median,
    min and all times in seconds and the load average seen around its runs."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    loads: list[float] = []
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        la = load_average()
        if la:
            loads.append(la[0])
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": [round(x, 4) for x in v],
                "load_1min_median": statistics.median(loads) if loads else None} for k, v in times.items()}


def md_header(title: str, info: dict[str, Any]) -> list[str]:
    """The first lines of a result's markdown: title and the machine."""
    g = info.get("git") or {}
    return [f"# {title}", "",
            f"{info['device_name']} ({', '.join(info['cpu_bf16_flags']) or 'no bf16 flags'}; "
            f"{info['cpu_count']} cores), torch {info['torch']} ({info['cpu_capability']}), "
            f"commit {str(g.get('commit'))[:10]}{' (dirty)' if g.get('dirty') else ''}, {info['date']}; "
            f"load average at the start {info['load_average_start']}, at the end {info.get('load_average_end')}.",
            ""]
