"""One-shot GPU check: everything the study can only learn on a GPU, in one command.

Run on a machine with a CUDA GPU (about 10 minutes on one H200-class GPU)::

    make gpu-check                      # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out benchmarks/results/gpu-check/my-gpu

and on any CPU, with every size shrunk, to check that the script itself works::

    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check

It measures, writing everything under one folder (``gpu_check.json``, a
``summary.md`` table and the log ``log.txt``):

``env``
    device, driver, CUDA / cuDNN / torch versions, bf16 support, GPU count.
``train``
    one real engine training step (:class:`mmdm.engine.train.Trainer`: data
    loading, the method's ``train_step``: losses, backward, Adam; D then G for the GANs)
    of every method's ``paper`` configuration on 288x320 windows of 5 slices,
    batch 4 (the paper's), in fp32 and with bf16 autocast: median step time,
    peak memory, whether every loss stayed finite.
``nets``
    MMDM's networks alone (``benchmarks/bench_nets.py``: 3 branches + fusion, the
    authors' network) at 288x320: fp32 / bf16 x channels-last off / on, and
    ``torch.compile`` with bf16 (compile time reported apart from step time).
``synthesis``
    whole-volume synthesis of one paper-size subject (288 x 320 x 214 slices,
    random weights and data: timing only) at the frontier's recommended setting
    (read from the committed standard frontier; else 5 steps, stride 2,
    independent) and at the paper's 200 coupled steps with stride 1. The
    200-step synthesis is measured on a slab of slices and extrapolated to the
    whole volume by its window count when the slab would already take long;
    ``extrapolated`` says so.
``ddp``
    a 2-process ``torchrun`` training run (DDP) when more than one GPU is visible.
``run``
    a tiny paper-configuration run: a 6-subject phantom cohort, MMDM full
    (``paper`` network) trained for a few hundred steps with bf16 autocast
    through ``mmdm train``, then ``mmdm evaluate-run`` (whole-volume synthesis,
    metrics, the run record). The study's notebooks are not executed.

A part that fails is recorded with its error and the check goes on; the exit
status is 1 when any part failed. ``--dry-run`` uses the ``small``
configurations, 32x32 windows, batch 1, one timed step, 2 sampler steps and a
3-step run on the CPU (or the given ``--device``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_nets  # noqa: E402
from bench_engine import make_synthetic_dataset  # noqa: E402

from mmdm.data.dataset import DataConfig  # noqa: E402
from mmdm.engine.distributed import DistInfo, device_name, resolve_device  # noqa: E402
from mmdm.engine.infer import synthesize_volume  # noqa: E402
from mmdm.engine.train import TrainConfig, Trainer  # noqa: E402
from mmdm.io import write_json, write_text  # noqa: E402
from mmdm.methods import build_method  # noqa: E402
from mmdm.study.runs import REFERENCE_METHOD, REFERENCE_VARIANT, baselines  # noqa: E402

PARTS = ("env", "train", "synthesis", "run", "nets", "ddp")  # cheapest and most telling first
#: every method of Table 1 (the registry's declarations) with MMDM full first, as registry name and
#: factory kwargs (config added per size)
METHODS: list[tuple[str, dict[str, Any]]] = [(REFERENCE_METHOD, {"variant": REFERENCE_VARIANT}),
                                             *((m, {}) for m in baselines())]
SOURCES = ("T1w", "T2w", "FLAIR")
#: used when no committed frontier record can be read
DEFAULT_RECOMMENDATION = {"steps": 5, "stride": 2, "mode": "independent"}


@dataclass
class Sizes:
    """Everything the check sizes; :meth:`dry` shrinks it for a CPU."""

    config: str = "paper"
    hw: tuple[int, int] = (288, 320)
    batch: int = 4
    warmup: int = 2
    iters: int = 5
    train_depth: int = 12
    volume_depth: int = 214            # the paper's mean slice count (213.66)
    paper_steps: int = 200
    slab_depth: int = 24               # slices of the measured slab at 200 steps
    slab_budget_s: float = 60.0        # synthesise the whole volume at 200 steps only if the slab says it fits
    synth_batch: int = 16
    run_steps: int = 300
    run_cohort: str = "tiny"
    run_sample_steps: int = 5
    compile: bool = True
    nets_sizes: list[tuple[int, int]] = field(default_factory=lambda: [(288, 320)])

    @classmethod
    def dry(cls) -> "Sizes":
        return cls(config="small", hw=(32, 32), batch=1, warmup=1, iters=1, train_depth=7, volume_depth=9,
                   paper_steps=2, slab_depth=7, slab_budget_s=0.0, synth_batch=4, run_steps=3, run_sample_steps=2,
                   compile=False, nets_sizes=[(32, 32)])


class Check:
    """Runs the parts, logs, and rewrites ``gpu_check.json`` after each one (atomically)."""

    def __init__(self, out: Path, device: torch.device, sizes: Sizes, dry_run: bool):
        self.out, self.device, self.sizes, self.dry_run = out, device, sizes, dry_run
        self.results: dict[str, Any] = {"dry_run": dry_run, "device": str(device), "sizes": _plain(sizes.__dict__),
                                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": {}}
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self._log = open(out / "log.txt", "a")

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def run(self, name: str, fn: Callable[["Check"], dict[str, Any]]) -> bool:
        self.log(f"== {name}")
        t0 = time.perf_counter()
        try:
            res, ok = fn(self), True
        except Exception as e:  # noqa: BLE001 - a failed part is a result; the others still run
            res, ok = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, False
            self.log(f"   FAILED: {type(e).__name__}: {e}")
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        res["ok"] = ok and res.get("ok", True)
        self.results["parts"][name] = res
        self.save()
        return res["ok"]

    def progress(self, name: str, res: dict[str, Any]) -> None:
        """Save a part's results so far, so that a check stopped mid-part keeps what it measured."""
        self.results["parts"][name] = {**res, "ok": False, "unfinished": True}
        self.save()

    def save(self) -> None:
        self.results["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(self.out / "gpu_check.json", _plain(self.results))
        write_text(self.out / "summary.md", summary_markdown(self.results))

    def close(self) -> None:
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float):
        return round(v, 6)
    return v


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ parts
def part_env(c: Check) -> dict[str, Any]:
    d = c.device
    res: dict[str, Any] = {"device_name": device_name(d), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                           "python": platform.python_version(), "gpu_count": torch.cuda.device_count(),
                           "cpu_count": os.cpu_count(), "hostname": platform.node()}
    if d.type == "cuda":
        props = torch.cuda.get_device_properties(d)
        res.update(memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            res["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
    with contextlib.suppress(Exception):
        res["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    c.log(f"   {res['device_name']}, torch {res['torch']}, CUDA {res['cuda']}, {res['gpu_count']} GPU(s)")
    return res


def time_train_steps(c: Check, method: str, kwargs: dict[str, Any], bf16: bool, data: Path) -> dict[str, Any]:
    """Median time of real engine steps of one method; peak memory; every loss finite."""
    s, d = c.sizes, c.device
    cfg = TrainConfig(method=method, method_kwargs=dict(kwargs), data=DataConfig(root=str(data), sources=SOURCES),
                      steps=s.warmup + s.iters, epochs=None, batch_size=s.batch, device=str(d),
                      amp="bf16" if bf16 else "none", checkpoint_every=0, image_every=0, log_every=10**6)
    run_dir = Path(tempfile.mkdtemp(dir=c.tmp))
    reset_peak(d)
    tr = Trainer(cfg, run_dir, DistInfo(device=d), progress=False)
    params = sum(p.numel() for p in tr.method.parameters())
    it = tr.batches(0)
    finite = True
    for _ in range(s.warmup):
        logs = tr.train_step(next(it))
        finite &= all(bool(torch.isfinite(v).all()) for v in logs.values())
    sync(d)
    times = []
    for _ in range(s.iters):
        t0 = time.perf_counter()
        logs = tr.train_step(next(it))
        sync(d)
        times.append(time.perf_counter() - t0)
        finite &= all(bool(torch.isfinite(v).all()) for v in logs.values())
    mem = peak_mib(d)
    del tr
    if d.type == "cuda":
        torch.cuda.empty_cache()
    return {"method": method, "kwargs": kwargs, "bf16": bf16, "parameters": params, "batch": s.batch,
            "height_width": list(s.hw), "step_s_median": statistics.median(times), "step_s_min": min(times),
            "windows_per_s": s.batch / statistics.median(times), "peak_memory_mib": mem, "loss_finite": finite,
            "last_loss": {k: float(v) for k, v in logs.items()}}


def part_train(c: Check) -> dict[str, Any]:
    s = c.sizes
    data = make_synthetic_dataset(c.tmp / "train-data", s.hw, depth=s.train_depth)
    entries, ok = [], True
    precisions = (False, True) if c.device.type == "cuda" else (False,)  # a dry run checks the script, in fp32
    for method, kw in METHODS:
        for bf16 in precisions:
            label = f"{method} {s.config} {'bf16' if bf16 else 'fp32'}"
            try:
                r = time_train_steps(c, method, {**kw, "config": s.config}, bf16, data)
                ok &= r["loss_finite"]
                c.log(f"   {label}: {r['step_s_median'] * 1e3:.1f} ms/step, peak {_mib(r['peak_memory_mib'])} MiB, "
                      f"finite={r['loss_finite']}")
            except Exception as e:  # noqa: BLE001 - one method failing must not hide the others
                r = {"method": method, "kwargs": kw, "bf16": bf16, "error": f"{type(e).__name__}: {e}"}
                ok = False
                c.log(f"   {label}: FAILED {type(e).__name__}: {e}")
            entries.append(r)
            c.progress("train", {"entries": entries})
    return {"entries": entries, "ok": ok,
            "note": None if c.device.type == "cuda" else "bf16 skipped on the CPU (a dry run checks the script)"}


def part_nets(c: Check) -> dict[str, Any]:
    s = c.sizes
    combos = [(False, False, False), (True, False, False), (False, True, False), (True, True, False)]
    if s.compile:
        combos += [(True, False, True), (True, True, True)]
    entries = []
    for bf16, cl, comp in combos:
        for hw in s.nets_sizes:
            args = argparse.Namespace(modalities=3, batch=s.batch, window=5, bf16=bf16, channels_last=cl,
                                      compile=comp, iters=max(s.iters, 3) if not c.dry_run else 1,
                                      warmup=s.warmup + (2 if comp else 0), flops_only=False)
            t0 = time.perf_counter()
            try:
                r = bench_nets.bench_one(s.config, hw, args, c.device)
                r["wall_s_including_compile"] = time.perf_counter() - t0
                c.log(f"   {r['key']}: {r['step_ms']['median']:.1f} ms/step, {r['achieved_gflop_per_s']:.0f} "
                      f"GFLOP/s, {r['fwd_gflop_per_window']:.1f} GFLOP/window fwd")
            except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a compiler
                r = {"bf16": bf16, "channels_last": cl, "compile": comp, "error": f"{type(e).__name__}: {e}"}
                c.log(f"   bf16={bf16} channels_last={cl} compile={comp}: FAILED {type(e).__name__}: {e}")
            entries.append(r)
            c.progress("nets", {"entries": entries})
            if c.device.type == "cuda":
                torch.cuda.empty_cache()
    return {"entries": entries, "ok": all("error" not in e or e.get("compile") for e in entries)}


def frontier_recommendation() -> dict[str, Any]:
    """The committed standard frontier's recommended sampling setting (or the default)."""
    try:
        import pandas as pd

        from mmdm.study.frontier import recommend

        df = pd.read_csv(ROOT / "results" / "standard" / "analysis" / "frontier" / "frontier.csv")
        c = recommend(df)["choice"]  # recommend() returns the reference and the chosen setting
        return {"steps": int(c["steps"]), "stride": int(c["stride"]), "mode": str(c["mode"]),
                "source": "results/standard/analysis/frontier: recommend()['choice']"}
    except Exception as e:  # noqa: BLE001 - a missing or older record falls back to the documented default
        return {**DEFAULT_RECOMMENDATION, "source": f"default ({type(e).__name__}: {e})"}


def synth(c: Check, method, depth: int, steps: int, stride: int, mode: str, bf16: bool) -> dict[str, Any]:
    s, d = c.sizes, c.device
    rng = np.random.default_rng(0)
    vols = {m: rng.random((*s.hw, depth), dtype=np.float32) for m in method.sources}
    method.sampling_mode = mode
    reset_peak(d)
    with autocast(d, bf16):
        sync(d)
        t0 = time.perf_counter()
        res = synthesize_volume(method, vols, window=method.window, stride=stride, batch_size=s.synth_batch,
                                steps=steps, progress=False)
        sync(d)
    secs = time.perf_counter() - t0
    ok = bool(np.isfinite(res["mean"]).all()) and res["mean"].shape == vols[method.sources[0]].shape
    return {"depth": depth, "steps": steps, "stride": stride, "mode": mode, "bf16": bf16, "seconds": secs,
            "windows": res["windows"], "windows_per_s": res["windows"] / secs, "peak_memory_mib": peak_mib(d),
            "finite_and_shaped": ok}


def part_synthesis(c: Check) -> dict[str, Any]:
    s, d = c.sizes, c.device
    torch.manual_seed(0)
    method = build_method("mmdm", variant="full", config=s.config).to(d).eval()
    bf16 = d.type == "cuda"
    rec = frontier_recommendation()
    warm = synth(c, method, method.window, 2, 1, "coupled", bf16)  # untimed set-up (cuDNN autotuning etc.)
    recommended = synth(c, method, s.volume_depth, rec["steps"], rec["stride"], rec["mode"], bf16)
    c.log(f"   recommended {rec['steps']} steps stride {rec['stride']} {rec['mode']}: "
          f"{recommended['seconds']:.1f} s for {s.volume_depth} slices")
    slab = synth(c, method, s.slab_depth, s.paper_steps, 1, "coupled", bf16)
    windows_full = s.volume_depth - method.window + 1
    est = slab["seconds"] * windows_full / slab["windows"]
    c.log(f"   paper {s.paper_steps} coupled steps stride 1: slab of {s.slab_depth} slices {slab['seconds']:.1f} s "
          f"-> whole volume ~{est:.0f} s")
    paper = {**slab, "extrapolated": True, "volume_depth": s.volume_depth, "volume_seconds_estimate": est}
    if est <= s.slab_budget_s:
        paper = {**synth(c, method, s.volume_depth, s.paper_steps, 1, "coupled", bf16), "extrapolated": False}
        c.log(f"   paper setting, whole volume: {paper['seconds']:.1f} s")
    return {"recommendation": rec, "warmup_s": warm["seconds"], "recommended": recommended, "paper": paper,
            "config": s.config, "height_width": list(s.hw), "weights": "random (timing only)",
            "ok": recommended["finite_and_shaped"] and paper["finite_and_shaped"]}


def mmdm_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmdm.cli", *args]


def run_logged(c: Check, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    c.log("   $ " + " ".join(cmd))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    with open(c.out / "log.txt", "a") as f:
        f.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    if proc.returncode:
        raise RuntimeError(f"{cmd[3] if len(cmd) > 3 else cmd[0]} exited with {proc.returncode}: "
                           f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    return proc


def part_ddp(c: Check) -> dict[str, Any]:
    n = torch.cuda.device_count() if c.device.type == "cuda" else 0
    if n < 2:
        return {"skipped": f"{n} GPU(s) visible; a DDP step needs at least 2"}
    s = c.sizes
    data = make_synthetic_dataset(c.tmp / "ddp-data", s.hw, depth=s.train_depth, n_train=4)
    run_dir = c.tmp / "ddp-run"
    t0 = time.perf_counter()
    run_logged(c, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "mmdm.engine.cli", "train", "--method", "mmdm", "--variant", "full", "--method-config",
                   s.config, "--data", str(data), "--steps", "4", "--batch-size", str(s.batch), "--run-dir",
                   str(run_dir), "--set", "amp=bf16", "--set", "checkpoint_every=4", "--set", "image_every=0"],
               timeout=600)
    return {"processes": 2, "steps": 4, "seconds": time.perf_counter() - t0,
            "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))}


def part_run(c: Check) -> dict[str, Any]:
    s = c.sizes
    data, run_dir = c.tmp / f"phantom-{s.run_cohort}", c.tmp / "run-mmdm-full"
    t0 = time.perf_counter()
    run_logged(c, mmdm_cli("data", "phantom", "--profile", s.run_cohort, "--out", str(data), "--workers",
                           str(min(8, os.cpu_count() or 1))), timeout=900)
    cohort_s = time.perf_counter() - t0
    amp = ["--set", "amp=bf16"] if c.device.type == "cuda" else []
    t1 = time.perf_counter()
    run_logged(c, mmdm_cli("train", "--method", "mmdm", "--variant", "full", "--method-config", s.config,
                           "--data", str(data), "--steps", str(s.run_steps), "--batch-size", str(s.batch),
                           "--run-dir", str(run_dir), "--device", str(c.device), *amp,
                           "--set", f"checkpoint_every={s.run_steps}", "--set", "image_every=0"), timeout=1800)
    train_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    run_logged(c, mmdm_cli("evaluate-run", str(run_dir), "--steps", str(s.run_sample_steps), "--device",
                           str(c.device)), timeout=1800)
    eval_s = time.perf_counter() - t2
    summary = json.loads((run_dir / "summary.json").read_text())
    keep = {k: summary[k] for k in ("metrics_mean", "metrics", "mean", "n_subjects", "sampling") if k in summary}
    from mmdm.study.records import read_scalars

    df = read_scalars(run_dir)
    loss = df[df["tag"] == "train/loss"] if "train/loss" in set(df["tag"]) else df[df["tag"].str.endswith("loss")]
    losses = None
    if len(loss):
        k = max(1, len(loss) // 10)  # first and last tenth of the logged steps
        losses = {"tag": str(loss["tag"].iloc[0]), "first_mean": float(loss["value"].iloc[:k].mean()),
                  "last_mean": float(loss["value"].iloc[-k:].mean()), "logged": len(loss)}
    c.log(f"   cohort {cohort_s:.0f} s, train {s.run_steps} steps {train_s:.0f} s, evaluate {eval_s:.0f} s")
    return {"cohort": s.run_cohort, "steps": s.run_steps, "config": s.config, "bf16": bool(amp),
            "cohort_s": cohort_s, "train_s": train_s, "eval_s": eval_s, "summary": keep, "loss": losses}


PART_FUNCS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "env": part_env, "train": part_train, "nets": part_nets, "synthesis": part_synthesis, "ddp": part_ddp,
    "run": part_run,
}


# ------------------------------------------------------------------------------------------ report
def summary_markdown(results: dict[str, Any]) -> str:
    """A short human-readable table of what was measured."""
    parts = results.get("parts", {})
    env = parts.get("env", {})
    lines = [f"# GPU check{' (dry run)' if results.get('dry_run') else ''}", "",
             f"Device: {env.get('device_name', results.get('device'))}; torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}; started {results.get('started')}.", ""]
    for name, res in parts.items():
        state = "ok" if res.get("ok") else ("unfinished (stopped)" if res.get("unfinished") else "FAILED")
        lines.append(f"- **{name}**: {state}" + (f" in {res['wall_s']} s" if "wall_s" in res else "")
                     + (f" ({res['error']})" if "error" in res else "")
                     + (f" (skipped: {res['skipped']})" if "skipped" in res else ""))
    train = parts.get("train", {}).get("entries", [])
    if train:
        lines += ["", "| method | precision | ms / step | windows / s | peak MiB | finite |", "|---|---|---|---|---|---|"]
        for e in train:
            if "error" in e:
                lines.append(f"| {e['method']} | {'bf16' if e['bf16'] else 'fp32'} | failed: {e['error'][:60]} | | | |")
                continue
            lines.append(f"| {e['method']} | {'bf16' if e['bf16'] else 'fp32'} | {e['step_s_median'] * 1e3:.1f} | "
                         f"{e['windows_per_s']:.2f} | {_mib(e['peak_memory_mib'])} | {e['loss_finite']} |")
    nets = parts.get("nets", {}).get("entries", [])
    if nets:
        lines += ["", "| MMDM networks | ms / step | GFLOP/s | peak MiB |", "|---|---|---|---|"]
        for e in nets:
            if "error" in e:
                lines.append(f"| bf16={e['bf16']} cl={e['channels_last']} compile={e['compile']} | failed | | |")
            else:
                lines.append(f"| {e['key'].replace('|', ', ')} | {e['step_ms']['median']:.1f} | "
                             f"{e['achieved_gflop_per_s']:.0f} | {e['peak_memory_mib']:.0f} |")
    syn = parts.get("synthesis", {})
    if "recommended" in syn:
        r, p = syn["recommended"], syn["paper"]
        lines += ["", f"Synthesis of a {syn['height_width'][0]}x{syn['height_width'][1]}x{r['depth']} volume "
                  f"({syn['config']}, random weights): recommended setting ({r['steps']} steps, stride {r['stride']}, "
                  f"{r['mode']}) {r['seconds']:.1f} s; paper setting ({p['steps']} coupled steps, stride 1) "
                  + (f"~{p['volume_seconds_estimate']:.0f} s (extrapolated from {p['depth']} slices)"
                     if p.get("extrapolated") else f"{p['seconds']:.1f} s") + "."]
    run = parts.get("run", {})
    if "train_s" in run:
        loss = run.get("loss") or {}
        lines += ["", f"Tiny run: {run['steps']} steps of MMDM full ({run['config']}) in {run['train_s']:.0f} s, "
                  f"evaluation {run['eval_s']:.0f} s; {loss.get('tag')} {loss.get('first_mean', float('nan')):.4g} "
                  f"(first tenth) -> {loss.get('last_mean', float('nan')):.4g} (last tenth); test metrics "
                  f"{run.get('summary', {}).get('metrics')}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: benchmarks/results/gpu-check/<device>)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: auto)")
    p.add_argument("--dry-run", action="store_true", help="shrink every size (small configs, 32x32) to check the script")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    p.add_argument("--run-steps", type=int, default=None, help="training steps of the tiny run (default 300)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if not args.dry_run and device.type != "cuda":
        p.error("no CUDA device: the GPU check needs a GPU (use --dry-run to check the script on a CPU)")
    sizes = Sizes.dry() if args.dry_run else Sizes()
    if args.no_compile:
        sizes.compile = False
    if args.run_steps is not None:
        sizes.run_steps = args.run_steps
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    slug = "".join(ch if ch.isalnum() else "-" for ch in device_name(device).lower()).strip("-")
    out = args.out or ROOT / "benchmarks" / "results" / "gpu-check" / (slug + ("-dry" if args.dry_run else ""))
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, device, sizes, args.dry_run)
    try:
        ok = all([check.run(name, PART_FUNCS[name]) for name in PARTS if name in args.parts])
    finally:
        check.results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        check.save()
        check.close()
    print(f"wrote {out / 'gpu_check.json'} and {out / 'summary.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
