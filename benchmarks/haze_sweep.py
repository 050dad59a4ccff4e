"""Run a haze sweep (``haze-fusion``, ``haze-crops``; mmdm/study/sweep.py) and judge it on whole validation volumes.

1. ``mmdm sweep run NAME`` (:func:`mmdm.study.sweep.run_sweep`): trains every point (finished ones are
   skipped, interrupted ones resume) and copies their records to ``results/sweeps/NAME/``;
2. :func:`mmdm.study.haze.evaluate_sweep`: synthesises the 4 validation subjects of every point
   (whole volumes, every slice, non-overlapping windows (stride 5), 5 sampling steps) and measures
   the haze, PSNR and vessel recovery -> ``results/sweeps/NAME/validation_volumes.csv`` / ``.json``;
3. :func:`mmdm.study.haze.judge_sweep`: the rule the sweep declares (``Sweep.rule``) ->
   ``results/sweeps/NAME/selection.csv``.

Usage (2 points at a time, one thread each, on a shared 2-core machine)::

    python benchmarks/haze_sweep.py haze-fusion --jobs 2
    python benchmarks/haze_sweep.py haze-crops --jobs 2
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
from mmdm.study.haze import evaluate_sweep, judge_sweep  # noqa: E402
from mmdm.study.sweep import get_sweep, run_sweep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="haze-fusion or haze-crops")
    ap.add_argument("--jobs", type=int, default=1, help="points trained at once")
    ap.add_argument("--skip-train", action="store_true", help="only evaluate and judge trained points")
    args = ap.parse_args(argv)
    sweep = get_sweep(args.name)
    info = machine()
    t0 = time.time()
    if not args.skip_train:
        run_sweep(args.name, jobs=args.jobs, threads=1)
    t_train = time.time() - t0
    import torch

    torch.set_num_threads(1)
    evaluate_sweep(args.name, jobs=args.jobs)
    table = judge_sweep(args.name)
    info["load_average_end"] = load_average()
    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
            "rule": sweep.rule.text, "steps": sweep.steps, "train_wall_s": round(t_train, 1),
            "total_wall_s": round(time.time() - t0, 1), "machine": info}
    write_text(project_path("results/sweeps") / args.name / "selection.json", json.dumps(meta, indent=2) + "\n")
    print(f"rule: {sweep.rule.text}")
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
