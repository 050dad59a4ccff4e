"""The region breakdown of a prediction's error (mmdm.regions), its record files and the book's views."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mmdm.regions import (BACKGROUND_THRESHOLD, MAX_SLICE_BANDING, PANEL_ESTIMATE, REGION_COLUMNS, central_slices,
                          panel_regions, region_errors, region_summary, slice_banding, slice_errors)
from mmdm.study.figures import draw_error_views, error_view, shared_error_limit, slice_profile_curves
from mmdm.study.records import REGIONS_MEASURED, figure_panels, load_regions, load_slice_errors


def head_volume(shape=(12, 10, 8)) -> np.ndarray:
    """A bright ellipsoid 'head' (0.5) in air (0), with one brighter voxel."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    t = np.where(x ** 2 + y ** 2 + z ** 2 < 0.7, 0.5, 0.0)
    t[shape[0] // 2, shape[1] // 2, shape[2] // 2] = 1.0
    return t


def test_central_half_of_the_stack():
    assert np.flatnonzero(central_slices(8)).tolist() == [2, 3, 4, 5]
    assert np.flatnonzero(central_slices(10)).tolist() == [2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="at least one slice"):
        central_slices(0)


def test_a_haze_in_the_air_is_a_background_bias_and_no_brain_error():
    t = head_volume()
    p = np.where(t < BACKGROUND_THRESHOLD, 0.12, t)  # the air painted at 0.12, the head exact
    r = region_errors(p, t)
    assert r["background_bias"] == pytest.approx(0.12)
    assert r["background_bright_share"] == 1.0
    assert math.isinf(r["psnr_brain"])
    assert r["psnr_background"] == pytest.approx(10 * math.log10(1 / 0.12 ** 2))
    # a haze below the 0.1 line is a bias, but no bright voxel
    r2 = region_errors(np.where(t < BACKGROUND_THRESHOLD, 0.08, t), t)
    assert r2["background_bright_share"] == 0.0 and r2["background_bias"] == pytest.approx(0.08)


def test_error_only_at_the_stack_ends_is_all_in_the_outer_half():
    t = head_volume()
    p = t.copy()
    p[:, :, [0, 7]] += 0.2
    r = region_errors(p, t)
    assert r["outer_error_share"] == pytest.approx(1.0)
    assert math.isinf(r["psnr_central"]) and math.isinf(r["central_minus_outer_psnr"])
    # outer half = 4 of 8 slices, two of them wrong by 0.2 everywhere: MSE 0.02
    assert r["psnr_outer"] == pytest.approx(10 * math.log10(1 / 0.02))


def test_brain_mask_replaces_the_head_when_given():
    t = head_volume()
    p = t + 0.1
    brain = np.zeros(t.shape, bool)
    brain[5:7, 4:6, 3:5] = True
    r = region_errors(p, t, brain)
    assert r["psnr_brain"] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="brain mask"):
        region_errors(p, t, brain[:-1])
    with pytest.raises(ValueError, match="one shape"):
        region_errors(p[:-1], t)


def test_slice_profile_matches_an_independent_per_slice_mse():
    rng = np.random.default_rng(0)
    t = head_volume()
    p = t + rng.normal(0, 0.05, t.shape) * np.arange(1, 9)[None, None, :]
    rows = slice_errors(p, t)
    assert [r["z"] for r in rows] == list(range(8))
    assert [r["position"] for r in rows] == pytest.approx([(z + 0.5) / 8 for z in range(8)])
    for r in rows:
        mse = float(np.mean((p[:, :, r["z"]] - t[:, :, r["z"]]) ** 2))
        assert r["mse"] == pytest.approx(mse) and r["psnr"] == pytest.approx(10 * math.log10(1 / mse))
    assert rows[-1]["psnr"] < rows[0]["psnr"]  # the noise grows along the stack


def textured_head(shape=(16, 14, 12), seed=0) -> np.ndarray:
    """The head of :func:`head_volume` with a random texture inside (0.3-0.7), air 0."""
    t = head_volume(shape)
    tex = np.random.default_rng(seed).uniform(0.3, 0.7, shape)
    return np.where(t > 0, tex, 0.0)


def test_slice_banding_is_one_for_the_target_and_any_rescaling_of_it():
    t = textured_head()
    assert slice_banding(t, t) == pytest.approx(1.0)
    assert slice_banding(0.6 * t, t) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2D or 3D"):
        slice_banding(t[:, :, :-1], t)
    assert math.isnan(slice_banding(np.zeros((6, 6, 6)), np.zeros((6, 6, 6))))  # no head


def test_slices_that_disagree_score_above_the_limit_and_in_plane_stripes_below_one():
    t = textured_head()
    head = t >= BACKGROUND_THRESHOLD
    sign_z = (-1.0) ** np.arange(t.shape[2])
    weak = slice_banding(t + 0.02 * sign_z * head, t)
    strong = slice_banding(t + 0.1 * sign_z * head, t)
    assert 1.0 < weak < strong and strong > MAX_SLICE_BANDING
    sign_x = (-1.0) ** np.arange(t.shape[0])[:, None, None]
    assert slice_banding(t + 0.1 * sign_x * head, t) < 1.0


