"""Threshold-free vessel scores: contrast recovery, vessel PSNR, bright mask, the phantom's lumen."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmdm import vessel_contrast
from mmdm.vessel_contrast import (bright_mask, contrast_recovery, phantom_vessel_scores,
                                  vessel_free_brain, vessel_psnr, vessel_scores)
from mmdm.vessel_segmentation import LUMEN_MIN_FRACTION, phantom_lumen


def _case():
    """A 12^3 volume: brain = the inner 10^3 cube, a lumen line along z at (5, 5), known intensities.

    target: air 0, brain 0.3, lumen 0.9, the lumen's face neighbours 0.6 (partial volume, excluded by margin 1).
    pred:   air 7 (outside the brain: must not count), brain 0.2, lumen 0.5, neighbours 99 (excluded).
    -> recovery = (0.5 - 0.2) / (0.9 - 0.3) = 0.5
    """
    shape = (12, 12, 12)
    brain = np.zeros(shape, bool)
    brain[1:11, 1:11, 1:11] = True
    lumen = np.zeros(shape, bool)
    lumen[5, 5, 1:11] = True
    ring = np.zeros(shape, bool)
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        ring[5 + dx, 5 + dy, 1:11] = True
    ring[5, 5, 0] = ring[5, 5, 11] = True  # the ends (outside the brain anyway)
    target = np.where(brain, 0.3, 0.0)
    target[ring & brain] = 0.6
    target[lumen] = 0.9
    pred = np.where(brain, 0.2, 7.0)
    pred[ring & brain] = 99.0
    pred[lumen] = 0.5
    return pred, target, lumen, brain, ring


def test_contrast_recovery_matches_the_hand_computed_case():
    pred, target, lumen, brain, ring = _case()
    assert contrast_recovery(pred, target, lumen, brain) == pytest.approx(0.5)
    # margin 0 lets the rim into the background: (0.5 - mean_bg_pred) / (0.9 - mean_bg_target)
    bg = brain & ~lumen
    expect = (0.5 - pred[bg].mean()) / (0.9 - target[bg].mean())
    assert contrast_recovery(pred, target, lumen, brain, margin=0) == pytest.approx(expect)
    assert abs(expect - 0.5) > 0.1  # the margin matters in this case
    s = vessel_scores(pred, target, brain, lumen_mask=lumen)
    assert s["mask_source"] == "ground_truth" and s["contrast_recovery"] == pytest.approx(0.5)
    assert (s["lumen_pred"], s["lumen_target"], s["background_pred"], s["background_target"]) == \
        pytest.approx((0.5, 0.9, 0.2, 0.3))
    assert s["lumen_voxels"] == 10
    assert s["background_voxels"] == brain.sum() - 10 - 40  # lumen and its 4 face neighbours per slice


def test_perfect_prediction_recovers_one_and_a_flat_brain_zero_and_gain_scales():
    _, target, lumen, brain, _ = _case()
    assert contrast_recovery(target, target, lumen, brain) == pytest.approx(1.0)
    flat = np.where(brain, 0.27, 0.0)
    assert contrast_recovery(flat, target, lumen, brain) == pytest.approx(0.0, abs=1e-12)
    assert contrast_recovery(2.0 * target + 0.1, target, lumen, brain) == pytest.approx(2.0)
    inverted = np.where(brain, 0.3, 0.0) - (target - np.where(brain, 0.3, 0.0))
    assert contrast_recovery(inverted, target, lumen, brain) == pytest.approx(-1.0)


def test_vessel_psnr_matches_a_hand_computation():
    t = np.zeros((7, 7, 7))
    t[3, 3, 3] = 2.0  # the maximum -> data range 2
    p = t.copy()
    lumen = np.zeros(t.shape, bool)
    lumen[3, 3, 3] = True
    p[3, 3, 3] = 1.0        # error 1 on the lumen
    p[2, 3, 3] = 0.5        # error 0.5 on a face neighbour (inside the 1-voxel dilation)
    p[2, 2, 3] = 10.0       # an edge neighbour: outside a face-connected dilation, must not count
    # 7 voxels: squared errors 1 + 0.25 -> MSE 1.25 / 7
    expect = 10 * math.log10(2.0 ** 2 / (1.25 / 7))
    assert vessel_psnr(p, t, lumen, dilate_voxels=1) == pytest.approx(expect)
    assert vessel_psnr(p, t, lumen, dilate_voxels=0) == pytest.approx(10 * math.log10(4.0 / 1.0))
    assert vessel_psnr(t, t, lumen) == math.inf
    assert vessel_psnr(p, t, lumen, data_range=1.0) == pytest.approx(10 * math.log10(1.0 / (1.25 / 7)))


def test_bright_mask_takes_exactly_the_brightest_brain_voxels_with_ties_by_index():
    rng = np.random.default_rng(0)
    t = rng.uniform(size=(20, 20, 10))
    brain = np.zeros(t.shape, bool)
    brain[2:18, 2:18, :] = True
    t[0, 0, 0] = 50.0  # brightest of the volume but outside the brain: never picked
    m = bright_mask(t, brain, fraction=0.01)
    k = round(0.01 * brain.sum())
    assert m.sum() == k and not m[~brain].any() and not m[0, 0, 0]
    assert t[m].min() >= t[brain & ~m].max()
    # ties: a flat brain with 5 tied maxima, k = 3 -> the 3 lowest flat indices
    flat = np.zeros((10, 10, 3))
    tied = [(1, 1, 1), (2, 5, 0), (4, 4, 2), (7, 0, 1), (9, 9, 2)]
    for ijk in tied:
        flat[ijk] = 1.0
    m2 = bright_mask(flat, None, fraction=0.01)  # 300 voxels -> k = 3
    assert sorted(map(tuple, np.argwhere(m2))) == tied[:3]


def test_vessel_scores_without_ground_truth_uses_the_bright_mask_and_says_so():
    pred, target, lumen, brain, _ = _case()
    # the lumen is 10 of 1000 brain voxels, the brightest 1 %: the bright mask finds it exactly
    assert np.array_equal(bright_mask(target, brain, 0.01), lumen)
    s = vessel_scores(pred, target, brain, fraction=0.01)
    assert s["mask_source"] == "bright_target"
    assert s["contrast_recovery"] == pytest.approx(0.5)


def test_phantom_scores_use_the_one_lumen_and_exclude_any_lumen():
    _, target, lumen, brain, ring = _case()
    vf = np.zeros(target.shape, np.float32)
    vf[lumen] = 0.8
    vf[ring] = 0.05  # the outer partial-volume band: not lumen, not vessel-free either
    vf[2, 2, 2] = 0.09  # just under the lumen's 0.1
    assert np.array_equal(phantom_lumen(vf), lumen)
    pred = np.where(brain, 0.2, 0.0)
    pred[lumen] = 0.5
    pred[2, 2, 2] = 40.0  # a voxel with some lumen: out of the vessel-free brain (margin 0 would still drop it)
    s = phantom_vessel_scores(pred, target, vf, brain, margin=0)
    assert s["mask_source"] == "ground_truth"
    # the rim and (2,2,2) are excluded -> background is exactly 0.2 / 0.3
    assert s["background_pred"] == pytest.approx(0.2) and s["contrast_recovery"] == pytest.approx(0.5)
    # lumen outside the brain counts unless restricted: a lumen voxel outside the brain, predicted dark
    vf[0, 0, 0] = 0.9
    pred[0, 0, 0] = 0.2
    target[0, 0, 0] = 0.9
    full = phantom_vessel_scores(pred, target, vf, brain, margin=0)
    inside = phantom_vessel_scores(pred, target, vf, brain, margin=0, lumen_in_brain=True)
    assert full["lumen_voxels"] == 11 and inside["lumen_voxels"] == 10
    assert inside["contrast_recovery"] == pytest.approx(0.5)
    assert full["contrast_recovery"] == pytest.approx(((10 * 0.5 + 0.2) / 11 - 0.2) / (0.9 - 0.3))


def test_torch_inputs_are_accepted():
    pred, target, lumen, brain, _ = _case()
    r = contrast_recovery(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(lumen),
                          torch.from_numpy(brain))
    assert r == pytest.approx(0.5)


def test_bad_inputs_raise_clear_errors():
    pred, target, lumen, brain, _ = _case()
    with pytest.raises(ValueError, match="lumen mask is empty"):
        contrast_recovery(pred, target, np.zeros_like(lumen), brain)
    with pytest.raises(ValueError, match="same voxel grid"):
        contrast_recovery(pred, target, lumen[:-1], brain)
    with pytest.raises(ValueError, match="resample the prediction"):
        contrast_recovery(pred[:-1], target, lumen, brain)
    with pytest.raises(ValueError, match="no vessel-free brain voxel"):
        contrast_recovery(pred, target, lumen, lumen)
    with pytest.raises(ValueError, match="no vessel contrast to recover"):
        contrast_recovery(pred, np.where(brain, 0.3, 0.0), lumen, brain)
    with pytest.raises(ValueError, match="brain_mask is empty"):
        bright_mask(target, np.zeros_like(brain))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        bright_mask(target, brain, fraction=1.5)
    with pytest.raises(ValueError, match="vessel mask is empty"):
        vessel_psnr(pred, target, np.zeros_like(lumen))
    with pytest.raises(ValueError, match="one subject"):
        vessel_scores(pred[None, None], target[None, None])
    with pytest.raises(ValueError, match="NaN"):
        contrast_recovery(np.full(target.shape, np.nan), target, lumen, brain)
    assert vessel_free_brain(brain, lumen, 0).sum() == brain.sum() - lumen.sum()


def test_every_vessel_metric_uses_one_lumen_at_a_tenth_of_a_voxel():
    """One definition: the segmentation ground truth and the contrast score see the same voxels,
    f >= 0.1 (the edge included), and the contrast score's lumen really is that mask."""
    vf = np.array([0.0, 0.05, 0.0999, 0.1, 0.3, 0.5, 1.0], np.float32).reshape(1, 1, 7)
    assert LUMEN_MIN_FRACTION == 0.1
    assert phantom_lumen(vf).ravel().tolist() == [False, False, False, True, True, True, True]
    assert vessel_contrast.phantom_lumen is phantom_lumen  # no second definition
    from mmdm.engine import validation
    assert validation.phantom_lumen is phantom_lumen
    # the score's lumen: a prediction bright only on the 0.1-0.3 voxels recovers part of the contrast
    target = np.where(vf >= 0.1, 1.0, 0.2).astype(np.float32)
    brain = np.ones(vf.shape, bool)
    pred = np.where((vf >= 0.1) & (vf < 0.5), 1.0, 0.2).astype(np.float32)
    s = phantom_vessel_scores(pred, target, vf, brain, margin=0)
    assert s["lumen_voxels"] == 4 and s["lumen_target"] == pytest.approx(1.0)
    assert s["lumen_pred"] == pytest.approx((2 * 1.0 + 2 * 0.2) / 4)
