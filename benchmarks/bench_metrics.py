"""Time mmdm.metrics.evaluate_volumes against the scikit-image way of computing the same six numbers.

A script, not a test::

    .venv/bin/python benchmarks/bench_metrics.py [--shape 288 320 214] [--repeats 3] [--device all]

The volume is phantom-like (smooth tissue + bright winding tubes + noise) of the
paper's size: 288 x 320 in-plane, 214 axial slices (the last axis). The
reference path is scikit-image (float64 numpy, single-threaded scipy filters):
``peak_signal_noise_ratio`` and ``structural_similarity`` on the gt-max-scaled
volume and on the axial MIP, numpy for RMSE(%). Ours runs on the CPU (torch's
thread count is recorded) and, when present, on CUDA with the data already on
the device. For every device one JSON file is written:
``benchmarks/results/metrics-<device name>.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mmdm import metrics as M
from mmdm.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def phantom_pair(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, ground truth) float64 volumes in scanner-like units."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 1, *[max(2, n // 8) for n in shape], generator=g, dtype=torch.float64)
    tissue = torch.nn.functional.interpolate(low, size=shape, mode="trilinear", align_corners=False)[0, 0]
    gt = 0.3 * tissue
    x = torch.arange(shape[0], dtype=torch.float64).view(-1, 1, 1)
    y = torch.arange(shape[1], dtype=torch.float64).view(1, -1, 1)
    z = torch.arange(shape[2], dtype=torch.float64).view(1, 1, -1)
    for _ in range(6):  # winding vessels along the axial axis
        u = torch.rand(5, generator=g, dtype=torch.float64)
        cx = shape[0] * (0.2 + 0.6 * u[0]) + 8 * torch.sin(z / (10 + 20 * u[1]))
        cy = shape[1] * (0.2 + 0.6 * u[2]) + 8 * torch.cos(z / (10 + 20 * u[3]))
        gt = gt + (1.0 + u[4]) * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 1.2 ** 2))
    gt = (gt + 0.02 * torch.randn(shape, generator=g, dtype=torch.float64)).abs() * 500.0
    pred = 0.85 * torch.roll(gt, 1, dims=0) + 0.15 * gt
    pred = pred + 0.03 * float(gt.max()) * torch.randn(shape, generator=g, dtype=torch.float64)
    return pred.numpy(), gt.numpy()


def skimage_reference(pred: np.ndarray, gt: np.ndarray, gaussian: bool) -> dict[str, float]:
    """The six numbers the scikit-image / numpy way (independent of mmdm.metrics)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    extra = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False) if gaussian else {}
    p, t = pred / gt.max(), gt / gt.max()
    mt_raw = gt.max(axis=-1)
    mp, mt = pred.max(axis=-1) / mt_raw.max(), mt_raw / mt_raw.max()
    return {
        "psnr": float(peak_signal_noise_ratio(t, p, data_range=1.0)),
        "ssim": float(structural_similarity(p, t, data_range=1.0, **extra)),
        "rmse": float(100 * np.sqrt(np.mean((p - t) ** 2))),
        "mip_psnr": float(peak_signal_noise_ratio(mt, mp, data_range=1.0)),
        "mip_ssim": float(structural_similarity(mp, mt, data_range=1.0, **extra)),
        "mip_rmse": float(100 * np.sqrt(np.mean((mp - mt) ** 2))),
    }


def timed(fn: Callable[[], dict], repeats: int, sync: Callable[[], None] = lambda: None
          ) -> tuple[dict, dict[str, list[float]]]:
    """Run ``fn`` ``repeats`` times; wall-clock and process CPU seconds of each run."""
    wall, cpu, out = [], [], {}
    for _ in range(repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return out, {"wall": wall, "cpu": cpu}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def summary(times: dict[str, list[float]]) -> dict[str, float | list[float]]:
    return {"wall_min_s": min(times["wall"]), "wall_median_s": statistics.median(times["wall"]),
            "cpu_min_s": min(times["cpu"]), "wall_all_s": times["wall"], "cpu_all_s": times["cpu"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[288, 320, 214], metavar=("X", "Y", "Z"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads while the metrics run (mmdm.metrics.CPU_THREADS; 0 = torch's "
                         "setting); default: the module's (1). scikit-image's filters are single-threaded.")
    args = ap.parse_args(argv)
    if args.threads is not None:
        M.CPU_THREADS = args.threads or None

    shape = tuple(args.shape)
    pred, gt = phantom_pair(shape)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append("cpu")
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available():
            devices.append("cuda")
        elif args.device == "cuda":
            print("no CUDA device available; run with --device cpu", file=sys.stderr)
            return 2

    # warm-up (imports, first-call overheads) on a small crop, then time
    crop = (slice(0, 16),) * 3
    skimage_reference(pred[crop], gt[crop], False)
    M.evaluate_volumes(pred[crop], gt[crop])
    # the scikit-image baseline always runs on this machine's CPU, in the same call
    reference = {}
    for variant, gaussian in (("uniform7", False), ("gaussian", True)):
        ref, ref_t = timed(lambda: skimage_reference(pred, gt, gaussian), args.repeats)
        reference[variant] = (ref, ref_t)
        print(f"scikit-image {variant}: {min(ref_t['wall']):.2f} s wall, {min(ref_t['cpu']):.2f} s CPU "
              f"(min of {args.repeats})")

    for dev in devices:
        if dev == "cuda":
            name = torch.cuda.get_device_name(0)
            sync = torch.cuda.synchronize
            p_in, t_in = torch.from_numpy(pred).cuda(), torch.from_numpy(gt).cuda()
        else:
            name = cpu_name()
            sync = lambda: None  # noqa: E731
            p_in, t_in = pred, gt
        record = {
            "device": dev,
            "device_name": name,
            "baseline_cpu": cpu_name(),
            "shape": list(shape),
            "n_voxels": int(np.prod(shape)),
            "repeats": args.repeats,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "metrics_cpu_threads": M.CPU_THREADS or torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(),
            "variants": {},
        }
        try:
            import skimage
            record["skimage"] = skimage.__version__
        except ImportError:  # pragma: no cover
            pass
        for variant, gaussian in (("uniform7", False), ("gaussian", True)):
            if dev == "cuda":  # warm-up (kernel launch / allocator)
                M.evaluate_volumes(p_in, t_in, gaussian=gaussian)
            ours, ours_t = timed(lambda: M.evaluate_volumes(p_in, t_in, gaussian=gaussian), args.repeats, sync)
            ref, ref_t = reference[variant]
            diff = {k: abs(ours[k] - ref[k]) for k in M.METRIC_KEYS}
            record["variants"][variant] = {
                "mmdm": summary(ours_t),
                "skimage_cpu": summary(ref_t),
                "speedup_wall": min(ref_t["wall"]) / min(ours_t["wall"]),
                "metrics": ours,
                "max_abs_diff_vs_skimage": max(diff.values()),
            }
            print(f"{dev} ({name}) {variant}: mmdm {min(ours_t['wall']):.2f} s wall / {min(ours_t['cpu']):.2f} s "
                  f"CPU vs scikit-image {min(ref_t['wall']):.2f} s wall / {min(ref_t['cpu']):.2f} s CPU "
                  f"(x{min(ref_t['wall']) / min(ours_t['wall']):.1f} wall); max |diff| {max(diff.values()):.2e}")
        path = write_json(args.out_dir / f"metrics-{slug(dev + '-' + name)}.json", record)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