def test_slice_banding_without_smoothing_matches_explicit_loops():
    rng = np.random.default_rng(3)
    t = textured_head((7, 6, 5), seed=1)
    p = t + rng.normal(0, 0.05, t.shape)
    head = t >= BACKGROUND_THRESHOLD

    def rough(v, axis):
        vals = []
        for idx in np.ndindex(*v.shape):
            i = idx[axis]
            if 0 < i < v.shape[axis] - 1 and head[idx]:
                lo, hi = list(idx), list(idx)
                lo[axis], hi[axis] = i - 1, i + 1
                vals.append(abs(v[idx] - (v[tuple(lo)] + v[tuple(hi)]) / 2))
        return np.mean(vals)

    expected = (rough(p, 2) / rough(t, 2)) / (np.mean([rough(p, 0), rough(p, 1)]) / np.mean([rough(t, 0), rough(t, 1)]))
    assert slice_banding(p, t, sigma=0.0) == pytest.approx(expected)


def test_panel_estimate_equals_the_volume_breakdown_of_a_volume_constant_across_x():
    t2 = head_volume((1, 10, 8))[0]
    t = np.repeat(t2[None], 12, axis=0)
    p = np.where(t < BACKGROUND_THRESHOLD, 0.07, t * 0.9)
    est = panel_regions(figure_panels(p.astype(np.float32), t))
    full = region_errors(p, t)
    for k in REGION_COLUMNS:  # panels are float16: agreement to its precision
        assert est["regions"][k] == pytest.approx(full[k], rel=2e-3, abs=2e-3), k
    assert len(est["slices"]) == 8


def test_region_summary_ignores_non_finite_values():
    rows = [dict.fromkeys(REGION_COLUMNS, 1.0), dict.fromkeys(REGION_COLUMNS, 3.0)]
    rows[1]["psnr_central"] = math.inf
    s = region_summary(rows)
    assert s["psnr_brain"] == 2.0 and s["psnr_central"] == 1.0


def write_record(root, name, t, p, with_regions: bool):
    rec = root / name
    rec.mkdir(parents=True)
    np.savez(rec / "panels.npz", subject=np.array("sub-001"), **figure_panels(p.astype(np.float32), t))
    if with_regions:
        pd.DataFrame([{"subject": "sub-001", **region_errors(p, t)}]).to_csv(rec / "regions.csv", index=False)
        pd.DataFrame([{"subject": "sub-001", **r} for r in slice_errors(p, t)]).to_csv(rec / "slice_errors.csv",
                                                                                      index=False)
    (rec / "summary.json").write_text(json.dumps({"method": "x"}))


def test_records_without_a_breakdown_are_estimated_from_their_panels_and_say_so(tmp_path):
    t = head_volume()
    write_record(tmp_path, "new", t, np.where(t < BACKGROUND_THRESHOLD, 0.2, t), True)
    write_record(tmp_path, "old", t, np.where(t < BACKGROUND_THRESHOLD, 0.2, t), False)
    (tmp_path / "unfinished").mkdir()
    reg = load_regions(tmp_path).set_index("run")
    assert sorted(reg.index) == ["new", "old"]
    assert reg.at["new", "source"] == REGIONS_MEASURED and reg.at["old", "source"] == PANEL_ESTIMATE
    assert reg.at["new", "background_bias"] == pytest.approx(0.2)
    assert reg.at["old", "background_bias"] == pytest.approx(0.2, rel=1e-3)
    sl = load_slice_errors(tmp_path)
    assert len(sl[sl.run == "new"]) == 8 and set(sl[sl.run == "old"].source) == {PANEL_ESTIMATE}


