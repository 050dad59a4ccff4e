"""Validation on what the tables measure: whole validation volumes, every slice.

The validation vessel score (:mod:`mmdm.engine.validation`) looks at a few
windows from the middle of each validation subject; Tables 1-3 score whole
volumes, where the stack's end slices and the air around the head count too.
Every ``val_every`` steps the trainer therefore also synthesises the first
``val_volumes`` validation subjects whole, with the 2.5D sliding window of run
evaluation (:func:`mmdm.engine.infer.synthesize_volume`, on volumes read once per run) at a cheaper setting
that is the same for every validation of a run and recorded with each entry
(``val_volume_stride``: axial stride of the window; ``val_volume_steps``:
sampler steps), and scores them as the tables do
(:func:`mmdm.metrics.evaluate_volumes`: PSNR and SSIM of the volume and of its
axial MIP, both scaled by the target's maximum) and, on a phantom cohort, with
the threshold-free vessel contrast recovery over the whole brain
(:func:`mmdm.vessel_contrast.phantom_vessel_scores`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from mmdm.data.dataset import DataConfig
from mmdm.data.layout import Layout
from mmdm.data.phantom import has_ground_truth, load_ground_truth
from mmdm.engine.infer import SubjectSynthesis, subject_sources, synthesize_volume
from mmdm.methods.base import SynthesisMethod
from mmdm.metrics import evaluate_volumes
from mmdm.vessel_contrast import phantom_vessel_scores

#: The scores of a whole-volume validation entry (means over the validation subjects).
VOLUME_SCORES = ("psnr", "ssim", "mip_psnr", "mip_ssim", "vessel_recovery")


class ValidationVolumes:
    """The first ``n`` subjects of the validation split, synthesised whole and scored by :meth:`score`."""

    def __init__(self, data: DataConfig, n: int, stride: int, steps: int | None):
        if n < 1 or stride < 1:
            raise ValueError(f"whole-volume validation needs >= 1 subject and stride >= 1 (got {n}, {stride})")
        self.data, self.stride, self.steps = data, int(stride), steps
        self.subjects: Sequence[str] = Layout(data.root).split("val")[:n]
        self.phantom = has_ground_truth(data.root)
        self._truth: dict[str, dict[str, np.ndarray]] = {}
        self._volumes: list[SubjectSynthesis] | None = None

    def _loaded(self) -> list[SubjectSynthesis]:
        """The subjects' source and target volumes, read from disk at the first validation and kept
        (a few MB per subject): every validation of a run scores the same volumes."""
        if self._volumes is None:
            self._volumes = list(subject_sources(self.data, self.subjects, with_target=True))
        return self._volumes

    def _ground_truth(self, subject: str) -> dict[str, np.ndarray]:
        if subject not in self._truth:
            gt = load_ground_truth(self.data.root, subject)
            self._truth[subject] = {"vf": np.asarray(gt["vessel_fraction"]), "brain": np.asarray(gt["brain_mask"])}
        return self._truth[subject]

    @torch.no_grad()
    def score(self, method: SynthesisMethod, device: torch.device, seed: int, batch_size: int) -> dict[str, Any]:
        """Synthesise and score every subject (one generator seeded ``seed``, so every validation of a run
        draws the same noise): the means of :data:`VOLUME_SCORES` over the subjects, their number and
        names, and the sampler setting (``stride``, ``steps``). {} without validation subjects."""
        if not self.subjects:
            return {}
        gen = torch.Generator(device=device).manual_seed(seed)
        rows = []
        for item in self._loaded():
            # what synthesize_subjects does for each subject, on the volumes already in memory
            result = synthesize_volume(method, item.sources, window=self.data.window, stride=self.stride,
                                       batch_size=batch_size, steps=self.steps, norm=self.data.norm, generator=gen,
                                       progress=False)
            pred, target = result["mean"], item.target.data / float(item.target.data.max())
            m = evaluate_volumes(pred, target)
            row = {k: float(m[k]) for k in ("psnr", "ssim", "mip_psnr", "mip_ssim")}
            row["vessel_recovery"] = math.nan
            if self.phantom:
                gt = self._ground_truth(item.subject)
                try:
                    s = phantom_vessel_scores(pred, target, gt["vf"], gt["brain"], data_range=1.0)
                    row["vessel_recovery"] = float(s["contrast_recovery"])
                except ValueError as err:  # e.g. a subject without vessels: no score, training goes on
                    warnings.warn(f"{item.subject}: no whole-volume vessel score ({err})", stacklevel=2)
            rows.append(row)
        out: dict[str, Any] = {}
        for k in VOLUME_SCORES:
            v = np.array([r[k] for r in rows], dtype=np.float64)
            v = v[np.isfinite(v)]
            out[k] = float(v.mean()) if len(v) else float("nan")
        out.update({"n_subjects": len(rows), "subjects": list(self.subjects), "stride": self.stride,
                    "steps": self.steps})
        return out


__all__ = ["VOLUME_SCORES", "ValidationVolumes"]
