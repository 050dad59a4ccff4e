"""Vessel emphasis weight map and weighted reconstruction losses."""

from __future__ import annotations

import math

import pytest
import torch

from mmdm.config import ConfigError, from_dict
from mmdm.losses.emphasis import EmphasisConfig, PixelLoss, emphasis_weights, weighted_l1, weighted_mse
from mmdm.losses.hybrid import hybrid_loss
from mmdm.stats import top_count


def emphasised_loss(pred, target, cfg, base="mse", reduction="mean"):
    """A method's per-pixel term with ``cfg``: the pixel loss bound to the target, plus its image term."""
    px = PixelLoss(cfg).bind(target)
    loss = px(pred, target, base, reduction)
    extra = px.image_term(pred, target, reduction)
    return loss if extra is None else loss + extra


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tied_target() -> torch.Tensor:
    """Two samples of 5x10x10 = 500 voxels: background 0 with 8 voxels at 1.0 (tied) and a ramp.

    Sample 0: 8 tied maxima -> with fraction 0.01 (k = 5) only the 5 with the lowest flat index count.
    Sample 1: a strictly increasing ramp -> the last 5 flat indices count.
    """
    t = torch.zeros(2, 5, 10, 10, dtype=torch.float64)
    flat0 = t[0].view(-1)
    tied = torch.tensor([3, 17, 42, 99, 150, 151, 300, 499])
    flat0[tied] = 1.0
    t[1] = torch.arange(500, dtype=torch.float64).view(5, 10, 10) / 500.0
    return t


def test_top_count_rounds_and_keeps_at_least_one():
    assert top_count(500, 0.01) == 5
    assert top_count(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001 must not become 8
    assert top_count(10, 0.01) == 1
    assert top_count(3, 0.99) == 3


def test_top_fraction_emphasises_exactly_k_voxels_per_sample_with_deterministic_ties():
    t = _tied_target()
    w = emphasis_weights(t, EmphasisConfig(kind="top_fraction", fraction=0.01, weight=20.0))
    assert w.shape == t.shape and w.dtype == t.dtype
    assert torch.all((w == 1.0) | (w == 20.0))
    counts = (w == 20.0).flatten(1).sum(1)
    assert counts.tolist() == [5, 5]
    # sample 0: the 5 lowest flat indices among the 8 tied maxima
    assert torch.nonzero(w[0].reshape(-1) == 20.0).flatten().tolist() == [3, 17, 42, 99, 150]
    # sample 1: the 5 brightest voxels of the ramp
    assert torch.nonzero(w[1].reshape(-1) == 20.0).flatten().tolist() == [495, 496, 497, 498, 499]
    # the emphasised voxels are never darker than the rest, per sample
    for b in range(2):
        tb, wb = t[b].reshape(-1), w[b].reshape(-1)
        assert tb[wb == 20.0].min() >= tb[wb == 1.0].max()


def test_weights_are_per_sample_not_per_batch():
    """A dim sample next to a bright one still gets its own brightest voxels emphasised."""
    t = torch.rand(2, 3, 8, 8, generator=_gen(1))
    t[1] *= 0.01  # sample 1 in [0, 0.01), sample 0 in [1, 2): a batch-wide cut would skip sample 1
    t[0] += 1.0
    w = emphasis_weights(t, EmphasisConfig(kind="top_fraction", fraction=0.05, weight=3.0))
    k = top_count(3 * 8 * 8, 0.05)
    assert (w[0] == 3.0).sum() == k and (w[1] == 3.0).sum() == k


def test_weights_depend_on_the_target_only_and_carry_no_gradient():
    t = torch.rand(3, 5, 16, 16, generator=_gen(2))
    cfg = EmphasisConfig(kind="top_fraction", fraction=0.02, weight=10.0)
    p1 = torch.rand(3, 5, 16, 16, generator=_gen(3), requires_grad=True)
    p2 = torch.rand(3, 5, 16, 16, generator=_gen(4), requires_grad=True)
    w1 = emphasis_weights(t, cfg)
    assert not w1.requires_grad
    # the loss path with two different predictions uses the same weights
    for p in (p1, p2):
        loss = emphasised_loss(p, t, cfg, reduction="none")
        manual = weighted_mse(p, t, w1, reduction="none")
        torch.testing.assert_close(loss, manual, rtol=0, atol=0)
    # a target that needs grad gives the same, detached weights
    tg = t.clone().requires_grad_(True)
    w2 = emphasis_weights(tg, cfg)
    assert not w2.requires_grad and torch.equal(w1, w2)
    # and changing the target changes them
    t2 = t.clone()
    t2[0, 0, 0, 0] = 5.0
    assert not torch.equal(emphasis_weights(t2, cfg)[0], w1[0])


def test_smooth_kind_ramps_from_one_at_the_cut_to_one_plus_weight_at_the_maximum():
    t = _tied_target()
    w = emphasis_weights(t, EmphasisConfig(kind="smooth", fraction=0.01, weight=4.0))
    # sample 1 (ramp, values i/500): q = 495/500, max = 499/500
    w1 = w[1].reshape(-1)
    assert torch.all(w1[:496] == 1.0)
    torch.testing.assert_close(w1[496:], torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    # sample 0: the cut value equals the maximum (ties) -> flat, all ones
    assert torch.all(w[0] == 1.0)


def test_normalise_gives_unit_mean_per_sample():
    t = torch.rand(4, 5, 8, 8, generator=_gen(5))
    for kind in ("top_fraction", "smooth"):
        w = emphasis_weights(t, EmphasisConfig(kind=kind, fraction=0.1, weight=9.0, normalise=True))
        torch.testing.assert_close(w.flatten(1).mean(1), torch.ones(4), rtol=0, atol=1e-6)
        assert w.max() > 1.0


def test_weighted_mse_matches_a_hand_computation():
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0, 3.0, 1.0], [1.0, -1.0, 2.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 2.0, 1.0, 10.0], [1.0, 1.0, 0.5, 0.0]], dtype=torch.float64)
    # sample 0: errors^2 = 0, 4, 0, 9 -> weighted 0 + 8 + 0 + 90 = 98 -> /4 = 24.5
    # sample 1: errors^2 = 1, 1, 4, 0 -> weighted 1 + 1 + 2 + 0 = 4 -> /4 = 1.0
    per = weighted_mse(pred, target, w, reduction="none")
    torch.testing.assert_close(per, torch.tensor([24.5, 1.0], dtype=torch.float64))
    assert weighted_mse(pred, target, w).item() == pytest.approx((98 + 4) / 8)
    assert weighted_mse(pred, target, w, reduction="sum").item() == pytest.approx(102.0)
    # L1: |e| = 0, 2, 0, 3 -> 0 + 4 + 0 + 30 = 34 -> 8.5; 1, 1, 2, 0 -> 1 + 1 + 1 + 0 = 3 -> 0.75
    torch.testing.assert_close(weighted_l1(pred, target, w, reduction="none"),
                               torch.tensor([8.5, 0.75], dtype=torch.float64))


