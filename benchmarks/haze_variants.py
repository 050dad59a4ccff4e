"""One trained run's whole validation volumes under sampling variants: EMA or raw weights, x0 clamp on/off.

The same measurement as the haze sweeps' validation (:func:`mmdm.study.haze.evaluate_run_validation`:
the 4 validation subjects, every slice, stride 5, 5 sampling steps), for the variants that change
only how a trained model is sampled, so they need no training of their own::

    OMP_NUM_THREADS=1 python benchmarks/haze_variants.py runs/sweeps/haze-crops/bbdm

Writes ``benchmarks/results/haze/variants-<sweep>-<point>.json`` (per variant: the means over subjects
and the per-subject rows; the command, machine and load).
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
from mmdm.study.haze import evaluate_run_validation  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "haze"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a trained run directory")
    ap.add_argument("--variants", nargs="+", default=["ema", "raw", "ema-clamp"],
                    help="ema | raw (weights) | ema-clamp | ema-noclamp | raw-clamp | raw-noclamp")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    run = project_path(args.run)
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
              "run": args.run, "stride": 5, "sample_steps": 5, "split": "val", "machine": machine(), "variants": {}}
    for v in args.variants:
        weights, _, clamp = v.partition("-")
        clip = None if not clamp else clamp == "clamp"
        t0 = time.time()
        df = evaluate_run_validation(run, stride=5, steps=5, clip_x0=clip, use_ema=weights == "ema")
        means = df.drop(columns="subject").mean().round(4).to_dict()
        result["variants"][v] = {"means": means, "rows": df.round(4).to_dict("records"),
                                 "ema_used": df.attrs["ema_used"], "wall_s": round(time.time() - t0, 1)}
        print(v, means, flush=True)
    result["machine"]["load_average_end"] = load_average()
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"variants-{run.parent.name}-{run.name}.json"
    write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
