"""Bright lines along the slice axis, and whether they sit on a network's patch grid, on the validation split.

A line along z is a pixel ``(x, y)`` that is brighter than its in-plane neighbourhood in most slices: in a
sagittal or coronal view a streak across the stack, in the axial MIP a bright dot. The target has a few (vessels
running along z); a model that paints the same offset of every patch token bright has many, and they sit at a
few positions modulo the patch size. For every run given, on whole validation volumes (windows every slice, the
profile's sampler steps, seed 0)::

    OMP_NUM_THREADS=1 python benchmarks/grid_lines.py runs/standard/unest runs/standard/pix2pix --subjects 4

The line map: the mean over z minus its 7x7 in-plane median, inside the head (target's z-mean >= 0.05); line
pixels: where it exceeds :data:`LINE_THRESHOLD`. Per run and subject: their count and the target's, and the grid
amplitude (:func:`grid_amplitude`): how much the line map's mean differs between the offsets ``(x mod p, y mod p)``
of the ``--period`` grid, against the target's.
Writes ``benchmarks/results/haze/grid-lines.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cpu_env import load_average, machine  # noqa: E402
from mmdm.io import write_text  # noqa: E402
from mmdm.paths import project_path  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "haze"
LINE_THRESHOLD = 0.03
HEAD = 0.05


def line_map(volume, target):
    """The z-mean minus its 7x7 in-plane median (X, Y), and the head (target's z-mean >= :data:`HEAD`)."""
    import numpy as np
    from scipy.ndimage import median_filter

    z = np.asarray(volume, dtype=np.float64).mean(axis=2)
    return z - median_filter(z, size=7), np.asarray(target).mean(axis=2) >= HEAD


def grid_amplitude(lines, head, period: int) -> float:
    """Standard deviation over the ``period x period`` offsets ``(x mod p, y mod p)`` of the line map's mean
    over the head at that offset: 0 for a pattern that does not repeat with the grid, large for one that does."""
    import numpy as np

    x, y = np.indices(lines.shape)
    key = ((x % period) * period + y % period)[head]
    n = np.bincount(key, minlength=period * period)
    means = np.bincount(key, weights=lines[head], minlength=period * period) / np.maximum(n, 1)
    return float(means[n > 0].std())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="trained run directories")
    ap.add_argument("--subjects", type=int, default=None, help="only the first N validation subjects")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps of the diffusion models (the standard "
                                                         "evaluation's: 10)")
    ap.add_argument("--period", type=int, default=8, help="the grid to test (UNest's patch size in the small "
                                                          "configuration: 8)")
    args = ap.parse_args(argv)
    import numpy as np
    import torch

    from mmdm.data.layout import Layout
    from mmdm.engine.infer import load_run_method, synthesize_subjects
    from mmdm.engine.rundir import git_info

    torch.set_num_threads(1)
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
              "split": "val", "sample_steps": args.steps, "period": args.period, "line_threshold": LINE_THRESHOLD,
              "commit": git_info(ROOT).get("commit"), "machine": machine(), "runs": {}}
    for name in args.runs:
        run = project_path(name)
        method, cfg, info = load_run_method(run, device="cpu")
        subjects = Layout(cfg.data.root).split("val")[: args.subjects]
        t0, rows = time.time(), []
        for item in synthesize_subjects(method, cfg.data, subjects, lambda i, s: torch.Generator().manual_seed(0),
                                        with_target=True, stride=1, steps=args.steps,
                                        progress=False):
            target = item.target.data / float(item.target.data.max())
            lines, head = line_map(item.result["mean"], target)
            t_lines, _ = line_map(target, target)
            rows.append({"subject": item.subject, "lines": int((lines[head] > LINE_THRESHOLD).sum()),
                         "target_lines": int((t_lines[head] > LINE_THRESHOLD).sum()),
                         "grid_amplitude": grid_amplitude(lines, head, args.period),
                         "target_grid_amplitude": grid_amplitude(t_lines, head, args.period)})
            print(run.name, rows[-1], flush=True)
        means = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0] if k != "subject"}
        result["runs"][run.name] = {"run": name, "checkpoint": str(info.get("file")), "subjects": subjects,
                                    "means": means, "rows": rows, "wall_s": round(time.time() - t0, 1)}
        print(run.name, means, flush=True)
    result["machine"]["load_average_end"] = load_average()
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / "grid-lines.json"
    write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
