"""Training throughput of MMDM against this machine's measured fp32 peak, this commit against another.

What is measured (fp32, CPU):

- the machine's practical fp32 peak: a square matmul (``--matmul-n``) and one large 3x3
  convolution (128 -> 128 channels, 4 x 48 x 56), forward only, GFLOP/s;
- one MMDM training step (full variant, 3 modalities, 5-slice windows, ``--size``, batch
  ``--batch``): ``method.training_losses`` on a random batch, ``backward``, an Adam step. For
  ``--configs`` (``paper``: the authors' network; ``small``: the CPU size derived from it).

Work per step is counted with ``torch.utils.flop_counter.FlopCounterMode`` over the forward and
the backward (convolutions, matmuls; elementwise ops are not counted). Two counts are reported:
``gflop_counted`` (what the code at that commit executes) and ``gflop_useful`` (the authors'
formulation: every 1x1 + 3x3 convolution pair as two convolutions, counted with
``mmdm.nets.resunet.unfused_conv_pairs`` where that exists). GFLOP/s of useful work =
``gflop_useful`` / step time, so a commit that computes the same function with fewer operations
shows as faster, not as less efficient.

Before/after: ``--base REF`` runs the same worker in a ``git worktree`` of ``REF`` and of this
checkout, ALTERNATING (base, new, base, new, ...; ``--repeats`` each), every run a fresh
process with ``--threads`` threads; medians and the load average around each run are kept. Each
step is timed in wall seconds and in the process's CPU seconds (``time.process_time``): on a
machine loaded beyond its cores a 1-thread process waits for a core most of the wall time, and
the CPU time is the steadier measure of its work. The ratio of medians of interleaved runs is
the result (``benchmarks/cpu_env.py``).

Usage::

    python benchmarks/bench_throughput.py --base 59d89a2 --configs paper small --repeats 3
    python benchmarks/bench_throughput.py --worker --config paper   # one process, prints JSON

Results: ``benchmarks/results/cpu/throughput.json`` (and ``.md``), with the CPU capability,
its bf16 flags, the thread count and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ("T1w", "T2w", "FLAIR")


# ------------------------------------------------------------------------------- worker (one commit)
def matmul_peak(n: int, iters: int = 5) -> float:
    """GFLOP/s of an ``n x n`` fp32 matmul (best of ``iters``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(iters))
    return 2 * n ** 3 / best / 1e9


def conv_peak(iters: int = 5) -> float:
    """GFLOP/s of one 3x3 conv 128 -> 128 on 4 x 48 x 56 (best of ``iters``)."""
    x, w = torch.randn(4, 128, 48, 56), torch.randn(128, 128, 3, 3)
    torch.nn.functional.conv2d(x, w, padding=1)
    best = min(_timed(lambda: torch.nn.functional.conv2d(x, w, padding=1)) for _ in range(iters))
    return 2 * 4 * 48 * 56 * 128 * 128 * 9 / best / 1e9


def _timed(fn) -> float:
    """CPU seconds of the calling process (with 1 thread: the time it ran, not the time it waited)."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def _setup(config: str, size: tuple[int, int], batch: int):
    from mmdm.methods import build_method

    torch.manual_seed(0)
    method = build_method("mmdm", config=config, variant="full", sources=MODALITIES)
    h, w = size
    win = method.window
    g = torch.Generator().manual_seed(0)
    data = {"sources": {m: torch.rand(batch, win, h, w, generator=g) * 2 - 1 for m in MODALITIES},
            "target": torch.rand(batch, win, h, w, generator=g) * 2 - 1}
    opt = torch.optim.Adam(method.parameters(), lr=1e-4)
    return method, data, opt


def _step(method, data, opt, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    losses = method.training_losses(data, generator=gen)
    loss = losses["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def count_gflop(method, data) -> dict[str, float]:
    """FLOPs of one forward + backward (no optimiser step), as executed and in the authors' form."""
    from torch.utils.flop_counter import FlopCounterMode

    def once() -> float:
        with FlopCounterMode(display=False) as c:
            method.training_losses(data, generator=torch.Generator().manual_seed(0))["loss"].backward()
        method.zero_grad(set_to_none=True)
        return c.get_total_flops() / 1e9

    counted = once()
    try:
        from mmdm.nets.resunet import unfused_conv_pairs  # absent before the fused form existed
    except ImportError:
        return {"gflop_counted": counted, "gflop_useful": counted}
    with unfused_conv_pairs():
        useful = once()
    return {"gflop_counted": counted, "gflop_useful": useful}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    method, data, opt = _setup(args.config, args.size, args.batch)
    flops = count_gflop(method, data) if args.count else {}
    for i in range(args.warmup):
        _step(method, data, opt, i)
    times, cpu, losses = [], [], []
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(_step(method, data, opt, 100 + i))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"config": args.config, "size": list(args.size), "batch": args.batch, "threads": torch.get_num_threads(),
            "step_s": {"median": statistics.median(times), "all": times},
            "step_cpu_s": {"median": statistics.median(cpu), "all": cpu}, **flops,
            "first_loss": losses[0], "load_average": [round(v, 2) for v in os.getloadavg()]}


