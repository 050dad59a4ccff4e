import pytest
import torch

from mmdm.nets.gating import ModalityGating


def test_gates_sum_to_one_and_output_is_convex_combination():
    torch.manual_seed(0)
    g = ModalityGating(3, 5)
    for p in g.parameters():  # leave the zero init so gates are not trivially uniform
        torch.nn.init.normal_(p, std=0.5)
    xs = [torch.randn(2, 5, 8, 12) for _ in range(3)]
    gates = g.gates(xs)
    assert gates.shape == (2, 3, 5, 8, 12)
    torch.testing.assert_close(gates.sum(1), torch.ones(2, 5, 8, 12))
    assert gates.std() > 0.01  # not uniform
    out = g(xs)
    stack = torch.stack(xs, 1)
    assert torch.all(out <= stack.max(1).values + 1e-6) and torch.all(out >= stack.min(1).values - 1e-6)
    torch.testing.assert_close(out, (gates * stack).sum(1))


def test_initial_gates_give_the_mean():
    g = ModalityGating(2, 5)
    xs = [torch.randn(1, 5, 4, 4), torch.randn(1, 5, 4, 4)]
    torch.testing.assert_close(g(xs), (xs[0] + xs[1]) / 2)


def test_wrong_number_of_modalities_is_a_clear_error():
    g = ModalityGating(3, 5)
    with pytest.raises(ValueError, match="built for 3 source modalities but got 2"):
        g([torch.randn(1, 5, 4, 4)] * 2)
    with pytest.raises(ValueError, match=r"expected \(B, 5, H, W\)"):
        g([torch.randn(1, 4, 4, 4)] * 3)


def test_gradients_reach_gate_network():
    g = ModalityGating(3, 5)
    xs = [torch.randn(2, 5, 8, 8) for _ in range(3)]
    g(xs).square().mean().backward()
    assert all(p.grad is not None for p in g.parameters())
    assert g.net[-1].weight.grad.abs().sum() > 0
