"""Image-quality metrics (mmdm/metrics.py) against scikit-image and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mmdm import metrics as M
from mmdm.config import ConfigError, from_dict, to_dict
from mmdm.io import save_nifti

TOL = 1e-6
WANG = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def structured_volume(shape=(30, 34, 24), seed=0) -> np.ndarray:
    """Smooth blobs + bright thin tubes + noise: a crude TOF-MRA-like volume."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    vol = np.zeros(shape)
    for _ in range(4):  # smooth tissue blobs
        c = [rng.uniform(0, n) for n in shape]
        r2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
        vol += rng.uniform(0.2, 0.4) * np.exp(-r2 / (2 * rng.uniform(3, 6) ** 2))
    x, y, z = grids
    for _ in range(3):  # thin bright tubes winding along the axial axis
        cx = rng.uniform(5, shape[0] - 5) + 3 * np.sin(z / rng.uniform(4, 8))
        cy = rng.uniform(5, shape[1] - 5) + 3 * np.cos(z / rng.uniform(4, 8))
        vol += rng.uniform(1.5, 2.5) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.7 ** 2))
    vol += 0.02 * rng.standard_normal(shape)
    return np.abs(vol) * 300.0  # raw scanner-like units


def degrade(vol: np.ndarray, seed=1) -> np.ndarray:
    """A plausible prediction: slightly scaled, shifted, noisy."""
    rng = np.random.default_rng(seed)
    out = 0.9 * np.roll(vol, 1, axis=0) + 0.1 * vol
    return out + 0.03 * vol.max() * rng.standard_normal(vol.shape)


def random_pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.random(shape)
    return t + 0.2 * rng.standard_normal(shape), t


PAIRS = {
    "random3d": lambda: random_pair((20, 23, 17)),
    "structured3d": lambda: (lambda t: (degrade(t), t))(structured_volume()),
    "random2d": lambda: random_pair((40, 37), seed=3),
    "structured2d": lambda: (lambda t: (degrade(t)[:, :, 12], t[:, :, 12]))(structured_volume()),
}


def scaled(pred, target):
    m = target.max()
    return pred / m, target / m


# ---------------------------------------------------------------- agreement with scikit-image


@pytest.mark.parametrize("case", sorted(PAIRS))
def test_psnr_matches_skimage(case):
    p, t = scaled(*PAIRS[case]())
    assert abs(M.psnr(p, t) - peak_signal_noise_ratio(t, p, data_range=1.0)) < TOL


@pytest.mark.parametrize("case", sorted(PAIRS))
@pytest.mark.parametrize("variant", ["uniform7", "uniform5", "gaussian"])
def test_ssim_matches_skimage(case, variant):
    p, t = scaled(*PAIRS[case]())
    if variant == "gaussian":
        ours = M.ssim(p, t, gaussian=True)
        ref = structural_similarity(p, t, data_range=1.0, **WANG)
    else:
        win = int(variant[-1])
        ours = M.ssim(p, t, win_size=win)
        ref = structural_similarity(p, t, data_range=1.0, win_size=win)
    assert abs(ours - ref) < TOL


def test_default_window_is_skimage_default():
    p, t = scaled(*PAIRS["structured3d"]())
    assert abs(M.ssim(p, t) - structural_similarity(p, t, data_range=1.0)) < TOL
    assert abs(M.ssim(p, t) - M.ssim(p, t, win_size=5)) > 1e-4  # the window matters


@pytest.mark.parametrize("gaussian", [False, True])
def test_evaluate_volumes_matches_skimage_on_volume_and_mip(gaussian):
    pred, target = PAIRS["structured3d"]()
    extra = WANG if gaussian else {}
    got = M.evaluate_volumes(pred, target, gaussian=gaussian)
    assert list(got) == list(M.METRIC_KEYS) and all(type(v) is float for v in got.values())

    p, t = pred / target.max(), target / target.max()
    mp_raw, mt_raw = pred.max(axis=-1), target.max(axis=-1)
    mp, mt = mp_raw / mt_raw.max(), mt_raw / mt_raw.max()
    ref = {
        "psnr": peak_signal_noise_ratio(t, p, data_range=1.0),
        "ssim": structural_similarity(p, t, data_range=1.0, **extra),
        "rmse": 100 * np.sqrt(np.mean((p - t) ** 2)),
        "mip_psnr": peak_signal_noise_ratio(mt, mp, data_range=1.0),
        "mip_ssim": structural_similarity(mp, mt, data_range=1.0, **extra),
        "mip_rmse": 100 * np.sqrt(np.mean((mp - mt) ** 2)),
    }
    for key in M.METRIC_KEYS:
        assert abs(got[key] - ref[key]) < TOL, key


