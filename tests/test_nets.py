"""Tests of mmdm.nets: embeddings, Restormer blocks, Restormer-UNet, TimeUNet, fusion (eq. 4)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmdm.config import ConfigError, from_dict, to_dict
from mmdm.nets import (
    GDFN,
    MDTA,
    CrossModalFusion,
    FusionConfig,
    LayerNorm2d,
    RestormerUNet,
    RestormerUNetConfig,
    TimeUNet,
    TransformerBlock,
    UNetConfig,
    channel_attention,
    timestep_embedding,
)

SMALL_UNET = UNetConfig(base=8, mult=(1, 2), num_res_blocks=1, time_embed_dim=32, time_freq_dim=16)
SMALL_FUSION = FusionConfig(unet=SMALL_UNET)
OTHER_RESTORMER = RestormerUNetConfig(dim=12, mult=(1, 2, 4), num_blocks=(1, 2, 1), heads=(1, 2, 4),
                                      ffn_expansion=2.66, time_embed_dim=64, time_freq_dim=16, bias=True,
                                      layernorm="bias_free", in_kernel=3)


def _t(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# ---------------------------------------------------------------- embeddings
@pytest.mark.parametrize("dim", [8, 9])
def test_timestep_embedding_matches_formula(dim: int) -> None:
    t = [0, 1, 17, 999]
    emb = timestep_embedding(torch.tensor(t), dim)
    half = dim // 2
    assert emb.shape == (len(t), dim)
    for b, tb in enumerate(t):
        for i in range(half):
            f = 10000.0 ** (-i / half)
            assert emb[b, i].item() == pytest.approx(math.cos(tb * f), abs=1e-4)
            assert emb[b, half + i].item() == pytest.approx(math.sin(tb * f), abs=1e-4)
        if dim % 2:
            assert emb[b, -1].item() == 0.0


def test_timestep_embedding_float_and_int_agree_and_bad_shape_raises() -> None:
    assert torch.allclose(timestep_embedding(_t(3, 500), 16), timestep_embedding(torch.tensor([3.0, 500.0]), 16))
    with pytest.raises(ValueError, match="one timestep per sample"):
        timestep_embedding(torch.zeros(2, 2), 16)


# ---------------------------------------------------------------- Restormer blocks
@pytest.mark.parametrize("kind", ["with_bias", "bias_free"])
def test_layernorm2d_against_per_pixel_formula(kind: str) -> None:
    torch.manual_seed(0)
    ln = LayerNorm2d(6, kind)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        if ln.bias is not None:
            ln.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    y = ln(x)
    for b, i, j in [(0, 0, 0), (1, 4, 6), (0, 2, 3)]:
        v = x[b, :, i, j].double()
        mean = v.sum() / v.numel()
        var = ((v - mean) ** 2).sum() / v.numel()
        num = v - mean if kind == "with_bias" else v
        ref = num / torch.sqrt(var + 1e-5) * ln.weight.double()
        if ln.bias is not None:
            ref = ref + ln.bias.double()
        assert torch.allclose(y[b, :, i, j].double(), ref, atol=1e-5)


def _mdta_reference(m: MDTA, x: torch.Tensor) -> torch.Tensor:
    """MDTA computed without flattening pixels: explicit heads loop, spatial einsums."""
    qkv = F.conv2d(x, m.qkv.weight, m.qkv.bias)
    qkv = F.conv2d(qkv, m.qkv_dw.weight, m.qkv_dw.bias, padding=1, groups=qkv.shape[1])
    dim = x.shape[1]
    q, k, v = qkv[:, :dim], qkv[:, dim:2 * dim], qkv[:, 2 * dim:]
    c = dim // m.heads
    outs = []
    for h in range(m.heads):
        sl = slice(h * c, (h + 1) * c)
        qh, kh, vh = q[:, sl], k[:, sl], v[:, sl]
        qh = qh / qh.pow(2).sum(dim=(2, 3), keepdim=True).sqrt().clamp_min(1e-12)
        kh = kh / kh.pow(2).sum(dim=(2, 3), keepdim=True).sqrt().clamp_min(1e-12)
        logits = torch.einsum("biyx,bjyx->bij", qh, kh) * m.temperature[h]
        weights = torch.exp(logits - logits.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        outs.append(torch.einsum("bij,bjyx->biyx", weights, vh))
    return F.conv2d(torch.cat(outs, dim=1), m.project.weight, m.project.bias)


@pytest.mark.parametrize("bias", [False, True])
def test_mdta_matches_reference_on_non_square_input(bias: bool) -> None:
    torch.manual_seed(1)
    m = MDTA(8, heads=2, bias=bias)
    with torch.no_grad():
        m.temperature.copy_(torch.tensor([0.7, 2.5]))
    x = torch.randn(2, 8, 12, 20)
    assert torch.allclose(m(x), _mdta_reference(m, x), atol=1e-5)


def test_channel_attention_is_equivariant_to_pixel_permutation() -> None:
    torch.manual_seed(2)
    b, c, h, w = 2, 6, 6, 10
    q, k, v = (torch.randn(b, c, h, w) for _ in range(3))
    temp = torch.tensor([1.5, 0.3, 4.0])
    perm = torch.randperm(h * w)

    def permute(z: torch.Tensor) -> torch.Tensor:
        return z.reshape(b, c, h * w)[:, :, perm].reshape(b, c, h, w)

    out = channel_attention(q, k, v, temp, heads=3)
    out_p = channel_attention(permute(q), permute(k), permute(v), temp, heads=3)
    assert torch.allclose(out_p, permute(out), atol=1e-5)
    assert not torch.allclose(out, permute(out), atol=1e-3)  # the permutation is not trivial


def _transposed_kernels(module: torch.nn.Module) -> torch.nn.Module:
    mt = copy.deepcopy(module)
    with torch.no_grad():
        for mod in mt.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.copy_(mod.weight.transpose(-1, -2).clone())
    return mt


def test_transformer_block_is_transpose_equivariant_on_non_square_input() -> None:
    # The reference code's (w h) / (h w) reshape mismatch breaks this property.
    torch.manual_seed(3)
    blk = TransformerBlock(8, heads=2, ffn_expansion=2.0)
    x = torch.randn(1, 8, 12, 20)
    y = blk(x)
    yt = _transposed_kernels(blk)(x.transpose(-1, -2))
    assert yt.shape == (1, 8, 20, 12)
    assert torch.allclose(yt, y.transpose(-1, -2), atol=1e-5)


def test_gdfn_matches_reference() -> None:
    torch.manual_seed(4)
    g = GDFN(6, expansion=2.0, bias=True)
    x = torch.randn(2, 6, 8, 10)
    h = F.conv2d(x, g.project_in.weight, g.project_in.bias)
    h = F.conv2d(h, g.dw.weight, g.dw.bias, padding=1, groups=24)
    gelu = 0.5 * h[:, :12] * (1 + torch.erf(h[:, :12] / math.sqrt(2.0)))
    ref = F.conv2d(gelu * h[:, 12:], g.project_out.weight, g.project_out.bias)
    assert torch.allclose(g(x), ref, atol=1e-5)


# ---------------------------------------------------------------- whole networks
@pytest.mark.parametrize("cfg", [RestormerUNetConfig(), OTHER_RESTORMER], ids=["authors", "other"])
@pytest.mark.parametrize("hw", [(96, 112), (48, 64)])
def test_restormer_unet_shapes(cfg: RestormerUNetConfig, hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = RestormerUNet(10, 5, cfg)
    with torch.no_grad():
        y = net(torch.randn(1, 10, *hw), _t(999))
    assert y.shape == (1, 5, *hw)
    assert torch.isfinite(y).all()


def test_time_unet_shapes_with_attention() -> None:
    torch.manual_seed(0)
    cfg = UNetConfig(base=8, mult=(1, 2, 2), num_res_blocks=2, attention=True, groups=4, time_embed_dim=32)
    net = TimeUNet(3, 2, cfg)
    with torch.no_grad():
        y = net(torch.randn(2, 3, 24, 40), _t(5, 700))
    assert y.shape == (2, 2, 24, 40) and torch.isfinite(y).all()


@pytest.mark.parametrize("n_mod", [2, 3])
def test_fusion_shapes(n_mod: int) -> None:
    torch.manual_seed(0)
    fus = CrossModalFusion(n_mod, 5, SMALL_FUSION)
    xs = [torch.randn(2, 5, 16, 24) for _ in range(2 * n_mod)]
    with torch.no_grad():
        y = fus(xs[:n_mod], xs[n_mod:], _t(1, 400))
    assert y.shape == (2, 5, 16, 24) and torch.isfinite(y).all()


def test_fusion_authors_size_runs_non_square() -> None:
    torch.manual_seed(0)
    fus = CrossModalFusion(3, 5)
    xs = [torch.randn(1, 5, 16, 28) for _ in range(6)]
    with torch.no_grad():
        y = fus(xs[:3], xs[3:], _t(250))
    assert y.shape == (1, 5, 16, 28) and torch.isfinite(y).all()


def test_fusion_branch_mixer_sees_own_prediction_and_other_sources_only() -> None:
    torch.manual_seed(5)
    fus = CrossModalFusion(3, 2, SMALL_FUSION)
    seen: dict[int, torch.Tensor] = {}
    for m, mixer in enumerate(fus.per_modality):
        mixer.register_forward_hook(lambda mod, inp, out, m=m: seen.__setitem__(m, inp[0].detach().clone()))
    preds = [torch.randn(1, 2, 8, 8) for _ in range(3)]
    srcs = [torch.randn(1, 2, 8, 8) for _ in range(3)]
    with torch.no_grad():
        fus(preds, srcs, _t(10))
    for m in range(3):
        others = [srcs[j] for j in range(3) if j != m]
        assert torch.equal(seen[m], torch.cat([preds[m], *others], dim=1))


def test_time_conditioning_changes_outputs() -> None:
    torch.manual_seed(6)
    x = torch.randn(1, 10, 16, 16)
    nets = [
        (RestormerUNet(10, 5), (x,)),
        (TimeUNet(10, 5, SMALL_UNET), (x,)),
    ]
    fus = CrossModalFusion(2, 5, SMALL_FUSION)
    with torch.no_grad():
        for net, args in nets:
            a, a2, b = net(*args, _t(10)), net(*args, _t(10)), net(*args, _t(600))
            assert torch.equal(a, a2)
            assert (a - b).abs().max() > 1e-4
        parts = list(x.split(5, dim=1))
        a, b = fus(parts, parts[::-1], _t(10)), fus(parts, parts[::-1], _t(600))
        assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("hw", [(30, 32), (32, 36)])
def test_indivisible_sizes_raise_clear_error(hw: tuple[int, int]) -> None:
    net = RestormerUNet(10, 5)
    with pytest.raises(ValueError, match=rf"{hw[0]}x{hw[1]} is not supported.*multiples of 8"):
        net(torch.randn(1, 10, *hw), _t(0))
    unet = TimeUNet(2, 2, SMALL_UNET)  # 2 levels: multiples of 2 -> 30x32 and 32x36 are fine
    assert unet(torch.randn(1, 2, *hw), _t(0)).shape == (1, 2, *hw)
    with pytest.raises(ValueError, match="multiples of 2"):
        unet(torch.randn(1, 2, 31, 32), _t(0))
    fus = CrossModalFusion(2, 1, FusionConfig())  # fusion UNet of 3 levels: multiples of 4
    with pytest.raises(ValueError, match="CrossModalFusion.*multiples of 4"):
        fus([torch.zeros(1, 1, 10, 12)] * 2, [torch.zeros(1, 1, 10, 12)] * 2, _t(0))


def _assert_all_parameters_get_gradients(net: torch.nn.Module, loss: torch.Tensor) -> None:
    net.zero_grad(set_to_none=True)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(7)
    t = _t(3, 800)
    net = RestormerUNet(10, 5, OTHER_RESTORMER)
    _assert_all_parameters_get_gradients(net, net(torch.randn(2, 10, 16, 24), t).pow(2).mean())
    net = RestormerUNet(10, 5)
    _assert_all_parameters_get_gradients(net, net(torch.randn(2, 10, 16, 24), t).pow(2).mean())
    unet = TimeUNet(3, 2, UNetConfig(base=8, mult=(1, 2), attention=True, time_embed_dim=32))
    _assert_all_parameters_get_gradients(unet, unet(torch.randn(2, 3, 8, 12), t).pow(2).mean())
    for n_mod in (2, 3):
        fus = CrossModalFusion(n_mod, 2, SMALL_FUSION)
        xs = [torch.randn(2, 2, 8, 12) for _ in range(2 * n_mod)]
        _assert_all_parameters_get_gradients(fus, fus(xs[:n_mod], xs[n_mod:], t).pow(2).mean())


def test_outputs_do_not_depend_on_batch_composition() -> None:
    torch.manual_seed(8)
    net = RestormerUNet(10, 5)
    x, t = torch.randn(3, 10, 16, 24), _t(1, 2, 3)
    with torch.no_grad():
        full = net(x, t)
        single = net(x[1:2], t[1:2])
    assert torch.allclose(full[1:2], single, atol=1e-5)
    fus = CrossModalFusion(2, 2, SMALL_FUSION)
    xs = [torch.randn(3, 2, 8, 8) for _ in range(4)]
    with torch.no_grad():
        full = fus(xs[:2], xs[2:], t)
        single = fus([z[2:] for z in xs[:2]], [z[2:] for z in xs[2:]], t[2:])
    assert torch.allclose(full[2:], single, atol=1e-5)


def test_construction_is_deterministic_given_seed() -> None:
    def build() -> list[torch.Tensor]:
        torch.manual_seed(123)
        return [p.detach().clone() for p in
                list(RestormerUNet(10, 5).parameters()) + list(CrossModalFusion(2, 5, SMALL_FUSION).parameters())]

    a, b = build(), build()
    assert len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


# ---------------------------------------------------------------- configs and errors
def test_configs_round_trip_and_reject_unknown_keys() -> None:
    for cfg in (OTHER_RESTORMER, SMALL_UNET, FusionConfig(heads=3, unet=SMALL_UNET)):
        assert from_dict(type(cfg), to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(FusionConfig, {"unet": {"channels": 4}})


def test_inconsistent_configs_raise() -> None:
    with pytest.raises(ConfigError, match="one entry per level"):
        RestormerUNet(10, 5, RestormerUNetConfig(mult=(1, 2), num_blocks=(1,), heads=(1, 1)))
    with pytest.raises(ConfigError, match="multiple of the number of heads"):
        RestormerUNet(10, 5, RestormerUNetConfig(dim=6, mult=(1,), num_blocks=(1,), heads=(4,)))
    with pytest.raises(ConfigError, match="at least 2 modalities"):
        CrossModalFusion(1, 5)
    with pytest.raises(ConfigError, match="cannot be split into 4 heads"):
        CrossModalFusion(3, 5, FusionConfig(mixer="restormer", heads=4))


def test_fusion_rejects_wrong_inputs() -> None:
    fus = CrossModalFusion(3, 2, SMALL_FUSION)
    z = torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match="built for 3 modalities"):
        fus([z, z], [z, z], _t(0))
    with pytest.raises(ValueError, match=r"sources\[1\] has shape \(1, 3, 8, 8\)"):
        fus([z, z, z], [z, torch.zeros(1, 3, 8, 8), z], _t(0))
    with pytest.raises(ValueError, match="one timestep per sample"):
        fus([z, z, z], [z, z, z], _t(0, 1))


# ---------------------------------------------------------------- precision and memory format
def test_bf16_autocast_and_channels_last_match_fp32() -> None:
    torch.manual_seed(9)
    net = RestormerUNet(10, 5)
    fus = CrossModalFusion(2, 5, SMALL_FUSION)
    x, t = torch.randn(2, 10, 16, 24), _t(7, 300)
    parts = list(x.split(5, dim=1))
    with torch.no_grad():
        ref_net, ref_fus = net(x, t), fus(parts, parts[::-1], t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_net, low_fus = net(x, t), fus(parts, parts[::-1], t)
        for ref, low in ((ref_net, low_net), (ref_fus, low_fus)):
            rel = (low.float() - ref).norm() / ref.norm()
            assert rel < 0.05, f"bf16 autocast deviates by {rel:.3f} (relative L2) from fp32"
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        fus_cl = copy.deepcopy(fus).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        parts_cl = [p.contiguous(memory_format=torch.channels_last) for p in parts]
        assert torch.allclose(net_cl(x_cl, t), ref_net, atol=1e-4)
        assert torch.allclose(fus_cl(parts_cl, parts_cl[::-1], t), ref_fus, atol=1e-4)
