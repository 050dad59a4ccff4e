"""Where in the pipeline the haze of the bridge models appears: measurements on a trained run.

For one trained run (MMDM or BBDM; e.g. a reference point of the sweeps
``haze-fusion`` / ``haze-crops``) and one VALIDATION subject of its cohort:

1. **training crops** (no model): share of air voxels (target below 0.05 of its
   maximum) in the run's crops and in whole volumes, and how often a crop
   reaches the first or last 5 slices, with the run's crop setting and with
   30 % air-centred crops;
2. **x0 prediction per timestep**, teacher-forced (``x_t`` drawn from eq. (1)
   around the true target): background bias of every stage (MMDM: each branch,
   their mean, the fusion; BBDM: its network) on the first, central and last
   window of the subject (whole slices);
3. **the sampler**, step by step on the same windows, with the run's sampling
   settings (and, for a bridge that clamps or not, the other clamp setting);
4. **window aggregation**: every window of the subject (stride 1) sampled once;
   the per-position-in-window background bias, the volume assembled from those
   windows with stride 1 and with stride 2 (the standard profile's; ``--window-steps`` sampling
   steps, default 5 to fit a shared machine), its region
   measures (:func:`mmdm.study.haze.haze_summary`) and banding, against the
   banding that the per-position bias alone predicts
   (:func:`mmdm.study.haze.aggregated_slice_bias`).

Usage (one thread; a few minutes per run on a shared 2-core machine)::

    OMP_NUM_THREADS=1 python benchmarks/haze_diagnose.py runs/sweeps/haze-fusion/base
    OMP_NUM_THREADS=1 python benchmarks/haze_diagnose.py runs/sweeps/haze-crops/bbdm --clip-both

Writes ``benchmarks/results/haze/diagnose-<sweep>-<point>.json`` (with the command, machine and load).
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

from benchmarks.cpu_env import load_average, machine  # noqa: E402
from mmdm.data.crops import CropConfig, CropSampler  # noqa: E402
from mmdm.data.dataset import WindowDataset, window_starts  # noqa: E402
from mmdm.data.layout import Layout  # noqa: E402
from mmdm.engine.infer import load_run_method  # noqa: E402
from mmdm.io import write_text  # noqa: E402
from mmdm.paths import project_path  # noqa: E402
from mmdm.study.haze import (BACKGROUND_LEVEL, aggregated_slice_bias, background_stats, banding,  # noqa: E402
                             channel_bias, haze_summary, sampler_trace, slice_profile, x0_bias_by_timestep)

OUT = ROOT / "benchmarks" / "results" / "haze"
TIMESTEPS = (0, 50, 200, 500, 800, 999)


def crop_composition(data, crops: CropConfig | None, seed: int, n_subjects: int = 6, n_steps: int = 150,
                     batch: int = 4) -> dict[str, Any]:
    """Air share of crop voxels and whole volumes, and the share of crops that reach the end slices."""
    subjects = Layout(project_path(data.root)).split("train")[:n_subjects]
    ds = WindowDataset(data, "train", subjects=subjects)
    vol_air = float(np.mean([((v[data.target] + 1) / 2 < BACKGROUND_LEVEL).float().mean().item()
                             for v in ds.volumes.values()]))
    out: dict[str, Any] = {"subjects": len(subjects), "crops_drawn": n_steps * batch, "volume_air_share": vol_air}
    settings = {"run": crops} if crops is not None else {}
    if crops is not None:
        settings["air30"] = CropConfig(size=crops.size, multiple=crops.multiple, vessel_share=crops.vessel_share,
                                       quantile=crops.quantile, power=crops.power,
                                       background_share=min(0.3, 1 - crops.vessel_share))
    for name, cfg in settings.items():
        s = CropSampler.from_dataset(ds, cfg, seed=seed)
        air, ends = [], []
        for step in range(n_steps):
            for it in s.batch(step, batch):
                air.append(float(((it["target"] + 1) / 2 < BACKGROUND_LEVEL).float().mean()))
                depth = s.shapes[it["subject"]][2]
                ends.append(it["z0"] < 5 or it["z0"] + data.window > depth - 5)
        out[name] = {"background_share": cfg.background_share, "vessel_share": cfg.vessel_share,
                     "crop_air_share": float(np.mean(air)), "crops_reaching_end_5_slices": float(np.mean(ends))}
    return out


def subject_windows(data, subject: str) -> tuple[dict[str, torch.Tensor], int]:
    """The subject's normalised volumes (X, Y, Z) per modality, and its depth."""
    ds = WindowDataset(data, "val", subjects=[subject])
    vols = ds.volumes[subject]
    return vols, int(vols[data.target].shape[2])


