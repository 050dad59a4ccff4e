"""Reverse sampling of the bridge (eq. (2)) and the multi-branch samplers (Fig. 1b)."""

from __future__ import annotations

import math

import pytest
import torch

from mmdm.diffusion import (
    BridgeConfig,
    BrownianBridge,
    bridge_step,
    sample_bridge,
    sample_multibranch,
    skip_timesteps,
)


def _pair(shape=(2, 5, 8, 8), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=dtype) * 2 - 1
    y = torch.rand(shape, generator=g, dtype=dtype) * 2 - 1
    return x0, y


# -- skip steps ------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [2, 3, 5, 50, 200, 999, 1000])
def test_skip_timesteps_are_distinct_and_span_the_chain(steps, spacing):
    ts = skip_timesteps(1000, steps, spacing)
    assert len(ts) == steps and ts[0] == 999 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_linear_spacing_is_even_then_1_0_and_cosine_is_dense_at_the_ends():
    ts = skip_timesteps(1000, 50, "linear")
    gaps = [a - b for a, b in zip(ts[:-1], ts[1:-1])]  # all but the final 1 -> 0
    assert ts[-2:] == [1, 0]
    assert max(gaps) - min(gaps) <= 1 and abs(sum(gaps) / len(gaps) - 998 / 48) < 0.05
    tc = skip_timesteps(1000, 50, "cosine")
    gc = [a - b for a, b in zip(tc, tc[1:])]
    assert gc[0] < gc[len(gc) // 2] and gc[-1] < gc[len(gc) // 2]


def test_skip_timesteps_rejects_bad_counts():
    with pytest.raises(ValueError, match=r"\[2, T=10\]"):
        skip_timesteps(10, 11)
    with pytest.raises(ValueError, match="spacing"):
        skip_timesteps(10, 5, "quadratic")


# -- one reverse step = the bridge posterior ----------------------------------------
def _posterior_by_composition(bridge: BrownianBridge, t: int, n: int, x_t: float, x0: float, y: float):
    """q(x_n | x_t, x0, y) from the one-step forward transitions of the bridge.

    The one-step transition s-1 -> s keeping eq. (1) as marginals is
    x_s = a_s x_{s-1} + b_s y + N(0, v_s). Composing them from n to t gives
    x_t = A x_n + B y + N(0, V); Gaussian conditioning of (x_n, x_t) gives the posterior.
    """
    m = bridge.m_t.tolist()
    d = bridge.delta_t.tolist()
    A, B, V = 1.0, 0.0, 0.0
    for s in range(n + 1, t + 1):
        a = (1 - m[s]) / (1 - m[s - 1])
        b = m[s] - a * m[s - 1]
        v = d[s] - a * a * d[s - 1]
        A, B, V = a * A, a * B + b, a * a * V + v
    mu_n = (1 - m[n]) * x0 + m[n] * y
    var_xt = A * A * d[n] + V
    assert var_xt == pytest.approx(d[t], rel=1e-9)  # the composition reproduces eq. (1) at t
    gain = A * d[n] / var_xt
    mean = mu_n + gain * (x_t - (A * mu_n + B * y))
    var = d[n] - gain * A * d[n]
    return mean, var


@pytest.mark.parametrize("t,n", [(999, 998), (999, 600), (500, 1), (300, 299), (120, 40)])
def test_single_step_matches_closed_form_posterior(t, n):
    bridge = BrownianBridge(BridgeConfig(num_timesteps=1000))
    x0, y, xt = 0.3, -0.7, 0.1
    mean_ref, var_ref = _posterior_by_composition(bridge, t, n, xt, x0, y)
    f = lambda v: torch.full((1, 1, 1, 1), v, dtype=torch.float64)  # noqa: E731
    mean = bridge_step(bridge, f(xt), f(y), f(x0), t, n, eta=0.0)
    with_unit_noise = bridge_step(bridge, f(xt), f(y), f(x0), t, n, eta=1.0, noise=f(1.0))
    assert mean.item() == pytest.approx(mean_ref, abs=1e-10)
    assert (with_unit_noise - mean).item() ** 2 == pytest.approx(var_ref, rel=1e-7, abs=1e-14)


def test_step_noise_is_standard_gaussian_times_posterior_std():
    """Monte Carlo: (x_n - mean) / sqrt(var) has zero mean and unit variance (not uniform noise)."""
    bridge = BrownianBridge(BridgeConfig(num_timesteps=1000))
    t, n, N = 700, 400, 50000
    x0, y = _pair((N, 1, 1, 1), seed=1)
    xt = bridge.q_sample(x0, y, t, torch.randn_like(x0))
    g = torch.Generator().manual_seed(2)
    from mmdm.diffusion import randn_like

    xn = bridge_step(bridge, xt, y, x0, t, n, eta=1.0, noise=randn_like(xt, g))
    mean = bridge_step(bridge, xt, y, x0, t, n, eta=0.0)
    _, var_ref = _posterior_by_composition(bridge, t, n, 0.0, 0.0, 0.0)
    z = (xn - mean) / math.sqrt(var_ref)
    assert abs(z.mean().item()) < 5 / math.sqrt(N)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / N)


