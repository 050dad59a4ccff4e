"""Benchmark of MMDM's networks: M branches + the cross-modal fusion module.

One training-like step is timed: every branch predicts ``eps^m`` from
``cat(x_t^m, x^m)``, ``x0_hat^m = x^m - eps^m`` (Sec. 2.1), the fusion module
gives ``x0_hat`` (eq. 4), the loss is the sum of the four MSEs to the target,
then ``backward()`` (no optimizer step). The networks are those of a named MMDM
configuration (``--model``: ``paper`` = the authors' network, ``small`` = the
CPU size derived from it, ``depthwise`` = the study's earlier depthwise
Restormer-UNet model), taken from the method class without its diffusion and losses.

Reported per configuration: forward GFLOP per 5-slice window, in total and
per part (branches, fusion mixers, fusion UNet), counted with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls and
attention only; elementwise ops are not counted); time per step, windows/s,
achieved GFLOP/s with the step's work estimated as 3 x forward (the counter's
own backward count is not used: in torch 2.13 it ignores ``groups`` in
``convolution_backward`` and so overcounts the depthwise convolutions of
MDTA/GDFN by a factor of the channel count), parameter counts and peak memory (CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps;
CPU: the process's peak resident set size so far, ``ru_maxrss``).

Usage::

    python benchmarks/bench_nets.py --device cpu --model paper small --size 96x112
    python benchmarks/bench_nets.py --device cuda --model paper --size 96x112 288x320 --bf16 --channels-last --compile

Results are merged (keyed by configuration and options) into
``benchmarks/results/nets-<device>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mmdm.io import write_json  # noqa: E402
from mmdm.methods import build_method  # noqa: E402
from mmdm.methods.mmdm import NAMED_CONFIGS  # noqa: E402
from mmdm.nets import count_parameters  # noqa: E402

#: MMDM's source modalities, in the order the method uses them
MODALITIES = ("T1w", "T2w", "FLAIR")


def parse_size(text: str) -> tuple[int, int]:
    """``"96x112"`` -> ``(96, 112)``."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 96x112, got {text!r}") from None
    if h % 8 or w % 8:
        raise argparse.ArgumentTypeError(f"size {text}: height and width must be multiples of 8")
    return h, w


class BranchesAndFusion(nn.Module):
    """The M branches + cross-modal fusion of a named MMDM configuration, as one module."""

    def __init__(self, model: str, n_modalities: int, window: int):
        super().__init__()
        if not 2 <= n_modalities <= len(MODALITIES):
            raise ValueError(f"--modalities must be 2 or 3, got {n_modalities}")
        method = build_method("mmdm", config=model, sources=MODALITIES[:n_modalities], window=window)
        self.branches = nn.ModuleList(method.branches.values())
        self.fusion = method.fusion
        self.time_embed = method.time_embed  # shared by branches and fusion (None: one per network)

    def forward(self, x_t: list[Tensor], sources: list[Tensor], t: Tensor) -> tuple[list[Tensor], Tensor]:
        """``x_t[m], sources[m]``: ``(B, window, H, W)`` -> ``(x0_hats, x0_hat)``."""
        x0_hats = [src - net(torch.cat([xt, src], dim=1), t) for net, xt, src in zip(self.branches, x_t, sources)]
        return x0_hats, self.fusion(x0_hats, sources, t)


