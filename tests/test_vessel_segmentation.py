"""Vessel segmentation and vessel-continuity metrics (mmdm/vessel_segmentation.py) on constructed cases and the phantom."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import dice as scipy_dice_dissimilarity
from skimage.morphology import skeletonize

from mmdm.config import ConfigError, from_dict, load_yaml, save_yaml, to_dict
from mmdm.vessel_segmentation import (
    VesselSegConfig,
    bin_key,
    centreline_samples,
    cldice,
    count_components,
    dice,
    evaluate_vessels,
    fit_segmentation,
    fragmentation,
    mip_dice,
    phantom_lumen,
    recovered_length_by_radius,
    segment_vessels,
)


def tube(shape, p0, p1, radius) -> np.ndarray:
    """Voxels whose centre lies within ``radius`` of the segment p0-p1 (voxel units)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    a, b = np.asarray(p0, float), np.asarray(p1, float)
    t = np.clip(((idx - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
    d = np.linalg.norm(idx - (a + t[..., None] * (b - a)), axis=-1)
    return d <= radius


def tree_mask(shape=(40, 24, 20)) -> np.ndarray:
    """A trunk with one branch."""
    return tube(shape, (3, 12, 10), (36, 12, 10), 2.0) | tube(shape, (20, 12, 10), (20, 3, 4), 1.2)


def vessel_volume(mask_big, mask_small, rng, contrast=(40.0, 20.0), noise=2.0) -> np.ndarray:
    """Tissue at ~50 with a smooth bias, two vessel contrasts and Gaussian noise."""
    shape = mask_big.shape
    x = np.linspace(-1, 1, shape[0])[:, None, None]
    vol = 50.0 * (1 + 0.15 * x) + np.zeros(shape)
    vol += contrast[0] * mask_big + contrast[1] * (mask_small & ~mask_big)
    return vol + rng.normal(0, noise, shape)


# --------------------------------------------------------------------------- overlap metrics


def test_perfect_prediction_scores_one():
    gt = tree_mask()
    assert cldice(gt, gt) == 1.0
    assert dice(gt, gt) == 1.0
    assert mip_dice(gt, gt) == 1.0
    frag = fragmentation(gt, gt)
    assert frag["components_pred"] == frag["components_gt"] == 1.0
    assert frag["component_ratio"] == 1.0
    assert frag["betti0_error"] == 0.0


def test_dice_matches_scipy_on_random_masks():
    rng = np.random.default_rng(3)
    p, g = rng.random((12, 10, 8)) < 0.3, rng.random((12, 10, 8)) < 0.4
    assert dice(p, g) == pytest.approx(1.0 - scipy_dice_dissimilarity(p.ravel(), g.ravel()))
    assert dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 4))) == 1.0  # documented empty convention


def test_broken_tube_lowers_cldice_and_adds_a_component():
    shape = (48, 16, 16)
    gt = tube(shape, (4, 8, 8), (43, 8, 8), 2.0)
    broken = gt.copy()
    broken[22:26] = False  # a 4-voxel gap in the middle
    score = cldice(broken, gt)
    # independent evaluation of the clDice formula with the same skeletons
    s_pred, s_gt = skeletonize(broken), skeletonize(gt)
    tprec = (s_pred & gt).sum() / s_pred.sum()
    tsens = (s_gt & broken).sum() / s_gt.sum()
    assert tprec == 1.0 and tsens < 1.0  # the broken prediction lies inside the truth but misses centreline
    assert score == pytest.approx(2 * tprec * tsens / (tprec + tsens))
    assert 0.8 < score < 0.98
    frag = fragmentation(broken, gt)
    assert frag["components_pred"] == frag["components_gt"] + 1
    assert frag["betti0_error"] == 1.0
    assert frag["component_ratio"] == 2.0


def test_mip_dice_ignores_depth_errors():
    gt = tube((30, 20, 20), (3, 10, 5), (26, 10, 5), 1.5)
    shifted = np.roll(gt, 8, axis=2)  # the same vessel 8 slices higher
    assert dice(shifted, gt) == 0.0
    assert mip_dice(shifted, gt) == 1.0


