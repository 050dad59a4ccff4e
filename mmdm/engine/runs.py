"""Run directories, provenance and the evaluation of a trained run.

One directory per run::

    RUN/
      config.yaml              the resolved TrainConfig (written before the first step)
      provenance.json          git commit, versions, device, seeds, sessions (start/end, UTC)
      checkpoints/step-*.pt    the last k checkpoints (mmdm.engine.checkpoint)
      tb/                      TensorBoard logs
      train_complete.json      written atomically after the last step -- training is done
      predictions/sub-XXX_angio.nii.gz   synthesised test volumes, [0, 1] TOF units
      metrics.csv              one row per subject: the six metrics of the paper's tables
      summary.json             written LAST and atomically: means over the subjects + provenance

A directory "looks finished" only when ``summary.json`` exists
(:func:`run_status`), so a run interrupted at any point is never mistaken for
a result.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmdm.io import write_json, write_text

#: Packages whose versions go into provenance.json.
KEY_PACKAGES = ("torch", "numpy", "scipy", "nibabel", "torchio", "scikit-image", "pandas", "pyyaml", "tqdm",
                "tensorboard")
RUN_STATES = ("empty", "training", "trained", "evaluating", "finished")


@dataclass(frozen=True)
class RunPaths:
    """The files of one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def train_complete(self) -> Path:
        return self.root / "train_complete.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


def run_paths(run_dir: str | Path) -> RunPaths:
    return RunPaths(Path(run_dir))


def utc_now() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_status(run_dir: str | Path) -> str:
    """One of ``empty``, ``training`` (config but no train_complete.json: running or
    interrupted), ``trained`` (training done, not evaluated), ``evaluating``
    (predictions or metrics but no summary) and ``finished`` (summary.json)."""
    p = run_paths(run_dir)
    if p.summary.is_file():
        return "finished"
    if p.train_complete.is_file():
        if p.metrics.is_file() or (p.predictions.is_dir() and any(p.predictions.iterdir())):
            return "evaluating"
        return "trained"
    if p.config.is_file():
        return "training"
    return "empty"


def is_finished(run_dir: str | Path) -> bool:
    return run_status(run_dir) == "finished"


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's summary.json; an unfinished run raises with its state and what to do."""
    status = run_status(run_dir)
    if status != "finished":
        hint = {"empty": "train it with `mmdm train`", "training": "resume it with `mmdm train --resume`",
                "trained": "evaluate it with `mmdm evaluate-run`",
                "evaluating": "evaluation was interrupted: run `mmdm evaluate-run` again"}[status]
        raise RuntimeError(f"run {run_dir} is unfinished (state '{status}', no summary.json): {hint}")
    return json.loads(run_paths(run_dir).summary.read_text())


# ----------------------------------------------------------------------------
# provenance


def git_info(cwd: str | Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the source tree (``None`` values when git is unavailable)."""
    cwd = Path(cwd) if cwd is not None else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": (bool(status) if status is not None else None)}


def package_versions(names: Sequence[str] = KEY_PACKAGES) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def environment_info(device: Any = None) -> dict[str, Any]:
    """Device name, Python/torch/CUDA/numpy versions, platform and key package versions."""
    import torch

    from mmdm import __version__
    from mmdm.engine.distributed import device_name

    return {
        "mmdm_version": __version__,
        "device": str(device) if device is not None else "cpu",
        "device_name": device_name(device),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
    }


#: environment variable through which a driver (the study runner) names the command behind a run
INVOCATION_ENV = "MMDM_INVOCATION"


def invocation() -> str:
    """What started this run: the driver's description (``MMDM_INVOCATION``) if one set it, else the
    process's command line (inside a notebook kernel that is only the kernel launcher)."""
    return os.environ.get(INVOCATION_ENV) or " ".join(sys.argv)


def start_session(run_dir: str | Path, *, profile: str | None, seed: int, device: Any, world_size: int = 1,
                  resumed_from_step: int = 0) -> dict[str, Any]:
    """Create or extend ``provenance.json`` with a new training session (rank 0 only)."""
    p = run_paths(run_dir)
    prov: dict[str, Any] = json.loads(p.provenance.read_text()) if p.provenance.is_file() else {}
    if not prov:
        prov = {"created": utc_now(), "git": git_info(), "profile": profile, "seeds": {"train": seed},
                "command": invocation(), "sessions": []}
    session = {"start": utc_now(), "end": None, "wall_s": None, "resumed_from_step": resumed_from_step,
               "world_size": world_size, "git": git_info(), **environment_info(device)}
    if profile is not None:
        prov["profile"] = profile
    prov["sessions"].append(session)
    prov.update({k: session[k] for k in ("device", "device_name", "python", "torch", "cuda", "numpy")})
    prov["_t0"] = time.time()
    write_json(p.provenance, prov)
    return prov


def end_session(run_dir: str | Path, **extra: Any) -> dict[str, Any]:
    """Close the latest session: end time, wall time; total wall time over sessions."""
    p = run_paths(run_dir)
    prov = json.loads(p.provenance.read_text())
    s = prov["sessions"][-1]
    s["end"] = utc_now()
    s["wall_s"] = round(time.time() - prov.pop("_t0", time.time()), 3)
    s.update(extra)
    prov["train_wall_s"] = round(sum(x.get("wall_s") or 0.0 for x in prov["sessions"]), 3)
    prov["start"] = prov["sessions"][0]["start"]
    prov["end"] = s["end"]
    write_json(p.provenance, prov)
    return prov


# ----------------------------------------------------------------------------
# evaluation of a trained run

METRIC_COLUMNS = ("psnr", "ssim", "rmse", "mip_psnr", "mip_ssim", "mip_rmse")


def write_metrics_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Atomically write per-subject metrics (columns: subject + the six metrics)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["subject", *METRIC_COLUMNS], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(r[k])) if k != "subject" else r[k]) for k in ["subject", *METRIC_COLUMNS]})
    return write_text(path, buf.getvalue())