def test_kind_none_and_unit_weights_equal_the_plain_mse_of_the_hybrid_loss():
    pred = torch.randn(3, 5, 12, 12, generator=_gen(6))
    target = torch.randn(3, 5, 12, 12, generator=_gen(7))
    plain = hybrid_loss(pred, target, use_mip=False, reduction="none")
    none_cfg = EmphasisConfig(kind="none")
    assert torch.equal(emphasis_weights(target, none_cfg), torch.ones_like(target))
    assert torch.equal(emphasised_loss(pred, target, none_cfg, reduction="none"), plain)
    assert torch.equal(weighted_mse(pred, target, torch.ones_like(target), reduction="none"), plain)
    assert torch.equal(emphasised_loss(pred, target, none_cfg),
                       hybrid_loss(pred, target, use_mip=False, reduction="mean"))
    # with emphasis the loss is larger (weights >= 1 everywhere, > 1 somewhere, errors non-zero)
    strong = emphasised_loss(pred, target, EmphasisConfig(kind="top_fraction", weight=20.0), reduction="none")
    assert torch.all(strong > plain)


def test_the_gradient_is_larger_on_emphasised_voxels():
    target = torch.rand(2, 5, 10, 10, generator=_gen(8))
    pred = (target + 0.1).requires_grad_(True)  # the same error everywhere
    cfg = EmphasisConfig(kind="top_fraction", fraction=0.02, weight=20.0)
    emphasised_loss(pred, target, cfg).backward()
    w = emphasis_weights(target, cfg)
    g = pred.grad
    hi, lo = g[w == 20.0], g[w == 1.0]
    torch.testing.assert_close(hi, torch.full_like(hi, hi[0].item()))
    torch.testing.assert_close(lo, torch.full_like(lo, lo[0].item()))
    assert hi[0].item() == pytest.approx(20.0 * lo[0].item())
    assert lo[0].item() > 0


@pytest.mark.parametrize("bad, match", [
    ({"weight": -1.0}, "weight must be a finite number >= 0"),
    ({"weight": float("nan")}, "weight must be a finite number >= 0"),
    ({"fraction": 0.0}, "fraction must lie strictly between 0 and 1"),
    ({"fraction": 1.0}, "fraction must lie strictly between 0 and 1"),
    ({"fraction": -0.2}, "fraction must lie strictly between 0 and 1"),
    ({"kind": "vesselness"}, "choose one of"),
])
def test_bad_configs_raise_clear_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        EmphasisConfig(**{"kind": "top_fraction", **bad})
    with pytest.raises(ConfigError, match=match):  # the YAML path too
        from_dict(EmphasisConfig, {"kind": "top_fraction", **bad})


