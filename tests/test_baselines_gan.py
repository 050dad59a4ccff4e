"""The adversarial Table 1 baselines: Pix2Pix, ResViT, UNest (losses, nets, training protocol)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmdm.methods.pix2pix  # noqa: F401  (registers "pix2pix")
import mmdm.methods.resvit  # noqa: F401  (registers "resvit")
import mmdm.methods.unest  # noqa: F401  (registers "unest")
from mmdm.config import ConfigError, from_dict, to_dict
from mmdm.losses.adversarial import discriminator_loss, gan_loss, generator_adversarial_loss
from mmdm.methods import build_method
from mmdm.methods.base import StepContext
from mmdm.methods.pix2pix import DEVIATIONS as P2P_DEV
from mmdm.methods.pix2pix import Pix2PixConfig
from mmdm.methods.resvit import DEVIATIONS as RESVIT_DEV
from mmdm.methods.resvit import ResViTConfig
from mmdm.methods.unest import DEVIATIONS as UNEST_DEV
from mmdm.methods.unest import ImagePool, UNestConfig, foreground_mask
from mmdm.nets.patchgan import PatchGAN, PatchGANConfig, receptive_field
from mmdm.nets.pix2pix_unet import Pix2PixUNet, Pix2PixUNetConfig
from mmdm.nets.resvit import ViTEncoder
from mmdm.nets.unest import StructuralTransformerLayer, structural_masks

METHODS = ("pix2pix", "resvit", "unest")
#: (method, build kwargs) of the paired objectives: L_G = GAN + lambda_L1 * L1 (+ extras)
PAIRED = (("pix2pix", {}), ("resvit", {}), ("unest", {"variant": "paired"}))
CONFIGS = {"pix2pix": Pix2PixConfig, "resvit": ResViTConfig, "unest": UNestConfig}
ALL = ("T1w", "T2w", "FLAIR")


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(b=2, k=5, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = -torch.ones(b, k, h, w)
    target[:, :, 8:24, 14:18] = 0.8  # a bright "vessel" through the window
    target[:, :, 4:28, 4:8] = -0.2  # some tissue
    srcs = {s: (target * 0.3 * (i + 1) + 0.1 * torch.randn(b, k, h, w, generator=g)).clamp(-1, 1)
            for i, s in enumerate(ALL)}
    return {"sources": srcs, "target": target}


def _build(name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_method(name, config="small", **kw)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return [not torch.equal(a, p.detach()) for a, p in zip(before, params)]


def _engine_step(model, batch, opts):
    """One training step as the engine takes it (``train_step`` with a context); logs per group."""
    logs = model.train_step(batch, StepContext(opts))
    outs = {name: {} for name in opts}
    for key, v in logs.items():
        name, k = key.split("/", 1)
        outs[name][k] = float(v)
    return outs


def _adams(model, lr=None):
    oc = model.optim_configs()
    return {n: torch.optim.Adam(p, lr=lr or oc[n].lr, betas=oc[n].betas) for n, p in model.optimizer_groups().items()}


# ----------------------------------------------------------------------------
# adversarial losses


def test_gan_losses_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 1, 4, 4, generator=g)
    sig = torch.sigmoid(s)
    for y in (1.0, 0.9):
        expected = -(y * torch.log(sig) + (1 - y) * torch.log(1 - sig)).mean()
        torch.testing.assert_close(gan_loss(s, True, "vanilla", real_label=y), expected)
        torch.testing.assert_close(gan_loss(s, True, "lsgan", real_label=y), ((s - y) ** 2).mean())
    torch.testing.assert_close(gan_loss(s, False, "lsgan", fake_label=0.1), ((s - 0.1) ** 2).mean())
    r, f = torch.randn(2, 1, 3, 3, generator=g), torch.randn(2, 1, 3, 3, generator=g)
    loss, real, fake = discriminator_loss(r, f, "lsgan", 0.9, 0.1)
    torch.testing.assert_close(loss, 0.5 * (((r - 0.9) ** 2).mean() + ((f - 0.1) ** 2).mean()))
    torch.testing.assert_close(generator_adversarial_loss(f, "vanilla"), F.softplus(-f).mean())
    # the vanilla D loss is minimal where sigmoid(score) equals the label
    x = torch.linspace(-4, 4, 161)
    best = x[torch.stack([gan_loss(v.view(1), True, "vanilla", 0.9) for v in x]).argmin()]
    assert abs(torch.sigmoid(best).item() - 0.9) < 0.02
    with pytest.raises(ValueError, match="unknown GAN objective 'wgan'"):
        gan_loss(s, True, "wgan")


# ----------------------------------------------------------------------------
# networks


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_patchgan_receptive_field_is_70_for_3_layers(n_layers):
    assert receptive_field(3) == 70
    d = PatchGAN(2, PatchGANConfig(base=4, n_layers=n_layers, norm="none"))
    x = torch.randn(1, 2, 160, 160, requires_grad=True)
    out = d(x[:, :1], x[:, 1:])
    assert out.shape[:2] == (1, 1)
    i, j = out.shape[2] // 2, out.shape[3] // 2
    out[0, 0, i, j].backward()
    rows = x.grad.abs().sum(dim=(0, 1, 3)).nonzero()
    cols = x.grad.abs().sum(dim=(0, 1, 2)).nonzero()
    assert rows.max() - rows.min() + 1 == receptive_field(n_layers)
    assert cols.max() - cols.min() + 1 == receptive_field(n_layers)


def test_pix2pix_unet_dropout_sits_in_the_official_blocks():
    # unet_256 (depth 8): dropout in the three C512 decoder blocks above the innermost one
    net = Pix2PixUNet(1, 1, Pix2PixUNetConfig(base=2, depth=8, norm="none"))
    with_dropout = {i for i, up in enumerate(net.up) if any(isinstance(m, torch.nn.Dropout) for m in up)}
    c512 = {i for i, up in enumerate(net.up) if i not in (0, 7)
            and up[1].in_channels == 2 * 16 and up[1].out_channels == 16}
    assert with_dropout == c512 and len(c512) == 3
    x = torch.randn(2, 1, 256, 256)
    assert net(x).shape == x.shape
    with pytest.raises(ValueError, match="multiples of 2\\*\\*depth = 256"):
        net(torch.randn(1, 1, 96, 112))


def test_resvit_shares_one_transformer_between_its_transformer_blocks():
    model = _build("resvit")
    net = model.net
    assert sum(isinstance(m, ViTEncoder) for m in model.modules()) == 1
    assert [i for i, b in enumerate(net.blocks) if b.with_transformer] == [0, 5] and len(net.blocks) == 9
    calls = []
    net.transformer.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    model.sample(_batch()["sources"])
    assert len(calls) == 2  # blocks 1 and 6 both run the one shared encoder


def test_resvit_reads_every_modality_directly():
    model = _build("resvit", sources=("T1w", "FLAIR")).eval()
    assert model.net.encoder[1].in_channels == 2 * 5
    assert not hasattr(model, "gating")
    src = _batch()["sources"]
    base = model.sample(src)
    for m in ("T1w", "FLAIR"):
        moved = dict(src, **{m: src[m].flip(-1)})
        assert not torch.allclose(model.sample(moved), base)
    torch.testing.assert_close(model.sample(dict(src, T2w=-src["T2w"])), base)  # unused modality


def _swin_allowed(h, w, win, shift):
    """Swin's construction: roll by -shift, partition into windows, regions of the cyclic shift."""
    def region(n):
        lab = torch.zeros(n, dtype=torch.long)
        if shift:
            lab[n - win:n - shift] = 1
            lab[n - shift:] = 2
        return lab
    ri, rj = region(h), region(w)
    n = h * w
    allowed = torch.zeros(n, n, dtype=torch.bool)
    pos = [((i + shift) % h, (j + shift) % w) for i in range(h) for j in range(w)]  # rolled (i, j) -> original
    rolled = {p: (i, j) for (i, j), p in zip([(i, j) for i in range(h) for j in range(w)], pos)}
    for a in range(n):
        for b in range(n):
            (ia, ja), (ib, jb) = rolled[divmod(a, w)], rolled[divmod(b, w)]
            same_window = ia // win == ib // win and ja // win == jb // win
            same_region = ri[ia] == ri[ib] and rj[ja] == rj[jb]
            allowed[a, b] = same_window and same_region
    return allowed


