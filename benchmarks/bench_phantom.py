"""Benchmark of the digital phantom: time to simulate (and write) one subject.

Times, for each resolution (default 1 mm and 2 mm): the one-off template load
and blur (cached per process), ``generate_subject`` (median of ``--repeats`` runs on
different subject indices) and writing the subject's files. The target is under
20 s for one 1 mm subject on 2 CPU cores.

Usage::

    python benchmarks/bench_phantom.py [--resolutions 1 2] [--repeats 1]

Writes ``benchmarks/results/phantom.json`` (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolutions", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "phantom.json"))
    args = ap.parse_args(argv)

    import torch

    from mmdm.data.phantom import PROFILES, generate_subject, write_subject
    from mmdm.data.phantom import anatomy
    from mmdm.io import write_json

    result = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "numpy": np.__version__, "torch": torch.__version__,
              "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "runs": []}
    t = time.perf_counter()
    anatomy.load_template(PROFILES["paper"].shell_mm)
    result["template_load_s"] = round(time.perf_counter() - t, 3)
    for res in args.resolutions:
        cfg = dataclasses.replace(PROFILES["paper"], resolution=res)
        t = time.perf_counter()
        anatomy.smoothed_template(res, cfg.shell_mm)
        blur_s = time.perf_counter() - t
        times, subj = [], None
        for i in range(args.repeats):
            t = time.perf_counter()
            subj = generate_subject(i, cfg)
            times.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            write_subject(subj, tmp)
            write_s = time.perf_counter() - t
        run = {"resolution_mm": res, "shape": list(subj.images["T1w"].shape),
               "vessel_segments": subj.params["vessel_segments"], "template_blur_s": round(blur_s, 3),
               "generate_s": round(statistics.median(times), 3), "generate_all_s": [round(x, 3) for x in times],
               "write_s": round(write_s, 3)}
        result["runs"].append(run)
        print(f"{res:g} mm {tuple(run['shape'])}: generate {run['generate_s']:.2f} s "
              f"(+ {blur_s:.2f} s one-off blur), write {write_s:.2f} s, {run['vessel_segments']} segments")
    print(f"CPU: {result['cpu']} ({result['cpu_count']} cores), torch {result['torch']}, numpy {result['numpy']}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