def batch_at(vols: dict[str, torch.Tensor], data, starts: list[int]) -> dict[str, Any]:
    k = data.window
    win = lambda m: torch.stack([vols[m][:, :, s:s + k].permute(2, 0, 1) for s in starts])  # noqa: E731
    return {"sources": {m: win(m) for m in data.sources}, "target": win(data.target)}


def sample_windows(method, vols, data, starts: list[int], steps: int, seed: int, batch: int = 8) -> torch.Tensor:
    """Every window at ``starts`` sampled once (N, K, X, Y) in [-1, 1], final output clamped as the records."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(starts), batch):
        b = batch_at(vols, data, starts[i:i + batch])
        out.append(method.sample(b["sources"], steps=steps, generator=gen).clamp(-1, 1))
    return torch.cat(out)


def assemble(preds: torch.Tensor, starts_all: list[int], use: list[int], depth: int) -> np.ndarray:
    """The sliding-window mean over the windows starting at ``use`` (a subset of ``starts_all``), in [0, 1]."""
    k = preds.shape[1]
    acc = np.zeros(preds.shape[2:] + (depth,))
    cnt = np.zeros(depth)
    where = {s: i for i, s in enumerate(starts_all)}
    for s in use:
        acc[:, :, s:s + k] += np.moveaxis(preds[where[s]].double().numpy(), 0, -1)
        cnt[s:s + k] += 1
    return (acc / cnt + 1) / 2


def trace_summary(trace) -> dict[str, Any]:
    """Per stage: bias at the first step, at each of the last three steps and of the output."""
    out = {}
    last_i = int(trace["i"].max())
    for stage, g in trace.groupby("stage"):
        g = g.sort_values("i")
        out[stage] = {"first": float(g["bias"].iloc[0]),
                      "by_step": [round(float(v), 4) for v in g["bias"]],
                      "t": [int(v) for v in g["t"]], "final_step": int(last_i)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a trained run directory")
    ap.add_argument("--subject", default=None, help="validation subject (default: the first)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps (the standard profile's: 10)")
    ap.add_argument("--window-steps", type=int, default=5,
                    help="sampling steps of the every-window analysis (4.; default 5, the sweeps' validation)")
    ap.add_argument("--raw-weights", action="store_true", help="the raw weights instead of the run's EMA")
    ap.add_argument("--no-windows", action="store_true", help="skip the every-window analysis (4.)")
    ap.add_argument("--clip-both", action="store_true", help="also sample with the other x0 clamp setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="output name (default: <sweep>-<point> from the run path)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    info = machine()
    run = project_path(args.run)
    method, cfg, ck = load_run_method(run, use_ema=not args.raw_weights)
    data = cfg.data
    subject = args.subject or Layout(project_path(data.root)).split("val")[0]
    k = data.window
    vols, depth = subject_windows(data, subject)
    first, central, last = 0, depth // 2 - k // 2, depth - k
    regions = {"first": first, "central": central, "last": last}
    result: dict[str, Any] = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "run": str(args.run), "method": cfg.method, "checkpoint_step": ck["step"], "ema_used": ck["ema_used"],
        "subject": subject, "split": "val", "depth": depth, "sample_steps": args.steps,
        "window_sample_steps": args.window_steps, "machine": info,
        "clip_x0": bool(method.bridge.cfg.clip_x0)}
    print(f"[haze] {run.name}: crops", flush=True)
    result["crops"] = crop_composition(data, cfg.crops, cfg.seed)
    print("[haze] x0 per timestep", flush=True)
    result["x0_by_timestep"] = {}
    for name, z0 in regions.items():
        b = batch_at(vols, data, [z0])
        df = x0_bias_by_timestep(method, b, TIMESTEPS, generator=torch.Generator().manual_seed(args.seed))
        result["x0_by_timestep"][name] = {st: {int(r.t): round(float(r.bias), 4) for r in g.itertuples()}
                                          for st, g in df.groupby("stage")}
    print("[haze] sampler traces", flush=True)
    clips = [None] + ([not method.bridge.cfg.clip_x0] if args.clip_both else [])
    result["sampler"] = {}
    for clip in clips:
        key = f"clip_x0={method.bridge.cfg.clip_x0 if clip is None else clip}"
        result["sampler"][key] = {}
        for name, z0 in regions.items():
            trace, _ = sampler_trace(method, batch_at(vols, data, [z0]), args.steps,
                                     generator=torch.Generator().manual_seed(args.seed), clip_x0=clip)
            result["sampler"][key][name] = trace_summary(trace)
    print("[haze] every window of the subject (stride 1)", flush=True)
    target = (vols[data.target].double().numpy() + 1) / 2
    starts1 = window_starts(depth, k, 1)
    starts2 = window_starts(depth, k, 2)
    result["windows"] = {}
    for clip in ([] if args.no_windows else clips):
        key = f"clip_x0={method.bridge.cfg.clip_x0 if clip is None else clip}"
        if clip is not None:
            method.bridge.cfg.clip_x0 = clip
        t1 = time.time()
        preds = sample_windows(method, vols, data, starts1, args.window_steps, args.seed)
        if clip is not None:
            method.bridge.cfg.clip_x0 = not clip
        tw = batch_at(vols, data, starts1)["target"]
        cb = channel_bias((preds.double().numpy() + 1) / 2, (tw.double().numpy() + 1) / 2)
        entry: dict[str, Any] = {"channel_bias": [round(float(v), 4) for v in cb], "wall_s": round(time.time() - t1, 1)}
        for stride, use in ((1, starts1), (2, starts2)):
            vol = assemble(preds, starts1, use, depth)
            prof = slice_profile(vol, target)
            predicted = aggregated_slice_bias(cb, depth, stride)
            bias = prof["background_bias"].to_numpy()
            entry[f"stride{stride}"] = {
                **{kk: round(float(v), 4) for kk, v in haze_summary(vol, target).items()},
                "banding_predicted_from_channel_bias": round(banding(predicted[k:depth - k]), 4),
                "banding_interior": round(banding(bias[k:depth - k]), 4),
                "background": {kk: round(float(v), 4) for kk, v in background_stats(vol, target).items()},
                "slice_background_bias": [round(float(v), 4) for v in bias],
                "slice_psnr": [round(float(v), 2) for v in prof["psnr"]]}
        result["windows"][key] = entry
    result["wall_s"] = round(time.time() - t0, 1)
    result["machine"]["load_average_end"] = load_average()
    name = args.name or f"{run.parent.name}-{run.name}" + ("-raw" if args.raw_weights else "")
    OUT.mkdir(parents=True, exist_ok=True)
    write_text(OUT / f"diagnose-{name}.json", json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("crops", "x0_by_timestep")}, indent=1))
    for key, e in result["windows"].items():
        print(key, {s: {m: e[s][m] for m in ("psnr", "psnr_central", "psnr_outer", "background_bias",
                                             "background_hazy", "banding_interior",
                                             "banding_predicted_from_channel_bias")}
                    for s in ("stride1", "stride2")}, "channel bias", e["channel_bias"])
    print(f"[haze] wrote {OUT / f'diagnose-{name}.json'} in {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
