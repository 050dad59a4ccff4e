"""The vessel score of a model during training, on validation windows.

Every ``val_every`` steps the trainer synthesises a fixed set of validation
windows and scores them with :func:`mmdm.vessel_contrast.vessel_scores`:

* contrast recovery: (mean prediction on the lumen - mean prediction on
  vessel-free brain) / (the same for the real TOF-MRA); 1 reproduces the
  target's vessel contrast, 0 shows none of it;
* PSNR inside the dilated lumen.

On a phantom cohort the lumen is the ground truth (:func:`mmdm.vessel_segmentation.phantom_lumen`), the
brain its brain mask; on data without ground truth (IXI) the lumen is the
brightest voxels of the real TOF inside a foreground mask, as in the run
records. The windows are spread evenly over the validation windows of the
central half of each subject's slices (a pure function of the split), so every
validation of a run and every run of a cohort scores the same windows.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from mmdm.data.dataset import WindowDataset
from mmdm.data.phantom import has_ground_truth, load_ground_truth
from mmdm.engine.batches import collate, to_device
from mmdm.methods.base import SynthesisMethod
from mmdm.vessel_contrast import HEAD_THRESHOLD, vessel_scores
from mmdm.vessel_segmentation import phantom_lumen

#: Share of each subject's axial extent the validation windows are drawn from (the middle).
CENTRAL_SHARE = 0.5


def spread_indices(n_items: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(n_items)``, away from both ends (all when ``n >= n_items``)."""
    if n_items < 1 or n < 1:
        return []
    if n >= n_items:
        return list(range(n_items))
    return sorted({int(round(x)) for x in np.linspace(0, n_items - 1, n + 2)[1:-1]})


def central_windows(dataset: WindowDataset, share: float = CENTRAL_SHARE) -> list[int]:
    """Indices of the windows whose slices lie in the central ``share`` of their subject's depth
    (where the brain and the circle of Willis are; the first and last slices hold little of either)."""
    out = []
    for i, (s, z0) in enumerate(dataset.index):
        depth = int(dataset.volumes[s][dataset.cfg.target].shape[2])
        lo, hi = depth * (1 - share) / 2, depth * (1 + share) / 2
        if z0 >= lo and z0 + dataset.cfg.window <= hi:
            out.append(i)
    return out or list(range(len(dataset)))


class ValidationVessels:
    """The fixed validation windows of a run and their reference masks; :meth:`score` one model."""

    def __init__(self, dataset: WindowDataset, n_windows: int):
        self.dataset = dataset
        central = central_windows(dataset)
        self.indices = [central[i] for i in spread_indices(len(central), n_windows)]
        k = dataset.cfg.window
        phantom = has_ground_truth(dataset.cfg.root)
        truth: dict[str, dict[str, np.ndarray]] = {}
        lumen, excl, brain = [], [], []
        for i in self.indices:
            s, z0 = dataset.index[i]
            if phantom:
                if s not in truth:
                    gt = load_ground_truth(dataset.cfg.root, s)
                    truth[s] = {"vf": np.asarray(gt["vessel_fraction"]), "brain": np.asarray(gt["brain_mask"])}
                vf = np.moveaxis(truth[s]["vf"][:, :, z0:z0 + k], 2, 0)
                lumen.append(phantom_lumen(vf))
                excl.append(vf > 0)
                brain.append(np.moveaxis(truth[s]["brain"][:, :, z0:z0 + k], 2, 0))
        self.mask_source = "ground_truth" if phantom else "bright_target"
        self.lumen = np.concatenate(lumen) if phantom else None
        self.exclude = np.concatenate(excl) if phantom else None
        self.brain = np.concatenate(brain) if phantom else None

    def __len__(self) -> int:
        return len(self.indices)

    @torch.no_grad()
    def score(self, method: SynthesisMethod, device: torch.device, steps: int | None, seed: int,
              batch_size: int) -> dict[str, Any]:
        """Synthesise the windows (``method.sample``, ``steps`` steps, a generator seeded ``seed``) and
        score them together: ``{"recovery", "psnr", "n_windows", "mask_source"}``."""
        if not self.indices:
            return {}
        gen = torch.Generator(device=device).manual_seed(seed)
        preds, targets = [], []
        for i in range(0, len(self.indices), batch_size):
            b = to_device(collate([self.dataset[j] for j in self.indices[i:i + batch_size]]), device)
            preds.append(method.sample(b["sources"], steps=steps, generator=gen).float().cpu())
            targets.append(b["target"].float().cpu())
        # (N*K, X, Y) in [0, 1], the scale of the run records
        p = ((torch.cat(preds).flatten(0, 1) + 1) / 2).clamp(0, 1).numpy()
        t = ((torch.cat(targets).flatten(0, 1) + 1) / 2).numpy()
        brain = self.brain if self.brain is not None else t > HEAD_THRESHOLD
        try:  # data range 1: the scale of the run records' test-split vessel PSNR
            s = vessel_scores(p, t, brain_mask=brain, lumen_mask=self.lumen, exclude_mask=self.exclude,
                              data_range=1.0)
        except ValueError as e:  # e.g. windows without any vessel: no score, training goes on
            warnings.warn(f"validation vessel score not computed: {e}", stacklevel=2)
            return {"recovery": float("nan"), "psnr": float("nan"), "n_windows": len(self.indices),
                    "mask_source": self.mask_source, "error": str(e)}
        return {"recovery": float(s["contrast_recovery"]), "psnr": float(s["vessel_psnr"]),
                "n_windows": len(self.indices), "mask_source": str(s["mask_source"])}


__all__ = ["CENTRAL_SHARE", "ValidationVessels", "central_windows", "spread_indices"]