@pytest.mark.parametrize("win,shift", [(2, 0), (2, 1), (3, 1)])
def test_unest_local_windows_match_swin_shifted_windows(win, shift):
    h, w = 6, 6
    fg = torch.zeros(1, h * w, dtype=torch.bool)
    _, local = structural_masks(fg, h, w, win, shift)
    assert torch.equal(local[0, 0], _swin_allowed(h, w, win, shift))


def test_unest_structural_attention_routes_foreground_globally_and_background_locally():
    torch.manual_seed(0)
    h = w = 6
    layer = StructuralTransformerLayer(16, 2, 32).eval()
    fg = torch.zeros(1, h * w, dtype=torch.bool)
    fg[0, [0, 35, 14]] = True  # two far corners and one middle token are foreground
    masks = structural_masks(fg, h, w, 2, 0)
    x = torch.randn(1, h * w, 16)

    def run(x):
        return layer(x, fg, *masks)[0]

    base = run(x)

    def bump(i):
        y = x.clone()
        y[0, i] += torch.linspace(-1.0, 1.0, 16)  # not a constant shift, which LayerNorm would remove
        return run(y)

    out = bump(1)  # background token (0, 1): in the window of token 0 (foreground) and 6, 7
    assert torch.allclose(out[[0, 35, 14]], base[[0, 35, 14]])  # foreground ignores background tokens
    changed = (out - base).abs().sum(-1) > 1e-6
    assert set(changed.nonzero().flatten().tolist()) == {1, 6, 7}  # its background window-mates (and itself)
    out = bump(35)  # a foreground token at the far corner reaches the other foreground tokens only
    changed = (out - base).abs().sum(-1) > 1e-6
    assert set(changed.nonzero().flatten().tolist()) == {0, 14, 35, 28, 29, 34}