# ------------------------------------------------------------------------------- driver (two commits)
def ensure_worktree(ref: str) -> Path:
    """A detached ``git worktree`` of ``ref`` under /tmp (made once, reused)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    path = Path(f"/tmp/mmdm-bench-{sha}")
    if not path.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def run_worker(code_root: Path, args: argparse.Namespace, config: str, count: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", config,
           "--size", f"{args.size[0]}x{args.size[1]}", "--batch", str(args.batch), "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--count"] if count else [])
    out = subprocess.run(cmd, cwd=code_root, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker failed in {code_root}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def driver(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from benchmarks.cpu_env import machine  # noqa: E402
    from mmdm.io import write_json, write_text  # noqa: E402

    torch.set_num_threads(args.threads)
    info = machine()
    base = ensure_worktree(args.base)
    roots = {"base": base, "new": ROOT}
    peaks: dict[str, list[float]] = {"matmul": [], "conv3x3": []}  # per CPU second (process_time)
    runs: dict[str, dict[str, list[dict]]] = {c: {"base": [], "new": []} for c in args.configs}
    for r in range(args.repeats):
        for config in args.configs:
            for which in ("base", "new") if r % 2 == 0 else ("new", "base"):
                res = run_worker(roots[which], args, config, count=r == 0)
                runs[config][which].append(res)
                print(f"[{r + 1}/{args.repeats}] {config} {which}: {res['step_s']['median']:.2f} s/step wall, "
                      f"{res['step_cpu_s']['median']:.2f} s CPU, load {res['load_average']}", flush=True)
        peaks["matmul"].append(matmul_peak(args.matmul_n))
        peaks["conv3x3"].append(conv_peak())
    summary: dict[str, Any] = {}
    for config, by in runs.items():
        med = {w: statistics.median(x["step_s"]["median"] for x in by[w]) for w in by}
        cpu = {w: statistics.median(x["step_cpu_s"]["median"] for x in by[w]) for w in by}
        useful = by["base"][0]["gflop_useful"]
        summary[config] = {
            "step_cpu_s_median": cpu, "speedup_cpu": cpu["base"] / cpu["new"],
            "step_s_median": med, "speedup_wall": med["base"] / med["new"],
            "gflop_per_step_useful": useful, "gflop_per_step_counted": {w: by[w][0]["gflop_counted"] for w in by},
            "gflops_useful_cpu": {w: useful / cpu[w] for w in cpu},
            "fraction_of_matmul_peak_cpu": {w: useful / cpu[w] / statistics.median(peaks["matmul"]) for w in cpu},
            "first_loss": {w: by[w][0]["first_loss"] for w in by},
        }
    result = {"machine": info, "base": {"ref": args.base, "path": str(base)}, "threads": args.threads,
              "size": list(args.size), "batch": args.batch, "steps_per_run": args.steps, "repeats": args.repeats,
              "order": "alternating base/new (new first on odd repeats), one fresh process per run",
              "peaks_gflops": {k: {"median": statistics.median(v), "all": v} for k, v in peaks.items()},
              "summary": summary, "runs": runs,
              "load_average_end": [round(v, 2) for v in os.getloadavg()]}
    out = Path(args.out)
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(result))
    return result


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"# MMDM training throughput, {r['base']['ref']} (base) vs {m['git'].get('commit', '?')[:7]} (new)", "",
             f"CPU {m['device_name']}, capability {m['cpu_capability']}, bf16 flags {m['cpu_bf16_flags'] or 'none'}, "
             f"{r['threads']} thread(s), torch {m['torch']}; load average at start {m['load_average_start']}, at end "
             f"{r['load_average_end']} (a 2-core machine shared with other jobs: absolute times are noisy, the "
             "ratio of interleaved medians is the result). fp32, batch "
             f"{r['batch']}, {r['size'][0]}x{r['size'][1]}, {r['steps_per_run']} timed steps per process, "
             f"{r['repeats']} processes per commit, alternating.", "",
             f"Peaks: matmul {r['peaks_gflops']['matmul']['median']:.0f} GFLOP/s, 3x3 conv "
             f"{r['peaks_gflops']['conv3x3']['median']:.0f} GFLOP/s (medians).", "",
             "| config | GFLOP/step (authors' form) | counted new | CPU s/step base | CPU s/step new | speed-up (CPU) | "
             "wall s/step base / new | speed-up (wall) | GFLOP/s base / new (CPU) | of matmul peak base / new |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c, s in r["summary"].items():
        lines.append(f"| {c} | {s['gflop_per_step_useful']:.1f} | {s['gflop_per_step_counted']['new']:.1f} | "
                     f"{s['step_cpu_s_median']['base']:.2f} | {s['step_cpu_s_median']['new']:.2f} | "
                     f"{s['speedup_cpu']:.2f}x | {s['step_s_median']['base']:.1f} / {s['step_s_median']['new']:.1f} | "
                     f"{s['speedup_wall']:.2f}x | {s['gflops_useful_cpu']['base']:.0f} / "
                     f"{s['gflops_useful_cpu']['new']:.0f} | "
                     f"{100 * s['fraction_of_matmul_peak_cpu']['base']:.0f} % / "
                     f"{100 * s['fraction_of_matmul_peak_cpu']['new']:.0f} % |")
    lines += ["", "CPU s = the worker process's CPU time (`time.process_time`, 1 thread): on a machine whose load "
              "exceeds its cores a process waits for a core most of the wall time, and its CPU time is the "
              "steadier measure of the work; wall times are given too. GFLOP/s and peaks are per CPU second."]
    return "\n".join(lines) + "\n"


def parse_size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help="time one config at the code on PYTHONPATH, print JSON")
    p.add_argument("--config", default="paper")
    p.add_argument("--configs", nargs="+", default=["paper", "small"])
    p.add_argument("--size", type=parse_size, default=(96, 112))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--count", action="store_true", help="(worker) count the FLOPs of a step too")
    p.add_argument("--repeats", type=int, default=3, help="processes per commit, alternating")
    p.add_argument("--matmul-n", type=int, default=1024)
    p.add_argument("--base", default="59d89a2", help="the commit to compare against")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu" / "throughput.json"))
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    r = driver(args)
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
