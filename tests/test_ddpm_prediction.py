"""DDPM's prediction targets: eps (Ho et al. 2020, the default), x0 (Ho et al. 2020,
sec. 3.2) and v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022).

The conversions are checked against the formulas computed from the betas by hand (numpy), the
sampler and the training loss with oracle networks that return each prediction's exact target,
and the loss of a random network against ``F.mse_loss`` to an independently computed target.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdm.config import ConfigError
from mmdm.diffusion.ddpm import PREDICTIONS, GaussianDiffusion, sample_ddim
from mmdm.losses.emphasis import EmphasisConfig, PixelLoss, emphasis_weights, steerable_loss
import mmdm.methods.ddpm as ddpm_mod
from mmdm.methods import build_method
from mmdm.methods.ddpm import DDPM, DDPMConfig
from mmdm.study import sweep as sweep_mod

ALL = ("T1w", "T2w", "FLAIR")
K = 5
T = 1000
TINY = dict(unet={"base": 8, "mult": [1, 2], "num_res_blocks": 1, "attention": False}, gating={"hidden": 8})

pytestmark = pytest.mark.usefixtures("one_thread")


def _abar() -> np.ndarray:
    """``abar_t = prod_{s <= t} (1 - beta_s)``, Ho et al.'s linear betas 1e-4 .. 0.02, by hand."""
    betas = np.linspace(1e-4, 0.02, T)
    return np.cumprod(1.0 - betas)


def _col(v: np.ndarray, t: Tensor, dtype=torch.float32) -> Tensor:
    return torch.as_tensor(v[t.numpy()], dtype=dtype).view(-1, 1, 1, 1)


