"""Benchmark of the engine: training steps/s and whole-volume synthesis windows/s.

For each method specification and image size, a synthetic dataset (random
volumes in the study's layout, written to a temporary directory) is trained on
through :class:`mmdm.engine.train.Trainer` -- the real step: data loading,
the method's ``train_step`` (losses, backward, Adam), optional bf16 autocast -- and a volume is
synthesised with :func:`mmdm.engine.infer.synthesize_volume` (2.5D sliding
window, stride 1, batched windows, ``--sample-steps`` sampler steps).

Reported: steps/s and windows/s of training (batch x steps/s), synthesis
windows/s and seconds per 100-slice volume at that many sampler steps
(time scales ~linearly with the steps: the paper samples with 200), peak
memory (CUDA: max allocated; CPU: process peak RSS).

Usage::

    python benchmarks/bench_engine.py --device cpu --size authors --train-steps 5 --sample-steps 5
    python benchmarks/bench_engine.py --device cuda --size authors paper --bf16
    python benchmarks/bench_engine.py --method mmdm --method-kwargs '{"variant": "base", "config": "small"}'

Results are merged (keyed by method, kwargs, size and options) into
``benchmarks/results/engine-<device>.json`` together with the device name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mmdm.data.dataset import DataConfig  # noqa: E402
from mmdm.engine.distributed import DistInfo, device_name, resolve_device  # noqa: E402
from mmdm.engine.infer import synthesize_volume  # noqa: E402
from mmdm.engine.train import TrainConfig, Trainer  # noqa: E402
from mmdm.io import write_json  # noqa: E402

#: name -> (height, width) of the axial slices
SIZES: dict[str, tuple[int, int]] = {"tiny": (32, 32), "authors": (96, 112), "paper": (288, 320)}
DEFAULT_METHODS = [("mmdm", {"variant": "full", "config": "small"}), ("mmdm", {"variant": "full", "config": "paper"})]
MODALITIES = ("T1w", "T2w", "FLAIR", "angio")


def make_synthetic_dataset(root: Path, size: tuple[int, int], depth: int, n_train: int = 2) -> Path:
    """Random volumes in the study's layout (content is irrelevant for timing)."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    subjects = [f"sub-{i:03d}" for i in range(1, n_train + 3)]
    for s in subjects:
        for m in MODALITIES:
            p = root / s / "anat" / f"{s}_{m}.nii.gz"
            p.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(rng.random((*size, depth), dtype=np.float32), np.eye(4)), str(p))
    (root / "splits.json").write_text(json.dumps({"train": subjects[:n_train], "val": [subjects[-2]],
                                                  "test": [subjects[-1]]}))
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_one(method: str, kwargs: dict[str, Any], size_name: str, device: torch.device, args) -> dict[str, Any]:
    size = SIZES[size_name]
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_dataset(Path(tmp) / "data", size, depth=args.depth)
        cfg = TrainConfig(method=method, method_kwargs=dict(kwargs),
                          data=DataConfig(root=str(data), sources=tuple(args.sources)),
                          steps=args.warmup + args.train_steps, epochs=None, batch_size=args.batch_size,
                          device=str(device), amp="bf16" if args.bf16 else "none", checkpoint_every=0,
                          image_every=0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tr = Trainer(cfg, Path(tmp) / "run", DistInfo(device=device), progress=False)
        n_params = sum(p.numel() for p in tr.method.parameters())
        it = tr.batches(0)
        for _ in range(args.warmup):
            tr.train_step(next(it))
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.train_steps):
            tr.train_step(next(it))
        _sync(device)
        train_s = time.perf_counter() - t0
        train_mem = _peak_mb(device)

        method_obj = tr.method.eval()
        vol = {m: np.random.default_rng(1).random((*size, args.synth_depth), dtype=np.float32)
               for m in method_obj.sources}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 and device.type == "cuda" else \
            torch.autocast("cpu", enabled=False)
        with ctx:
            synthesize_volume(method_obj, {m: v[..., :cfg.data.window] for m, v in vol.items()},
                              window=cfg.data.window, batch_size=args.synth_batch, steps=2, progress=False)
            _sync(device)
            t0 = time.perf_counter()
            res = synthesize_volume(method_obj, vol, window=cfg.data.window, stride=1, batch_size=args.synth_batch,
                                    steps=args.sample_steps, progress=False)
            _sync(device)
        synth_s = time.perf_counter() - t0
    windows = res["windows"]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "method": method, "method_kwargs": kwargs, "size": size_name, "height_width": list(size),
        "batch_size": args.batch_size, "bf16": args.bf16, "parameters": n_params,
        "train_steps": args.train_steps, "train_steps_per_s": args.train_steps / train_s,
        "train_windows_per_s": args.train_steps * args.batch_size / train_s, "train_peak_mb": train_mem,
        "sample_steps": args.sample_steps, "synth_batch": args.synth_batch, "synth_windows": windows,
        "synth_windows_per_s": windows / synth_s,
        "synth_s_per_100_slices": synth_s * 100 / args.synth_depth,
        "synth_peak_mb": _peak_mb(device),
        "load_average_1min": load[0] if load else None,  # other processes on a shared CPU skew the timings
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--size", nargs="+", default=["authors"], choices=sorted(SIZES))
    p.add_argument("--method", default=None, help="one method name (default: MMDM small and paper)")
    p.add_argument("--method-kwargs", default="{}", help="JSON kwargs of --method")
    p.add_argument("--sources", nargs="+", default=["T1w", "T2w", "FLAIR"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--depth", type=int, default=12, help="slices per training volume")
    p.add_argument("--synth-depth", type=int, default=20, help="slices of the synthesised volume")
    p.add_argument("--synth-batch", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    methods = [(args.method, json.loads(args.method_kwargs))] if args.method else DEFAULT_METHODS
    out = args.out or ROOT / "benchmarks" / "results" / f"engine-{device.type}.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
                    "python": platform.python_version(), "threads": torch.get_num_threads()})
    entries = results.setdefault("results", {})
    for name, kw in methods:
        for size in args.size:
            r = bench_one(name, kw, size, device, args)
            key = f"{name}|{json.dumps(kw, sort_keys=True)}|{size}|b{args.batch_size}|bf16={args.bf16}"
            entries[key] = r
            print(f"{key}: train {r['train_steps_per_s']:.3f} steps/s ({r['train_windows_per_s']:.2f} win/s), "
                  f"synthesis {r['synth_windows_per_s']:.3f} win/s at {args.sample_steps} sampler steps",
                  flush=True)
    write_json(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