def test_foreground_mask_threshold_and_dilation():
    x = -torch.ones(1, 3, 9, 9)
    x[0, 2, 4, 4] = 0.0  # one bright pixel in one slice
    m0 = foreground_mask(x, -0.9, 0)
    assert m0.shape == (1, 1, 9, 9) and m0.sum() == 1 and m0[0, 0, 4, 4] == 1
    m2 = foreground_mask(x, -0.9, 2)
    assert m2.sum() == 25 and m2[0, 0, 2:7, 2:7].all()
    assert foreground_mask(x, 0.5, 2).sum() == 0


# ----------------------------------------------------------------------------
# the methods


@pytest.mark.parametrize("name", METHODS)
def test_generator_and_discriminator_steps_touch_only_their_parameters(name):
    model = _build(name).train()
    batch = _batch()
    groups = model.optimizer_groups()
    assert list(groups) == ["discriminator", "generator"]
    d_ids = {id(p) for p in model.discriminator.parameters()}
    assert {id(p) for p in groups["discriminator"]} == d_ids
    assert {id(p) for p in groups["generator"]} == {id(p) for p in model.parameters()} - d_ids
    assert set(model.optim_configs()) == set(groups)
    opts = _adams(model)
    d, g = groups["discriminator"], groups["generator"]
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    before_d, before_g = _snapshot(d), _snapshot(g)
    model.training_losses(batch, group="discriminator")["loss"].backward()
    opts["discriminator"].step()
    assert any(_changed(before_d, d)) and not any(_changed(before_g, g))
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    before_d, before_g = _snapshot(d), _snapshot(g)
    model.training_losses(batch, group="generator")["loss"].backward()
    opts["generator"].step()
    assert not any(_changed(before_d, d)) and any(_changed(before_g, g))
    if hasattr(model, "gating"):  # the gates are part of the generator and learn
        assert any(_changed(before_g[:len(list(model.gating.parameters()))], list(model.gating.parameters())))


