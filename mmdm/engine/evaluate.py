"""The evaluation of a trained run: predictions, ``metrics.csv`` and, last, ``summary.json``.

The top of the engine: it rebuilds the run's method (:mod:`mmdm.engine.infer`),
synthesises every subject of a split, scores each prediction with the six
metrics of Tables 1-3 (:func:`mmdm.metrics.evaluate_volumes`) and writes the
record through :class:`mmdm.engine.rundir.RecordWriter`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mmdm.data.layout import Layout
from mmdm.engine.distributed import resolve_device
from mmdm.engine.infer import check_amp, load_run_method, synthesize_subjects
from mmdm.engine.rundir import METRIC_COLUMNS, RecordWriter, run_paths, run_provenance, run_status, write_metrics_csv
from mmdm.io import save_nifti, tof_fraction_descrip
from mmdm.metrics import evaluate_volumes


def evaluate_run(run_dir: str | Path, split: str = "test", steps: int | None = None, eta: float | None = None,
                 n_samples: int = 1, batch_size: int = 8, device: str = "auto", checkpoint: str = "latest",
                 use_ema: bool = True, seed: int = 0, subjects: Sequence[str] | None = None,
                 require_complete: bool = True, progress: bool = True, amp: str = "none") -> dict[str, Any]:
    """Synthesise every subject of ``split``, write predictions, metrics.csv, then summary.json.

    The data (root, modalities, window, normalisation) come from the run's
    config. Each prediction is the sliding-window mean in [0, 1] (see
    :func:`mmdm.engine.infer.synthesize_volume`); it is scored against
    ``target / target.max()`` with :func:`mmdm.metrics.evaluate_volumes`.
    ``summary.json`` is deleted first and written last, so an interrupted
    evaluation never looks finished. ``amp="bf16"`` samples with bf16 autocast of the networks
    (:func:`mmdm.engine.infer.synthesize_volume`); the summary's ``sampling`` records it.
    """
    p = run_paths(run_dir)
    if require_complete and not p.train_complete.is_file():
        raise RuntimeError(f"run {run_dir} has not finished training (no train_complete.json; state "
                           f"'{run_status(run_dir)}'). Resume it with `mmdm train --resume --run-dir {run_dir}`, "
                           "or pass require_complete=False to evaluate its latest checkpoint anyway.")
    dev = resolve_device(device)
    check_amp(amp, dev)  # before RecordWriter removes the old summary
    record = RecordWriter(p.root)
    method, cfg, ckpt = load_run_method(run_dir, checkpoint=checkpoint, device=dev, use_ema=use_ema)
    subs = list(subjects) if subjects is not None else Layout(cfg.data.root).split(split)
    if not subs:
        raise RuntimeError(f"split '{split}' of {Layout(cfg.data.root).root} is empty: nothing to evaluate")
    gen = torch.Generator(device=dev).manual_seed(seed)  # one stream through all subjects
    descrip = tof_fraction_descrip(1.0)
    rows = []
    for item in synthesize_subjects(method, cfg.data, subs, lambda i, s: gen, with_target=True, steps=steps,
                                    eta=eta, n_samples=n_samples, batch_size=batch_size, progress=progress, amp=amp):
        s, out, target = item.subject, item.result, item.target
        save_nifti(p.predictions / f"{s}_{cfg.data.target}.nii.gz", out["mean"], target.affine, descrip=descrip)
        if "std" in out:
            save_nifti(p.predictions / f"{s}_{cfg.data.target}_std.nii.gz", out["std"], target.affine,
                       descrip=descrip)
        rows.append({"subject": s, **evaluate_volumes(out["mean"], target.data / float(target.data.max()))})
    write_metrics_csv(p.metrics, rows)
    means = {k: float(np.mean([r[k] for r in rows])) for k in METRIC_COLUMNS}
    stds = {k: float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0 for k in METRIC_COLUMNS}
    return record.finish({
        "run": str(Path(run_dir)), "method": cfg.method, "method_kwargs": cfg.method_kwargs,
        "objective": method.objective(),
        "split": split, "n_subjects": len(rows), "subjects": [r["subject"] for r in rows],
        "metrics": means, "metrics_std": stds,
        "sampling": {"steps": steps, "eta": eta, "n_samples": n_samples, "seed": seed,
                     "window": cfg.data.window, "stride": cfg.data.eval_stride, "amp": amp},
        "checkpoint": {"file": ckpt.get("file"), "step": ckpt.get("step"), "ema": ckpt.get("ema_used")},
        "evaluation": record.session(dev),
        "provenance": run_provenance(run_dir),
    })


__all__ = ["evaluate_run"]