def read_metrics_csv(path: str | Path) -> list[dict[str, Any]]:
    with open(path, newline="") as fh:
        return [{k: (v if k == "subject" else float(v)) for k, v in row.items()} for row in csv.DictReader(fh)]


def evaluate_run(run_dir: str | Path, split: str = "test", steps: int | None = None, eta: float | None = None,
                 n_samples: int = 1, batch_size: int = 8, device: str = "auto", checkpoint: str = "latest",
                 use_ema: bool = True, seed: int = 0, subjects: Sequence[str] | None = None,
                 require_complete: bool = True, progress: bool = True) -> dict[str, Any]:
    """Synthesise every subject of ``split``, write predictions, metrics.csv, then summary.json.

    The data (root, modalities, window, normalisation) come from the run's
    config. Each prediction is the sliding-window mean in [0, 1] (see
    :func:`mmdm.engine.infer.synthesize_volume`); it is scored against
    ``target / target.max()`` with :func:`mmdm.metrics.evaluate_volumes`.
    ``summary.json`` is deleted first and written last, so an interrupted
    evaluation never looks finished.
    """
    import torch

    from mmdm.data.dataset import load_subject_volumes
    from mmdm.data.layout import Layout
    from mmdm.engine.distributed import resolve_device
    from mmdm.engine.infer import load_run_method, synthesize_volume
    from mmdm.io import save_nifti
    from mmdm.metrics import evaluate_volumes

    p = run_paths(run_dir)
    if require_complete and not p.train_complete.is_file():
        raise RuntimeError(f"run {run_dir} has not finished training (no train_complete.json; state "
                           f"'{run_status(run_dir)}'). Resume it with `mmdm train --resume --run-dir {run_dir}`, "
                           "or pass require_complete=False to evaluate its latest checkpoint anyway.")
    p.summary.unlink(missing_ok=True)
    t0 = time.time()
    started = utc_now()
    dev = resolve_device(device)
    method, cfg, ckpt = load_run_method(run_dir, checkpoint=checkpoint, device=dev, use_ema=use_ema)
    layout = Layout(cfg.data.root)
    subs = list(subjects) if subjects is not None else layout.split(split)
    if not subs:
        raise RuntimeError(f"split '{split}' of {layout.root} is empty: nothing to evaluate")
    gen = torch.Generator(device=dev).manual_seed(seed)
    rows = []
    for s in subs:
        vols = load_subject_volumes(layout, s, list(cfg.data.sources) + [cfg.data.target])
        target = vols.pop(cfg.data.target)
        out = synthesize_volume(method, {m: v.data for m, v in vols.items()}, window=cfg.data.window,
                                stride=cfg.data.eval_stride, batch_size=batch_size, steps=steps, eta=eta,
                                n_samples=n_samples, norm=cfg.data.norm, generator=gen, progress=progress,
                                desc=s)
        save_nifti(p.predictions / f"{s}_{cfg.data.target}.nii.gz", out["mean"], target.affine)
        if "std" in out:
            save_nifti(p.predictions / f"{s}_{cfg.data.target}_std.nii.gz", out["std"], target.affine)
        tgt = target.data / float(target.data.max())
        rows.append({"subject": s, **evaluate_volumes(out["mean"], tgt)})
    write_metrics_csv(p.metrics, rows)
    means = {k: float(np.mean([r[k] for r in rows])) for k in METRIC_COLUMNS}
    stds = {k: float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0 for k in METRIC_COLUMNS}
    prov = json.loads(p.provenance.read_text()) if p.provenance.is_file() else {}
    prov.pop("_t0", None)
    summary = {
        "run": str(Path(run_dir)), "method": cfg.method, "method_kwargs": cfg.method_kwargs,
        "objective": method.objective(),
        "split": split, "n_subjects": len(rows), "subjects": [r["subject"] for r in rows],
        "metrics": means, "metrics_std": stds,
        "sampling": {"steps": steps, "eta": eta, "n_samples": n_samples, "seed": seed,
                     "window": cfg.data.window, "stride": cfg.data.eval_stride},
        "checkpoint": {"file": ckpt.get("file"), "step": ckpt.get("step"), "ema": ckpt.get("ema_used")},
        "evaluation": {"start": started, "end": utc_now(), "wall_s": round(time.time() - t0, 3),
                       **environment_info(dev)},
        "provenance": prov,
    }
    write_json(p.summary, summary)
    return summary
