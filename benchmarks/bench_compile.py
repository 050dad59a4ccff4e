"""MMDM's networks on the CPU: fp32 / bf16 autocast x channels-last x ``torch.compile``, training and sampling.

Two parts, each for a named MMDM configuration (``--model``: ``paper`` = the
authors' network, ``small``), random weights (timing only):

``train``
    one networks' step as in ``bench_nets.py``: the M branches and the fusion
    module forward, the four MSEs, ``backward()`` (no optimiser step; Adam adds
    tens of ms), batch 4 of 96x112 windows of 5 slices. Work = 3 x the forward
    FLOPs (``FlopCounterMode``, convolutions and matmuls).
``sample``
    ``method.sample`` on a batch of windows (default 4) at the frontier's
    setting (5 steps, independent branches), the networks under
    ``mmdm.engine.infer.network_autocast`` as ``synthesize_volume(amp=...)``
    runs them. Work = the FLOPs counted over one such call.

Each variant is a deep copy of the same model; with ``compile`` every network
is ``nn.Module.compile()``-d (inductor, default mode) in a fresh, empty
inductor cache, so the first call's time (``first_call_s``) is a cold compile;
``compile_s = first_call_s - median``. The variants are then timed alternating
(v1, v2, ..., v1, v2, ...) in one process with the same thread count and
reported as medians, so their ratios hold under other jobs' load. A variant
that fails (e.g. no C++ compiler for inductor) records its error.

Break-even: compiling pays after ``compile_s / (eager median - compiled median)``
steps (training) or windows (sampling), compared with the same precision and
memory format in eager mode.

Usage (one model and part per call stays under ~10 minutes on a loaded 2-core machine: one cold
compile of the small networks' training step took 3.7 minutes there)::

    python benchmarks/bench_compile.py --model small --part train --threads 1
    python benchmarks/bench_compile.py --model small --part sample --threads 1
    python benchmarks/bench_compile.py --model paper --part train --threads 1
    python benchmarks/bench_compile.py --model paper --part sample --threads 1

Results are merged (keyed by model, part and threads) into
``benchmarks/results/cpu/compile.json``; ``compile.md`` is rewritten from all of them.
"""

from __future__ import annotations

import os
import tempfile

# a cold, private inductor cache: compile times are those of a first run (set before torch is imported)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmdm-bench-inductor-")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_nets import MODALITIES, BranchesAndFusion, loss_fn  # noqa: E402
from cpu_env import RESULTS, interleaved, load_average, machine, md_header  # noqa: E402

from mmdm.engine.infer import method_networks, network_autocast  # noqa: E402
from mmdm.io import write_json, write_text  # noqa: E402
from mmdm.methods import build_method  # noqa: E402

VARIANTS = [(bf16, cl, comp) for comp in (False, True) for bf16 in (False, True) for cl in (False, True)]
DEFAULT_VARIANTS = ["fp32", "fp32+cl", "bf16", "bf16+cl", "fp32+compile", "bf16+compile"]


def label(bf16: bool, cl: bool, comp: bool) -> str:
    return "+".join(["bf16" if bf16 else "fp32"] + (["cl"] if cl else []) + (["compile"] if comp else []))


