"""The MMDM method: variants, shapes, input checks, registry, configs, overfitting."""

from __future__ import annotations

import pytest
import torch
import yaml

from mmdm.config import ConfigError, dump_yaml, from_dict, to_dict
from mmdm.diffusion import skip_timesteps
from mmdm.methods import METHODS, MMDM, VARIANTS, MMDMConfig, build_method

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


pytestmark = pytest.mark.usefixtures("one_thread")


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
    use_mip, use_naws = (VARIANTS[variant].overrides[k] for k in ("use_mip", "use_naws"))
    assert (model.naws is not None) == use_naws
    if use_naws:  # the learned variances are trained too (eq. (11) depends on them)
        assert model.naws.p0.grad.abs() > 0 and bool((model.naws.pm.grad.abs() > 0).all())
        assert set(model.log_scalars()) >= {"naws/w_fused", "naws/C"}
    else:  # the total is checked against an independent recomputation in test_training_loss_recomputed_...
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
    for variant, v in VARIANTS.items():
        use_mip, use_naws = v.overrides["use_mip"], v.overrides["use_naws"]
        cfg = MMDM.make_config("small", variant=variant)
        assert (cfg.use_mip, cfg.use_naws) == (use_mip, use_naws) and cfg.variant == variant
    with pytest.raises(KeyError, match="unknown method 'mmdn'; known: .*mmdm"):
        build_method("mmdn")
    with pytest.raises(ConfigError, match="unknown MMDM variant 'fulll'; known: base, mip, naws, full"):
        build_method("mmdm", variant="fulll", config="small", **TINY)
    with pytest.raises(ConfigError, match="known: paper, small"):
        build_method("mmdm", config="huge")
    with pytest.raises(ConfigError, match="at least 2 modalities"):
        build_method("mmdm", config="small", sources=("T1w",), **TINY)
    with pytest.raises(ConfigError, match="valid keys"):
        build_method("mmdm", config="small", windw=3)


def test_named_configurations_have_the_documented_sizes():
    paper = MMDM.make_config("paper")
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
    small = MMDM.make_config("small")
    assert small.bridge.sample_steps < paper.bridge.sample_steps
    assert small.fusion.unet.base < paper.fusion.unet.base
    # small is derived from paper: same structure, narrower
    assert small.branch_net == paper.branch_net and small.fusion.mixer == paper.fusion.mixer
    assert small.resunet.base < paper.resunet.base and small.resunet.mult == paper.resunet.mult
    assert small.fusion.unet.conv_resample == paper.fusion.unet.conv_resample


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
    cfg = MMDM.make_config("small", ("T2w", "FLAIR"), variant="mip", **TINY)
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


# -- the training loss, recomputed from the paper -------------------------------------------------
def _soft_mip_by_hand(x: torch.Tensor, g: torch.Tensor, tau: float, reverse: bool) -> torch.Tensor:
    """Eq. (6) slice by slice: out_i = sum_{j in J_i} softmax_j((x_j + g_j) / tau) x_j, J_i = {j <= i}
    ({j >= i} reversed), along dim 1."""
    n = x.shape[1]
    out = []
    for i in range(n):
        js = list(range(i, n)) if reverse else list(range(i + 1))
        w = torch.softmax(torch.stack([(x[:, j] + g[:, j]) / tau for j in js]), dim=0)
        out.append(sum(w[k] * x[:, j] for k, j in enumerate(js)))
    return torch.stack(out, 1)


