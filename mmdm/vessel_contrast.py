"""Threshold-free vessel scores of a synthesised TOF-MRA volume.

The segmentation-based metrics of :mod:`mmdm.vessel_segmentation` (clDice, Dice, ...)
need a threshold and score 0 when a prediction has some vessel contrast but
not enough to cross it. The scores here need none:

* **contrast recovery** ``(mean pred on lumen - mean pred on vessel-free brain)
  / (mean target on lumen - mean target on vessel-free brain)``: 1 when the
  prediction reproduces the target's vessel-to-brain contrast, 0 when its
  vessels are as dark as its brain (a smooth brain), negative when darker.
  It is invariant to a common offset of the prediction and scales with its gain,
  so pred and target must be in the same units (both raw, or both scaled by
  the target's maximum).
* **vessel PSNR**: PSNR over the voxels of the vessel mask dilated by
  ``dilate`` voxels (the lumen plus its rim, where a blurred vessel's error
  lives), with the data range of :mod:`mmdm.metrics` (the target's maximum,
  inside the brain mask when given).

Masks
-----
* Phantom (ground truth): the lumen is ``vessel fraction >= 0.1``
  (:func:`mmdm.vessel_segmentation.phantom_lumen`, the one lumen of every vessel
  metric; records made before it used ``> 0.5`` here; the fraction is stored as
  ``derivatives/phantom/sub-XXX/sub-XXX_vesselfraction.nii.gz``, read by
  :func:`mmdm.data.phantom.load_ground_truth`); vessel-free brain is the brain
  mask minus every voxel with any lumen (fraction > 0) dilated by ``margin``.
* Data without ground truth (IXI): :func:`bright_mask`, the brightest
  ``fraction`` of the **real** TOF's voxels inside the brain; vessel-free brain
  is the brain minus that mask dilated by ``margin``.

:func:`vessel_scores` takes either and says which it used in ``mask_source``
(``"ground_truth"`` or ``"bright_target"``). Dilations use the face-connected
(6-neighbour in 3D) structuring element, ``dilate`` / ``margin`` times.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from mmdm.stats import top_count
from mmdm.vessel_segmentation import phantom_lumen


#: Without a brain mask (IXI), voxels of the target scaled to [0, 1] above this form the head mask.
HEAD_THRESHOLD = 0.05
#: Share of the brain's voxels that :func:`bright_mask` takes as vessels when there is no ground truth.
DEFAULT_BRIGHT_FRACTION = 0.01
#: Keys of :func:`vessel_scores` (besides ``mask_source``).
VESSEL_SCORE_KEYS = ("contrast_recovery", "vessel_psnr", "lumen_pred", "lumen_target", "background_pred",
                     "background_target", "lumen_voxels", "background_voxels")
MASK_SOURCES = ("ground_truth", "bright_target")


def _volume(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    v = np.asarray(x, dtype=np.float64)
    if v.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D image or an (X, Y, Z) volume, got shape {v.shape}; "
                         "score one subject (or one window) at a time")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or infinite values; replace them before scoring")
    return v


def _mask(m: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if hasattr(m, "detach"):
        m = m.detach().cpu().numpy()
    a = np.asarray(m)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape} but the volumes have shape {tuple(shape)}; "
                         "all inputs must be on the same voxel grid")
    return a.astype(bool) if a.dtype != bool else a


def _pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _volume(pred, "pred"), _volume(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred has shape {p.shape} but target has shape {t.shape}; resample the prediction onto "
                         "the target's grid")
    return p, t


def dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``mask`` grown by ``iterations`` face-connected voxels (``0``: unchanged)."""
    if iterations < 0:
        raise ValueError(f"a dilation must be >= 0 voxels, got {iterations}")
    return ndimage.binary_dilation(mask, iterations=iterations) if iterations and mask.any() else mask.copy()