def test_bad_inputs_raise():
    cfg = EmphasisConfig(kind="top_fraction")
    with pytest.raises(ValueError, match="batch axis"):
        emphasis_weights(torch.ones(5), cfg)
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_mse(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="do not broadcast"):
        weighted_mse(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="negative weights"):
        weighted_mse(torch.ones(2, 3), torch.ones(2, 3), -torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown reduction"):
        weighted_mse(torch.ones(2, 3), torch.ones(2, 3), reduction="batchmean")
    with pytest.raises(ValueError, match="base must be 'mse' or 'l1'"):
        emphasised_loss(torch.ones(2, 3), torch.ones(2, 3), cfg, base="huber")


# -- steerable (Gaussian-derivative) feature matching, Olut et al. 2018 ---------------------------------------
from mmdm.losses.emphasis import gaussian_derivative_kernels, steerable_loss, steerable_responses  # noqa: E402


def test_derivative_filters_measure_slopes_and_curvatures():
    k = gaussian_derivative_kernels(1.5, torch.float64)
    assert k.shape == (5, 1, 11, 11)
    torch.testing.assert_close(k.sum((1, 2, 3)), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)
    i = torch.arange(40, dtype=torch.float64)
    ramp = (0.3 * i)[:, None].expand(40, 40)[None, None]      # f = 0.3 * h
    quad = (0.5 * i * i)[:, None].expand(40, 40)[None, None]  # f = 0.5 * h^2 -> f'' = 1
    r_ramp = steerable_responses(ramp, (1.5,))[0, :, 20, 20]
    r_quad = steerable_responses(quad, (1.5,))[0, :, 20, 20]
    assert r_ramp[0].item() == pytest.approx(-0.3, rel=1e-2)  # first order along H (sign of correlation)
    assert r_ramp[1:].abs().max().item() < 1e-9               # nothing along W, no curvature
    assert r_quad[2].item() == pytest.approx(1.0, rel=2e-2)   # d2/dH2
    assert r_quad[3:].abs().max().item() < 1e-9


def test_steerable_loss_ignores_offsets_and_sees_a_missing_vessel_that_mse_cannot_tell_apart():
    target = torch.zeros(1, 5, 32, 32, dtype=torch.float64)
    target[:, :, 8:24, 15:17] = 1.0  # a thin bright vessel: 5 x 16 x 2 = 160 voxels of 5120
    missing = torch.zeros_like(target)  # the vessel is absent
    mse_missing = weighted_mse(missing, target).item()
    offset = target + math.sqrt(mse_missing)  # a uniform offset with exactly the same MSE
    assert weighted_mse(offset, target).item() == pytest.approx(mse_missing)
    assert steerable_loss(target, target).item() == 0.0
    assert steerable_loss(offset, target).item() < 1e-12
    assert steerable_loss(missing, target).item() > 1e-5
    cfg = EmphasisConfig(kind="steerable", weight=1.0)
    assert emphasised_loss(missing, target, cfg).item() > emphasised_loss(offset, target, cfg).item()
    assert torch.equal(emphasis_weights(target, cfg), torch.ones_like(target))  # no weight map for this kind
    # per-sample reduction
    both = torch.cat([missing, offset])
    per = steerable_loss(both, torch.cat([target, target]), reduction="none")
    assert per.shape == (2,) and per[0] > 1e-5 and per[1] < 1e-12


def test_steerable_loss_is_invariant_to_rotating_both_images_by_90_degrees():
    p = torch.rand(2, 3, 24, 24, generator=_gen(9), dtype=torch.float64)
    t = torch.rand(2, 3, 24, 24, generator=_gen(10), dtype=torch.float64)
    a = steerable_loss(p, t, reduction="none")
    b = steerable_loss(p.rot90(1, (-2, -1)), t.rot90(1, (-2, -1)), reduction="none")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad, match", [({"sigmas": ()}, "sigmas must be one or more"),
                                        ({"sigmas": (1.0, -2.0)}, "sigmas must be one or more"),
                                        ({"delta": 0.0}, "delta")])
def test_bad_steerable_settings_raise(bad, match):
    with pytest.raises(ConfigError, match=match):
        EmphasisConfig(kind="steerable", **bad)


def test_separable_responses_equal_the_2d_kernels():
    x = torch.rand(2, 3, 20, 17, generator=_gen(11), dtype=torch.float64)
    for sigma in (0.7, 2.0):
        k = gaussian_derivative_kernels(sigma, torch.float64)
        r = k.shape[-1] // 2
        planes = torch.nn.functional.pad(x.reshape(-1, 1, 20, 17), (r, r, r, r), mode="replicate")
        ref = torch.nn.functional.conv2d(planes, k).reshape(2, -1, 20, 17)
        torch.testing.assert_close(steerable_responses(x, (sigma,)), ref)