@pytest.mark.parametrize("name,kw", [("pix2pix", {}), ("unest", {"variant": "paired"}), ("unest", {})])
def test_one_generator_pass_per_step_and_the_generator_step_scores_the_discriminators_fake(name, kw):
    model = _build(name, **kw).train()
    calls = []
    orig = model.generate
    model.generate = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    batch = _batch()
    opts = _adams(model)
    d_before = _snapshot(model.optimizer_groups()["discriminator"])
    logs = _engine_step(model, batch, opts)
    assert len(calls) == 1  # one generator pass per iteration, like the official loop
    assert all(_changed(d_before, model.optimizer_groups()["discriminator"]))  # D stepped before G's loss
    if model.paired:  # the very fake the discriminator step saw (same dropout draw)
        assert logs["discriminator"]["loss_l1"] == logs["generator"]["loss_l1"]
    model.cfg.reuse_fake = False  # G runs again for its own step
    _engine_step(model, batch, opts)
    assert len(calls) == 3


def test_no_method_caches_on_object_identity_or_private_counters():
    import inspect

    import mmdm.methods.pix2pix as p2p
    import mmdm.methods.unest as unest

    for mod in (p2p, unest):
        src = inspect.getsource(mod)
        assert "_version" not in src and " is batch" not in src, mod.__name__


@pytest.mark.parametrize("name,kw,steps", [("pix2pix", {}, 50), ("resvit", {}, 40),
                                            ("unest", {"variant": "paired"}, 40)])
def test_a_few_dozen_steps_fit_a_fixed_batch(name, kw, steps):
    model = _build(name, **kw).train()
    batch = _batch()
    opts = _adams(model, lr=1e-3)
    model.eval()
    l1_start = F.l1_loss(model.sample(batch["sources"]), batch["target"]).item()
    model.train()
    logs = [_engine_step(model, batch, opts) for _ in range(steps)]
    first, last = logs[0]["generator"]["loss_l1"], logs[-1]["generator"]["loss_l1"]
    assert last < 0.15 * first, (first, last)
    assert all(math.isfinite(v) for step in logs for out in step.values() for v in out.values())
    model.eval()
    l1_end = F.l1_loss(model.sample(batch["sources"]), batch["target"]).item()
    assert l1_end < 0.5 * l1_start, (l1_start, l1_end)
    if name == "unest":  # the mask head learns the foreground too
        assert logs[-1]["generator"]["loss_mask"] < logs[0]["generator"]["loss_mask"]