def test_fragmentation_ignores_components_below_min_size():
    gt = tube((30, 20, 20), (3, 10, 10), (26, 10, 10), 1.5)
    pred = gt.copy()
    pred[2, 2, 2] = pred[27, 17, 17] = True  # two isolated speckles
    pair = np.zeros_like(gt)
    pair[10, 2, 2:4] = True  # a 2-voxel speckle
    pred |= pair
    assert count_components(pred, min_size=1) == 4
    assert fragmentation(pred, gt, min_size=3)["components_pred"] == 1.0
    assert fragmentation(pred, gt, min_size=2)["components_pred"] == 2.0
    diagonal = np.zeros((5, 5, 5), bool)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = diagonal[3, 3, 3] = True  # corner neighbours: 26-connected
    assert count_components(diagonal, min_size=1) == 1


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="same voxel grid"):
        dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


# --------------------------------------------------------------------------- recovered length by radius


AFFINE = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -30], [0, 0, 2.0, -10], [0, 0, 0, 1]])
SHAPE = (30, 30, 10)


def hand_tree() -> dict:
    """Two-radius tree in the phantom's centreline JSON format (world mm), plus a virtual inlet."""
    small_pts = [[0.0, -10.0, 0.0], [0.0, 5.0, 0.0], [10.0, 15.0, 0.0]]
    return {
        "units": {"position": "mm (world, RAS)", "radius": "mm"},
        "root": 0,
        "nodes": [{"id": 0, "position_mm": [-20.0, -10.0, -80.0], "radius_mm": 1.2},
                  {"id": 1, "position_mm": [-20.0, -10.0, 0.0], "radius_mm": 1.2},
                  {"id": 2, "position_mm": [0.0, -10.0, 0.0], "radius_mm": 1.2},
                  {"id": 3, "position_mm": small_pts[-1], "radius_mm": 0.3}],
        "edges": [
            {"id": 1, "label": 0, "parent": 0, "children": [2], "start": 0, "end": 1, "radius_mm": 1.2,
             "kind": "virtual", "name": "inlet", "points_mm": [[-20.0, -10.0, -80.0], [-20.0, -10.0, 0.0]]},
            {"id": 2, "label": 2, "parent": 1, "children": [3], "start": 1, "end": 2, "radius_mm": 1.2,
             "kind": "trunk", "name": "big", "points_mm": [[-20.0, -10.0, 0.0], [0.0, -10.0, 0.0]]},
            {"id": 3, "label": 3, "parent": 2, "children": [], "start": 2, "end": 3, "radius_mm": 0.3,
             "kind": "grown", "name": "small", "points_mm": small_pts},
        ],
        "anastomoses": [],
    }


def rasterise(centerlines: dict) -> np.ndarray:
    """Mask of the voxels the rendered polylines pass through (dense sampling), dilated by one voxel."""
    mask = np.zeros(SHAPE, bool)
    for e in centerlines["edges"]:
        if e["kind"] == "virtual":
            continue
        pts = np.asarray(e["points_mm"])
        for a, b in zip(pts[:-1], pts[1:]):
            for t in np.linspace(0, 1, 2000):
                ijk = np.rint(((a + t * (b - a)) - AFFINE[:3, 3]) / 2.0).astype(int)
                mask[tuple(ijk)] = True
    return ndimage.binary_dilation(mask, np.ones((3, 3, 3), bool))


def test_centreline_samples_preserve_length_and_skip_virtual_edges():
    pts, lens, rads = centreline_samples(hand_tree(), step_mm=0.7)
    assert lens.sum() == pytest.approx(20.0 + 15.0 + 10.0 * math.sqrt(2.0))
    assert lens.max() <= 0.7 + 1e-12
    assert set(np.unique(rads)) == {0.3, 1.2}
    assert pts[:, 2].min() == 0.0  # nothing of the virtual inlet (z down to -80)


