"""MIP loss (eqs. (5)-(6)), hybrid loss (eq. (7)) and NAWS (eqs. (8)-(11))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmdm.losses import NAWS, cumulative_max, gumbel_cumulative_mip, hybrid_loss, mip_loss


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _vessel_window(b=2, k=5, h=16, w=16, slices=(0, 1, 2, 3, 4)):
    """Background -1, a bright vertical "vessel" (+1) in the given slices."""
    x = -torch.ones(b, k, h, w, dtype=torch.float64)
    for s in slices:
        x[:, s, 4:12, 7:9] = 1.0
    return x


# -- eq. (5) -------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
def test_cumulative_max_matches_a_direct_loop(reverse):
    x = torch.randn(3, 6, 4, 5, generator=_gen())
    out = cumulative_max(x, dim=1, reverse=reverse).numpy()
    xn = x.numpy()
    for i in range(6):
        ref = xn[:, i:].max(1) if reverse else xn[:, : i + 1].max(1)
        np.testing.assert_array_equal(out[:, i], ref)
    # another axis
    out_last = cumulative_max(x, dim=-1)
    np.testing.assert_array_equal(out_last.numpy()[..., 2], xn[..., :3].max(-1))
    with pytest.raises(ValueError, match="out of range"):
        cumulative_max(x, dim=4)


# -- eq. (6) -------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("tau", [0.75, 1e-3])
def test_soft_mip_equals_one_softmax_per_projection_with_its_gradients(reverse, tau):
    """Eq. (6) written out: projection i is softmax over the allowed slices j of (x_j + g_j) / tau,
    one separate softmax per i; the running form agrees to float64 rounding, gradients included,
    also at a temperature where the logits span thousands."""
    x = torch.randn(2, 5, 4, 3, generator=_gen(11), dtype=torch.float64, requires_grad=True)
    g = -torch.log(-torch.log(torch.rand(x.shape, generator=_gen(12), dtype=torch.float64)))
    soft = gumbel_cumulative_mip(x, tau, dim=1, reverse=reverse, noise=g)
    rows = []
    for i in range(5):
        js = list(range(i, 5)) if reverse else list(range(i + 1))
        w = torch.softmax((x[:, js] + g[:, js]) / tau, dim=1)
        rows.append((w * x[:, js]).sum(1))
    expect = torch.stack(rows, 1)
    torch.testing.assert_close(soft, expect, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(soft.sin().sum(), x)[0]
    gb = torch.autograd.grad(expect.sin().sum(), x)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reverse", [False, True])
def test_gumbel_mip_is_a_convex_combination_of_the_allowed_slices(reverse):
    x = torch.randn(2, 5, 6, 6, generator=_gen(1), dtype=torch.float64)
    soft = gumbel_cumulative_mip(x, tau=0.75, reverse=reverse, generator=_gen(2))
    lo = -cumulative_max(-x, reverse=reverse)  # cumulative min
    hi = cumulative_max(x, reverse=reverse)
    assert torch.all(soft >= lo - 1e-12) and torch.all(soft <= hi + 1e-12)
    end = 4 if reverse else 0  # a single allowed slice: exactly that slice
    torch.testing.assert_close(soft[:, end], x[:, end])
    const = torch.full_like(x, 0.3)
    torch.testing.assert_close(gumbel_cumulative_mip(const, generator=_gen(3)), const)


@pytest.mark.parametrize("reverse", [False, True])
def test_soft_mip_tends_to_hard_cumulative_max_as_tau_goes_to_zero(reverse):
    x = torch.rand(2, 5, 8, 8, generator=_gen(4), dtype=torch.float64) * 2 - 1
    hard = cumulative_max(x, reverse=reverse)
    zeros = torch.zeros_like(x)  # without the Gumbel perturbation the limit is the exact maximum
    errs = [(gumbel_cumulative_mip(x, tau, reverse=reverse, noise=zeros) - hard).abs().max().item()
            for tau in (1.0, 0.1, 1e-7)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-6
    # with Gumbel noise the limit is the maximum when intensities are far apart (gaps of 100)
    big = x.argsort(dim=1).argsort(dim=1).double() * 100
    soft = gumbel_cumulative_mip(big, 1e-3, reverse=reverse, generator=_gen(5))
    torch.testing.assert_close(soft, cumulative_max(big, reverse=reverse))


def test_gumbel_max_trick_selects_slices_with_softmax_probabilities():
    """At tau -> 0, slice j wins with probability softmax(x)_j (Gumbel-max trick)."""
    x = torch.zeros(1, 2, 200, 200, dtype=torch.float64)
    x[:, 1] = math.log(3.0)  # P(slice 1) = 3 / (1 + 3)
    soft = gumbel_cumulative_mip(x, tau=1e-4, generator=_gen(6))
    frac = (soft[:, 1] > math.log(3.0) / 2).double().mean().item()
    assert abs(frac - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 40000)


def test_gumbel_noise_is_reproducible_with_a_generator():
    x = torch.randn(1, 5, 4, 4)
    a = gumbel_cumulative_mip(x, generator=_gen(7))
    b = gumbel_cumulative_mip(x, generator=_gen(7))
    c = gumbel_cumulative_mip(x, generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- L_MIP ---------------------------------------------------------------------------
def test_mip_loss_gradients_reach_every_slice():
    target = _vessel_window(b=1)
    pred = (target * 0.5).requires_grad_(True)
    mip_loss(pred, target, generator=_gen(9)).backward()
    g = pred.grad
    assert torch.isfinite(g).all()
    per_slice = g.abs().flatten(2).sum(-1)[0]
    assert torch.all(per_slice > 0)  # the soft maximum passes gradient to non-maximal slices too


def test_mip_loss_is_near_zero_for_a_perfect_prediction_at_small_tau():
    target = _vessel_window()
    assert mip_loss(target, target, tau=1e-3, gumbel=False).item() < 1e-12
    # vessel contrast far above the unit-scale Gumbel noise: near zero with the noise too
    big = target * 50
    assert mip_loss(big, big, tau=1e-3, generator=_gen(10)).item() < 1e-6


def test_gumbel_mip_loss_of_a_perfect_prediction_is_positive_at_intensity_scale_one():
    """Documented property: with [-1, 1] data the unit Gumbel noise often picks a dark slice."""
    target = _vessel_window(slices=(2,))
    losses = [mip_loss(target, target, tau=0.75, generator=_gen(s)).item() for s in range(5)]
    assert min(losses) > 0.01


@pytest.mark.parametrize("vessel_slices,removed", [((0, 1, 2, 3, 4), 2), ((2,), 2)])
def test_mip_loss_grows_when_a_vessel_is_removed_from_one_slice(vessel_slices, removed):
    target = _vessel_window(slices=vessel_slices)
    pred = target.clone()
    pred[:, removed, 4:12, 7:9] = -1.0
    same = mip_loss(target, target, tau=0.75, generator=_gen(11))
    broken = mip_loss(pred, target, tau=0.75, generator=_gen(11))  # same Gumbel draws
    assert broken.item() > same.item() + 1e-3
    if vessel_slices == (2,):  # the vessel vanishes from every projection: a large increase
        assert broken.item() > 3 * same.item()


def test_mip_loss_reduction_none_is_per_sample():
    target = _vessel_window(b=3)
    pred = target + 0.1 * torch.randn(target.shape, generator=_gen(12), dtype=torch.float64)
    per = mip_loss(pred, target, reduction="none", generator=_gen(13))
    mean = mip_loss(pred, target, reduction="mean", generator=_gen(13))
    assert per.shape == (3,)
    torch.testing.assert_close(per.mean(), mean)
    with pytest.raises(ValueError, match="differ in shape"):
        mip_loss(pred[:, :4], target)


# -- eq. (7) -------------------------------------------------------------------------
def test_hybrid_loss_is_mse_plus_mip():
    target = _vessel_window()
    pred = target + 0.2 * torch.randn(target.shape, generator=_gen(14), dtype=torch.float64)
    hyb = hybrid_loss(pred, target, use_mip=True, tau=0.5, generator=_gen(15))
    ref = F.mse_loss(pred, target) + mip_loss(pred, target, tau=0.5, generator=_gen(15))
    torch.testing.assert_close(hyb, ref)
    torch.testing.assert_close(hybrid_loss(pred, target, use_mip=False), F.mse_loss(pred, target))
    per = hybrid_loss(pred, target, use_mip=False, reduction="none")
    torch.testing.assert_close(per, ((pred - target) ** 2).mean((1, 2, 3)))


# -- NAWS, eqs. (8)-(11) ------------------------------------------------------------------
def _eq11_reference(l0, lm, delta, p0, pm):
    """Eq. (11) written out sample by sample in plain Python, averaged over the batch."""
    totals = []
    for s in range(len(l0)):
        a0 = p0**2
        total = 0.5 / a0 * l0[s] + math.log(1 + a0)
        for m in range(len(pm)):
            am = pm[m] ** 2 + delta[s]
            total += 0.5 / am * lm[s][m] + math.log(1 + am)
        totals.append(total)
    return sum(totals) / len(totals)


def test_naws_total_follows_eq11():
    naws = NAWS(3, ["T1w", "T2w", "FLAIR"]).double()
    with torch.no_grad():
        naws.p0.fill_(0.7)
        naws.pm.copy_(torch.tensor([1.3, 0.4, 2.0], dtype=torch.float64))
    l0 = torch.tensor([0.2, 0.05, 0.9, 0.3], dtype=torch.float64)
    lm = torch.tensor([[0.3, 0.1, 0.5], [0.2, 0.2, 0.2], [1.0, 0.7, 0.4], [0.0, 0.3, 0.6]], dtype=torch.float64)
    delta = torch.tensor([0.01, 0.3, 0.5, 0.002], dtype=torch.float64)
    total, w = naws(l0, lm, delta)
    ref = _eq11_reference(l0.tolist(), lm.tolist(), delta.tolist(), 0.7, [1.3, 0.4, 2.0])
    assert total.item() == pytest.approx(ref, rel=1e-12)
    assert w["w_fused"].item() == pytest.approx(0.5 / 0.49)
    assert w["w_T2w"].item() == pytest.approx(np.mean([0.5 / (0.16 + d) for d in delta.tolist()]))


def test_naws_initialisation_and_gradients_reach_every_weight():
    naws = NAWS(2)
    assert naws.p0.item() == 1.0 and torch.all(naws.pm == 1.0)
    total, _ = naws(torch.tensor([0.5, 0.1]), torch.tensor([[0.4, 0.2], [0.3, 0.1]]), torch.tensor([0.2, 0.4]))
    total.backward()
    assert naws.p0.grad is not None and naws.p0.grad.abs() > 0
    assert naws.pm.grad is not None and torch.all(naws.pm.grad.abs() > 0)


def test_naws_stationary_point_is_the_analytic_optimum():
    """For a fixed loss L, 0.5 L / a + log(1 + a) is minimal where a^2 = L (1 + a) / 2."""
    L = 0.3
    a_star = (0.5 * L + math.sqrt(0.25 * L * L + 2 * L)) / 2
    naws = NAWS(1).double()
    with torch.no_grad():
        naws.p0.fill_(math.sqrt(a_star))
    total, _ = naws(torch.tensor([L], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
                    torch.zeros(1, dtype=torch.float64))
    total.backward()
    assert abs(naws.p0.grad.item()) < 1e-10


def test_naws_per_sample_delta_differs_from_first_sample_delta():
    l0 = torch.tensor([0.2, 0.4, 0.1])
    lm = torch.tensor([[0.3, 0.1], [0.2, 0.5], [0.6, 0.6]])
    delta = torch.tensor([0.01, 0.45, 0.2])  # different t in the batch
    per, _ = NAWS(2, per_sample=True)(l0, lm, delta)
    first, _ = NAWS(2, per_sample=False)(l0, lm, delta)
    assert abs(per.item() - first.item()) > 1e-3
    ref_first = _eq11_reference(l0.tolist(), lm.tolist(), [0.01] * 3, 1.0, [1.0, 1.0])
    assert first.item() == pytest.approx(ref_first, rel=1e-6)
    same = torch.full((3,), 0.2)
    a, _ = NAWS(2, per_sample=True)(l0, lm, same)
    b, _ = NAWS(2, per_sample=False)(l0, lm, same)
    torch.testing.assert_close(a, b)


def test_naws_rejects_mismatched_shapes():
    naws = NAWS(3)
    with pytest.raises(ValueError, match=r"\(B, M\)"):
        naws(torch.zeros(2), torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="one delta_t per sample"):
        naws(torch.zeros(2), torch.zeros(2, 3), torch.zeros(3))