def test_per_slice_ssim_is_mean_of_2d_slices():
    pred, target = PAIRS["structured3d"]()
    p, t = scaled(pred, target)
    ref = np.mean([structural_similarity(p[:, :, k], t[:, :, k], data_range=1.0) for k in range(t.shape[2])])
    assert abs(M.ssim_per_slice(p, t) - ref) < TOL
    got = M.evaluate_volumes(pred, target, per_slice_ssim=True)
    assert abs(got["ssim"] - ref) < TOL
    assert abs(got["ssim"] - M.evaluate_volumes(pred, target)["ssim"]) > 1e-4  # 2D != 3D


@pytest.mark.parametrize("planes", [1, 2, 5, 6, 7, 13])
def test_slab_streaming_gives_the_same_result(monkeypatch, planes):
    """The SSIM is computed in slabs along axis 0; any slab size must give the same numbers."""
    pred, target = PAIRS["structured3d"]()
    mask = brain_mask(target.shape)
    p, t = scaled(pred, target)
    ref_map = M.ssim_map(p, t, gaussian=True)
    ref = [M.evaluate_volumes(pred, target, mask, per_slice_ssim=s) for s in (False, True)]
    plane = int(np.prod(target.shape[1:]))
    monkeypatch.setitem(M.CHUNK_VOXELS, "cpu", planes * plane)
    monkeypatch.setattr(M, "MIN_STREAM_PLANE", 1)
    calls = []
    orig = M._ssim_from_moments
    monkeypatch.setattr(M, "_ssim_from_moments", lambda *a: calls.append(1) or orig(*a))
    assert torch.equal(M.ssim_map(p, t, gaussian=True), ref_map)
    assert len(calls) == ref_map.shape[0]  # really streamed: one SSIM evaluation per output plane
    for s, r in zip((False, True), ref):
        assert M.evaluate_volumes(pred, target, mask, per_slice_ssim=s) == pytest.approx(r, rel=0, abs=1e-12)
    assert abs(M.ssim(p, t) - structural_similarity(p, t, data_range=1.0)) < TOL
    _, full = structural_similarity(p, t, data_range=1.0, full=True, **WANG)
    np.testing.assert_allclose(ref_map.numpy(), full[5:-5, 5:-5, 5:-5], rtol=0, atol=1e-12)


def test_float32_and_torch_inputs_give_the_float64_result():
    pred, target = PAIRS["structured3d"]()
    ref = M.evaluate_volumes(pred, target)
    as_torch = M.evaluate_volumes(torch.from_numpy(pred), torch.from_numpy(target))
    assert as_torch == pytest.approx(ref, rel=0, abs=1e-12)
    flipped = M.evaluate_volumes(pred[::-1, ::-1], target[::-1, ::-1])  # negative-stride views
    ref_flipped = M.evaluate_volumes(np.ascontiguousarray(pred[::-1, ::-1]), np.ascontiguousarray(target[::-1, ::-1]))
    assert flipped == ref_flipped
    p32, t32 = pred.astype(np.float32), target.astype(np.float32)
    got32 = M.evaluate_volumes(p32, t32)
    ref32 = M.evaluate_volumes(p32.astype(np.float64), t32.astype(np.float64))
    assert got32 == pytest.approx(ref32, rel=0, abs=1e-12)


def test_torch_thread_setting_is_restored(monkeypatch):
    pred, target = PAIRS["random3d"]()
    old = torch.get_num_threads()
    seen = []
    orig = M._ssim_mean
    monkeypatch.setattr(M, "_ssim_mean", lambda *a, **k: seen.append(torch.get_num_threads()) or orig(*a, **k))
    try:
        torch.set_num_threads(2)
        M.evaluate_volumes(pred, target)
        assert seen == [M.CPU_THREADS, M.CPU_THREADS] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    pred, target = PAIRS["structured3d"]()
    ref = M.evaluate_volumes(pred, target, gaussian=True)
    got = M.evaluate_volumes(pred, target, gaussian=True, device="cuda")
    assert got == pytest.approx(ref, rel=0, abs=1e-9)


# ---------------------------------------------------------------- RMSE, PSNR, identity