def test_recovered_length_by_radius():
    cl = hand_tree()
    bins = [0.0, 0.5, math.inf]
    small, big = bin_key(0.0, 0.5), bin_key(0.5, math.inf)
    assert (small, big) == ("length_r0-0.5", "length_r0.5-inf")
    full = rasterise(cl)
    assert recovered_length_by_radius(full, cl, AFFINE, bins) == {small: 1.0, big: 1.0}
    # the small vessel is missing beyond world y = 9 mm (voxel index 20): the last 6 sqrt(2) mm of its bend
    partial = full.copy()
    partial[:, 20:] = False
    out = recovered_length_by_radius(partial, cl, AFFINE, bins)
    expected = 1.0 - 6.0 * math.sqrt(2.0) / (15.0 + 10.0 * math.sqrt(2.0))
    assert out[small] == pytest.approx(expected, abs=0.03)
    assert out[big] == 1.0
    # outside the evaluation region (what the prediction was restricted to) nothing counts
    region = np.ones(SHAPE, bool)
    region[:, 20:] = False
    assert recovered_length_by_radius(partial, cl, AFFINE, bins, region=region) == {small: 1.0, big: 1.0}
    # no small vessel at all
    big_only = rasterise({**cl, "edges": cl["edges"][:2]})
    out = recovered_length_by_radius(big_only, cl, AFFINE, bins)
    assert out[small] < 0.15 and out[big] == 1.0  # only the junction region overlaps
    # an empty bin is NaN, not 0
    assert math.isnan(recovered_length_by_radius(full, cl, AFFINE, [0.0, 0.1, 0.5, math.inf])[bin_key(0.0, 0.1)])


# --------------------------------------------------------------------------- segmentation and fitting


def test_fit_uses_only_the_volumes_it_receives_and_maximises_their_dice():
    shape = (40, 24, 20)
    big = tube(shape, (3, 12, 10), (36, 12, 10), 2.0)
    small = tube(shape, (20, 12, 10), (20, 3, 4), 1.2)
    gt = big | small
    rng = np.random.default_rng(0)
    val = {f"sub-v{i}": vessel_volume(big, small, rng) for i in range(2)}
    test_volume = vessel_volume(big, small, rng, contrast=(12.0, 8.0))  # dim vessels: would pull the threshold down
    cfg = VesselSegConfig(background_size=7, fit_grid=[round(0.05 * k, 2) for k in range(1, 21)])
    fitted = fit_segmentation(val, {s: gt for s in val}, cfg)
    # brute force on the validation volumes only, through segment_vessels
    scores = [np.mean([dice(segment_vessels(v, dataclasses.replace(cfg, threshold=t)), gt) for v in val.values()])
              for t in cfg.fit_grid]
    assert fitted.threshold == cfg.fit_grid[int(np.argmax(scores))]
    assert fitted.fitted_dice == pytest.approx(max(scores))
    assert fitted.fitted_on == list(val) and cfg.fitted_on == []  # provenance recorded, input untouched
    # the test volume would have changed the fit, had it been passed
    with_test = fit_segmentation({**val, "sub-t": test_volume}, {s: gt for s in [*val, "sub-t"]}, cfg)
    assert with_test.threshold < fitted.threshold
    # evaluating a subject the threshold was fitted on is refused
    with pytest.raises(ValueError, match="fitted on sub-v0"):
        evaluate_vessels(val["sub-v0"], gt, fitted, subject="sub-v0")
    score = evaluate_vessels(vessel_volume(big, small, rng), gt, fitted, subject="sub-t")  # a fresh noise draw
    assert score["dice"] > 0.8 and score["cldice"] > 0.8


