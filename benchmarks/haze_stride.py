"""Slice banding of one trained run's whole validation volumes, by window stride or by sampler steps.

The 2.5D models synthesise a volume from windows of K slices and average where windows overlap. With windows
every 2nd slice (stride 2), even slices average other positions in the window than odd ones, so a prediction
that depends on a slice's position in its window alternates from slice to slice: horizontal bands in the
sagittal and coronal views. This measures it where the tables measure (whole volumes, every slice), on the
validation split, at the evaluation's sampler setting::

    OMP_NUM_THREADS=1 python benchmarks/haze_stride.py runs/standard/mmdm-full --steps 10

or, with windows every slice, how the banding moves with the sampler's steps (one stride, several steps)::

    OMP_NUM_THREADS=1 python benchmarks/haze_stride.py runs/standard/rddm --strides 1 --steps 2 10 30 --subjects 2

Writes ``benchmarks/results/haze/stride-<run>.json`` (several strides) or ``steps-<run>.json`` (several step
counts): per setting, PSNR, slice banding (:func:`mmdm.regions.slice_banding`) and background bias of every
validation subject and their means, the wall time, the command, machine and load.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a trained run directory")
    ap.add_argument("--strides", type=int, nargs="+", default=[2, 1], help="window strides to compare")
    ap.add_argument("--steps", type=int, nargs="+", default=[10],
                    help="sampler steps (the standard evaluation's: 10); several with one stride")
    ap.add_argument("--subjects", type=int, default=None, help="only the first N validation subjects")
    args = ap.parse_args(argv)
    if len(args.steps) > 1 and len(args.strides) > 1:
        ap.error("vary the strides or the steps, not both")
    import numpy as np
    import torch

    from mmdm.data.layout import Layout
    from mmdm.engine.infer import load_run_method, synthesize_subjects
    from mmdm.engine.rundir import git_info
    from mmdm.metrics import psnr
    from mmdm.regions import region_errors

    torch.set_num_threads(1)
    run = project_path(args.run)
    method, cfg, info = load_run_method(run, device="cpu")
    subjects = Layout(cfg.data.root).split("val")[: args.subjects]
    by_steps = len(args.steps) > 1
    key = "steps" if by_steps else "strides"
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
              "run": args.run, "checkpoint": str(info.get("file")), "split": "val", "subjects": subjects,
              "sample_steps": args.steps if by_steps else args.steps[0], "window": cfg.data.window,
              "commit": git_info(ROOT).get("commit"), "machine": machine(), key: {}}
    if by_steps:
        result["stride"] = args.strides[0]
    for stride, steps in [(args.strides[0], n) for n in args.steps] if by_steps else \
            [(st, args.steps[0]) for st in args.strides]:
        t0, rows = time.time(), []
        # every subject sampled from the same seed, so the settings differ only in how windows are laid and
        # averaged, or in the sampler's steps
        for item in synthesize_subjects(method, cfg.data, subjects, lambda i, s: torch.Generator().manual_seed(0),
                                        with_target=True, stride=stride, steps=steps, progress=False):
            target = item.target.data / float(item.target.data.max())
            pred = item.result["mean"]
            reg = region_errors(pred, target)
            rows.append({"subject": item.subject, "psnr": psnr(pred, target), "slice_banding": reg["slice_banding"],
                         "background_bias": reg["background_bias"]})
            print(stride, steps, rows[-1], flush=True)
        means = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "slice_banding", "background_bias")}
        result[key][str(steps if by_steps else stride)] = {"means": means, "rows": rows,
                                                            "wall_s": round(time.time() - t0, 1)}
        print(f"stride {stride}, {steps} steps: {means}", flush=True)
    result["machine"]["load_average_end"] = load_average()
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"{'steps' if by_steps else 'stride'}-{run.name}.json"
    write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
