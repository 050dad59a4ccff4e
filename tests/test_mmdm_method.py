"""The MMDM method: variants, shapes, input checks, registry, configs, overfitting."""

from __future__ import annotations

import pytest
import torch
import yaml

from mmdm.config import ConfigError, dump_yaml, from_dict, to_dict
from mmdm.methods import METHODS, MMDM, VARIANTS, MMDMConfig, build_method, mmdm_config

#: Networks small enough for CPU tests; H, W must be multiples of 2.
TINY = dict(
    resunet={"base": 4, "mult": [1, 2], "groups": 4, "ffn_expansion": 2},
    fusion={"unet": {"base": 8, "mult": [1, 2], "num_res_blocks": 1}},
    bridge={"sample_steps": 3},
)
ALL = ("T1w", "T2w", "FLAIR")


def _batch(sources=ALL, b=2, k=5, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = -torch.ones(b, k, h, w)
    target[:, :, 4:12, 7:9] = 0.8  # a bright "vessel" through the window
    srcs = {s: (target * 0.3 * (i + 1) + 0.1 * torch.randn(b, k, h, w, generator=g)).clamp(-1, 1)
            for i, s in enumerate(sources)}
    return {"sources": srcs, "target": target}


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded torch: these small models gain nothing from threads, and thread
    oversubscription makes them many times slower when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("sources", [ALL, ("T1w", "FLAIR")])
def test_every_variant_trains_and_samples_with_2_and_3_modalities(variant, sources):
    torch.manual_seed(0)
    model = build_method("mmdm", variant=variant, config="small", sources=sources, **TINY)
    assert model.variant == variant and model.sources == sources
    assert sorted(model.branches) == sorted(sources)
    batch = _batch(ALL)  # extra modalities in the batch are ignored
    out = model.training_losses(batch, generator=torch.Generator().manual_seed(1))
    expected = {"loss", "loss_fused", "mse_fused", *(f"loss_{m}" for m in sources)}
    assert set(out) == expected
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, module in [*model.branches.items(), ("fusion", model.fusion)]:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert all(g is not None for g in grads), f"no gradient reached {name}"
        assert any(g.abs().sum() > 0 for g in grads), f"zero gradient in {name}"
    use_mip, use_naws = VARIANTS[variant]
    assert (model.naws is not None) == use_naws
    if use_naws:
        assert model.naws.p0.grad is not None and set(model.log_scalars()) >= {"naws/w_fused", "naws/C"}
    else:
        # the paper's base: the plain sum of the (hybrid) losses of the M + 1 predictions
        parts = out["loss_fused"] + sum(out[f"loss_{m}"] for m in sources)
        torch.testing.assert_close(out["loss"].detach(), parts)
        assert model.log_scalars() == {}
    if not use_mip:  # without L_MIP the fused loss is the plain MSE
        torch.testing.assert_close(out["loss_fused"], out["mse_fused"])
    else:
        assert out["loss_fused"] > out["mse_fused"]
    model.eval()
    x = model.sample(batch["sources"], generator=torch.Generator().manual_seed(2))
    assert x.shape == batch["target"].shape and torch.isfinite(x).all()
    assert x.min() >= -1 and x.max() <= 1  # clip_x0


@pytest.mark.parametrize("mode", ["coupled", "independent"])
def test_sampling_modes_are_reproducible_and_differ(mode):
    torch.manual_seed(0)
    model = build_method("mmdm", variant="base", config="small", sampling=mode, **TINY).eval()
    src = _batch()["sources"]
    a = model.sample(src, steps=4, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = model.sample(src, steps=4, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    other = "independent" if mode == "coupled" else "coupled"
    model.cfg.sampling = other
    c = model.sample(src, steps=4, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("shared", [True, False])
def test_training_noise_is_shared_across_branches_only_when_asked(shared, monkeypatch):
    model = build_method("mmdm", variant="base", config="small", shared_noise=shared, **TINY)
    seen = []
    original = model.bridge.q_sample

    def spy(x0, y, t, noise):
        seen.append((t.clone(), noise.clone()))
        return original(x0, y, t, noise)

    monkeypatch.setattr(model.bridge, "q_sample", spy)
    model.training_losses(_batch(), generator=torch.Generator().manual_seed(0))
    assert len(seen) == 3
    assert all(torch.equal(seen[0][0], t) for t, _ in seen)  # one t per sample, shared by branches
    assert torch.equal(seen[0][1], seen[1][1]) == shared


def test_naws_per_sample_flag_reaches_the_loss():
    a = build_method("mmdm", variant="naws", config="small", **TINY)
    b = build_method("mmdm", variant="naws", config="small", naws_per_sample=False, **TINY)
    assert a.naws.per_sample and not b.naws.per_sample
    b.load_state_dict(a.state_dict())
    la = a.training_losses(_batch(b=4), generator=torch.Generator().manual_seed(5))["loss"]
    lb = b.training_losses(_batch(b=4), generator=torch.Generator().manual_seed(5))["loss"]
    assert not torch.allclose(la, lb)  # the 4 samples have different t


def test_clear_errors_for_missing_or_misshaped_sources():
    model = build_method("mmdm", variant="full", config="small", **TINY)
    batch = _batch(("T1w", "T2w"))
    with pytest.raises(ValueError, match=r"missing source modality.*FLAIR.*expects.*T1w.*T2w.*FLAIR"):
        model.training_losses(batch)
    with pytest.raises(ValueError, match="missing source modality"):
        model.sample(batch["sources"])
    bad = _batch()
    bad["sources"]["T2w"] = bad["sources"]["T2w"][:, :3]
    with pytest.raises(ValueError, match=r"'T2w' has shape \(2, 3, 16, 16\); expected \(B, 5, H, W\)"):
        model.sample(bad["sources"])
    odd = _batch(h=15)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.sample(odd["sources"])
    wrong_target = _batch()
    wrong_target["target"] = wrong_target["target"][:1]
    with pytest.raises(ValueError, match="target has shape"):
        model.training_losses(wrong_target)
    with pytest.raises(ValueError, match="'sources' and 'target'"):
        model.training_losses({"target": wrong_target["target"]})


def test_registry_builds_every_variant_and_lists_known_names():
    assert "mmdm" in METHODS.names()
    for variant, (use_mip, use_naws) in VARIANTS.items():
        cfg = mmdm_config(variant, "small")
        assert (cfg.use_mip, cfg.use_naws) == (use_mip, use_naws) and cfg.variant == variant
    with pytest.raises(KeyError, match="unknown method 'mmdn'; known: .*mmdm"):
        build_method("mmdn")
    with pytest.raises(ConfigError, match="unknown MMDM variant 'fulll'; known: base, mip, naws, full"):
        build_method("mmdm", variant="fulll", config="small", **TINY)
    with pytest.raises(ConfigError, match="known: depthwise, paper, small, small-depthwise"):
        build_method("mmdm", config="huge")
    with pytest.raises(ConfigError, match="at least 2 modalities"):
        build_method("mmdm", config="small", sources=("T1w",), **TINY)
    with pytest.raises(ConfigError, match="valid keys"):
        build_method("mmdm", config="small", windw=3)


def test_named_configurations_have_the_documented_sizes():
    paper = mmdm_config(config="paper")
    assert paper.variant == "full" and paper.sources == ALL and paper.window == 5
    assert paper.branch_net == "resunet" and paper.shared_time_embedding
    assert paper.resunet.base == 8 and tuple(paper.resunet.mult) == (1, 2, 4, 8) and paper.resunet.groups == 8
    assert paper.resunet.ffn_expansion == 4 and paper.resunet.attention == "global"
    assert paper.fusion.unet.base == 32 and tuple(paper.fusion.unet.mult) == (1, 4, 8)
    assert paper.fusion.mixer == "authors" and not paper.fusion.unet.conv_resample
    assert paper.bridge.num_timesteps == 1000 and paper.bridge.sample_steps == 200
    assert paper.bridge.objective == "ysubx" and paper.mip_tau == 0.75
    assert paper.optim.lr == 1e-4 and tuple(paper.optim.betas) == (0.5, 0.999)
    assert paper.shared_noise and paper.naws_per_sample and paper.sampling == "coupled"
    small = mmdm_config(config="small")
    assert small.bridge.sample_steps < paper.bridge.sample_steps
    assert small.fusion.unet.base < paper.fusion.unet.base
    # small is derived from paper: same structure, narrower
    assert small.branch_net == paper.branch_net and small.fusion.mixer == paper.fusion.mixer
    assert small.resunet.base < paper.resunet.base and small.resunet.mult == paper.resunet.mult
    assert small.fusion.unet.conv_resample == paper.fusion.unet.conv_resample
    depthwise = mmdm_config(config="depthwise")
    assert depthwise.branch_net == "restormer" and depthwise.fusion.mixer == "restormer"


def test_paper_sized_model_runs_at_32x32():
    torch.manual_seed(0)
    model = build_method("mmdm", variant="full", config="paper")
    assert model.spatial_multiple == 8  # 4 Restormer levels; the fusion UNet needs 4
    batch = _batch(b=1, h=32, w=32)
    out = model.training_losses(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    x = model.eval().sample(batch["sources"], steps=2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (1, 5, 32, 32) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="multiples of 8"):
        model.sample(_batch(b=1, h=36, w=32)["sources"], steps=2)


def test_config_round_trips_through_yaml_and_rebuilds_the_same_model():
    cfg = mmdm_config("mip", "small", sources=("T2w", "FLAIR"), **TINY)
    text = dump_yaml(cfg)
    back = from_dict(MMDMConfig, yaml.safe_load(text))
    assert back == cfg and to_dict(back) == to_dict(cfg)
    a, b = MMDM(cfg), build_method("mmdm", config=yaml.safe_load(text))
    assert b.variant == "mip" and b.sources == ("T2w", "FLAIR")  # a dict keeps its own flags
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_optimizer_groups_cover_all_parameters_once():
    model = build_method("mmdm", variant="full", config="small", **TINY)
    groups = model.optimizer_groups()
    assert list(groups) == ["main"]
    ids = [id(p) for p in groups["main"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert id(model.naws.p0) in ids


def test_full_model_overfits_one_tiny_batch():
    """The loss of a fixed batch (fixed t and noise) falls by more than 5x in 100 Adam steps."""
    torch.manual_seed(0)
    model = build_method("mmdm", variant="full", config="small",
                         resunet={"base": 8, "mult": [1, 2], "groups": 4, "ffn_expansion": 2},
                         fusion={"unet": {"base": 8, "mult": [1, 2], "num_res_blocks": 1}})
    batch = _batch(b=2)

    def fixed_losses() -> tuple[float, float]:
        with torch.no_grad():
            out = model.training_losses(batch, generator=torch.Generator().manual_seed(123))
        return (sum(out[k].item() for k in out if k.startswith("loss_")), out["mse_fused"].item())

    before, mse_before = fixed_losses()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        loss = model.training_losses(batch, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, mse_after = fixed_losses()
    assert after < before / 5, (before, after)
    assert mse_after < mse_before / 5, (mse_before, mse_after)