def test_eta1_chain_preserves_the_eq1_marginals():
    """Starting from an exact x_{T-1} sample, oracle steps keep x_n ~ q(x_n | x0, y)."""
    T, N = 1000, 40000
    bridge = BrownianBridge(BridgeConfig(num_timesteps=T))
    x0 = torch.full((N, 1, 1, 1), 0.4, dtype=torch.float64)
    y = torch.full((N, 1, 1, 1), -0.8, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    ts = skip_timesteps(T, 6, "linear")  # 999, 749, 500, 250, 1, 0
    x = bridge.q_sample(x0, y, ts[0], torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    for t, n in zip(ts[:3], ts[1:4]):
        x = bridge_step(bridge, x, y, x0, t, n, eta=1.0, noise=torch.randn(x.shape, generator=g, dtype=x.dtype))
        m, d = bridge.m_t[n].item(), bridge.delta_t[n].item()
        assert abs(x.mean().item() - ((1 - m) * 0.4 + m * -0.8)) < 5 * math.sqrt(d / N)
        assert abs(x.var().item() / d - 1) < 5 * math.sqrt(2 / N)


def test_step_to_zero_returns_x0_hat_and_invalid_steps_raise():
    bridge = BrownianBridge(BridgeConfig())
    x0, y = _pair()
    xt = bridge.q_sample(x0, y, 10, torch.randn_like(x0))
    assert torch.equal(bridge_step(bridge, xt, y, x0, 10, 0, eta=1.0, noise=torch.randn_like(x0)), x0)
    with pytest.raises(ValueError, match="0 <= n < t"):
        bridge_step(bridge, xt, y, x0, 10, 10)
    with pytest.raises(ValueError, match="noise"):
        bridge_step(bridge, xt, y, x0, 10, 5, eta=1.0)


# -- whole samplers with an oracle ----------------------------------------------------
@pytest.mark.parametrize("spacing", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [5, 50, 200])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_oracle_sampler_recovers_x0(steps, spacing, eta):
    bridge = BrownianBridge(BridgeConfig(num_timesteps=1000, clip_x0=False))
    x0, y = _pair()
    seen = []

    def oracle(x_t, t):
        seen.append((x_t.clone(), t.clone()))
        return x0

    out = sample_bridge(oracle, y, bridge, steps=steps, eta=eta, spacing=spacing,
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)
    assert [int(t[0]) for _, t in seen] == skip_timesteps(1000, steps, spacing)
    assert torch.equal(seen[0][0], y)  # starts from x_T = y
    # the state handed to the network before the last step is close to x0 (small m_t, delta_t)
    x_last, t_last = seen[-2]
    m, d = bridge.m_t[t_last[0]].item(), bridge.delta_t[t_last[0]].item()
    tol = m * 2 + (6 * math.sqrt(d) if eta > 0 else 0) + 1e-9
    assert (x_last - x0).abs().max().item() <= tol


def test_sampler_reproducible_with_generator_and_keeps_dtype():
    bridge = BrownianBridge(BridgeConfig(num_timesteps=100, sample_steps=10))
    x0, y = _pair(dtype=torch.float32)
    noisy = lambda x_t, t: x_t * 0.5  # noqa: E731  (a non-oracle "network")
    a = sample_bridge(noisy, y, bridge, generator=torch.Generator().manual_seed(5))
    b = sample_bridge(noisy, y, bridge, generator=torch.Generator().manual_seed(5))
    c = sample_bridge(noisy, y, bridge, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == torch.float32


def test_clip_x0_clamps_predictions_given_to_the_step():
    bridge = BrownianBridge(BridgeConfig(num_timesteps=100, sample_steps=5, clip_x0=True))
    _, y = _pair()
    out = sample_bridge(lambda x_t, t: torch.full_like(x_t, 3.0), y, bridge, eta=0.0)
    assert torch.all(out == 1.0)


# -- multi-branch ------------------------------------------------------------------
def _three_sources(seed=0):
    x0, y1 = _pair(seed=seed)
    _, y2 = _pair(seed=seed + 1)
    _, y3 = _pair(seed=seed + 2)
    return x0, [y1, y2, y3]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_coupled_mode_steps_every_branch_with_the_fused_prediction(eta):
    bridge = BrownianBridge(BridgeConfig(num_timesteps=1000, clip_x0=False))
    x0, ys = _three_sources()
    states, fuse_calls = [], []

    def branches(x_ts, t):  # deliberately wrong branch predictions: the sources themselves
        states.append([x.clone() for x in x_ts])
        return list(ys)

    def fuse(preds, srcs, t):  # an oracle fusion
        fuse_calls.append(int(t[0]))
        return x0

    out = sample_multibranch(branches, ys, bridge, steps=20, eta=eta, mode="coupled", fuse_fn=fuse,
                             generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)
    assert fuse_calls == skip_timesteps(1000, 20, "linear")
    assert all(torch.equal(s, y) for s, y in zip(states[0], ys))  # each branch starts at its own source
    for s in states[-1]:  # the step 1 -> 0 returned the fused x0 in every branch
        torch.testing.assert_close(s, x0, atol=1e-12, rtol=0)


def test_independent_mode_steps_each_branch_with_its_own_prediction_and_fuses_once():
    bridge = BrownianBridge(BridgeConfig(num_timesteps=1000, clip_x0=False))
    x0, ys = _three_sources()
    targets = [x0 + 0.1 * k for k in range(3)]  # branch k "believes" in its own target
    states, fuse_calls = [], []

    def branches(x_ts, t):
        states.append([x.clone() for x in x_ts])
        return targets

    def fuse(preds, srcs, t):
        fuse_calls.append(int(t[0]))
        return torch.stack(list(preds)).mean(0)

    out = sample_multibranch(branches, ys, bridge, steps=10, eta=1.0, mode="independent", fuse_fn=fuse,
                             generator=torch.Generator().manual_seed(0))
    assert fuse_calls == [0]
    for s, tgt in zip(states[-1], targets):
        torch.testing.assert_close(s, tgt, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, x0 + 0.1, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shared", [False, True])
def test_branch_noise_is_independent_unless_shared(shared):
    bridge = BrownianBridge(BridgeConfig(num_timesteps=1000, clip_x0=False))
    x0, y = _pair()
    states = []

    def branches(x_ts, t):
        states.append([x.clone() for x in x_ts])
        return [x0, x0]

    sample_multibranch(branches, [y, y], bridge, steps=5, eta=1.0, fuse_fn=lambda p, s, t: x0,
                       shared_noise=shared, generator=torch.Generator().manual_seed(0))
    a, b = states[1]  # after the first (noisy) step, identical inputs differ only by the noise
    assert torch.equal(a, b) == shared


def test_multibranch_defaults_to_mean_fusion_and_rejects_bad_inputs():
    bridge = BrownianBridge(BridgeConfig(num_timesteps=100, sample_steps=4, clip_x0=False))
    x0, ys = _three_sources()
    targets = [x0 - 0.3, x0, x0 + 0.3]
    out = sample_multibranch(lambda xs, t: targets, ys, bridge, eta=0.0)
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="coupled"):
        sample_multibranch(lambda xs, t: targets, ys, bridge, mode="joint")
    with pytest.raises(ValueError, match="one shape"):
        sample_multibranch(lambda xs, t: targets, [ys[0], ys[1][:, :2]], bridge)


# -- the one reverse loop ---------------------------------------------------------
def test_reverse_loop_visits_the_schedule_and_reports_every_step_to_the_callback():
    from mmdm.diffusion import reverse_loop

    ts = skip_timesteps(100, 6)
    seen, calls = [], []

    def step(x, t, n):
        calls.append((t, n))
        return (None if n is None else x + 1), x * 10

    out = reverse_loop(step, 0, ts, callback=seen.append)
    assert calls == list(zip(ts, ts[1:] + [None]))
    assert [s["i"] for s in seen] == list(range(6)) and [s["t"] for s in seen] == ts
    assert [s["x0_hat"] for s in seen] == [0, 10, 20, 30, 40, 50] and out == 50  # the last estimate
    assert seen[-1]["x"] is None and seen[-1]["n"] is None


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_every_sampler_returns_its_callbacks_last_estimate_and_the_callback_changes_nothing(eta):
    from mmdm.diffusion.ddpm import GaussianConfig, GaussianDiffusion, sample_ddim
    from mmdm.diffusion.rddm import ResidualConfig, ResidualDiffusion, sample_residual

    x0, y = _pair(dtype=torch.float32)
    bridge = BrownianBridge(BridgeConfig(num_timesteps=100, sample_steps=5))
    gauss = GaussianDiffusion(GaussianConfig(num_timesteps=100, sample_steps=5))
    resid = ResidualDiffusion(ResidualConfig(num_timesteps=100, sample_steps=5))
    runs = {
        "bridge": lambda **kw: sample_bridge(lambda x, t: 0.5 * x, y, bridge, eta=eta, **kw),
        "coupled": lambda **kw: sample_multibranch(lambda xs, t: [0.5 * x for x in xs], [y, -y], bridge, eta=eta,
                                                   **kw),
        "ddim": lambda **kw: sample_ddim(lambda x, t: 0.1 * x, y, gauss, eta=eta, **kw),
        "rddm": lambda **kw: sample_residual(lambda x, t: (0.1 * x, 0.2 * x), y, resid, eta=eta, **kw),
    }
    for name, run in runs.items():
        plain = run(generator=torch.Generator().manual_seed(4))
        seen = []
        hooked = run(generator=torch.Generator().manual_seed(4), callback=seen.append)
        assert torch.equal(plain, hooked), name
        assert len(seen) == 5 and [s["t"] for s in seen] == skip_timesteps(100, 5), name
        assert torch.equal(seen[-1]["x0_hat"], hooked), name


def test_process_configs_share_the_sampler_settings_and_their_checks():
    from mmdm.config import ConfigError
    from mmdm.diffusion import SamplerConfig, resolve_sampler
    from mmdm.diffusion.ddpm import GaussianConfig
    from mmdm.diffusion.rddm import ResidualConfig

    for cls in (BridgeConfig, GaussianConfig, ResidualConfig):
        assert issubclass(cls, SamplerConfig)
        with pytest.raises(ConfigError, match=rf"{cls.__name__}\.sample_steps must be >= 2"):
            cls(sample_steps=1)
        with pytest.raises(ConfigError, match=rf"{cls.__name__}\.spacing: unknown spacing 'log'"):
            cls(spacing="log")
        with pytest.raises(ConfigError, match=rf"{cls.__name__}\.eta must be >= 0"):
            cls(eta=-0.5)
    cfg = BridgeConfig(num_timesteps=100, sample_steps=7, eta=0.3, clip_x0=False)
    sc, ts = resolve_sampler(cfg, 100)
    assert type(sc) is SamplerConfig and sc == SamplerConfig(sample_steps=7, spacing="linear", eta=0.3, clip_x0=False)
    assert ts == skip_timesteps(100, 7)
    sc, ts = resolve_sampler(cfg, 100, steps=3, eta=0.0, spacing="cosine", clip_x0=True)
    assert sc == SamplerConfig(sample_steps=3, spacing="cosine", eta=0.0, clip_x0=True)
    assert ts == skip_timesteps(100, 3, "cosine")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        resolve_sampler(cfg, 100, eta=-1.0)
    with pytest.raises(ValueError, match="must lie in"):
        resolve_sampler(cfg, 100, steps=101)