def bright_mask(target: Any, brain_mask: Any = None, fraction: float = DEFAULT_BRIGHT_FRACTION) -> np.ndarray:
    """The brightest ``fraction`` of the target's voxels inside ``brain_mask`` (whole volume without one).

    Exactly ``max(1, round(fraction * n_brain))`` voxels (the rule of
    :func:`mmdm.stats.top_count`); ties at the cut go to the lower
    flat index. For data without vessel ground truth: pass the **real** TOF.
    """
    t = _volume(target, "target")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1 (e.g. 0.01 = the brightest 1 %), "
                         f"got {fraction}")
    brain = np.ones(t.shape, bool) if brain_mask is None else _mask(brain_mask, "brain_mask", t.shape)
    idx = np.flatnonzero(brain)
    if idx.size == 0:
        raise ValueError("brain_mask is empty; pass the subject's brain mask (or None for the whole volume)")
    k = top_count(idx.size, fraction)
    order = np.argsort(-t.ravel()[idx], kind="stable")[:k]
    out = np.zeros(t.size, bool)
    out[idx[order]] = True
    return out.reshape(t.shape)


def vessel_free_brain(brain_mask: Any, vessel_mask: Any, margin: int = 1) -> np.ndarray:
    """Brain voxels farther than ``margin`` (face-connected steps) from any ``vessel_mask`` voxel."""
    v = np.asarray(vessel_mask, dtype=bool)
    return _mask(brain_mask, "brain_mask", v.shape) & ~dilate(v, margin)


def _means(p: np.ndarray, t: np.ndarray, lumen: np.ndarray, background: np.ndarray) -> dict[str, float]:
    if not lumen.any():
        raise ValueError("the lumen mask is empty: no vessel to score. Pass the subject's vessel mask "
                         "(phantom: phantom_lumen(vessel_fraction)) or use bright_mask(target, brain_mask)")
    if not background.any():
        raise ValueError("no vessel-free brain voxel is left (brain mask minus the dilated vessel mask is empty); "
                         "pass the brain mask or lower the margin")
    return {"lumen_pred": float(p[lumen].mean()), "lumen_target": float(t[lumen].mean()),
            "background_pred": float(p[background].mean()), "background_target": float(t[background].mean()),
            "lumen_voxels": float(lumen.sum()), "background_voxels": float(background.sum())}


def _recovery(m: dict[str, float]) -> float:
    denom = m["lumen_target"] - m["background_target"]
    if not denom > 0:
        raise ValueError(f"the target is not brighter on the lumen ({m['lumen_target']:.6g}) than on vessel-free "
                         f"brain ({m['background_target']:.6g}): it has no vessel contrast to recover. Check that "
                         "the target is the TOF-MRA and the masks are on its grid")
    return (m["lumen_pred"] - m["background_pred"]) / denom


def contrast_recovery(pred: Any, target: Any, lumen_mask: Any, brain_mask: Any = None, exclude_mask: Any = None,
                      margin: int = 1) -> float:
    """``(mean pred on lumen - mean pred on vessel-free brain) / (the same for target)`` (see module doc).

    Vessel-free brain: ``brain_mask`` (whole volume without one) minus
    ``exclude_mask`` (default: the lumen; for the phantom pass every voxel with
    any lumen, fraction > 0) dilated by ``margin`` voxels.
    """
    p, t = _pair(pred, target)
    lumen = _mask(lumen_mask, "lumen_mask", t.shape)
    brain = np.ones(t.shape, bool) if brain_mask is None else _mask(brain_mask, "brain_mask", t.shape)
    excl = lumen if exclude_mask is None else _mask(exclude_mask, "exclude_mask", t.shape) | lumen
    return _recovery(_means(p, t, lumen, vessel_free_brain(brain, excl, margin)))


def _data_range(t: np.ndarray, brain: np.ndarray | None, data_range: float | None) -> float:
    if data_range is None:
        data_range = float(t[brain].max() if brain is not None and brain.any() else t.max())
    if not (data_range > 0 and math.isfinite(data_range)):
        raise ValueError(f"the data range is {data_range}: the target's maximum must be positive (or pass "
                         "data_range)")
    return float(data_range)