@pytest.mark.parametrize("name,kw", [*PAIRED, ("unest", {})])
def test_sampling_shape_range_and_determinism(name, kw):
    model = _build(name, **kw).eval()
    batch = _batch()
    x = model.sample(batch["sources"], steps=3, eta=0.5)
    assert x.shape == batch["target"].shape and torch.isfinite(x).all()
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(model.sample(batch["sources"]), x)
    if not model.paired:
        return  # the unpaired objective: test_unest_unpaired_losses_match_an_independent_computation
    out = model.training_losses(batch)  # group "main", the whole model: generator losses + D loss for logging
    assert {"loss", "loss_g_gan", "loss_l1", "loss_d", "mse"} <= set(out)
    lam = model.cfg.lambda_l1
    extra = out.get("loss_mask", 0.0)
    torch.testing.assert_close(out["loss"].detach(), out["loss_g_gan"] + lam * out["loss_l1"] + extra)


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_round_trip_is_exact(name, tmp_path):
    from mmdm.engine.checkpoint import load_checkpoint, save_checkpoint

    model = _build(name, seed=0).train()
    batch = _batch()
    _engine_step(model, batch, _adams(model, lr=1e-3))  # move weights and batch-norm statistics
    save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict()})
    other = _build(name, seed=123)
    other.load_state_dict(load_checkpoint(tmp_path / "m.pt")["model"])
    model.eval(), other.eval()
    torch.testing.assert_close(other.sample(batch["sources"]), model.sample(batch["sources"]), rtol=0, atol=0)
    a, b = model.training_losses(batch), other.training_losses(batch)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_missing_modality_and_bad_group_give_clear_errors(name):
    model = _build(name)
    batch = _batch()
    partial = {"sources": {m: batch["sources"][m] for m in ("T1w", "T2w")}, "target": batch["target"]}
    with pytest.raises(ValueError, match=r"missing source modality\(ies\) \['FLAIR'\]"):
        model.training_losses(partial, group="discriminator")
    with pytest.raises(ValueError, match="missing source modality"):
        model.sample(partial["sources"])
    with pytest.raises(ValueError, match="unknown optimiser group 'encoder'"):
        model.training_losses(batch, group="encoder")
    with pytest.raises(ValueError, match="multiples of"):
        model.sample({m: v[..., :20] for m, v in batch["sources"].items()})


@pytest.mark.parametrize("name", METHODS)
def test_configs_round_trip_and_validate(name):
    cls = CONFIGS[name]
    small = build_method(name, config="small", sources=("T1w", "T2w")).cfg
    assert small.sources == ("T1w", "T2w")
    assert from_dict(cls, to_dict(small)) == small
    paper = cls()
    lr = 1e-4 if name == "unest" else 2e-4  # UNest's train_options.py; the pix2pix code base's 2e-4
    assert paper.optim.lr == lr and paper.optim.betas == (0.5, 0.999) and paper.optim_d.lr == lr
    assert paper.lambda_l1 == (0.0 if name == "unest" else 100.0)  # UNest is unpaired: no L1 to the target
    assert paper.gan_mode == ("vanilla" if name == "pix2pix" else "lsgan")
    with pytest.raises(ConfigError, match="unknown GAN objective"):
        build_method(name, config="small", gan_mode="hinge")
    with pytest.raises(ConfigError, match="unknown .* configuration 'huge'"):
        build_method(name, config="huge")
    built = build_method(name, config=to_dict(build_method(name, config="small").cfg))
    assert built.cfg == build_method(name, config="small").cfg


def test_deviations_are_documented():
    for dev in (P2P_DEV, RESVIT_DEV, UNEST_DEV):
        assert dev and all(isinstance(d, str) and len(d) > 40 for d in dev)
    assert any("ImageNet" in d for d in RESVIT_DEV) and any("SAM" in d for d in UNEST_DEV)


def test_unest_inference_mask_options():
    model = _build("unest", infer_mask="sources").eval()
    src = _batch()["sources"]
    cond = model.gating(model.source_list(src))
    expected = model.net(cond, model.token_mask(cond))[0].clamp(-1, 1)
    torch.testing.assert_close(model.sample(src), expected)
    predicted = _build("unest", infer_mask="predicted").eval()
    probs = predicted.predict_mask(src)
    assert probs.shape == (2, 1, 4, 4) and ((probs >= 0) & (probs <= 1)).all()
    expected = predicted.net(predicted.gating(predicted.source_list(src)), (probs > 0.5).float())[0].clamp(-1, 1)
    torch.testing.assert_close(predicted.sample(src), expected)


def test_patchgan_refuses_inputs_too_small_for_instance_norm():
    d = PatchGAN(2, PatchGANConfig(base=4, n_layers=3, norm="instance"))
    assert d.min_size == 24
    assert d(torch.randn(1, 1, 24, 24), torch.randn(1, 1, 24, 24)).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="needs at least 24x24"):
        d(torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16))