def test_segmentation_is_invariant_to_intensity_scale_and_respects_the_mask():
    shape = (40, 24, 20)
    big, small = tube(shape, (3, 12, 10), (36, 12, 10), 2.0), tube(shape, (20, 12, 10), (20, 3, 4), 1.2)
    vol = vessel_volume(big, small, np.random.default_rng(1))
    cfg = VesselSegConfig(background_size=7, threshold=0.2)
    seg = segment_vessels(vol, cfg)
    assert np.array_equal(seg, segment_vessels(vol * 3.7, cfg))
    mask = np.zeros(shape, bool)
    mask[:20] = True
    assert not segment_vessels(vol, cfg, mask)[20:].any()


def test_frangi_segmentation_recovers_a_tube():
    shape = (40, 24, 20)
    big, small = tube(shape, (3, 12, 10), (36, 12, 10), 2.0), tube(shape, (20, 12, 10), (20, 3, 4), 1.2)
    rng = np.random.default_rng(2)
    cfg = VesselSegConfig(method="frangi", sigmas=[1.0, 2.0], fit_grid=[round(0.05 * k, 2) for k in range(1, 21)])
    fitted = fit_segmentation([vessel_volume(big, small, rng)], [big | small], cfg)
    score = evaluate_vessels(vessel_volume(big, small, rng), big | small, fitted)
    assert score["cldice"] > 0.7 and score["dice"] > 0.5


def test_config_round_trip_and_errors(tmp_path):
    cfg = VesselSegConfig(method="sato", threshold=0.4, fitted_on=["sub-002"], fitted_dice=0.7)
    assert from_dict(VesselSegConfig, to_dict(cfg)) == cfg
    back = load_yaml(VesselSegConfig, save_yaml(cfg, tmp_path / "vessels.yaml"))
    assert back == cfg and back.radius_bins_mm[-1] == math.inf
    with pytest.raises(ValueError, match="choose one of"):
        VesselSegConfig(method="otsu")
    with pytest.raises(ConfigError, match="valid keys"):
        from_dict(VesselSegConfig, {"treshold": 0.2})
    with pytest.raises(ValueError, match="increasing"):
        VesselSegConfig(radius_bins_mm=[0.0, 1.0, 0.5])


# --------------------------------------------------------------------------- on the phantom


@pytest.fixture(scope="module")
def phantom_pair():
    from mmdm.data.phantom import generate_subject

    return generate_subject(0, "tiny"), generate_subject(1, "tiny")


def test_phantom_tof_segmentation_recovers_vessels_and_blur_lowers_it(phantom_pair):
    test_subj, val_subj = phantom_pair
    cfg = VesselSegConfig(background_size=3)  # wider than the widest vessel at the tiny profile's 4 mm voxels
    fitted = fit_segmentation({val_subj.id: val_subj.images["angio"]},
                              {val_subj.id: phantom_lumen(val_subj.vessel_fraction)}, cfg,
                              masks={val_subj.id: val_subj.brain_mask})
    gt = phantom_lumen(test_subj.vessel_fraction)
    args = dict(centerlines=test_subj.centerlines, affine=test_subj.affine, brain_mask=test_subj.brain_mask,
                subject=test_subj.id)
    sharp = evaluate_vessels(test_subj.images["angio"], gt, fitted, **args)
    blurred = evaluate_vessels(ndimage.gaussian_filter(test_subj.images["angio"], 1.5), gt, fitted, **args)
    assert sharp["cldice"] > 0.5
    assert blurred["cldice"] < sharp["cldice"] - 0.2
    assert blurred["dice"] < sharp["dice"]
    keys = [bin_key(lo, hi) for lo, hi in zip(fitted.radius_bins_mm[:-1], fitted.radius_bins_mm[1:])]
    assert set(sharp) == {"cldice", "dice", "mip_dice", "components_pred", "components_gt", "component_ratio",
                          "betti0_error", *keys}
    assert all(isinstance(v, float) for v in sharp.values())
    # at 4 mm voxels the large vessels are found, the smallest calibre is not
    assert sharp[keys[-1]] > 0.2 > sharp[keys[0]]
    assert blurred[keys[-1]] < sharp[keys[-1]]