def vessel_psnr(pred: Any, target: Any, mask: Any, dilate_voxels: int = 1, data_range: float | None = None,
                brain_mask: Any = None) -> float:
    """PSNR (dB) over ``mask`` dilated by ``dilate_voxels``: ``10 log10(range^2 / MSE)``; ``inf`` if equal there.

    ``data_range`` defaults to the target's maximum (inside ``brain_mask`` when
    given), the convention of :mod:`mmdm.metrics` (both scaled by the
    ground-truth maximum, range 1).
    """
    p, t = _pair(pred, target)
    m = _mask(mask, "mask", t.shape)
    if not m.any():
        raise ValueError("the vessel mask is empty: no vessel to score")
    brain = None if brain_mask is None else _mask(brain_mask, "brain_mask", t.shape)
    rng = _data_range(t, brain, data_range)
    region = dilate(m, dilate_voxels)
    mse = float(np.mean((p[region] - t[region]) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(rng * rng / mse)


def vessel_scores(pred: Any, target: Any, brain_mask: Any = None, lumen_mask: Any = None, exclude_mask: Any = None,
                  fraction: float = DEFAULT_BRIGHT_FRACTION, margin: int = 1, dilate_voxels: int = 1,
                  data_range: float | None = None) -> dict[str, float | str]:
    """Contrast recovery and vessel PSNR of one prediction, with the ground-truth lumen if given.

    ``lumen_mask`` given (phantom: :func:`phantom_lumen`; pass
    ``exclude_mask = vessel fraction > 0`` too): ``mask_source =
    "ground_truth"``. Otherwise the lumen is :func:`bright_mask` of the
    **target** with ``fraction`` inside ``brain_mask``: ``mask_source =
    "bright_target"``. Returns :data:`VESSEL_SCORE_KEYS` as floats plus
    ``mask_source``.
    """
    p, t = _pair(pred, target)
    brain = np.ones(t.shape, bool) if brain_mask is None else _mask(brain_mask, "brain_mask", t.shape)
    if lumen_mask is not None:
        lumen, source = _mask(lumen_mask, "lumen_mask", t.shape), "ground_truth"
    else:
        lumen, source = bright_mask(t, brain, fraction), "bright_target"
    excl = lumen if exclude_mask is None else _mask(exclude_mask, "exclude_mask", t.shape) | lumen
    m = _means(p, t, lumen, vessel_free_brain(brain, excl, margin))
    out: dict[str, float | str] = {"contrast_recovery": _recovery(m),
                                   "vessel_psnr": vessel_psnr(p, t, lumen, dilate_voxels, data_range,
                                                              None if brain_mask is None else brain)}
    out.update(m)
    out["mask_source"] = source
    return out


def phantom_vessel_scores(pred: Any, target: Any, vessel_fraction: Any, brain_mask: Any, margin: int = 1,
                          dilate_voxels: int = 1, data_range: float | None = None,
                          lumen_in_brain: bool = False) -> dict[str, float | str]:
    """:func:`vessel_scores` of a phantom subject: lumen = :func:`phantom_lumen` (fraction >= 0.1), any lumen
    (fraction > 0) kept out of the vessel-free brain.

    By default the lumen is not restricted to the brain mask: on the quick
    cohort's first subject 105 of its 341 lumen voxels (31 %) lie outside it
    (arteries at the skull base and on the brain's surface), and the
    prediction should show them too, so score an unmasked prediction.
    ``lumen_in_brain=True`` keeps only the lumen inside ``brain_mask`` (as
    :func:`mmdm.vessel_segmentation.evaluate_vessels` restricts its ground truth).
    """
    vf = np.asarray(vessel_fraction)
    lumen = phantom_lumen(vf)
    if lumen_in_brain:
        lumen = lumen & _mask(brain_mask, "brain_mask", lumen.shape)
    return vessel_scores(pred, target, brain_mask, lumen_mask=lumen, exclude_mask=vf > 0,
                         margin=margin, dilate_voxels=dilate_voxels, data_range=data_range)
