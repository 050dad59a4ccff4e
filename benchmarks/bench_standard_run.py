"""Wall time of a `standard` study run (training + evaluation), this commit against another, side by side.

For each run named in ``--runs`` (default: ``mmdm-full`` and ``pix2pix``, the strongest
baseline) and each commit (``--base`` and this checkout), a fresh process at that commit's code
trains the run with the `standard` profile's resolved config and evaluates it as the study
does (test split, the profile's sampling steps and window stride, then the vessel metrics).
The two commits ALTERNATE (base, new, new, base, ...), ``--repeats`` times each. Recorded per
process: wall and CPU seconds of training and of evaluation, and the test metrics.

``--scale s`` runs a fraction of the standard run: ``s`` times the training steps (the
validation, checkpoint and image intervals kept, so the run does ``s`` times their number: none
below ``s`` = 0.1) and ``s`` times the 16 test subjects (at least one). ``--scale 1`` is the full run (~25 min per
MMDM run on 2 idle cores; for a GPU or an idle machine); a reduced scale fits a shared machine
and says so in the result.

Metric tolerance. Changes that only reorder floating-point sums (fused convolutions, a running
softmax) change every weight update by rounding, and over thousands of steps of stochastic
training such differences grow until two runs differ like two seeds. So:

1. A full run's metrics are compared against the seed spread of the committed `standard`
   records (``results/standard/<run>``, ``-s1``, ``-s2``): the new mean must lie within
   [min, max] of the three seeds, widened by their range (``seed_tolerance``).
2. Exactness is checked where it can be: the SAME checkpoint (the base commit's first trained
   model) is evaluated with both commits' code; per subject, PSNR and MIP-PSNR must agree to
   ``--fixed-tol-db`` (default 1e-3 dB) and SSIM to 1e-5 (``fixed_checkpoint_agreement``).

Usage::

    python benchmarks/bench_standard_run.py --scale 0.05 --repeats 1     # reduced, on a shared machine
    python benchmarks/bench_standard_run.py --scale 1 --repeats 3        # the full side-by-side

Results: ``benchmarks/results/cpu/standard-run-scale<s>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"mmdm-full": ("mmdm", "full"), "pix2pix": ("pix2pix", None)}
#: metrics compared per subject on a fixed checkpoint, and their tolerances (dB for the PSNRs)
FIXED_METRICS = {"psnr": "db", "mip_psnr": "db", "ssim": 1e-5, "mip_ssim": 1e-5}


# ------------------------------------------------------------------------------- tolerances (tested)
def fixed_checkpoint_agreement(base: list[dict], new: list[dict], tol_db: float = 1e-3) -> dict[str, Any]:
    """Per-subject agreement of two evaluations of the SAME checkpoint (rows of metrics.csv as
    dicts with ``subject`` and the metrics). Returns the largest difference per metric and ``ok``."""
    b = {r["subject"]: r for r in base}
    n = {r["subject"]: r for r in new}
    if set(b) != set(n):
        return {"ok": False, "reason": f"subjects differ: {sorted(set(b) ^ set(n))}"}
    worst: dict[str, float] = {}
    ok = True
    for metric, tol in FIXED_METRICS.items():
        tol = tol_db if tol == "db" else tol
        d = max(abs(float(b[s][metric]) - float(n[s][metric])) for s in b)
        worst[metric] = d
        ok = ok and d <= tol
    return {"ok": ok, "max_abs_diff": worst, "tolerance": {k: tol_db if v == "db" else v
                                                             for k, v in FIXED_METRICS.items()}}


def seed_tolerance(seed_values: list[float], value: float) -> dict[str, Any]:
    """Whether ``value`` (a full run's mean metric) lies within the seeds' [min - range, max + range]."""
    lo, hi = min(seed_values), max(seed_values)
    spread = hi - lo
    return {"ok": lo - spread <= value <= hi + spread, "seeds": seed_values, "range": spread,
            "interval": [lo - spread, hi + spread], "value": value}


# ------------------------------------------------------------------------------- worker (one commit)
def _cpu() -> float:
    """CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _scaled_config(run: str, scale: float):
    from mmdm.config import replace
    from mmdm.study.api import make_spec, train_config
    from mmdm.study.profiles import get_profile

    profile = get_profile("standard")
    method, variant = RUNS[run]
    spec = make_spec(method, variant, None, profile)
    cfg = train_config(spec, profile, seed=0, device="cpu")
    steps = max(1, round(cfg.steps * scale))
    # the last step always writes a checkpoint (the trained model); the intervals stay the profile's
    return profile, replace(cfg, {"steps": steps})


def _evaluate(profile, run_dir: Path, scale: float) -> dict[str, Any]:
    import pandas as pd

    from mmdm.data.layout import Layout
    from mmdm.engine.evaluate import evaluate_run
    from mmdm.paths import project_path
    from mmdm.study.vessel_eval import cohort_segmentation, vessel_metrics

    data = project_path(profile.data_dir)
    subjects = Layout(data).split("test")
    subjects = subjects[: max(1, round(len(subjects) * scale))]
    t0, c0 = time.time(), _cpu()
    summary = evaluate_run(run_dir, split="test", steps=profile.eval_sample_steps, subjects=subjects, device="cpu",
                           progress=False)
    seg = cohort_segmentation(data, ROOT / "results" / "standard" / "vessel_segmentation.yaml")
    vessel_metrics(run_dir, data, seg, subjects)
    wall, cpu = time.time() - t0, _cpu() - c0
    rows = pd.read_csv(run_dir / "metrics.csv").to_dict("records")
    return {"eval_wall_s": wall, "eval_cpu_s": cpu, "metrics": summary["metrics"], "per_subject": rows,
            "subjects": subjects}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mmdm.engine.train import train

    torch.set_num_threads(args.threads)
    out = Path(args.run_dir)
    if args.evaluate_only:
        profile, _ = _scaled_config(args.run, args.scale)
        return _evaluate(profile, out, args.scale)
    profile, cfg = _scaled_config(args.run, args.scale)
    t0, c0 = time.time(), _cpu()
    train(cfg, out, progress=False, profile="standard")
    res = {"train_wall_s": time.time() - t0, "train_cpu_s": _cpu() - c0, "steps": cfg.steps}
    res.update(_evaluate(profile, out, args.scale))
    return res


# ------------------------------------------------------------------------------- driver (two commits)
def run_worker(code_root: Path, args: argparse.Namespace, run: str, run_dir: Path,
               evaluate_only: bool = False) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code_root), "MMDM_ROOT": str(ROOT)}
    env.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--run", run, "--run-dir", str(run_dir),
           "--scale", str(args.scale), "--threads", str(args.threads)] + (["--evaluate-only"] if evaluate_only else [])
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker failed ({code_root}, {run}):\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = time.time() - t0
    res["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return res


def driver(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_throughput import ensure_worktree
    from benchmarks.cpu_env import machine
    from mmdm.io import write_json, write_text

    info = machine()
    base = ensure_worktree(args.base)
    roots = {"base": base, "new": ROOT}
    work = Path(tempfile.mkdtemp(prefix="mmdm-standard-bench-"))
    results: dict[str, Any] = {}
    for run in args.runs:
        by: dict[str, list[dict]] = {"base": [], "new": []}
        for r in range(args.repeats):
            for which in ("base", "new") if r % 2 == 0 else ("new", "base"):
                d = work / f"{run}-{which}-{r}"
                res = run_worker(roots[which], args, run, d)
                by[which].append(res)
                print(f"[{run} {which} {r + 1}/{args.repeats}] train {res['train_wall_s']:.0f} s "
                      f"(CPU {res['train_cpu_s']:.0f}), eval {res['eval_wall_s']:.0f} s (CPU {res['eval_cpu_s']:.0f}), "
                      f"PSNR {res['metrics']['psnr']:.3f}, load {res['load_average']}", flush=True)
        # the same checkpoint (base's first model), evaluated by both commits' code
        fixed = {}
        for which in ("base", "new"):
            d = work / f"{run}-fixed-{which}"
            shutil.copytree(work / f"{run}-base-0", d)
            for f in ("summary.json", "metrics.csv", "vessel_metrics.csv"):
                (d / f).unlink(missing_ok=True)
            fixed[which] = run_worker(roots[which], args, run, d, evaluate_only=True)
        agree = fixed_checkpoint_agreement(fixed["base"]["per_subject"], fixed["new"]["per_subject"],
                                           args.fixed_tol_db)

        def med(key: str, which: str) -> float:
            return statistics.median(x[key] for x in by[which])

        summary = {k: {w: med(k, w) for w in by} for k in ("train_wall_s", "train_cpu_s", "eval_wall_s",
                                                            "eval_cpu_s")}
        total = {w: summary["train_wall_s"][w] + summary["eval_wall_s"][w] for w in by}
        total_cpu = {w: summary["train_cpu_s"][w] + summary["eval_cpu_s"][w] for w in by}
        seeds = []
        for suffix in ("", "-s1", "-s2"):
            p = ROOT / "results" / "standard" / f"{run}{suffix}" / "summary.json"
            if p.is_file():
                seeds.append(json.loads(p.read_text())["metrics"]["psnr"])
        new_psnr = statistics.mean(x["metrics"]["psnr"] for x in by["new"])
        results[run] = {
            "median": summary, "total_wall_s": total, "total_cpu_s": total_cpu,
            "ratio_wall_new_over_base": total["new"] / total["base"],
            "ratio_cpu_new_over_base": total_cpu["new"] / total_cpu["base"],
            "fixed_checkpoint": {**agree, "eval_cpu_s": {w: fixed[w]["eval_cpu_s"] for w in fixed},
                                 "eval_wall_s": {w: fixed[w]["eval_wall_s"] for w in fixed}},
            "full_run_psnr_vs_seed_spread": (seed_tolerance(seeds, new_psnr) if args.scale == 1 and seeds else
                                             {"ok": None, "note": "only meaningful at --scale 1 (the records are "
                                              "full runs)", "seeds": seeds, "value": new_psnr}),
            "runs": by}
    result = {"machine": info, "base": {"ref": args.base, "path": str(base)}, "scale": args.scale,
              "threads": args.threads, "repeats": args.repeats,
              "reduced": args.scale < 1, "order": "alternating base/new (new first on odd repeats), one process each",
              "results": results, "load_average_end": [round(v, 2) for v in os.getloadavg()]}
    out = Path(args.out or ROOT / "benchmarks" / "results" / "cpu" / f"standard-run-scale{args.scale:g}.json")
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(result))
    shutil.rmtree(work, ignore_errors=True)
    return result


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    head = (f"# `standard` run, {r['base']['ref']} (base) vs {m['git'].get('commit', '?')[:7]} (new)"
            + (f" -- REDUCED to scale {r['scale']:g}" if r["reduced"] else ""))
    lines = [head, "",
             f"CPU {m['device_name']}, capability {m['cpu_capability']}, {r['threads']} thread(s) per process, "
             f"torch {m['torch']}; load average at start {m['load_average_start']}, at end {r['load_average_end']} "
             f"(a 2-core machine shared with other jobs: wall times are noisy; CPU seconds are the steadier "
             f"measure). {r['repeats']} process(es) per commit and run, alternating."]
    if r["reduced"]:
        lines += ["", f"**Reduced**: {r['scale']:g} x the training steps and test subjects of a `standard` run. "
                  "Fixed costs (start-up, building the method, loading data, the first validation) weigh more "
                  "than in a full run, so the ratios here are not the full run's."]
    lines += ["", "| run | train s base / new (CPU) | eval s base / new (CPU) | total wall base / new | "
              "new / base wall | new / base CPU | same checkpoint: max |dPSNR| dB, |dSSIM| | within tolerance |",
              "|---|---|---|---|---|---|---|---|"]
    for run, x in r["results"].items():
        s, fc = x["median"], x["fixed_checkpoint"]
        diff = fc.get("max_abs_diff", {})
        lines.append(
            f"| {run} | {s['train_wall_s']['base']:.0f} / {s['train_wall_s']['new']:.0f} "
            f"({s['train_cpu_s']['base']:.0f} / {s['train_cpu_s']['new']:.0f}) | "
            f"{s['eval_wall_s']['base']:.0f} / {s['eval_wall_s']['new']:.0f} "
            f"({s['eval_cpu_s']['base']:.0f} / {s['eval_cpu_s']['new']:.0f}) | "
            f"{x['total_wall_s']['base']:.0f} / {x['total_wall_s']['new']:.0f} | {x['ratio_wall_new_over_base']:.2f} | "
            f"{x['ratio_cpu_new_over_base']:.2f} | {diff.get('psnr', float('nan')):.2g}, "
            f"{diff.get('ssim', float('nan')):.2g} | {fc['ok']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help="(internal) one run at the code on PYTHONPATH, JSON out")
    p.add_argument("--evaluate-only", action="store_true", help="(worker) evaluate the trained run in --run-dir")
    p.add_argument("--run", default="mmdm-full", choices=sorted(RUNS))
    p.add_argument("--run-dir")
    p.add_argument("--runs", nargs="+", default=["mmdm-full", "pix2pix"], choices=sorted(RUNS))
    p.add_argument("--scale", type=float, default=0.05, help="fraction of the standard steps and test subjects")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--base", default="59d89a2")
    p.add_argument("--fixed-tol-db", type=float, default=1e-3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1 or math.isnan(args.scale):
        p.error("--scale must lie in (0, 1]")
    if args.worker:
        print(json.dumps(worker(args), default=float))
        return 0
    driver(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
