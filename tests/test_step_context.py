"""The training-step contract: ``SynthesisMethod.train_step(batch, ctx)`` with a ``StepContext``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmdm.methods.base import StepContext, SynthesisMethod


class Lin(SynthesisMethod):
    """Two groups (``a``, ``b``) over two scalars; the default (single-loss) path serves both."""

    name = "lin"

    def __init__(self, bad: str | None = None):
        super().__init__()
        self.a, self.b, self.bad, self.calls = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(2.0)), bad, []

    def optimizer_groups(self):
        return {"a": [self.a], "b": [self.b]}

    def training_losses(self, batch, generator=None, group="main"):
        self.calls.append(group)
        if self.bad == "key":
            return {"l": self.a * 1.0}
        x = batch["x"]
        loss = (self.a * x).pow(2).sum() + (self.b * x).pow(2).sum() if group == "a" else (self.b - x).pow(2).sum()
        return {"loss": loss * (float("nan") if self.bad == "nan" and group == "b" else 1.0)}


def _ctx(m: Lin, **kw) -> StepContext:
    opts = {g: torch.optim.SGD(p, lr=0.1) for g, p in m.optimizer_groups().items()}
    return StepContext(opts, params=m.optimizer_groups(), **kw)


def test_the_default_step_runs_each_group_in_order_and_steps_only_that_group():
    m = Lin()
    x = torch.tensor([1.0, 2.0])
    logs = m.train_step({"x": x}, _ctx(m))
    assert m.calls == ["a", "b"] and set(logs) == {"a/loss", "b/loss"}
    # group a: d/da sum (a x)^2 = 2 a sum x^2 = 10 -> a = 1 - 0.1 * 10; b's gradient from a's loss is cleared
    assert m.a.item() == pytest.approx(0.0, abs=1e-6)
    # group b: d/db sum (b - x)^2 = 2 sum (b - x) = 2 (1 + 0) = 2 -> b = 2 - 0.2
    assert m.b.item() == pytest.approx(1.8)
    assert m.a.grad is None and m.b.grad is None  # nothing left behind for the next step
    assert logs["a/loss"].item() == pytest.approx(5.0 + 20.0) and not logs["a/loss"].requires_grad


def test_clipping_logs_the_norm_and_a_bad_loss_names_the_step_and_group_before_any_update():
    m = Lin()
    logs = m.train_step({"x": torch.tensor([1.0, 2.0])}, _ctx(m, grad_clip={"a": 1.0}))
    assert logs["a/grad_norm"].item() == pytest.approx(10.0) and m.a.item() == pytest.approx(0.9)  # clipped to 1
    m = Lin(bad="nan")
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 7 \\(group 'b'\\)"):
        m.train_step({"x": torch.tensor([1.0, 2.0])}, _ctx(m, step=7))
    assert m.b.item() == 2.0  # b was not stepped
    m = Lin(bad="key")
    with pytest.raises(KeyError, match="method 'toy' returned the losses \\['l'\\]; they must contain 'loss'"):
        m.train_step({"x": torch.tensor([1.0])}, _ctx(m, label="toy"))