def test_rmse_against_numpy_and_psnr_consistency():
    pred, target = PAIRS["structured3d"]()
    p, t = scaled(pred, target)
    rmse = M.rmse_percent(p, t)
    assert abs(rmse - 100 * np.sqrt(np.mean((p - t) ** 2))) < 1e-9
    assert abs(M.psnr(p, t) + 20 * math.log10(rmse / 100)) < 1e-9
    # data_range enters as PSNR + 20 log10(r) and RMSE / r
    assert abs(M.psnr(p, t, data_range=2.0) - M.psnr(p, t) - 20 * math.log10(2)) < 1e-9
    assert abs(M.rmse_percent(p, t, data_range=2.0) - rmse / 2) < 1e-9


def test_identical_inputs():
    t = structured_volume()
    got = M.evaluate_volumes(t, t.copy())
    assert got["psnr"] == math.inf and got["mip_psnr"] == math.inf
    assert got["rmse"] == 0.0 and got["mip_rmse"] == 0.0
    assert abs(got["ssim"] - 1.0) < 1e-12 and abs(got["mip_ssim"] - 1.0) < 1e-12
    assert abs(M.ssim(t / t.max(), t / t.max(), gaussian=True) - 1.0) < 1e-12


def test_metrics_invariant_to_common_intensity_scale():
    pred, target = PAIRS["structured3d"]()
    a = M.evaluate_volumes(pred, target)
    b = M.evaluate_volumes(pred * 7.3, target * 7.3)
    assert b == pytest.approx(a, rel=1e-10)


# ---------------------------------------------------------------- scaling and MIP


def test_scale_pair_divides_by_gt_max_and_clips_only_on_request():
    pred, target = PAIRS["structured3d"]()
    pred = pred * 1.5  # overshoot
    p, t = M.scale_pair(pred, target)
    assert isinstance(p, torch.Tensor) and p.dtype == torch.float64
    assert float(t.max()) == 1.0
    np.testing.assert_allclose(p.numpy(), pred / target.max(), rtol=1e-15)
    assert float(p.max()) > 1.0 and float(p.min()) < 0.0  # not clipped by default
    pc, _ = M.scale_pair(pred, target, clip=True)
    np.testing.assert_allclose(pc.numpy(), np.clip(pred / target.max(), 0, 1), rtol=1e-15)
    clipped = M.evaluate_volumes(pred, target, clip=True)
    unclipped = M.evaluate_volumes(pred, target)
    assert clipped["rmse"] < unclipped["rmse"] and clipped["mip_rmse"] < unclipped["mip_rmse"]
    # the clipped MIP path against numpy: MIP of the raw volumes, gt-MIP-max scaling, then clip
    mt = target.max(axis=-1)
    for clip, got in ((True, clipped), (False, unclipped)):
        mp = pred.max(axis=-1) / mt.max()
        mp = np.clip(mp, 0, 1) if clip else mp
        assert abs(got["mip_rmse"] - 100 * np.sqrt(np.mean((mp - mt / mt.max()) ** 2))) < TOL
        assert abs(got["mip_ssim"] - structural_similarity(mp, mt / mt.max(), data_range=1.0)) < TOL


def test_axial_mip_is_max_over_last_axis():
    vol = structured_volume()
    mip = M.axial_mip(vol)
    assert isinstance(mip, np.ndarray) and mip.shape == vol.shape[:2]
    np.testing.assert_array_equal(mip, np.max(vol, axis=2))
    tmip = M.axial_mip(torch.from_numpy(vol))
    assert isinstance(tmip, torch.Tensor)
    np.testing.assert_array_equal(tmip.numpy(), mip)
    assert mip.max() == vol.max()  # the gt MIP max is the gt volume max
    with pytest.raises(ValueError, match="expects an \\(X, Y, Z\\) volume"):
        M.axial_mip(vol[:, :, 0])


# ---------------------------------------------------------------- mask


def brain_mask(shape):
    grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    return sum((g / (0.4 * n)) ** 2 for g, n in zip(grids, shape)) <= 1.0