@pytest.mark.parametrize("name,kw", [*PAIRED, ("unest", {})])
def test_trains_through_the_engine_with_two_optimiser_groups(name, kw, tmp_path):
    """Two steps of the real trainer (checkpoint, validation and image panel included)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_dataset

    from mmdm.data.dataset import DataConfig
    from mmdm.engine.spec import TrainConfig
    from mmdm.engine.train import Trainer

    make_dataset(tmp_path / "data", n=4, shape=(32, 32, 8))
    cfg = TrainConfig(method=name, method_kwargs={"config": "small", **kw},
                      data=DataConfig(root=str(tmp_path / "data"), sources=("T1w", "T2w")), steps=2, epochs=None,
                      batch_size=2, seed=0, device="cpu", checkpoint_every=2, keep_last=1, log_every=1,
                      image_every=2, val_every=2, val_batches=1)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert list(trainer.optimizers) == ["discriminator", "generator"]
    assert trainer.optimizers["generator"].param_groups[0]["lr"] == trainer.method.cfg.optim.lr
    trainer.run()
    logs = trainer.last_losses
    assert {"discriminator/loss", "generator/loss"} <= set(logs)
    if trainer.method.paired:
        assert logs["discriminator/loss_l1"] == logs["generator/loss_l1"]  # the G step reused the D step's fake
    else:  # the published UNest: cycle terms, no paired L1, and the image pools were filled (batch 2, 2 steps)
        assert {"generator/loss_cycle_a", "generator/loss_cycle_b"} <= set(logs) and "generator/loss_l1" not in logs
        assert [len(p.images) for p in trainer.method.pools.values()] == [4, 4]
    assert (tmp_path / "run" / "checkpoints").is_dir()


# ----------------------------------------------------------------------------
# UNest's published, unpaired objective


def _lsgan(scores, label):
    return ((scores - label) ** 2).mean()


def test_unest_unpaired_losses_match_an_independent_computation():
    model = _build("unest").train()
    c = model.cfg
    assert c.objective == "unpaired" and c.lambda_l1 == 0.0 and not model.paired
    batch = _batch()
    b = batch["target"]
    with torch.no_grad():
        out = model.training_losses(batch)  # group=None: the generator loss (+ D's for logging), no pool update
        a = model.gating(model.source_list(batch["sources"]))
        m_a, m_b = model.token_mask(a), model.token_mask(b)
        fake_b, seg_a = model.net(a, m_a)
        rec_a = model.net_b(fake_b, m_a)[0]
        fake_a, seg_b = model.net_b(b, m_b)
        rec_b = model.net(fake_a, m_b)[0]
        d_t, d_s = model.discriminator["target"], model.discriminator["source"]
        cycle = 10 * (rec_a - a).abs().mean() + 10 * (rec_b - b).abs().mean()
        identity = 0.5 * 10 * ((model.net(b, m_b)[0] - b).abs().mean() + (model.net_b(a, m_a)[0] - a).abs().mean())
        bce = F.binary_cross_entropy(torch.sigmoid(seg_a), m_a) + F.binary_cross_entropy(torch.sigmoid(seg_b), m_b)
        adv = _lsgan(d_t(None, fake_b), 0.9) + _lsgan(d_s(None, fake_a), 0.9)
        d_loss = 0.5 * (_lsgan(d_t(None, b), 0.9) + _lsgan(d_t(None, fake_b), 0.1)) \
            + 0.5 * (_lsgan(d_s(None, a), 0.9) + _lsgan(d_s(None, fake_a), 0.1))
    torch.testing.assert_close(out["loss_cycle_a"] + out["loss_cycle_b"], cycle)
    torch.testing.assert_close(out["loss"], adv + cycle + identity + 0.5 * bce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_d"], d_loss)
    assert "loss_l1" not in out  # no paired term, not even as a log
    # the cycle reaches G_B (net_b), which the paired objective does not have
    model.zero_grad(set_to_none=True)
    model.training_losses(batch, group="generator")["loss"].backward()
    assert all(p.grad is not None for p in model.net_b.parameters())
    assert not hasattr(_build("unest", variant="paired"), "net_b")


def test_unest_unpaired_optimiser_groups_hold_both_generators_and_both_discriminators():
    model = _build("unest")
    groups = {k: {id(p) for p in v} for k, v in model.optimizer_groups().items()}
    ids = {name: {id(p) for p in module.parameters()} for name, module in
           (("G_A", model.net), ("G_B", model.net_b), ("gates", model.gating),
            ("D_target", model.discriminator["target"]), ("D_source", model.discriminator["source"]))}
    assert ids["G_A"] | ids["G_B"] | ids["gates"] == groups["generator"]
    assert ids["D_target"] | ids["D_source"] == groups["discriminator"]
    assert all(ids.values()) and not ids["G_A"] & ids["G_B"]  # two generators, no shared weights
    assert not list(model.pools.parameters())  # the image pools hold buffers only


def test_unest_unpaired_objective_never_uses_the_pairing():
    """Permuting the targets of a batch (each source window now meets another window's target)
    leaves every loss unchanged: the objective is unpaired."""
    model = _build("unest", pool_size=0).eval()  # eval: the D step leaves nothing behind
    batch = _batch(b=3)
    batch["target"][1, :, 10:20, 20:28] = 0.5  # three different targets
    batch["target"][2] = batch["target"][2].flip(-1)
    perm = {"sources": batch["sources"], "target": batch["target"][[2, 0, 1]]}
    for group in ("discriminator", "generator"):
        a, b = model.training_losses(batch, group=group), model.training_losses(perm, group=group)
        for k in a:
            if k != "mse":  # the monitor against the batch's own target is the one paired number
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    paired = _build("unest", variant="paired").eval()
    assert not torch.allclose(paired.training_losses(batch)["loss"], paired.training_losses(perm)["loss"])


def test_unest_variants_and_their_validation():
    paired = build_method("unest", config="small", variant="paired").cfg
    assert (paired.objective, paired.lambda_l1, paired.train_mask, paired.infer_mask, paired.optim.lr) == \
        ("paired", 100.0, "target", "predicted", 2e-4)
    assert build_method("unest", config="small", variant="unpaired").cfg == build_method("unest", config="small").cfg
    with pytest.raises(ConfigError, match="no paired L1 term.*variant 'paired'"):
        build_method("unest", config="small", lambda_l1=100.0)
    with pytest.raises(ConfigError, match="own input's mask"):
        build_method("unest", config="small", train_mask="target")
    with pytest.raises(ConfigError, match="unknown UNest variant 'cycle'"):
        build_method("unest", config="small", variant="cycle")
    with pytest.raises(ConfigError, match="unknown objective"):
        build_method("unest", config="small", objective="both")
    assert "no paired term" in _build("unest").objective() and "cycle L1 10/10" in _build("unest").objective()
    assert "100 x L1 to the target" in _build("unest", variant="paired").objective()


def test_unest_unpaired_training_shrinks_the_cycle_and_mask_losses():
    model = _build("unest", pool_size=0).train()
    batch = _batch()
    opts = _adams(model, lr=1e-3)
    logs = [_engine_step(model, batch, opts)["generator"] for _ in range(30)]
    for k in ("loss_cycle_a", "loss_cycle_b"):
        assert logs[-1][k] < 0.3 * logs[0][k], (k, logs[0][k], logs[-1][k])
    assert logs[-1]["loss_mask"] < logs[0]["loss_mask"]
    assert all(math.isfinite(v) for out in logs for v in out.values())


def test_image_pool_fills_then_swaps_half_of_the_queries_and_round_trips():
    pool = ImagePool(4)
    g = torch.Generator().manual_seed(0)
    first = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 3, 3)
    torch.testing.assert_close(pool.query(first, g), first)  # filling: the queries come back
    assert pool.images.shape == (4, 2, 3, 3)
    swapped = 0
    for i in range(400):
        img = torch.full((1, 2, 3, 3), 100.0 + i)
        before = pool.images.clone()
        out = pool.query(img, g)
        if torch.equal(out, img):
            assert torch.equal(pool.images, before)
        else:  # a stored image came back and the query took its place
            j = int((before == out[0]).all(dim=(1, 2, 3)).nonzero())
            assert torch.equal(pool.images[j], img[0])
            swapped += 1
    assert 160 < swapped < 240  # probability 1/2
    other = ImagePool(4)
    other.load_state_dict(pool.state_dict())  # the stored history travels in a checkpoint
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 3, 3)
    torch.testing.assert_close(other.query(x, g1), pool.query(x, g2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one window size"):
        pool.query(torch.zeros(1, 2, 4, 4), g)
    assert ImagePool(0).query(x) is not None and torch.equal(ImagePool(0).query(x), x)


def test_ema_copies_a_buffer_whose_shape_changed():
    from mmdm.engine.train import EMA, EMAConfig

    model = _build("unest").train()
    ema = EMA(model, EMAConfig(decay=0.5, start_step=0, every=1))
    _engine_step(model, _batch(), _adams(model))  # the pools grow from 0 to 2 images
    ema.update(model, 1)
    torch.testing.assert_close(ema.shadow["pools.target.images"], model.pools["target"].images)
    w = "net.patch_embed.weight"
    assert not torch.equal(ema.shadow[w], model.state_dict()[w])  # the weights are averaged, not copied


def test_every_registered_method_states_its_objective():
    from mmdm.methods import METHODS as REGISTRY

    for name in REGISTRY.names():
        text = build_method(name, config="small").objective()
        assert isinstance(text, str) and len(text) > 20, name
    assert "L1 to the target" in build_method("pix2pix", config="small").objective()


def test_unest_unpaired_resume_continues_bit_identically_with_its_image_pools(tmp_path):
    """Two generators, two discriminators and the pools are part of the checkpoint: a run resumed
    mid-way ends where an uninterrupted one does. The emphasis has nothing to weigh and says so."""
    import json
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_dataset

    from mmdm.data.dataset import DataConfig
    from mmdm.engine.checkpoint import load_checkpoint
    from mmdm.engine.train import TrainConfig, train
    from mmdm.losses.emphasis import EmphasisConfig

    make_dataset(tmp_path / "data", n=4, shape=(32, 32, 8))
    cfg = TrainConfig(method="unest", method_kwargs={"config": "small", "pool_size": 3},
                      data=DataConfig(root=str(tmp_path / "data"), sources=("T1w", "T2w")), steps=4, epochs=None,
                      batch_size=2, seed=0, device="cpu", checkpoint_every=2, keep_last=2, image_every=0,
                      emphasis=EmphasisConfig(kind="top_fraction", weight=20.0))
    ref = train(cfg, tmp_path / "ref", progress=False)
    emphasis = json.loads((ref / "train_complete.json").read_text())["emphasis"]
    assert emphasis["kind"] == "top_fraction" and emphasis["applied"] is False
    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    (run / "checkpoints" / "step-00000004.pt").unlink()  # as if killed after the step-2 checkpoint
    (run / "train_complete.json").unlink()
    mid = load_checkpoint(run / "checkpoints" / "step-00000002.pt")["model"]
    assert mid["pools.target.images"].shape[0] == 3  # full after 2 steps of batch 2: swaps follow
    train(cfg, run, resume=True, progress=False)
    a = load_checkpoint(ref / "checkpoints" / "step-00000004.pt")["model"]
    b = load_checkpoint(run / "checkpoints" / "step-00000004.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa = load_checkpoint(ref / "checkpoints" / "step-00000004.pt")["optimizers"]
    ob = load_checkpoint(run / "checkpoints" / "step-00000004.pt")["optimizers"]
    for group in ("discriminator", "generator"):  # both optimisers' moments too
        for i, st in oa[group]["state"].items():
            assert all(torch.equal(v, ob[group]["state"][i][n]) for n, v in st.items()), (group, i)
