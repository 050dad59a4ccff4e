"""Whole-volume synthesis on the CPU in fp32 and with bf16 autocast, and what bf16 changes in the images.

A trained checkpoint is needed for the image metrics to mean anything, so the
script makes one if it is missing (both steps are skipped when their output exists):

1. the quick phantom cohort (``mmdm data phantom --profile quick --out data/phantom-quick``, ~2-3 min);
2. a short run of MMDM full, ``small`` configuration (about 3 min on an idle core)::

       mmdm train --method mmdm --variant full --method-config small --data data/phantom-quick \\
           --steps 150 --run-dir runs/bench/mmdm-small-150 --set image_every=0 --set checkpoint_every=150

Then one test subject is synthesised at the frontier's recommended sampling
setting (``mmdm.study.frontier.recommend`` on the committed standard frontier;
5 steps, stride 2, independent branches) with ``synthesize_volume(amp="none")``
and ``amp="bf16"``, alternating (fp32, bf16, fp32, bf16, ...) in one process,
per thread count (``torch.set_num_threads``), with the same sampling seed, so
both draw the same noise. Reported: median seconds per volume and windows/s of
each, the speed-up, and PSNR/SSIM/RMSE (``mmdm.metrics.evaluate_volumes``,
volume and axial MIP) of bf16 against fp32 (fp32 as the reference) and of both
against the target (``target / target.max()``, as run evaluation scores).

Usage::

    python benchmarks/bench_sampling.py                    # threads 2 and 1, 4 repeats
    python benchmarks/bench_sampling.py --threads 2 --repeats 6

Writes ``benchmarks/results/cpu/sampling.json`` and ``sampling.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cpu_env import RESULTS, interleaved, load_average, machine, md_header  # noqa: E402

from mmdm.data.dataset import DataConfig  # noqa: E402
from mmdm.data.layout import Layout  # noqa: E402
from mmdm.data.phantom.cohort import ensure_cohort  # noqa: E402
from mmdm.engine.infer import load_run_method, subject_sources, synthesize_volume  # noqa: E402
from mmdm.engine.spec import TrainConfig  # noqa: E402
from mmdm.engine.train import train  # noqa: E402
from mmdm.io import write_json, write_text  # noqa: E402
from mmdm.metrics import evaluate_volumes  # noqa: E402

#: used when the committed frontier record cannot be read
DEFAULT_SETTING = {"steps": 5, "stride": 2, "mode": "independent"}


def frontier_setting() -> dict[str, Any]:
    """The committed standard frontier's recommended (cheapest within 0.2 dB PSNR) setting."""
    try:
        import pandas as pd

        from mmdm.study.frontier import recommend

        rec = recommend(pd.read_csv(ROOT / "results" / "standard" / "analysis" / "frontier" / "frontier.csv"))
        c = rec["choice"]
        return {"steps": int(c["steps"]), "stride": int(c["stride"]), "mode": str(c["mode"]),
                "source": "results/standard/analysis/frontier: recommend()['choice']"}
    except Exception as e:  # noqa: BLE001 - documented fallback
        return {**DEFAULT_SETTING, "source": f"default ({type(e).__name__}: {e})"}


def ensure_run(data: Path, run: Path, steps: int, threads: int) -> dict[str, Any]:
    """The phantom cohort and the short training run (made when missing); their wall times."""
    out: dict[str, Any] = {"data": str(data.relative_to(ROOT) if data.is_relative_to(ROOT) else data),
                           "run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run)}
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ensure_cohort(data, "quick", progress=True)
    out["cohort_s"] = round(time.perf_counter() - t0, 1)
    if not (run / "train_complete.json").is_file():
        cfg = TrainConfig(method="mmdm", method_kwargs={"variant": "full", "config": "small"},
                          data=DataConfig(root=str(data)), steps=steps, epochs=None, device="cpu",
                          checkpoint_every=steps, image_every=0)
        t0 = time.perf_counter()
        train(cfg, run, resume=(run / "config.yaml").is_file(), progress=True)
        out["train_s"] = round(time.perf_counter() - t0, 1)
    return out


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 5) for k, v in d.items()}


