"""The fused 1x1 + 3x3 convolution pairs of the authors' blocks (``mmdm.nets.resunet.conv_pairs``)
compute what the two convolutions compute, up to floating-point rounding, with the same parameters.

Tolerances: in float64 the fused and the unfused forms agree to ~1e-15 relative (only the order of
the sums differs), so 1e-10 fails on any real difference (a missing border tap, a wrong bias) and
never on rounding. In float32 a whole block agrees to ~1e-6 relative; its global channel softmax
can amplify rounding of the logits, so the network checks use 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from mmdm.nets import DenseRestormerBlock, ResUNet, ResUNetConfig
from mmdm.nets.resunet import _conv_pair, conv_pairs, unfused_conv_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ResUNetConfig(base=4, mult=(1, 2, 4), groups=2, ffn_expansion=2, time_embed_dim=32, time_freq_dim=16)


def _grads(fn, x, params):
    y = fn()
    return y, torch.autograd.grad(y.sin().sum(), [x, *params])


@pytest.mark.parametrize("hw", [(16, 24), (3, 7), (2, 2), (1, 5), (5, 1)])
def test_fused_pairs_equal_the_two_convolutions_in_float64_with_their_gradients(hw):
    torch.manual_seed(0)
    pairs = [_conv_pair(3, 6).double(), _conv_pair(3, 6).double()]
    for p in pairs:  # non-zero biases everywhere, so a wrong border term shows
        for q in p.parameters():
            q.data.normal_(0, 0.5)
    params = [q for p in pairs for q in p.parameters()]
    x = torch.randn(2, 3, *hw, dtype=torch.float64, requires_grad=True)
    y, g = _grads(lambda: conv_pairs(pairs, x), x, params)
    with unfused_conv_pairs():
        y0, g0 = _grads(lambda: conv_pairs(pairs, x), x, params)
    assert y.shape == (2, 12, *hw)
    torch.testing.assert_close(y, y0, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_border_bias_matters_and_is_reproduced():
    """With zero inputs a pair's output is its bias map: b3 + W3 b1 inside, less at the border."""
    torch.manual_seed(1)
    pair = _conv_pair(2, 3).double()
    x = torch.zeros(1, 2, 5, 6, dtype=torch.float64)
    fused = conv_pairs([pair], x)
    assert not torch.allclose(fused[0, :, 0, 0], fused[0, :, 2, 2])  # corner != inside
    torch.testing.assert_close(fused, pair(x), rtol=1e-12, atol=1e-12)


def test_a_block_keeps_its_parameters_and_their_names():
    """Old checkpoints load: the fused block has exactly the parameters of the two-convolution block."""
    block = DenseRestormerBlock(4, 8, groups=2)
    keys = set(block.state_dict())
    for path in ("q", "k", "v"):
        assert {f"attn.{path}.0.weight", f"attn.{path}.0.bias", f"attn.{path}.1.weight", f"attn.{path}.1.bias"} <= keys
    for path in ("gate", "value"):
        assert {f"ffn.{path}.0.weight", f"ffn.{path}.1.weight"} <= keys
    assert block.attn.q[0].weight.shape == (8, 8, 1, 1) and block.ffn.gate[1].weight.shape == (32, 32, 3, 3)


def test_the_branch_network_agrees_fused_and_unfused_in_fp32_and_bf16():
    torch.manual_seed(2)
    net = ResUNet(10, 5, TINY)
    x, t = torch.randn(2, 10, 16, 24), torch.tensor([3, 700])
    y = net(x, t)
    grads = torch.autograd.grad(y.square().mean(), list(net.parameters()))
    with unfused_conv_pairs():
        y0 = net(x, t)
        grads0 = torch.autograd.grad(y0.square().mean(), list(net.parameters()))
    torch.testing.assert_close(y, y0, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, grads0):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, t).float()
        with unfused_conv_pairs():
            low0 = net(x, t).float()
    assert (low - low0).norm() / low0.norm() < 0.05  # both within bf16's rounding of fp32
    assert (low - y.detach()).norm() / y.norm() < 0.05


def test_channels_last_input_gives_the_same_result():
    torch.manual_seed(3)
    block = DenseRestormerBlock(4, 8, groups=2)
    x = torch.randn(2, 4, 8, 12)
    ref = block(x)
    torch.testing.assert_close(block.to(memory_format=torch.channels_last)(x.contiguous(
        memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-5)


def test_sampling_reuses_the_composed_weights_until_a_parameter_changes():
    """With gradients off the composed weights are kept between calls: the output is bit for bit the
    one made afresh, and any change of a weight (an optimiser step, loading a state, an EMA swap:
    all in place) is seen by the next call."""
    import mmdm.nets.resunet as resunet

    torch.manual_seed(3)
    net = ResUNet(10, 5, TINY).eval()
    x, t = torch.randn(2, 10, 16, 24), torch.tensor([5, 700])
    composed = []
    real = resunet._compose
    with torch.no_grad():
        first = net(x, t)
        try:
            resunet._compose = lambda *a: composed.append(1) or real(*a)
            again = net(x, t)  # everything reused
            assert composed == []
            with torch.enable_grad():
                fresh = net(x, t).detach()  # gradients on: composed afresh at every call
            assert len(composed) > 0
            composed.clear()
        finally:
            resunet._compose = real
        assert torch.equal(first, again) and torch.equal(first, fresh)
        before = net(x, t)
        pair = net.enc_blocks[0].ffn.gate
        pair[0].weight.add_(0.1)  # in place, like an optimiser step
        stepped = net(x, t)
        other = ResUNet(10, 5, TINY).eval()
        other.load_state_dict(net.state_dict())
        assert not torch.equal(stepped, before)
        assert torch.equal(stepped, other(x, t))
        new_state = ResUNet(10, 5, TINY).state_dict()
        net.load_state_dict(new_state)  # copied into the same tensors
        other.load_state_dict(new_state)
        assert torch.equal(net(x, t), other(x, t)) and not torch.equal(net(x, t), stepped)