def test_clean_image_check_names_the_rows_over_a_limit_and_the_unmeasured_ones(tmp_path):
    from mmdm.study.tables import banding_sentence, clean_image_check

    t = textured_head()
    head = t >= BACKGROUND_THRESHOLD
    write_record(tmp_path, "pix2pix", t, 0.9 * t, True)  # clean
    write_record(tmp_path, "bbdm", t, np.where(head, t, 0.15), True)  # a haze of 0.15
    write_record(tmp_path, "mmdm-full", t, t + 0.1 * (-1.0) ** np.arange(t.shape[2]) * head, True)  # bands
    write_record(tmp_path, "mmdm-full-s1", t, 0.9 * t, True)  # its second seed is clean: the mean still bands
    write_record(tmp_path, "resvit", t, t, False)  # predates the breakdown: an estimate only
    write_record(tmp_path, "unest", t, 0.9 * t, True)
    reg = pd.read_csv(tmp_path / "unest" / "regions.csv").drop(columns=["slice_banding"])
    reg.to_csv(tmp_path / "unest" / "regions.csv", index=False)  # written before the banding column
    text = clean_image_check("table1", load_regions(tmp_path))
    over = text.split("Rows over a limit: ")[1].split(". ")[0]
    assert "BBDM" in over and "background bias = 0.15" in over and "share of background voxels above 0.1 = 1" in over
    mmdm = [p for p in over.split("; ") if p.startswith("MMDM")][0]
    assert "slice banding" in mmdm and "background" not in mmdm
    assert "Within every limit: Pix2Pix." in text
    unmeasured = text.split("Not measured on whole volumes: ")[1]
    assert "ResViT" in unmeasured and "UNest (slice banding not measured)" in unmeasured and "RDDM" in unmeasured
    assert load_regions(tmp_path).set_index("run")["slice_banding"].isna()["unest"]
    sentence = banding_sentence("table1", load_regions(tmp_path))
    assert "Pix2Pix 1.00," in sentence
    expected = np.mean([slice_banding(t + 0.1 * (-1.0) ** np.arange(t.shape[2]) * head, t), 1.0])
    assert f"MMDM {expected:.2f} (banding)" in sentence  # seeds 0 and 1 averaged
    assert sentence.split("Not measured on whole volumes: ")[1].rstrip(".").split(", ") == ["DDPM", "ResViT", "UNest", "RDDM"]
    # the region table shows the same means as the check: over the test subjects and seeds of each row
    from mmdm.study.tables import REGION_GROUPS, region_table

    tab = region_table("table1", load_regions(tmp_path), columns=REGION_GROUPS["haze"])
    assert tab.loc["MMDM (ours in the paper)", "n"] == "1x2"
    assert tab.loc["MMDM (ours in the paper)", "slice banding (x target)"].startswith(f"{expected:.2f} ± ")
    assert tab.loc["Pix2Pix", "n"] == "1" and tab.loc["RDDM", "n"] == "0"


def test_slice_profile_bins_pool_subjects_by_position():
    df = pd.DataFrame({"run": "a", "source": "whole volume", "subject": ["s1"] * 4 + ["s2"] * 2,
                       "position": [0.1, 0.3, 0.6, 0.9, 0.2, 0.8], "mse": [0.01, 0.02, 0.03, 0.04, 0.03, 0.06]})
    c = slice_profile_curves(df, bins=2).set_index("position")
    assert c.at[0.25, "mse"] == pytest.approx(0.02) and c.at[0.75, "mse"] == pytest.approx(np.mean([0.03, 0.04, 0.06]))
    assert c.at[0.25, "n_subjects"] == 2
    assert c.at[0.75, "psnr"] == pytest.approx(10 * math.log10(1 / c.at[0.75, "mse"]))


def test_error_views_fall_back_to_the_coronal_mips_and_share_one_symmetric_scale():
    t = head_volume()
    panels = figure_panels((t + 0.1).astype(np.float32), t)
    err, what = error_view(panels, "coronal")
    assert what == "mid-coronal slice" and np.allclose(err, 0.1, atol=1e-3)
    old = {k: v for k, v in panels.items() if not k.endswith("_coronal")}
    err_old, what_old = error_view(old, "coronal")
    assert "MIP" in what_old and err_old.shape == panels["pred_coronal_mip"].shape
    with pytest.raises(ValueError, match="unknown error view"):
        error_view(panels, "axial")
    # one failing method does not set the scale
    assert shared_error_limit([np.full((4, 4), 0.1), np.full((4, 4), -0.1), np.full((4, 4), 5.0)]) == pytest.approx(0.1)
    import matplotlib
    matplotlib.use("Agg")
    fig, lim = draw_error_views({"A": panels, "B": old}, "coronal", limit=0.3)
    ims = [ax.images[0] for ax in fig.axes if ax.images]
    assert lim == 0.3 and len(ims) == 2 and all(im.get_clim() == (-0.3, 0.3) for im in ims)


def test_export_keeps_the_region_files_and_the_coronal_slice(tmp_path):
    from test_vessel_record import _fake_run

    from mmdm.study.records import export_record

    run = _fake_run(tmp_path, "mmdm-full", None)
    (run / "regions.csv").write_text("subject,background_bias\nsub-001,0.25\n")
    (run / "slice_errors.csv").write_text("subject,z,position,mse\nsub-001,0,0.0625,0.01\n")
    rec = export_record(run, tmp_path / "results" / "mmdm-full")
    assert (rec / "regions.csv").read_text() == (run / "regions.csv").read_text()
    assert (rec / "slice_errors.csv").read_text() == (run / "slice_errors.csv").read_text()
    with np.load(rec / "panels.npz") as z:
        # the prediction is target / max: the coronal error is zero to float16 precision
        assert z["pred_coronal"].shape == z["target_coronal"].shape == (12, 8)
        assert np.abs(z["pred_coronal"].astype(np.float32) - z["target_coronal"]).max() < 1e-3