def _hard_mip_by_hand(x: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Eq. (5): out_i = max over J_i of x_j, along dim 1."""
    n = x.shape[1]
    return torch.stack([x[:, i:].amax(1) if reverse else x[:, :i + 1].amax(1) for i in range(n)], 1)


def _gumbel(shape, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=g)
    return -torch.log(-torch.log(u + 1e-20) + 1e-20)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_loss_recomputed_from_the_paper_equations(variant):
    """MMDM's total loss from eqs. (1), (4)-(7) and (11) written out here, drawing t, the shared noise
    and the Gumbel noise from the same generator in the same order; the networks are the model's."""
    torch.manual_seed(0)
    model = build_method("mmdm", variant=variant, config="small", **TINY)
    use_mip, use_naws = (VARIANTS[variant].overrides[k] for k in ("use_mip", "use_naws"))
    if use_naws:  # learned variances away from their initial 1, so that every term of eq. (11) matters
        with torch.no_grad():
            model.naws.p0.fill_(0.8)
            model.naws.pm.copy_(torch.tensor([1.3, 0.6, 1.1]))
    batch = _batch(ALL, b=3)
    got = model.training_losses(batch, generator=torch.Generator().manual_seed(7))["loss"]

    g = torch.Generator().manual_seed(7)
    x0 = batch["target"]
    ys = [batch["sources"][m] for m in ALL]
    T, tau = 1000, 0.75
    t = torch.randint(0, T, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)  # one noise tensor shared by the branches (the authors' code)
    m_t = torch.linspace(0.001, 0.999, T, dtype=torch.float64)[t]
    delta = 2 * (m_t - m_t ** 2)  # eq. (1), max_var 1
    col = lambda v: v.float().reshape(-1, 1, 1, 1)  # noqa: E731
    with torch.no_grad():
        preds = []
        for m, y in zip(ALL, ys):
            x_t = (1 - col(m_t)) * x0 + col(m_t) * y + col(delta).sqrt() * eps
            preds.append(y - model.branches[m](torch.cat([x_t, y], 1), t))  # objective y - x0: x0_hat = y - out
        fused = model.fusion(preds, ys, t)  # eq. (4)

        def hybrid(pred):  # eq. (7): MSE + L_MIP (forward and reverse projections), per sample
            loss = (pred - x0).pow(2).flatten(1).mean(1)
            if use_mip:
                for rev in (False, True):
                    soft = _soft_mip_by_hand(pred, _gumbel(pred.shape, g), tau, rev)
                    loss = loss + (soft - _hard_mip_by_hand(x0, rev)).pow(2).flatten(1).mean(1)
            return loss

        l0 = hybrid(fused)
        lm = [hybrid(p) for p in preds]
        if use_naws:  # eq. (11), per sample, then the batch mean
            a0 = torch.tensor(0.8) ** 2
            am = [torch.tensor(p) ** 2 + delta.float() for p in (1.3, 0.6, 1.1)]
            total = (l0 / (2 * a0) + sum(l / (2 * a) for l, a in zip(lm, am))
                     + torch.log(1 + a0) + sum(torch.log(1 + a) for a in am)).mean()
        else:  # the base: the plain sum of the M + 1 losses
            total = l0.mean() + sum(l.mean() for l in lm)
    torch.testing.assert_close(got.detach(), total, rtol=2e-5, atol=1e-6)


def test_exact_mip_loss_on_a_hand_computed_example():
    """L_MIP of a 1-pixel, 3-slice window with zero Gumbel noise, computed on paper:
    pred (0, 1, 0.5), target (1, 0, 0), tau = 1."""
    import math

    from mmdm.losses import mip_loss

    pred = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64).reshape(1, 3, 1, 1)
    target = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    e = math.exp

    def soft(xs):  # softmax-weighted mean of the slices xs
        w = [e(x) for x in xs]
        return sum(wi * x for wi, x in zip(w, xs)) / sum(w)

    fwd = [0.0, soft([0.0, 1.0]), soft([0.0, 1.0, 0.5])]  # j <= i
    rev = [soft([0.0, 1.0, 0.5]), soft([1.0, 0.5]), 0.5]  # j >= i
    hard_fwd, hard_rev = [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]
    want = (sum((a - b) ** 2 for a, b in zip(fwd, hard_fwd)) / 3
            + sum((a - b) ** 2 for a, b in zip(rev, hard_rev)) / 3)
    # on paper: fwd = (0, 0.73106, 0.66008), rev = (0.66008, 0.81123, 0.5);
    # (1 + 0.07233 + 0.11555) / 3 + (0.11555 + 0.65809 + 0.25) / 3 = 0.39596 + 0.34121
    assert want == pytest.approx(0.73717, abs=1e-5)
    got = mip_loss(pred, target, tau=1.0, gumbel=False)
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert mip_loss(pred, target, tau=1.0, gumbel=False, reduction="none").shape == (1,)


class _OracleBranch(torch.nn.Module):
    """A branch that knows x0: with the "ysubx" objective it outputs y - x0, so x0_hat^m = x0."""

    def __init__(self, x0: torch.Tensor, k: int):
        super().__init__()
        self.x0, self.k = x0, k

    def forward(self, inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return inp[:, self.k:] - self.x0


class _RecordingFusion(torch.nn.Module):
    """Fusion that returns the mean of the branch predictions and records what it was given."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = []

    def forward(self, x0_hats, sources, t):
        self.calls.append(([x.clone() for x in x0_hats], list(sources), t.clone()))
        return torch.stack(list(x0_hats)).mean(0)


@pytest.mark.parametrize("mode", ["coupled", "independent"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_with_oracle_branches_and_fusion_recovers_x0(mode, eta):
    """With branches that predict x0 exactly, MMDM's sampler (Fig. 1b) returns x0 for any eta; the fusion
    sees the M branch predictions and the M sources at every step (coupled) or once at t = 0 (independent)."""
    model = build_method("mmdm", variant="full", config="small", sampling=mode, **TINY).eval()
    batch = _batch(ALL)
    x0 = batch["target"] * 0.9  # inside [-1, 1]: clip_x0 leaves it alone
    model.branches = torch.nn.ModuleDict({m: _OracleBranch(x0, model.window) for m in ALL})
    model.fusion = _RecordingFusion()
    out = model.sample(batch["sources"], steps=4, eta=eta, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    calls = model.fusion.calls
    assert len(calls) == (4 if mode == "coupled" else 1)
    assert [int(c[2][0]) for c in calls] == (skip_timesteps(1000, 4) if mode == "coupled" else [0])
    for x0_hats, sources, _ in calls:
        assert len(x0_hats) == 3 and all(torch.allclose(x, x0, atol=1e-5) for x in x0_hats)
        assert all(s is batch["sources"][m] for s, m in zip(sources, ALL))