def _target(prediction: str, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """Each prediction's target from the papers' formulas."""
    a = _col(_abar(), t, x0.dtype)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def _batch(b: int = 2, h: int = 16, w: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    target = -torch.ones(b, K, h, w)
    target[:, :, 4:12, 7:9] = 0.8
    srcs = {s: (target * 0.3 * (i + 1) + 0.1 * torch.randn(b, K, h, w, generator=g)).clamp(-1, 1)
            for i, s in enumerate(ALL)}
    return {"sources": srcs, "target": target}


def _build(prediction: str, seed: int = 0) -> DDPM:
    torch.manual_seed(seed)
    return build_method("ddpm", config="small", prediction=prediction, **TINY)


class _Oracle(nn.Module):
    """Stands in for ``DDPM.net``: the exact target of ``prediction`` for a known x0, reading x_t
    from the input ``cat(x_t, c)`` (the noise is recovered from x_t and x0 by hand)."""

    def __init__(self, prediction: str, x0: Tensor):
        super().__init__()
        self.prediction, self.x0 = prediction, x0

    def forward(self, inp: Tensor, t: Tensor) -> Tensor:
        x_t = inp[:, :K]
        a = _col(_abar(), t)
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        return _target(self.prediction, self.x0, eps, t)


# -- the conversions -------------------------------------------------------------------------


def test_conversions_match_the_formulas_and_round_trip():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    a = _col(_abar(), t, torch.float64)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(d.q_sample(x0, t, eps), x_t, atol=1e-12, rtol=0)
    torch.testing.assert_close(d.v_target(x0, t, eps), v, atol=1e-12, rtol=0)
    torch.testing.assert_close(d.predict_x0_from_v(x_t, t, v), x0, atol=1e-10, rtol=0)
    torch.testing.assert_close(d.predict_eps_from_v(x_t, t, v), eps, atol=1e-10, rtol=0)
    torch.testing.assert_close(d.eps_from_x0(x_t, t, x0), eps, atol=1e-10, rtol=0)
    torch.testing.assert_close(d.predict_x0(x_t, t, eps), x0, atol=1e-10, rtol=0)
    for pred in PREDICTIONS:
        out = _target(pred, x0, eps, t)
        torch.testing.assert_close(d.prediction_target(pred, x0, t, eps), out, atol=1e-12, rtol=0)
        x0_hat, eps_hat = d.x0_eps_from_output(pred, x_t, t, out)
        torch.testing.assert_close(x0_hat, x0, atol=1e-10, rtol=0)
        torch.testing.assert_close(eps_hat, eps, atol=1e-10, rtol=0)
    with pytest.raises(ConfigError, match="'eps', 'x0', 'v'"):
        d.prediction_target("mu", x0, t, eps)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_an_oracle_of_each_prediction_recovers_x0(prediction, eta):
    """Every step's x0 estimate is x0, not only the last (at t = 0, v and eps nearly coincide)."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, K, 8, 8, generator=g) * 1.8 - 0.9
    oracle = _Oracle(prediction, x0)
    seen: list[tuple[int, Tensor]] = []
    out = sample_ddim(lambda x, t: oracle(x, t), torch.randn(x0.shape, generator=g), GaussianDiffusion(),
                      steps=10, eta=eta, generator=g, prediction=prediction,
                      callback=lambda s: seen.append((s["t"], s["x0_hat"])))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert [t for t, _ in seen][0] == T - 1 and len(seen) == 10
    for _, x0_hat in seen:
        torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=0)


# -- the method --------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("steps", [3, 20])
def test_sample_with_an_oracle_network_recovers_the_target(prediction, steps, monkeypatch):
    seen: list[Tensor] = []

    def spy(*args, **kw):  # the method's sampler, recording every step's x0 estimate
        return sample_ddim(*args, **kw, callback=lambda s: seen.append(s["x0_hat"]))

    monkeypatch.setattr(ddpm_mod, "sample_ddim", spy)
    model = _build(prediction).eval()
    batch = _batch()
    x0 = batch["target"]
    model.net = _Oracle(prediction, x0)
    out = model.sample(batch["sources"], steps=steps, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert len(seen) == steps
    for x0_hat in seen:
        torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=0)


def test_an_output_read_as_the_wrong_prediction_does_not_recover_x0():
    """The sampler does read the output as the configured prediction: an x0 oracle under eps fails."""
    model = _build("eps").eval()
    batch = _batch()
    model.net = _Oracle("x0", batch["target"])
    out = model.sample(batch["sources"], steps=5, generator=torch.Generator().manual_seed(3))
    assert (out - batch["target"]).abs().max() > 0.1


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_loss_of_an_oracle_is_zero(prediction):
    model = _build(prediction)
    batch = _batch()
    model.net = _Oracle(prediction, batch["target"])
    out = model.training_losses(batch, torch.Generator().manual_seed(4))
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-8)
    assert out["mse_x0"].item() == pytest.approx(0.0, abs=1e-8)  # x0 is read from the prediction


def _independent(prediction: str, model: DDPM, batch: dict, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(network output, target, x0 implied by the output), drawing t and the noise in the
    engine's order; at initialisation the gating is the plain mean of the sources."""
    g = torch.Generator().manual_seed(seed)
    x0 = batch["target"]
    c = torch.stack([batch["sources"][m] for m in ALL]).mean(0)
    t = torch.randint(0, T, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = _col(_abar(), t)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = model.net(torch.cat([x_t, c], 1), t)
    x0_of_out = {"eps": (x_t - (1 - a).sqrt() * out) / a.sqrt(), "x0": out,
                 "v": a.sqrt() * x_t - (1 - a).sqrt() * out}[prediction]
    return out, _target(prediction, x0, eps, t), x0_of_out


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_loss_of_a_random_network_is_the_mse_to_the_target(prediction):
    model = _build(prediction)
    batch = _batch()
    with torch.no_grad():
        got = model.training_losses(batch, torch.Generator().manual_seed(11))
        out, target, x0_of_out = _independent(prediction, model, batch, 11)
    assert got["loss"].item() > 1e-3
    torch.testing.assert_close(got["loss"], F.mse_loss(out, target), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["mse_x0"], (x0_of_out.clamp(-1, 1) - batch["target"]).pow(2).mean(),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_emphasis_weights_the_error_to_each_target(prediction):
    model = _build(prediction)
    emphasis = EmphasisConfig(kind="top_fraction", fraction=0.05, weight=20.0)
    model.pixel_loss = PixelLoss(emphasis)
    batch = _batch()
    weights = emphasis_weights(batch["target"], emphasis)  # the map of the target, whatever is predicted
    with torch.no_grad():
        got = model.training_losses(batch, torch.Generator().manual_seed(12))["loss"]
        out, target, _ = _independent(prediction, model, batch, 12)
    torch.testing.assert_close(got, (weights * (out - target) ** 2).mean(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_steerable_term_uses_the_x0_implied_by_the_prediction(prediction):
    model = _build(prediction)
    emphasis = EmphasisConfig(kind="steerable", weight=5.0)
    model.pixel_loss = PixelLoss(emphasis)
    batch = _batch()
    with torch.no_grad():
        got = model.training_losses(batch, torch.Generator().manual_seed(13))
        _, _, x0_of_out = _independent(prediction, model, batch, 13)
    want = 5.0 * steerable_loss(x0_of_out, batch["target"], emphasis.sigmas, emphasis.delta)
    torch.testing.assert_close(got["loss_steerable"], want, atol=1e-6, rtol=1e-4)


def test_an_unknown_prediction_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"DDPMConfig.prediction.*'mu'.*\('eps', 'x0', 'v'\)"):
        DDPMConfig(prediction="mu").validate()
    with pytest.raises(ConfigError, match="'eps', 'x0', 'v'"):
        build_method("ddpm", config="small", prediction="noise")


def test_objective_names_the_prediction_and_eps_stays_the_default():
    assert DDPMConfig().prediction == "eps" and DDPM.make_config("small").prediction == "eps"
    assert _build("eps").objective() == "eps prediction, MSE (L_simple), T = 1000"
    assert _build("x0").objective().startswith("x0 prediction")
    assert _build("v").objective().startswith("v prediction")
    assert "prediction=v" in repr(_build("v")) and "prediction" not in _build("eps").extra_repr()


def test_the_prediction_sweep_builds_one_ddpm_per_target():
    sw = sweep_mod.get_sweep("ddpm-prediction")
    assert [p.name for p in sw.points] == ["eps", "x0", "v"]
    assert (sw.profile, sw.steps, sw.val_every) == ("standard", 2000, 400)
    for p in sw.points:
        cfg = sweep_mod.point_config(sw, p)
        assert cfg.method == "ddpm" and cfg.steps == 2000 and cfg.emphasis.kind == "top_fraction"
        assert cfg.crops.size == (48, 48) and cfg.method_kwargs["optim"] == {"lr": 3e-4}
        model = build_method(cfg.method, **cfg.method_kwargs)
        assert model.prediction == p.name and model.cfg.optim.lr == 3e-4


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_predict_eps_gives_the_noise_for_every_prediction(prediction):
    model = _build(prediction)
    batch = _batch()
    x0, g = batch["target"], torch.Generator().manual_seed(5)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([3, 700])
    a = _col(_abar(), t)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    model.net = _Oracle(prediction, x0)
    got = model.predict_eps(x_t, model.condition(batch["sources"]), t)
    torch.testing.assert_close(got, eps, atol=1e-4, rtol=0)