def loss_fn(out: tuple[Tensor, Tensor], target: Tensor) -> Tensor:
    x0_hats, x0_hat = out
    return F.mse_loss(x0_hat.float(), target) + sum(F.mse_loss(p.float(), target) for p in x0_hats)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024, "ru_maxrss (process peak RSS so far)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(name: str, size: tuple[int, int], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    h, w = size
    m, b, win = args.modalities, args.batch, args.window
    torch.manual_seed(0)
    if args.flops_only:  # shapes only: nothing is computed or allocated
        device = torch.device("meta")
    model = BranchesAndFusion(name, m, win).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x_t = [torch.randn(b, win, h, w, device=device).contiguous(memory_format=memory_format) for _ in range(m)]
    sources = [torch.randn(b, win, h, w, device=device).contiguous(memory_format=memory_format) for _ in range(m)]
    target = torch.randn(b, win, h, w, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    use_bf16 = args.bf16 and device.type != "meta"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # FLOPs on the eager model (the flop counter does not see inside compiled graphs).
    with FlopCounterMode(display=False) as fwd_counter, autocast:
        out = model(x_t, sources, t)
    del out
    counts = fwd_counter.get_flop_counts()

    def part_flops(*modules: str) -> float:  # exact module names: each entry already includes its children
        return sum(sum(counts.get(f"BranchesAndFusion.{name}", {}).values()) for name in modules) / b / 1e9

    flops_parts = {"branches": part_flops(*(f"branches.{i}" for i in range(m))),
                   "fusion_mixers": part_flops("fusion.mix", *(f"fusion.per_modality.{i}" for i in range(m))),
                   "fusion_unet": part_flops("fusion.unet")}

    fwd = fwd_counter.get_total_flops()
    fwd_bwd = 3 * fwd  # estimate; see the module docstring
    shared = count_parameters(model.time_embed) if model.time_embed is not None else 0
    branch_params = count_parameters(model.branches[0]) - shared
    tag = f"{name}|{h}x{w}"
    result: dict[str, Any] = {
        "key": f"{tag}|bf16={args.bf16}|channels_last={args.channels_last}|compile={args.compile}",
        "model": name, "height": h, "width": w, "batch": b, "window": win, "n_modalities": m,
        "bf16": args.bf16, "channels_last": args.channels_last, "compile": args.compile,
        "params": {"branch": branch_params, "branches": m * branch_params, "shared_time_embedding": shared,
                   "fusion": count_parameters(model.fusion) - shared,
                   "total": count_parameters(model)},
        "fwd_gflop_per_window": fwd / b / 1e9,
        "fwd_gflop_per_window_parts": flops_parts,
        "fwd_bwd_gflop_per_window_est": fwd_bwd / b / 1e9,
    }
    if args.flops_only:
        result["key"] = f"{tag}|flops-only"
        return result

    step_model = torch.compile(model) if args.compile else model

    def step() -> None:
        with autocast:
            loss = loss_fn(step_model(x_t, sources, t), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    mem, mem_kind = peak_memory_mib(device)
    med = statistics.median(times)
    result.update({
        "step_ms": {"median": 1e3 * med, "mean": 1e3 * statistics.fmean(times), "min": 1e3 * min(times),
                    "n": len(times), "warmup": args.warmup},
        "windows_per_s": b / med,
        "achieved_gflop_per_s": fwd_bwd / med / 1e9,
        "peak_memory_mib": mem, "peak_memory_kind": mem_kind,
    })
    return result


def conv_peak_gflops(device: torch.device, iters: int = 5) -> float:
    """A practical fp32 peak of the device: throughput of one large 3x3 convolution
    (128 -> 128 channels, 4 x 48 x 56), forward only. The networks' achieved GFLOP/s
    read against it says how much of the machine they use."""
    x = torch.randn(4, 128, 48, 56, device=device)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(device)
    flops = 2 * 4 * 128 * 128 * 9 * 48 * 56
    with torch.no_grad():
        conv(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            conv(x)
        _sync(device)
    return flops * iters / (time.perf_counter() - t0) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", nargs="+", choices=sorted(NAMED_CONFIGS), default=["paper"],
                   help="named MMDM configuration(s): paper (the authors' network), small (CPU), depthwise")
    p.add_argument("--size", nargs="+", type=parse_size, default=[(96, 112)],
                   help="in-plane window size(s) HxW, e.g. 96x112 (the phantom at 2 mm) 288x320 (the paper's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--modalities", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--flops-only", action="store_true",
                   help="count FLOPs and parameters on the meta device (no compute, no timing); fast on any machine")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/nets-<device>.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.iters = args.iters or (10 if device.type == "cuda" else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out_path = args.out or ROOT / "benchmarks" / "results" / f"nets-{args.device}.json"

    previous: list[dict[str, Any]] = []
    if out_path.exists():
        with contextlib.suppress(ValueError, KeyError):
            previous = json.loads(out_path.read_text())["results"]
    results = {r["key"]: r for r in previous if "model" in r}  # entries of the pre-ResUnet benchmark are dropped
    for name, size in ((n, s) for n in args.model for s in args.size):
        r = bench_one(name, size, args, device)
        results[r["key"]] = r
        line = f"{r['key']}: {r['fwd_gflop_per_window']:.2f} GFLOP/window fwd, {r['params']['total']:,} parameters"
        if "step_ms" in r:
            line += (f", step {r['step_ms']['median']:.1f} ms, {r['achieved_gflop_per_s']:.1f} GFLOP/s, "
                     f"peak {r['peak_memory_mib']:.0f} MiB")
        print(line, flush=True)
    peak = None if args.flops_only else conv_peak_gflops(device)
    if peak:
        print(f"practical fp32 peak (one large 3x3 conv): {peak:.1f} GFLOP/s", flush=True)
    write_json(out_path, {
        "device": args.device, "device_name": device_name(device), "torch": torch.__version__,
        "conv_peak_gflop_per_s": peak,
        "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode, forward only (conv/matmul/attention); "
                        "forward+backward estimated as 3 x forward",
        "results": list(results.values()),
    })
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
