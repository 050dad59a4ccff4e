"""2.5D crop sampling with vessel-centred crops from the target image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmdm.config import ConfigError, from_dict
from mmdm.data.crops import CropConfig, CropSampler, CropStream, probability_map

SHAPE = (64, 48, 20)


def _volumes(n: int = 2, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Subjects with a dim noisy background and bright tubes; the sources are shifted copies of the target
    (so a crop of a source can be checked against the target's position)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        t = rng.uniform(-1.0, -0.4, SHAPE).astype(np.float32)
        t[10 + i, 5:40, :] = 0.9       # a tube along y and z
        t[30:60, 20 + i, 3:9] = 0.8     # a tube along x
        t[0, 0, 0] = 1.0                # a bright corner voxel: must be reachable as a centre
        tt = torch.from_numpy(t)
        out[f"sub-{i + 1:03d}"] = {"angio": tt, "T1w": tt + 10.0, "T2w": tt + 20.0}
    return out


def _sampler(cfg: CropConfig, seed: int = 0, window: int = 5, volumes=None) -> CropSampler:
    return CropSampler(volumes or _volumes(), ["T1w", "T2w"], "angio", window, cfg, seed)


def _binomial_ok(count: int, n: int, p: float, z: float = 4.0) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


def test_every_crop_contains_its_centre_and_cuts_the_right_voxels():
    vols = _volumes()
    cfg = CropConfig(size=(32, 16), multiple=16, vessel_share=0.5, quantile=0.98)
    s = _sampler(cfg, volumes=vols)
    n_vessel = 0
    for step in range(100):
        for it in s.batch(step, 4):
            cx, cy, cz = it["centre"]
            x0, y0, z0 = it["x0"], it["y0"], it["z0"]
            assert x0 <= cx < x0 + 32 and y0 <= cy < y0 + 16 and z0 <= cz < z0 + 5
            assert 0 <= x0 <= SHAPE[0] - 32 and 0 <= y0 <= SHAPE[1] - 16 and 0 <= z0 <= SHAPE[2] - 5
            assert it["target"].shape == (5, 32, 16)
            vol = vols[it["subject"]]["angio"]
            assert it["target"][cz - z0, cx - x0, cy - y0] == vol[cx, cy, cz]
            assert torch.equal(it["target"], vol[x0:x0 + 32, y0:y0 + 16, z0:z0 + 5].permute(2, 0, 1))
            assert torch.equal(it["sources"]["T2w"], it["target"] + 20.0)
            n_vessel += it["vessel_centred"]
            if it["vessel_centred"]:  # vessel-centred crops are centred on a voxel with positive probability
                q = np.quantile(vol.numpy(), 0.98)
                assert vol[cx, cy, cz] > q
    assert 0 < n_vessel < 400


@pytest.mark.parametrize("share", [0.0, 0.3, 0.7, 1.0])
def test_the_vessel_centred_share_matches_the_setting(share):
    s = _sampler(CropConfig(size=(16, 16), vessel_share=share))
    n = 2000
    flags = [it["vessel_centred"] for step in range(n // 4) for it in s.batch(step, 4)]
    count = int(sum(flags))
    if share in (0.0, 1.0):
        assert count == share * n
    else:
        assert _binomial_ok(count, n, share), (count, n * share)


def test_vessel_centres_follow_the_probability_map_up_to_the_border():
    """Two bright regions of 8 voxels with weights 1 : 3 above a zero background (quantile value 0)."""
    t = torch.zeros(SHAPE)
    t[0:2, 0:2, 0:2] = 1.0          # region A: at the volume's corner (torchio's sampler could never centre here)
    t[40:42, 30:32, 10:12] = 3.0    # region B
    vols = {"sub-001": {"angio": t, "T1w": t.clone()}}
    s = CropSampler(vols, ["T1w"], "angio", 5, CropConfig(size=(16, 16), vessel_share=1.0, quantile=0.5), seed=3)
    pm = probability_map(t, 0.5)
    assert pm[0, 0, 0] == 1.0 and pm[40, 30, 10] == 3.0 and pm[5, 5, 5] == 0.0
    n = 2000
    centres = [it["centre"] for step in range(n // 4) for it in s.batch(step, 4)]
    in_b = sum(40 <= x < 42 and 30 <= y < 32 and 10 <= z < 12 for x, y, z in centres)
    in_a = sum(x < 2 and y < 2 and z < 2 for x, y, z in centres)
    assert in_a + in_b == n
    assert _binomial_ok(in_b, n, 0.75)
    # every one of the 16 voxels is drawn (the corner ones included), roughly in proportion
    assert len({c for c in centres}) == 16


def test_crops_are_a_pure_function_of_seed_rank_and_step():
    cfg = CropConfig(size=(32, 32), vessel_share=0.6)
    a, b = _sampler(cfg, seed=7), _sampler(cfg, seed=7)
    first = a.batch(5, 4)
    torch.manual_seed(123)  # global RNG draws in between change nothing
    np.random.seed(123)
    torch.rand(10), np.random.rand(10)
    for x, y in zip(first, b.batch(5, 4)):
        assert torch.equal(x["target"], y["target"]) and x["centre"] == y["centre"]
        assert x["vessel_centred"] == y["vessel_centred"] and x["subject"] == y["subject"]
    other_seed = [it["centre"] for it in _sampler(cfg, seed=8).batch(5, 4)]
    other_rank = [it["centre"] for it in a.batch(5, 4, rank=1)]
    assert other_seed != [it["centre"] for it in first] and other_rank != [it["centre"] for it in first]


def test_stream_state_restores_the_same_next_crops():
    cfg = CropConfig(size=(16, 32), vessel_share=0.7)
    uninterrupted = CropStream(_sampler(cfg, seed=2), batch_size=3)
    ref = [next(uninterrupted) for _ in range(8)]

    first = CropStream(_sampler(cfg, seed=2), batch_size=3)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    assert state["step"] == 5
    resumed = CropStream(_sampler(cfg, seed=2), batch_size=3)  # a new process: fresh objects
    resumed.load_state_dict(state)
    for want in ref[5:]:
        got = next(resumed)
        for x, y in zip(got, want):
            assert torch.equal(x["target"], y["target"]) and x["centre"] == y["centre"]
            assert all(torch.equal(x["sources"][m], y["sources"][m]) for m in x["sources"])
    with pytest.raises(ValueError, match="differs in \\['seed'\\]"):
        CropStream(_sampler(cfg, seed=3), batch_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        CropStream(_sampler(cfg, seed=2), batch_size=4).load_state_dict(state)


def test_whole_slice_mode_cuts_full_slices():
    s = _sampler(CropConfig(size=None, vessel_share=0.5))
    for it in s.batch(0, 8):
        assert it["x0"] == 0 and it["y0"] == 0 and it["target"].shape == (5, SHAPE[0], SHAPE[1])


@pytest.mark.parametrize("kw, match", [
    ({"size": (40, 48)}, "not a multiple of the network's spatial multiple 16; use e.g. 48x48 or 32x48"),
    ({"size": (0, 16)}, "two positive integers"),
    ({"vessel_share": 1.2}, "vessel_share must lie in \\[0, 1\\]"),
    ({"vessel_share": -0.1}, "vessel_share must lie in \\[0, 1\\]"),
    ({"quantile": 1.0}, "quantile must lie in \\[0, 1\\)"),
    ({"power": 0.0}, "power must be a positive"),
    ({"multiple": 0}, "multiple must be an integer >= 1"),
])
def test_bad_configs_raise(kw, match):
    with pytest.raises(ConfigError, match=match):
        CropConfig(**kw)
    with pytest.raises(ConfigError, match=match):
        from_dict(CropConfig, {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()})


def test_settings_that_cannot_work_on_the_data_raise_before_training():
    with pytest.raises(ConfigError, match="larger than the image's 64x48"):
        _sampler(CropConfig(size=(64, 64)))
    with pytest.raises(ConfigError, match="deeper than the volume's 20"):
        _sampler(CropConfig(size=(16, 16)), window=21)
    with pytest.raises(ConfigError, match="whole slices of 64x48 are not a multiple"):
        _sampler(CropConfig(size=None, multiple=32))
    flat = {"sub-009": {"angio": torch.full(SHAPE, 0.3), "T1w": torch.zeros(SHAPE), "T2w": torch.zeros(SHAPE)}}
    with pytest.raises(ConfigError, match="sub-009: the crop probability map is all zero"):
        _sampler(CropConfig(size=(16, 16), vessel_share=0.5), volumes=flat)
    # without vessel-centred crops a flat target is fine
    assert _sampler(CropConfig(size=(16, 16), vessel_share=0.0), volumes=flat).batch(0, 2)
    with pytest.raises(ConfigError, match="no volume for modality \\['T2w'\\]"):
        CropSampler({"sub-001": {"angio": torch.zeros(SHAPE), "T1w": torch.zeros(SHAPE)}}, ["T1w", "T2w"],
                    "angio", 5, CropConfig(size=(16, 16), vessel_share=0.0))


def test_from_dataset_cuts_the_dataset_windows(tiny_cohort):
    from mmdm.data.dataset import DataConfig, WindowDataset

    ds = WindowDataset(DataConfig(root=str(tiny_cohort)), split="train")
    s = CropSampler.from_dataset(ds, CropConfig(size=(32, 32), vessel_share=0.5), seed=0)
    by_z0 = {(sub, z0): i for i, (sub, z0) in enumerate(ds.index)}
    matched = 0
    for it in s.batch(0, 20):
        assert set(it["sources"]) == set(ds.cfg.sources)
        key = (it["subject"], it["z0"])
        if key in by_z0:  # the crop is the in-plane box of the dataset's window at the same z0
            win = ds[by_z0[key]]
            x0, y0 = it["x0"], it["y0"]
            for m in ds.cfg.sources:
                assert torch.equal(it["sources"][m], win["sources"][m][:, x0:x0 + 32, y0:y0 + 32])
            assert torch.equal(it["target"], win["target"][:, x0:x0 + 32, y0:y0 + 32])
            matched += 1
    assert matched > 0
