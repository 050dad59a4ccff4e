"""RDDM's slice banding against its start noise, on the validation split: diagnosis and one candidate fix.

RDDM's sampler is deterministic (eta = 0): its only randomness is the start ``I_T = I_in + betabar_T eps``.
In the 2.5D synthesis every window draws its own ``eps``, so the windows that cover one slice start from
different noise, and neighbouring slices from independent noise. This compares, on whole validation volumes
(windows every slice, the evaluation's sampler steps, the same seed), three starts::

    OMP_NUM_THREADS=1 python benchmarks/haze_noise.py runs/standard/rddm --subjects 4

``window``  each window its own noise (the study's synthesis, RDDM's original start);
``volume``  one noise volume per subject, every window cut from it (the same noise at a voxel for every window
            that covers it): the candidate, a change of the shared synthesis that would apply to every method;
``none``    no start noise (``I_T = I_in``): a diagnosis only, it is not RDDM's sampler.

The rule, written before the measurement: ``volume`` is adopted for every method if RDDM's mean slice banding
(:func:`mmdm.regions.slice_banding`) is at most :data:`mmdm.regions.MAX_SLICE_BANDING` with it and its mean
whole-volume PSNR at most 0.3 dB below ``window``'s (the haze sweeps' fidelity margin).

It also measures how much of the start noise the network passes into its first prediction: on windows around
each subject's centre, at the first sampler timestep, the rms change of ``res_hat`` and of ``I0_hat`` between
``I_T`` with the noise and without it (an exact model changes neither: at ``t = T`` the noise is
``(I_T - I_in) / betabar_T``, read off its two inputs). Writes ``benchmarks/results/haze/noise-<run>.json``.
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

OUT = ROOT / "benchmarks" / "results" / "haze"
STARTS = ("window", "volume", "none")
PSNR_MARGIN = 0.3


class StartNoise:
    """Replaces ``process.start`` of an RDDM model for one subject: the start noise of each chunk of windows.

    ``synthesize_volume`` samples its windows (first slices ``starts``) in chunks of ``batch_size``, in order;
    ``volume`` cuts each window's noise from one ``(H, W, Z)`` noise volume, ``none`` adds no noise, ``window``
    keeps the noise the sampler drew.
    """

    def __init__(self, process, kind: str, starts: list[int], window: int, batch_size: int, noise_volume):
        self.process, self.kind, self.window = process, kind, window
        self.chunks = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
        self.noise_volume, self.calls = noise_volume, 0
        self.original = process.start

    def __call__(self, x_in, noise):
        import torch

        chunk = self.chunks[self.calls]
        self.calls += 1
        if x_in.shape[0] != len(chunk):
            raise RuntimeError(f"chunk {self.calls}: {x_in.shape[0]} windows sampled, {len(chunk)} expected")
        if self.kind == "none":
            noise = torch.zeros_like(noise)
        elif self.kind == "volume":
            h, w = x_in.shape[-2:]
            noise = torch.stack([self.noise_volume[:h, :w, s:s + self.window].permute(2, 0, 1) for s in chunk])
        return self.original(x_in, noise.to(x_in))


def first_step_leak(method, wins, x0) -> dict[str, float]:
    """rms change of ``res_hat`` and ``I0_hat`` at the first timestep caused by the start noise (over the head)."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x_in = method.condition(wins)
        t = torch.full((x0.shape[0],), method.process.cfg.num_timesteps - 1)
        eps = torch.randn(x0.shape, generator=g)
        head = x0 > -0.9  # the target's head, in [-1, 1] units
        out = {}
        preds = []
        for noise in (eps, torch.zeros_like(eps)):
            x_t = method.process.q_sample(x0, x_in - x0, t, noise)
            res_hat, eps_hat = method.predict_res_noise(x_t, x_in, t)
            preds.append((res_hat, method.process.predict_x0(x_t, t, res_hat, eps_hat)))
        noise_rms = float(method.process.beta_bar(t, like=x0)[0])
        out["noise_rms"] = noise_rms
        out["res_hat_change_rms"] = float((preds[0][0] - preds[1][0])[head].pow(2).mean().sqrt())
        out["x0_hat_change_rms"] = float((preds[0][1] - preds[1][1])[head].pow(2).mean().sqrt())
        out["x0_hat_share_of_noise"] = out["x0_hat_change_rms"] / noise_rms
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a trained RDDM run directory")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps (the standard evaluation's: 10)")
    ap.add_argument("--subjects", type=int, default=None, help="only the first N validation subjects")
    args = ap.parse_args(argv)
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mmdm.data.dataset import window_starts
    from mmdm.data.layout import Layout
    from mmdm.data.volumes import normalise
    from mmdm.engine.infer import load_run_method, subject_sources, synthesize_volume
    from mmdm.engine.rundir import git_info
    from mmdm.metrics import psnr
    from mmdm.regions import MAX_SLICE_BANDING, region_errors

    torch.set_num_threads(1)
    run = project_path(args.run)
    method, cfg, info = load_run_method(run, device="cpu")
    if not hasattr(method, "predict_res_noise") or float(method.process.cfg.eta) != 0.0:
        raise SystemExit(f"{run}: not an RDDM model with a deterministic sampler (eta 0); this measures RDDM only")
    subjects = Layout(cfg.data.root).split("val")[: args.subjects]
    K, batch = cfg.data.window, 8
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
              "run": args.run, "checkpoint": str(info.get("file")), "split": "val", "subjects": subjects,
              "sample_steps": args.steps, "stride": 1, "window": K, "commit": git_info(ROOT).get("commit"),
              "machine": machine(),
              "rule": (f"'volume' adopted for every method if RDDM's mean slice banding <= {MAX_SLICE_BANDING:g} "
                       f"with it and its mean PSNR at most {PSNR_MARGIN} dB below 'window''s"),
              "starts": {}, "first_step": []}
    rows: dict[str, list[dict]] = {k: [] for k in STARTS}
    walls = {k: 0.0 for k in STARTS}
    f = int(method.spatial_multiple or 1)
    for subject in subjects:
        item = next(subject_sources(cfg.data, [subject], root=cfg.data.root, with_target=True))
        X, Y, Z = np.asarray(next(iter(item.sources.values()))).shape
        noise_volume = torch.randn(X + (-X) % f, Y + (-Y) % f, Z, generator=torch.Generator().manual_seed(0))
        for kind in STARTS:
            t0 = time.time()
            starter = StartNoise(method.process, kind, window_starts(Z, K, 1), K, batch, noise_volume)
            method.process.start = starter
            try:
                pred = synthesize_volume(method, item.sources, window=K, stride=1, batch_size=batch,
                                         steps=args.steps, norm=cfg.data.norm,
                                         generator=torch.Generator().manual_seed(0), progress=False)["mean"]
            finally:
                del method.process.start  # back to the class's method
            if starter.calls != len(starter.chunks):
                raise RuntimeError(f"{subject}: {starter.calls} chunks sampled, {len(starter.chunks)} expected")
            target = item.target.data / float(item.target.data.max())
            reg = region_errors(pred, target)
            rows[kind].append({"subject": subject, "psnr": psnr(pred, target), "slice_banding": reg["slice_banding"],
                               "background_bias": reg["background_bias"]})
            walls[kind] += time.time() - t0
            print(kind, rows[kind][-1], flush=True)
        # the first step's noise leak, on windows around the subject's centre
        vols = {m: torch.from_numpy(normalise(np.asarray(item.sources[m], dtype=np.float32), cfg.data.norm)[0])
                for m in method.sources}
        tgt = torch.from_numpy(normalise(np.asarray(item.target.data, dtype=np.float32), cfg.data.norm)[0])
        pad = (0, (-Y) % f, 0, (-X) % f)
        firsts = list(range(Z // 2 - 16, Z // 2 + 16, 8))
        wins = {m: F.pad(torch.stack([v[:, :, s:s + K].permute(2, 0, 1) for s in firsts]), pad, value=-1.0)
                for m, v in vols.items()}
        x0 = F.pad(torch.stack([tgt[:, :, s:s + K].permute(2, 0, 1) for s in firsts]), pad, value=-1.0)
        result["first_step"].append({"subject": subject, **first_step_leak(method, wins, x0)})
        print("first step", result["first_step"][-1], flush=True)
    for kind in STARTS:
        means = {k: float(np.mean([r[k] for r in rows[kind]])) for k in ("psnr", "slice_banding", "background_bias")}
        result["starts"][kind] = {"means": means, "rows": rows[kind], "wall_s": round(walls[kind], 1)}
    win, vol = result["starts"]["window"]["means"], result["starts"]["volume"]["means"]
    adopted = vol["slice_banding"] <= MAX_SLICE_BANDING and vol["psnr"] >= win["psnr"] - PSNR_MARGIN
    result["verdict"] = {"volume_noise": "adopted" if adopted else "rejected",
                         "banding": {k: result["starts"][k]["means"]["slice_banding"] for k in STARTS},
                         "psnr": {k: result["starts"][k]["means"]["psnr"] for k in STARTS}}
    print(result["verdict"], flush=True)
    result["machine"]["load_average_end"] = load_average()
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"noise-{run.name}.json"
    write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
