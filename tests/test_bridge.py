"""The Brownian bridge process: schedules, eq. (1) moments, objectives (eq. (3))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from mmdm.config import ConfigError, dump_yaml, from_dict
from mmdm.diffusion import OBJECTIVES, BridgeConfig, BrownianBridge


def test_linear_schedule_is_bbdm_linspace_and_variance_formula():
    T = 1000
    br = BrownianBridge(BridgeConfig(num_timesteps=T))
    t = np.arange(T)
    m_ref = 0.001 + (0.999 - 0.001) * t / (T - 1)
    np.testing.assert_allclose(br.m_t.numpy(), m_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(br.delta_t.numpy(), 2 * (m_ref - m_ref**2), atol=1e-12)
    # the variance peaks at m = 1/2 with value max_var / 2
    br2 = BrownianBridge(BridgeConfig(num_timesteps=T, max_var=0.3))
    assert br2.delta_t.max().item() == pytest.approx(0.15, rel=1e-4)


def test_paper_schedule_is_t_over_T_and_pins_x0_at_t0():
    T = 50
    br = BrownianBridge(BridgeConfig(num_timesteps=T, schedule="t_over_T"))
    np.testing.assert_allclose(br.m_t.numpy(), np.arange(T) / T, atol=1e-15)
    alias = BrownianBridge(BridgeConfig(num_timesteps=T, schedule="paper"))
    assert torch.equal(alias.m_t, br.m_t)
    x0, y = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    xt = br.q_sample(x0, y, torch.zeros(3, dtype=torch.long), torch.randn_like(x0))
    torch.testing.assert_close(xt, x0)  # m_0 = 0 and delta_0 = 0


def test_sin_schedule_is_actually_exponential():
    T = 1000
    br = BrownianBridge(BridgeConfig(num_timesteps=T, schedule="sin"))
    m = br.m_t.numpy()
    assert m[-1] == pytest.approx(0.999)
    ratios = m[1:-1] / m[:-2]
    # a constant ratio between consecutive values = geometric (exponential) growth
    assert ratios.std() / ratios.mean() < 1e-9
    assert np.all(np.diff(m) > 0)
    assert m[T // 2] < 0.05  # stays small for most of the chain, unlike a sine


@pytest.mark.parametrize("t", [1, 100, 500, 900, 999])
def test_q_sample_has_the_moments_of_eq1(t):
    torch.manual_seed(t)
    T, n = 1000, 40000
    br = BrownianBridge(BridgeConfig(num_timesteps=T))
    x0 = torch.rand(1, 1, 3, 3, dtype=torch.float64) * 2 - 1
    y = torch.rand(1, 1, 3, 3, dtype=torch.float64) * 2 - 1
    m = 0.001 + 0.998 * t / (T - 1)
    var = 2 * (m - m * m)
    tt = torch.full((n,), t, dtype=torch.long)
    xt = br.q_sample(x0.expand(n, -1, -1, -1), y.expand(n, -1, -1, -1), tt,
                     torch.randn(n, 1, 3, 3, dtype=torch.float64))
    mean_ref = (1 - m) * x0[0] + m * y[0]
    se = math.sqrt(var / n)
    assert torch.all((xt.mean(0) - mean_ref).abs() < 5 * se)
    rel = (xt.var(0) / var - 1).abs()
    assert torch.all(rel < 5 * math.sqrt(2 / n))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("schedule", ["linear", "t_over_T", "sin"])
def test_objectives_round_trip(objective, schedule):
    g = torch.Generator().manual_seed(0)
    br = BrownianBridge(BridgeConfig(num_timesteps=200, schedule=schedule, objective=objective))
    x0 = torch.rand(6, 5, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(6, 5, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 5, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 50, 100, 198, 199])
    xt = br.q_sample(x0, y, t, eps)
    out = br.objective(x0, y, t, eps)
    torch.testing.assert_close(br.predict_x0(xt, y, t, out), x0, atol=1e-10, rtol=0)


def test_grad_objective_equals_xt_minus_x0():
    """Eq. (3): m_t (y - x0) + sqrt(delta_t) eps = x_t - x0."""
    br = BrownianBridge(BridgeConfig(objective="grad"))
    x0, y, eps = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    t = torch.tensor([3, 300, 600, 990])
    torch.testing.assert_close(br.objective(x0, y, t, eps), br.q_sample(x0, y, t, eps) - x0)


def test_ysubx_objective_is_source_minus_target():
    br = BrownianBridge(BridgeConfig())
    x0, y = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    t = torch.tensor([10, 900])
    torch.testing.assert_close(br.objective(x0, y, t, torch.randn_like(x0)), y - x0)


def test_per_sample_lookup_shapes_dtype_and_values():
    br = BrownianBridge(BridgeConfig(num_timesteps=100))
    t = torch.tensor([0, 10, 99])
    like = torch.zeros(3, 5, 4, 4, dtype=torch.float32)
    m = br.m(t, like=like)
    assert m.shape == (3, 1, 1, 1) and m.dtype == torch.float32
    torch.testing.assert_close(m.flatten(), br.m_t[t].float())
    assert br.delta(t).shape == (3,) and br.delta(t).dtype == torch.float64
    assert br.m(7, like=like).shape == (3, 1, 1, 1)  # an int broadcasts over the batch
    with pytest.raises(TypeError, match="integers"):
        br.m(torch.tensor([0.5]))


def test_mixed_timesteps_in_one_batch_match_single_calls():
    br = BrownianBridge(BridgeConfig())
    x0, y, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([5, 500, 995])
    batched = br.q_sample(x0, y, t, eps)
    for i in range(3):
        single = br.q_sample(x0[i:i + 1], y[i:i + 1], int(t[i]), eps[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], single)


def test_training_timesteps_cover_range_uniformly():
    br = BrownianBridge(BridgeConfig(num_timesteps=1000))
    t = br.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    # uniform on {0..999}: mean 499.5, sd 288.7
    assert abs(t.float().mean().item() - 499.5) < 5 * 288.7 / math.sqrt(20000)


def test_config_errors_name_valid_options_and_yaml_round_trip():
    with pytest.raises(ConfigError, match="linear"):
        BridgeConfig(schedule="cosine")
    with pytest.raises(ConfigError, match="ysubx"):
        BridgeConfig(objective="eps")
    with pytest.raises(ConfigError, match="sample_steps"):
        BridgeConfig(sample_steps=1)
    cfg = BridgeConfig(schedule="sin", objective="grad", sample_steps=50, spacing="cosine", eta=0.0)
    assert from_dict(BridgeConfig, yaml.safe_load(dump_yaml(cfg))) == cfg


def test_bridge_moves_with_module_and_keeps_tables_out_of_state_dict():
    br = BrownianBridge(BridgeConfig())
    assert dict(br.state_dict()) == {}
    br64 = br.to(torch.float64)
    assert br64.m_t.dtype == torch.float64
