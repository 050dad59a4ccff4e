"""The first training losses of every method, printed exactly: a check that a refactoring of the
engine or the methods changes no number.

Each case (a registered method, a variant or objective, a vessel-emphasis setting) trains a few
steps through the engine's :class:`~mmdm.engine.train.Trainer` on a tiny random cohort written
by this script (fixed seeds, whole 32x32 slices, two source modalities), in one thread.
Printed per case: every logged scalar of every step as ``repr`` of the float (exact), one
validation pass (:meth:`Trainer.validation_losses`) and a SHA-256 of the final
weights and optimiser moments. Run it at two commits and ``diff`` the outputs::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/loss_trace.py --steps 3 > /tmp/new.txt
    git worktree add /tmp/base <commit>
    (cd /tmp/base && PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/loss_trace.py --steps 3) > /tmp/old.txt
    diff /tmp/old.txt /tmp/new.txt

Only the public engine API is used (``TrainConfig``, ``Trainer.batches``, ``Trainer.train_step``,
``Trainer.validation_losses``), so the script runs unchanged at older commits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

#: (label, method, method kwargs, emphasis) of every traced case.
CASES: list[tuple[str, str, dict, dict]] = [
    ("mmdm-full", "mmdm", {"variant": "full"}, {"kind": "none"}),
    ("mmdm-full-top", "mmdm", {"variant": "full"}, {"kind": "top_fraction", "fraction": 0.01, "weight": 20.0}),
    ("mmdm-base-steer", "mmdm", {"variant": "base"}, {"kind": "steerable", "weight": 2.0}),
    ("mmdm-naws-top", "mmdm", {"variant": "naws", "naws_lr": 1e-2}, {"kind": "top_fraction", "weight": 20.0}),
    ("ddpm", "ddpm", {}, {"kind": "none"}),
    ("ddpm-top", "ddpm", {}, {"kind": "top_fraction", "weight": 20.0}),
    ("ddpm-x0-steer", "ddpm", {"prediction": "x0"}, {"kind": "steerable", "weight": 2.0}),
    ("bbdm", "bbdm", {}, {"kind": "none"}),
    ("bbdm-smooth", "bbdm", {}, {"kind": "smooth", "weight": 20.0, "normalise": True}),
    ("rddm", "rddm", {}, {"kind": "none"}),
    ("rddm-top", "rddm", {}, {"kind": "top_fraction", "weight": 20.0}),
    ("pix2pix", "pix2pix", {}, {"kind": "none"}),
    ("pix2pix-top", "pix2pix", {}, {"kind": "top_fraction", "weight": 20.0}),
    ("pix2pix-steer", "pix2pix", {}, {"kind": "steerable", "weight": 2.0}),
    ("resvit-top", "resvit", {}, {"kind": "top_fraction", "weight": 20.0}),
    ("unest", "unest", {"pool_size": 3}, {"kind": "none"}),
    ("unest-top", "unest", {"pool_size": 3}, {"kind": "top_fraction", "weight": 20.0}),
    ("unest-paired-top", "unest", {"variant": "paired"}, {"kind": "top_fraction", "weight": 20.0}),
]


def write_cohort(root: Path, n: int = 4, shape: tuple[int, int, int] = (32, 32, 8)) -> None:
    """``n`` subjects of random volumes (T1w, T2w, angio) with a bright tube in the target; splits 2/1/1."""
    import nibabel as nib

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    subjects = [f"sub-{i:03d}" for i in range(1, n + 1)]
    for s, subject in enumerate(subjects):
        rng = np.random.default_rng(s)
        for i, m in enumerate(("T1w", "T2w", "angio")):
            data = (rng.random(shape) * (i + 1) * 100).astype(np.float32)
            if m == "angio":
                data[10:13, 4:28, :] += 400.0  # a vessel-like bright structure
            path = root / subject / "anat" / f"{subject}_{m}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, aff), str(path))
    (root / "splits.json").write_text(json.dumps({"train": subjects[:2], "val": subjects[2:3], "test": subjects[3:]}))


def digest(trainer) -> str:
    """SHA-256 of the weights, buffers and every optimiser's state (first 16 hex digits)."""
    h = hashlib.sha256()
    for k, v in sorted(trainer.method.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for name, opt in trainer.optimizers.items():
        for i, st in sorted(opt.state_dict()["state"].items()):
            for k, v in sorted(st.items()):
                h.update(f"{name}{i}{k}".encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    return h.hexdigest()[:16]


def trace(label: str, method: str, kwargs: dict, emphasis: dict, root: Path, work: Path, steps: int) -> list[str]:
    from mmdm.config import from_dict
    from mmdm.engine.train import TrainConfig, Trainer

    cfg = from_dict(TrainConfig, {
        "method": method, "method_kwargs": {"config": "small", **kwargs},
        "data": {"root": str(root), "sources": ["T1w", "T2w"]}, "steps": steps, "epochs": None,
        "batch_size": 2, "seed": 0, "device": "cpu", "checkpoint_every": 0, "image_every": 0,
        "val_batches": 1, "val_windows": 0, "emphasis": emphasis})
    trainer = Trainer(cfg, work / label, progress=False)
    lines = []
    for step, batch in enumerate(trainer.batches(0), 1):
        logs = trainer.train_step(batch)
        trainer.step = step
        lines.append(f"{label} step {step} " + " ".join(f"{k}={float(v)!r}" for k, v in sorted(logs.items())))
    val = trainer.validation_losses()
    lines.append(f"{label} val " + " ".join(f"{k}={v!r}" for k, v in sorted(val.items())))
    lines.append(f"{label} state {digest(trainer)}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="training steps per case (default 3)")
    ap.add_argument("--only", nargs="*", help="case labels to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root, work = Path(tmp) / "data", Path(tmp) / "runs"
        write_cohort(root)
        for label, method, kwargs, emphasis in CASES:
            if args.only and label not in args.only:
                continue
            for line in trace(label, method, kwargs, emphasis, root, work, args.steps):
                print(line, flush=True)


if __name__ == "__main__":
    main()