def test_mask_metrics_only_see_mask_voxels():
    pred, target = PAIRS["structured3d"]()
    mask = brain_mask(target.shape)
    base = M.evaluate_volumes(pred, target, mask)
    rng = np.random.default_rng(5)
    pred2, target2 = pred.copy(), target.copy()
    pred2[~mask] = rng.normal(0, 5 * target.max(), size=(~mask).sum())
    target2[~mask] = rng.uniform(0, 3 * target.max(), size=(~mask).sum())  # brighter than anything inside
    assert M.evaluate_volumes(pred2, target2, mask) == pytest.approx(base, rel=1e-12)
    ps, ts = M.scale_pair(pred, target2, mask=mask)  # scale = gt max inside the mask
    assert float(ts[torch.from_numpy(mask)].max()) == 1.0 and float(ts.max()) > 1.0
    np.testing.assert_allclose(ps.numpy(), pred / target[mask].max(), rtol=1e-15)
    p, t = scaled(pred, target)
    assert M.psnr(p, t, mask=mask) == M.psnr(np.where(mask, p, 100.0), t, mask=mask)
    assert M.rmse_percent(p, t, mask=mask) == M.rmse_percent(np.where(mask, p, 100.0), t, mask=mask)
    # ... while a change inside the mask does show
    pred3 = pred.copy()
    pred3[mask] += 0.05 * target.max()
    changed = M.evaluate_volumes(pred3, target, mask)
    assert changed["psnr"] < base["psnr"] and changed["mip_psnr"] < base["mip_psnr"]


def test_mask_values_against_independent_computation():
    pred, target = PAIRS["structured3d"]()
    mask = brain_mask(target.shape)
    peak = target[mask].max()
    p, t = np.where(mask, pred, 0) / peak, np.where(mask, target, 0) / peak
    got = M.evaluate_volumes(pred, target, mask)
    assert abs(got["psnr"] - peak_signal_noise_ratio(t[mask], p[mask], data_range=1.0)) < TOL
    assert abs(got["rmse"] - 100 * np.sqrt(np.mean((p[mask] - t[mask]) ** 2))) < TOL
    _, smap = structural_similarity(p, t, data_range=1.0, full=True)
    valid = np.zeros_like(mask)
    valid[3:-3, 3:-3, 3:-3] = True
    assert abs(got["ssim"] - smap[mask & valid].mean()) < TOL
    mmask = mask.any(axis=-1)
    mp, mt = p.max(axis=-1), t.max(axis=-1)  # already on the gt-MIP-max scale
    assert mt.max() == 1.0
    assert abs(got["mip_psnr"] - peak_signal_noise_ratio(mt[mmask], mp[mmask], data_range=1.0)) < TOL
    _, smap2 = structural_similarity(mp, mt, data_range=1.0, full=True)
    mvalid = np.zeros_like(mmask)
    mvalid[3:-3, 3:-3] = True
    assert abs(got["mip_ssim"] - smap2[mmask & mvalid].mean()) < TOL


def test_per_slice_ssim_with_mask():
    pred, target = PAIRS["structured3d"]()
    mask = brain_mask(target.shape)
    p, t = scaled(pred, target)
    vals = []
    for k in range(t.shape[2]):
        _, smap = structural_similarity(p[:, :, k], t[:, :, k], data_range=1.0, full=True)
        m = mask[3:-3, 3:-3, k]
        if m.any():
            vals.append(smap[3:-3, 3:-3][m].mean())
    assert abs(M.ssim_per_slice(p, t, mask=mask) - np.mean(vals)) < TOL


# ---------------------------------------------------------------- errors


def test_error_messages():
    pred, target = PAIRS["random3d"]()
    with pytest.raises(ValueError, match="all zero"):
        M.evaluate_volumes(pred, np.zeros_like(target))
    with pytest.raises(ValueError, match=r"shape \(20, 23, 17\).*shape \(20, 23, 16\).*resample"):
        M.evaluate_volumes(pred, target[..., :16])
    with pytest.raises(ValueError, match="smaller than the 7-voxel SSIM window along axis 2"):
        M.ssim(pred[:, :, :5], target[:, :, :5])
    with pytest.raises(ValueError, match="smaller than the 11-voxel"):
        M.ssim(pred[:10, :10, :10], target[:10, :10, :10], gaussian=True)
    bad = pred.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="pred contains 1 NaN"):
        M.evaluate_volumes(bad, target)
    with pytest.raises(ValueError, match="target contains 1 NaN"):
        M.psnr(pred, np.where(np.isnan(bad), np.nan, target))
    with pytest.raises(ValueError, match="odd integer"):
        M.ssim(pred, target, win_size=6)
    with pytest.raises(ValueError, match="Leave win_size=None"):
        M.ssim(pred, target, win_size=7, gaussian=True)
    with pytest.raises(ValueError, match="mask is empty"):
        M.evaluate_volumes(pred, target, np.zeros(target.shape, bool))
    with pytest.raises(ValueError, match="mask has shape"):
        M.psnr(pred, target, mask=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="pred is empty"):
        M.psnr(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="data_range must be a positive finite number, got 0.0"):
        M.psnr(pred, target, data_range=0)