def markdown(r: dict[str, Any]) -> str:
    """The markdown of a result (``sampling.json``)."""

    def over(n: str, t: dict[str, Any]) -> str:
        load = t["fp32"]["load_1min_median"]
        return " \\*" if int(n) > 1 and load is not None and load > r["cpu_count"] else ""

    md = md_header("Whole-volume synthesis on the CPU: fp32 against bf16 autocast", r)
    md += [f"MMDM full, `small` configuration, trained {r['model']['checkpoint_step']} steps on the quick phantom "
           f"(`{r['model']['run']}`); test subject {r['subject']}, volume {'x'.join(map(str, r['volume_shape']))}, "
           f"{r['setting']['steps']} sampler steps, stride {r['setting']['stride']}, {r['setting']['mode']} branches "
           f"({r['windows']} windows, batch {r['batch_size']}; setting from {r['setting']['source']}). "
           f"fp32 and bf16 alternated {r['repeats']} times in one process; medians.", "",
           "| threads | fp32 s/volume | bf16 s/volume | fp32 windows/s | bf16 windows/s | bf16 speed-up | load (1 min) |",
           "|---|---|---|---|---|---|---|"]
    for n, t in r['timing'].items():
        md.append(f"| {n} | {t['fp32']['median_s']:.2f} | {t['bf16']['median_s']:.2f} | "
                  f"{t['fp32']['windows_per_s']:.2f} | {t['bf16']['windows_per_s']:.2f} | {t['speedup_bf16']:.2f}x | "
                  f"{t['fp32']['load_1min_median']}{over(n, t)} |")
    if any(over(n, t) for n, t in r["timing"].items()):
        md += ["", "\\* oversubscribed: the load exceeded the cores, and with more than one thread OpenMP's barriers "
               "wait for descheduled threads, so these times and their ratio say more about the other jobs than "
               "about fp32 or bf16 (the single times are in the JSON)."]
    md += ["", "| comparison | PSNR (dB) | SSIM | RMSE (%) | MIP PSNR (dB) | MIP SSIM |", "|---|---|---|---|---|---|"]
    for k, label in (("bf16_vs_fp32", "bf16 against fp32 (reference)"), ("fp32_vs_target", "fp32 against target"),
                     ("bf16_vs_target", "bf16 against target")):
        m = r['images'][k]
        md.append(f"| {label} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['rmse']:.3f} | {m['mip_psnr']:.2f} | "
                  f"{m['mip_ssim']:.4f} |")
    d = r["images"]["abs_diff"]
    md += ["", f"Absolute difference bf16 - fp32 on the [0, 1] scale: mean {d['mean']:.2e}, 99th percentile {d['p99']:.2e}, "
           f"max {d['max']:.2e}; without the {d['edge_slices']} slices at either end of the volume (the edge of the "
           f"head, nearly constant windows): 99th percentile {d['p99_inner']:.2e}, max {d['max_inner']:.2e}.", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "phantom-quick")
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "bench" / "mmdm-small-150")
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--train-threads", type=int, default=1,
                   help="threads of the training run (1: two-thread jobs oversubscribe a shared 2-core machine)")
    p.add_argument("--subject", default=None, help="default: the first test subject")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--out", type=Path, default=RESULTS / "sampling.json")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown from --out's JSON")
    args = p.parse_args(argv)
    if args.render:
        write_text(args.out.with_suffix(".md"), markdown(json.loads(args.out.read_text())))
        return 0

    info = machine()
    made = ensure_run(args.data, args.run, args.train_steps, args.train_threads)
    setting = frontier_setting()
    method, cfg, ckpt = load_run_method(args.run, device="cpu")
    method.sampling_mode = setting["mode"]
    subject = args.subject or Layout(cfg.data.root).split("test")[0]
    item = next(subject_sources(cfg.data, [subject], with_target=True))
    target = item.target.data / float(item.target.data.max())
    preds: dict[str, np.ndarray] = {}
    windows = [0]

    def synth(amp: str) -> None:
        gen = torch.Generator().manual_seed(0)  # the same noise for both precisions
        res = synthesize_volume(method, item.sources, window=cfg.data.window, stride=setting["stride"],
                                batch_size=args.batch_size, steps=setting["steps"], norm=cfg.data.norm,
                                generator=gen, progress=False, amp=amp)
        preds[amp], windows[0] = res["mean"], res["windows"]

    timing: dict[str, Any] = {}
    for n in args.threads:
        torch.set_num_threads(n)
        for amp in ("none", "bf16"):  # warm-up (one-off allocations, oneDNN primitive caches)
            synthesize_volume(method, {m: v[..., :cfg.data.window] for m, v in item.sources.items()},
                              window=cfg.data.window, steps=2, progress=False, amp=amp)
        t = interleaved({"fp32": lambda: synth("none"), "bf16": lambda: synth("bf16")}, args.repeats)
        for v in t.values():
            v["windows_per_s"] = windows[0] / v["median_s"]
        t["speedup_bf16"] = t["fp32"]["median_s"] / t["bf16"]["median_s"]
        timing[str(n)] = t
        print(f"{n} thread(s): fp32 {t['fp32']['median_s']:.2f} s, bf16 {t['bf16']['median_s']:.2f} s per volume "
              f"({windows[0]} windows): {t['speedup_bf16']:.2f}x", flush=True)

    images = {"bf16_vs_fp32": _rounded(evaluate_volumes(preds["bf16"], preds["none"])),
              "fp32_vs_target": _rounded(evaluate_volumes(preds["none"], target)),
              "bf16_vs_target": _rounded(evaluate_volumes(preds["bf16"], target))}
    diff = np.abs(preds["bf16"] - preds["none"])
    edge = min(5, target.shape[2] // 4)  # the head's first/last slices: little anatomy, nearly constant windows
    images["abs_diff"] = {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99)), "max": float(diff.max()),
                          "edge_slices": edge, "max_inner": float(diff[:, :, edge:-edge].max()),
                          "p99_inner": float(np.percentile(diff[:, :, edge:-edge], 99)),
                          "per_slice_max": [round(float(v), 4) for v in diff.max(axis=(0, 1))]}
    info["load_average_end"] = load_average()
    result = {"benchmark": "whole-volume synthesis, fp32 vs bf16 autocast (interleaved, medians)", **info,
              "model": {"method": "mmdm", "variant": "full", "config": "small", "checkpoint_step": ckpt["step"],
                        "ema": ckpt["ema_used"], **made},
              "setting": setting, "subject": subject, "volume_shape": list(target.shape), "windows": windows[0],
              "batch_size": args.batch_size, "repeats": args.repeats, "timing": timing, "images": images}
    write_json(args.out, result)

    write_text(args.out.with_suffix(".md"), markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