def _autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _fmt(x: torch.Tensor, cl: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def train_part(model: str, args: argparse.Namespace) -> tuple[float, dict[str, Callable[[], None]]]:
    """(work in FLOP per call, variant -> one networks' step)."""
    torch.manual_seed(0)
    b, (h, w) = args.batch, args.size
    base = BranchesAndFusion(model, len(MODALITIES), 5)
    x_t = [torch.randn(b, 5, h, w) for _ in MODALITIES]
    src = [torch.randn(b, 5, h, w) for _ in MODALITIES]
    target = torch.randn(b, 5, h, w)
    t = torch.randint(0, 1000, (b,))
    with FlopCounterMode(display=False) as fc:
        base(x_t, src, t)
    work = 3.0 * fc.get_total_flops()

    def make(bf16: bool, cl: bool, comp: bool) -> Callable[[], None]:
        net = copy.deepcopy(base)
        if cl:
            net = net.to(memory_format=torch.channels_last)
        xs, ss = [_fmt(x, cl) for x in x_t], [_fmt(s, cl) for s in src]
        call = torch.compile(net) if comp else net

        def step() -> None:
            with _autocast(bf16):
                loss = loss_fn(call(xs, ss, t), target)
            loss.backward()
            net.zero_grad(set_to_none=True)
        return step

    return work, {label(*v): make(*v) for v in VARIANTS if _wanted(v, args)}


def sample_part(model: str, args: argparse.Namespace) -> tuple[float, dict[str, Callable[[], None]]]:
    """(work in FLOP per call, variant -> one ``method.sample`` of a batch of windows)."""
    torch.manual_seed(0)
    b, (h, w) = args.sample_batch, args.size
    base = build_method("mmdm", config=model, variant="full", sources=MODALITIES).eval()
    base.sampling_mode = args.mode
    wins = {m: torch.rand(b, 5, h, w) * 2 - 1 for m in MODALITIES}
    with FlopCounterMode(display=False) as fc:
        base.sample(wins, steps=args.sample_steps, generator=torch.Generator().manual_seed(0))
    work = float(fc.get_total_flops())

    def make(bf16: bool, cl: bool, comp: bool) -> Callable[[], None]:
        method = copy.deepcopy(base)
        if cl:
            method = method.to(memory_format=torch.channels_last)
        if comp:
            for net in method_networks(method):
                net.compile()
        ws = {m: _fmt(x, cl) for m, x in wins.items()}

        def run() -> None:
            with network_autocast(method, "bf16" if bf16 else "none"):
                method.sample(ws, steps=args.sample_steps, generator=torch.Generator().manual_seed(0))
        return run

    return work, {label(*v): make(*v) for v in VARIANTS if _wanted(v, args)}


def _wanted(v: tuple[bool, bool, bool], args: argparse.Namespace) -> bool:
    return label(*v) in args.variants and not (v[2] and args.no_compile)


def bench(model: str, part: str, args: argparse.Namespace) -> dict[str, Any]:
    work, variants = (train_part if part == "train" else sample_part)(model, args)
    per_call = args.batch if part == "train" else args.sample_batch
    first: dict[str, float] = {}
    errors: dict[str, str] = {}
    ok: dict[str, Callable[[], None]] = {}
    for name, fn in variants.items():  # first call (a cold compile for the compiled ones), then one warm-up
        t0 = time.perf_counter()
        try:
            fn()
            first[name] = time.perf_counter() - t0
            fn()
            ok[name] = fn
        except Exception as e:  # noqa: BLE001 - recorded, the other variants go on
            errors[name] = f"{type(e).__name__}: {str(e).strip()[:600]}"
            print(f"{model} {part} {name}: FAILED {errors[name][:200]}", flush=True)
            traceback.print_exc(limit=3)
        print(f"{model} {part} {name}: first call {first.get(name, float('nan')):.1f} s", flush=True)
    timing = interleaved(ok, args.repeats)
    out: dict[str, Any] = {}
    for name, t in timing.items():
        med = t["median_s"]
        out[name] = {**t, "first_call_s": round(first[name], 3), "windows_per_s": per_call / med,
                     "gflop_per_s": work / med / 1e9}
        if name.endswith("+compile"):
            eager = name[: -len("+compile")]
            out[name]["compile_s"] = round(first[name] - med, 2)
            if eager in timing:
                gain = timing[eager]["median_s"] - med
                out[name]["speedup_vs_eager"] = timing[eager]["median_s"] / med
                out[name]["break_even_calls"] = (out[name]["compile_s"] / gain) if gain > 0 else None
        print(f"{model} {part} {name}: {med:.3f} s median, {out[name]['windows_per_s']:.2f} windows/s, "
              f"{out[name]['gflop_per_s']:.0f} GFLOP/s", flush=True)
    for name, e in errors.items():
        out[name] = {"error": e}
    return {"model": model, "part": part, "threads": torch.get_num_threads(), "height_width": list(args.size),
            "windows_per_call": per_call, "gflop_per_call": work / 1e9, "gflop_per_window": work / per_call / 1e9,
            "sample_steps": args.sample_steps if part == "sample" else None,
            "mode": args.mode if part == "sample" else None, "repeats": args.repeats,
            "work": "3 x forward FLOPs" if part == "train" else "FLOPs counted over one sample call",
            "variants": out, "load_average_end": load_average()}


def markdown(res: dict[str, Any]) -> str:
    md = md_header("MMDM's networks on the CPU: bf16, channels-last and torch.compile", res["machine"])
    md[2] = md[2].replace("load average at the start", "last run's load average at the start")
    md += ["Random weights, 96x112 windows of 5 slices; `train`: one networks' step (forward, four MSEs, "
           "backward; no optimiser), batch 4; `sample`: `method.sample` of a batch of windows, 5 steps, independent "
           "branches, networks under `network_autocast`. Variants alternated in one process; medians. "
           "`compile_s`: first call (cold inductor cache) minus the median; break-even: steps (train) or calls "
           "(sample) after which compiling has paid for itself against the same variant in eager mode.", ""]
    for key in sorted(res["results"]):
        r = res["results"][key]
        md += [f"## {r['model']} / {r['part']} / {r['threads']} thread(s)" + (f" ({r['tag']})" if r.get("tag") else ""),
               "",
               f"{r['gflop_per_window']:.1f} GFLOP per window ({r['work']}); {r['windows_per_call']} windows per call; "
               f"commit {str(r['machine']['git'].get('commit'))[:10]}, {r['machine']['date']}; load average at the "
               f"start {r['machine']['load_average_start']}, at the end {r['load_average_end']}.", ""]
        loads = [la[0] for la in (r["machine"]["load_average_start"], r["load_average_end"]) if la]
        if r["threads"] > 1 and loads and max(loads) > r["machine"]["cpu_count"]:
            md += ["**Oversubscribed**: other jobs kept the cores busy, and with more than one thread OpenMP's "
                   "barriers wait for descheduled threads; these times measure the contention, not the variants.", ""]
        md += [
               "| variant | s per call | windows/s | GFLOP/s | vs fp32 eager | compile s | break-even |",
               "|---|---|---|---|---|---|---|"]
        ref = r["variants"].get("fp32", {}).get("median_s")
        for name, v in r["variants"].items():
            if "error" in v:
                md.append(f"| {name} | failed: {v['error'][:120]} | | | | | |")
                continue
            be = v.get("break_even_calls")
            md.append(f"| {name} | {v['median_s']:.3f} | {v['windows_per_s']:.2f} | {v['gflop_per_s']:.0f} | "
                      f"{(ref / v['median_s']) if ref else float('nan'):.2f}x | {v.get('compile_s', '')} | "
                      f"{'' if 'compile_s' not in v else ('never' if be is None else f'{be:.0f}')} |")
        md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["small"], choices=["small", "paper"])
    p.add_argument("--part", nargs="+", default=["train", "sample"], choices=["train", "sample"])
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--size", type=int, nargs=2, default=(96, 112), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=4, help="training windows per step")
    p.add_argument("--sample-batch", type=int, default=4, help="windows per sample call")
    p.add_argument("--sample-steps", type=int, default=5)
    p.add_argument("--mode", default="independent", choices=["independent", "coupled"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="eager variants only")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=[label(*v) for v in VARIANTS],
                   help="default: the four eager ones and fp32/bf16 compiled (a cold compile takes minutes on 2 cores)")
    p.add_argument("--tag", default="", help="added to the result's key, so that runs of other variants of the same "
                   "model and part (each with its own eager reference) sit side by side")
    p.add_argument("--out", type=Path, default=RESULTS / "compile.json")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown from --out's JSON")
    args = p.parse_args(argv)
    if args.render:
        write_text(args.out.with_suffix(".md"), markdown(json.loads(args.out.read_text())))
        return 0
    res = json.loads(args.out.read_text()) if args.out.is_file() else {"results": {}}
    info = machine()
    for n in args.threads:
        torch.set_num_threads(n)
        for model in args.model:
            for part in args.part:
                r = bench(model, part, args)
                r["machine"] = info
                r["tag"] = args.tag
                res["results"][f"{model}|{part}|threads={n}" + (f"|{args.tag}" if args.tag else "")] = r
                info["load_average_end"] = load_average()
                res["machine"] = info
                write_json(args.out, res)  # after every part: a long run killed later keeps what it measured
                write_text(args.out.with_suffix(".md"), markdown(res))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
