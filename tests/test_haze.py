"""The haze measures (background bias, slice profile, banding, window aggregation), the rule that
judges a haze sweep, and the two options they led to: air-centred crops and the residual fusion."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mmdm.config import ConfigError
from mmdm.data.crops import CropConfig, CropSampler
from mmdm.methods import build_method
from mmdm.study.haze import (aggregated_slice_bias, background_stats, banding, central_slices, channel_bias,
                             haze_summary, sampler_trace, select_points, slice_profile, x0_bias_by_timestep)
from mmdm.study.sweep import SWEEPS, point_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _head(shape=(12, 10, 8)) -> np.ndarray:
    """A box of tissue (0.5) in air (0), the air covering whole end slices."""
    t = np.zeros(shape)
    t[3:9, 2:8, 2:6] = 0.5
    return t


def test_background_stats_match_a_direct_count():
    t = _head()
    p = t.copy()
    air = t < 0.05
    p[air] = 0.03
    idx = np.flatnonzero(air)[:17]
    p.flat[idx] = 0.4  # 17 hazy air voxels
    s = background_stats(p, t)
    assert s["voxels"] == air.sum()
    assert s["bias"] == pytest.approx((0.03 * (air.sum() - 17) + 0.4 * 17) / air.sum())
    assert s["hazy"] == pytest.approx(17 / air.sum())
    assert math.isnan(background_stats(np.ones((2, 2, 2)), np.ones((2, 2, 2)))["bias"])


@pytest.mark.parametrize("depth,share", [(8, 0.5), (7, 0.5), (91, 0.5), (10, 1.0), (5, 0.2)])
def test_central_slices_are_a_centred_block_of_the_share(depth, share):
    c = central_slices(depth, share)
    idx = np.flatnonzero(c)
    assert idx.size == max(1, round(depth * share))
    assert np.all(np.diff(idx) == 1)  # one block
    assert abs(idx[0] - (depth - 1 - idx[-1])) <= 1  # as many outer slices on each side, within one


def test_outer_error_share_and_regional_psnr():
    t = _head((12, 10, 8))
    p = t.copy()
    p[:, :, [0, 7]] += 0.2  # error in the two end slices only
    p[:, :, 4] += 0.01
    s = haze_summary(p, t)
    central = central_slices(8)
    assert not central[0] and not central[7] and central[4]
    sse_outer = 2 * 120 * 0.04
    sse_central = 120 * 1e-4
    assert s["outer_error_share"] == pytest.approx(sse_outer / (sse_outer + sse_central))
    assert s["psnr_outer"] == pytest.approx(10 * np.log10(1 / (sse_outer / (120 * 4))))
    assert s["psnr_central"] > s["psnr_outer"]


def test_slice_profile_gives_per_slice_error_and_background_bias():
    t = _head()
    p = t + np.linspace(0, 0.07, 8)[None, None, :]  # bias grows with z
    prof = slice_profile(p, t)
    assert list(prof["z"]) == list(range(8)) and prof["position"].iloc[-1] == 1.0
    np.testing.assert_allclose(prof["background_bias"], np.linspace(0, 0.07, 8))
    np.testing.assert_allclose(prof["mse"], np.linspace(0, 0.07, 8) ** 2)
    full = np.full((4, 4, 3), 0.5)  # no background anywhere: NaN bias
    assert prof.shape[0] == 8 and slice_profile(full, full)["background_bias"].isna().all()


def test_banding_is_zero_for_smooth_profiles_and_twice_the_amplitude_for_alternation():
    assert banding(np.linspace(0.0, 1.0, 9)) == pytest.approx(0.0)
    assert banding(np.full(9, 0.3)) == pytest.approx(0.0)
    a = 0.02
    assert banding(a * (-1.0) ** np.arange(10)) == pytest.approx(2 * a)
    assert math.isnan(banding([0.1, 0.2]))


def test_channel_bias_recovers_a_per_position_offset():
    rng = np.random.default_rng(0)
    t = np.zeros((6, 5, 8, 8))
    t[:, :, 2:6, 2:6] = rng.uniform(0.2, 0.9, (6, 5, 4, 4))
    offsets = np.array([0.05, 0.0, -0.01, 0.02, 0.08])
    p = t + offsets[None, :, None, None]
    np.testing.assert_allclose(channel_bias(p, t), offsets, atol=1e-12)
    with pytest.raises(ValueError, match="N, K, H, W"):
        channel_bias(p[0], t[0])


def test_sliding_window_mean_flattens_a_position_bias_at_stride_1_but_not_at_stride_2():
    b = np.array([0.10, 0.02, 0.0, 0.02, 0.10])  # the edges of the window are worse
    depth, k = 40, 5
    s1 = aggregated_slice_bias(b, depth, 1)
    np.testing.assert_allclose(s1[k - 1:depth - k + 1], b.mean())  # every interior slice sees all positions
    s2 = aggregated_slice_bias(b, depth, 2)
    interior = s2[k:depth - k]
    # stride 2: even slices average positions (0, 2, 4), odd ones (1, 3): period 2
    assert set(np.round(interior, 12)) == {round((b[0] + b[2] + b[4]) / 3, 12), round((b[1] + b[3]) / 2, 12)}
    # two alternating levels: every interior slice differs from its neighbours' mean by their gap
    gap = (b[0] + b[2] + b[4]) / 3 - (b[1] + b[3]) / 2
    assert banding(interior) == pytest.approx(abs(gap)) and banding(s1[k - 1:depth - k + 1]) == pytest.approx(0.0)
    np.testing.assert_allclose(aggregated_slice_bias(np.full(5, 0.03), depth, 2), 0.03)


def test_select_points_applies_the_rule_against_each_reference():
    means = pd.DataFrame([
        {"point": "ref", "psnr": 20.0, "recovery": 0.30, "background_bias": 0.05},
        {"point": "good", "psnr": 19.8, "recovery": 0.28, "background_bias": 0.02},
        {"point": "hazy", "psnr": 21.0, "recovery": 0.40, "background_bias": 0.021},
        {"point": "blurry", "psnr": 19.6, "recovery": 0.30, "background_bias": 0.0},
        {"point": "faint", "psnr": 20.5, "recovery": 0.26, "background_bias": 0.0},
    ])
    refs = {"ref": None, "good": "ref", "hazy": "ref", "blurry": "ref", "faint": "ref", "absent": "ref"}
    out = select_points(means, refs).set_index("point")
    assert out.loc["ref", "adopted"] is None and "absent" not in out.index
    assert out.loc["good", "adopted"] is True  # the limits themselves pass
    assert out.loc["hazy", "adopted"] is False and out.loc["blurry", "adopted"] is False
    assert out.loc["faint", "adopted"] is False
    assert out.loc["good", "d_psnr"] == pytest.approx(-0.2) and out.loc["faint", "d_recovery"] == pytest.approx(-0.04)


def test_haze_sweeps_declare_their_rule_and_references_before_running():
    for name in ("haze-fusion", "haze-crops"):
        sw = SWEEPS[name]
        names = {p.name for p in sw.points}
        assert "0.02" in sw.rule.text and "0.3 dB" in sw.rule.text and "0.03" in sw.rule.text
        refs = [p.reference for p in sw.points if p.reference]
        assert refs and set(refs) <= names
    cfg = point_config(SWEEPS["haze-fusion"], SWEEPS["haze-fusion"].points[1])
    assert cfg.method_kwargs["fusion_residual"] is True and cfg.steps == SWEEPS["haze-fusion"].steps
    air = point_config(SWEEPS["haze-crops"], SWEEPS["haze-crops"].points[-1])
    assert air.crops.background_share == 0.3 and air.crops.vessel_share == 0.7 and air.crops.size == (48, 48)


# --- air-centred crops ------------------------------------------------------------------------------


def _vols(shape=(48, 40, 16)) -> dict:
    rng = np.random.default_rng(0)
    t = rng.uniform(-0.6, 0.0, shape).astype(np.float32)  # tissue, above 0.05 of the maximum
    t[:, :, :3] = -1.0  # air in the first 3 slices
    t[:6, :, :] = -0.95  # and a band of air at the border (0.025 of the maximum)
    t[20, 10:30, 5:12] = 1.0  # a vessel
    tt = torch.from_numpy(t)
    return {"sub-001": {"angio": tt, "T1w": tt + 1, "T2w": tt + 2}}


def test_air_centred_crops_take_their_share_and_centre_on_air():
    vols = _vols()
    t = vols["sub-001"]["angio"]
    cfg = CropConfig(size=(16, 16), vessel_share=0.5, background_share=0.3)
    s = CropSampler(vols, ["T1w", "T2w"], "angio", 5, cfg, seed=3)
    items = [it for step in range(250) for it in s.batch(step, 4)]
    n_air = sum(it["air_centred"] for it in items)
    assert abs(n_air - 0.3 * len(items)) <= 4 * math.sqrt(len(items) * 0.3 * 0.7)
    assert not any(it["air_centred"] and it["vessel_centred"] for it in items)
    for it in items:
        if it["air_centred"]:
            cx, cy, cz = it["centre"]
            assert (float(t[cx, cy, cz]) + 1) / 2 < 0.05


def test_background_share_zero_leaves_the_crops_unchanged():
    vols = _vols()
    old = CropSampler(vols, ["T1w", "T2w"], "angio", 5, CropConfig(size=(16, 16), vessel_share=0.6), seed=1)
    new = CropSampler(vols, ["T1w", "T2w"], "angio", 5,
                      CropConfig(size=(16, 16), vessel_share=0.6, background_share=0.0), seed=1)
    for step in range(20):
        a, b = old.batch(step, 3), new.batch(step, 3)
        assert [(x["x0"], x["y0"], x["z0"], x["vessel_centred"]) for x in a] == \
               [(x["x0"], x["y0"], x["z0"], x["vessel_centred"]) for x in b]
        assert not any(x["air_centred"] for x in b)


def test_crop_shares_beyond_one_and_air_free_targets_are_refused():
    with pytest.raises(ConfigError, match="exceeds 1"):
        CropConfig(vessel_share=0.8, background_share=0.3)
    with pytest.raises(ConfigError, match="background_level"):
        CropConfig(background_share=0.1, background_level=0.0)
    vols = _vols()
    vols["sub-001"] = {k: v.clamp(min=-0.5) for k, v in vols["sub-001"].items()}  # no air left
    with pytest.raises(ConfigError, match="no angio voxel lies below"):
        CropSampler(vols, ["T1w", "T2w"], "angio", 5, CropConfig(size=(16, 16), background_share=0.2))


# --- the residual fusion and the pipeline probes ------------------------------------------------------

TINY = dict(resunet={"base": 4, "mult": [1, 2], "groups": 4, "ffn_expansion": 2},
            fusion={"unet": {"base": 8, "mult": [1, 2], "num_res_blocks": 1}}, bridge={"sample_steps": 3})


def _batch(b=2, k=5, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = -torch.ones(b, k, h, w)
    target[:, :, 4:12, 4:12] = 0.2
    srcs = {m: (target * 0.5 * (i + 1) + 0.1 * torch.randn(b, k, h, w, generator=g)).clamp(-1, 1)
            for i, m in enumerate(("T1w", "T2w", "FLAIR"))}
    return {"sources": srcs, "target": target}


def test_residual_fusion_starts_at_the_branch_mean_and_learns_a_correction():
    torch.manual_seed(0)
    model = build_method("mmdm", variant="base", config="small", fusion_residual=True, **TINY)
    plain = build_method("mmdm", variant="base", config="small", **TINY)
    batch = _batch()
    ys = model.source_list(batch["sources"])
    preds = [torch.randn(2, 5, 16, 16) for _ in ys]
    t = torch.tensor([10, 900])
    torch.testing.assert_close(model.fuse(preds, ys, t), torch.stack(preds).mean(0))
    torch.testing.assert_close(plain.fuse(preds, ys, t), plain.fusion(preds, ys, t))  # the authors' fusion
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model.training_losses(batch, generator=torch.Generator().manual_seed(1))["loss"].backward()
        opt.step()
    assert (model.fuse(preds, ys, t) - torch.stack(preds).mean(0)).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["mmdm", "bbdm"])
def test_probes_report_every_stage_and_the_sampler_output(method):
    torch.manual_seed(0)
    kw = TINY if method == "mmdm" else {"unet": {"base": 8, "mult": [1, 2], "num_res_blocks": 1},
                                         "bridge": {"sample_steps": 3}}
    model = build_method(method, config="small", **({"variant": "base"} if method == "mmdm" else {}), **kw)
    batch = _batch()
    x0 = x0_bias_by_timestep(model, batch, [0, 500, 999], generator=torch.Generator().manual_seed(0))
    stages = {"branch T1w", "branch T2w", "branch FLAIR", "branch mean", "fused"} if method == "mmdm" else {"x0"}
    assert set(x0["stage"]) == stages and sorted(set(x0["t"])) == [0, 500, 999]
    trace, final = sampler_trace(model, batch, steps=3, generator=torch.Generator().manual_seed(0))
    assert final.shape == batch["target"].shape
    assert sorted(set(trace["i"])) == [0, 1, 2, 3] and set(trace["stage"]) == stages | {"output", "output clamped"}
    target = ((batch["target"] + 1) / 2).numpy()
    for stage, pred in (("output", final), ("output clamped", final.clamp(-1, 1))):
        row = trace[trace["stage"] == stage].iloc[0]
        assert row["bias"] == pytest.approx(background_stats(((pred + 1) / 2).numpy(), target)["bias"])


def test_judge_sweep_reads_the_recorded_volumes_and_writes_its_verdicts(tmp_path, monkeypatch):
    from mmdm.study import sweep as sweep_mod
    from mmdm.study.haze import judge_sweep

    pts = (sweep_mod.SweepPoint("ref"), sweep_mod.SweepPoint("fix", reference="ref"),
           sweep_mod.SweepPoint("untrained", reference="ref"))
    monkeypatch.setitem(sweep_mod.SWEEPS, "t", sweep_mod.Sweep("t", "test", pts, rule="test rule"))
    with pytest.raises(FileNotFoundError, match="no whole-volume validation"):
        judge_sweep("t", tmp_path)
    rows = [{"point": p, "subject": s, "psnr": psnr + jitter, "recovery": rec, "background_bias": bias + jitter / 100}
            for p, psnr, rec, bias in (("ref", 20.0, 0.3, 0.10), ("fix", 19.9, 0.29, 0.01))
            for s, jitter in (("sub-a", -0.5), ("sub-b", 0.5))]
    (tmp_path / "t").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "t" / "validation_volumes.csv", index=False)
    out = judge_sweep("t", tmp_path).set_index("point")
    assert list(out.index) == ["ref", "fix"]  # the untrained point has no rows and no verdict
    assert out.loc["fix", "adopted"] is True and out.loc["fix", "d_psnr"] == pytest.approx(-0.1)
    assert out.loc["fix", "background_bias"] == pytest.approx(0.01)  # the mean over subjects
    saved = pd.read_csv(tmp_path / "t" / "selection.csv")
    assert list(saved["point"]) == ["ref", "fix"] and bool(saved.loc[1, "adopted"])


def test_sweep_regions_are_the_per_point_means_of_the_recorded_volumes(tmp_path):
    from mmdm.study.haze import sweep_regions

    assert sweep_regions("ema", tmp_path) is None  # nothing measured
    rows = pd.DataFrame({"point": ["b", "b", "a"], "subject": ["s1", "s2", "s1"], "psnr": [20.0, 24.0, 30.0],
                         "background_bias": [0.01, 0.03, -0.002]})
    (tmp_path / "ema").mkdir()
    rows.to_csv(tmp_path / "ema" / "validation_volumes.csv", index=False)
    assert sweep_regions("ema", tmp_path) is None  # a table without its record of how it was made
    (tmp_path / "ema" / "validation_volumes.json").write_text(json.dumps({"stride": 5, "sample_steps": 5}))
    means, meta = sweep_regions("ema", tmp_path)
    assert list(means["point"]) == ["b", "a"] and meta["stride"] == 5  # the sweep's order, not sorted
    assert means["psnr"].tolist() == [22.0, 30.0]
    assert means["background_bias"].tolist() == pytest.approx([0.02, -0.002])