def test_metrics_config_round_trip():
    cfg = from_dict(M.MetricsConfig, {"gaussian": True, "per_slice_ssim": True})
    assert from_dict(M.MetricsConfig, to_dict(cfg)) == cfg
    pred, target = PAIRS["structured3d"]()
    assert M.evaluate_volumes(pred, target, **to_dict(cfg)) == M.evaluate_volumes(
        pred, target, per_slice_ssim=True, gaussian=True)
    with pytest.raises(ConfigError, match="valid keys"):
        from_dict(M.MetricsConfig, {"gausian": True})


# ---------------------------------------------------------------- files


def _affine(shift=0.0):
    a = np.diag([0.65, 0.625, 0.625, 1.0])
    a[:3, 3] = [-90.0 + shift, -100.0, -60.0]
    return a


def test_evaluate_files(tmp_path):
    pred, target = PAIRS["structured3d"]()
    mask = brain_mask(target.shape)
    save_nifti(tmp_path / "pred.nii.gz", pred, _affine())
    save_nifti(tmp_path / "gt.nii.gz", target, _affine())
    save_nifti(tmp_path / "mask.nii.gz", mask, _affine(), dtype=np.uint8)
    p32, t32 = pred.astype(np.float32), target.astype(np.float32)
    got = M.evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "gt.nii.gz")
    assert got == pytest.approx(M.evaluate_volumes(p32, t32), rel=0, abs=1e-12)
    got_m = M.evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "gt.nii.gz", tmp_path / "mask.nii.gz",
                             gaussian=True)
    assert got_m == pytest.approx(M.evaluate_volumes(p32, t32, mask, gaussian=True), rel=0, abs=1e-12)


def test_evaluate_files_rejects_mismatched_grids(tmp_path):
    pred, target = PAIRS["structured3d"]()
    save_nifti(tmp_path / "gt.nii.gz", target, _affine())
    save_nifti(tmp_path / "short.nii.gz", pred[:, :, :-2], _affine())
    save_nifti(tmp_path / "moved.nii.gz", pred, _affine(shift=1.3))
    with pytest.raises(ValueError, match=r"short\.nii\.gz.*\(30, 34, 22\).*gt\.nii\.gz.*\(30, 34, 24\).*Resample"):
        M.evaluate_files(tmp_path / "short.nii.gz", tmp_path / "gt.nii.gz")
    with pytest.raises(ValueError, match=r"affine mismatch.*moved\.nii\.gz.*-88\.7.*gt\.nii\.gz.*-90\..*resample"):
        M.evaluate_files(tmp_path / "moved.nii.gz", tmp_path / "gt.nii.gz")
    save_nifti(tmp_path / "mask.nii.gz", np.ones((4, 4, 4)), _affine(), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"mask .*mask\.nii\.gz.*\(4, 4, 4\)"):
        M.evaluate_files(tmp_path / "gt.nii.gz", tmp_path / "gt.nii.gz", tmp_path / "mask.nii.gz")


def test_evaluate_cli_reports_damaged_files_and_counts_nan_voxels_in_the_file(tmp_path, capsys):
    """A truncated or non-NIfTI file is one line; a target with one NaN voxel reports one NaN voxel
    (not every voxel, as scaling by a NaN maximum would)."""
    import gzip

    from mmdm.cli import main as mmdm_main
    from mmdm.io import tof_fraction_descrip

    rng = np.random.default_rng(0)
    gt = rng.random((8, 8, 8)).astype(np.float32)
    save_nifti(tmp_path / "gt.nii.gz", gt, np.eye(4))
    save_nifti(tmp_path / "pred.nii.gz", gt * 0.9, np.eye(4), descrip=tof_fraction_descrip(1.0))
    raw = (tmp_path / "gt.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"not an image at all" * 40))
    (tmp_path / "plain.nii").write_text("hello")
    bad = gt.copy()
    bad[1, 2, 3] = np.nan
    save_nifti(tmp_path / "nan.nii.gz", bad, np.eye(4))
    for pred, target, msg in (("cut.nii.gz", "gt.nii.gz", "prediction file"), ("pred.nii.gz", "text.nii.gz",
                                                                                "target file"),
                              ("plain.nii", "gt.nii.gz", "not a readable NIfTI"),
                              ("pred.nii.gz", "nan.nii.gz", "contains 1 NaN and 0 infinite voxel(s) out of 512")):
        code = mmdm_main(["evaluate", "--pred", str(tmp_path / pred), "--target", str(tmp_path / target)])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (pred, target, err)
