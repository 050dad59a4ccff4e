"""The accounting of the standard-run profile (benchmarks/profile_standard_run.py): nested parts
are counted once, and the short run's per-unit costs scale to the full run as documented."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import profile_standard_run as prof  # noqa: E402


def test_nested_parts_are_counted_once_and_add_up_to_the_outer_time(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(prof.time, "process_time", lambda: clock[0])
    timer = prof.PartTimer()

    def inner():
        clock[0] += 2.0

    def gen():
        for _ in range(2):
            clock[0] += 1.5  # the work of producing an item is the generator's, before ...
            yield None
            clock[0] += 0.5  # ... and after each item, up to its end

    wrapped, wrapped_gen = timer.wrap(inner, "inner"), timer.wrap(gen, "items")
    with timer.part("outer"):
        clock[0] += 1.0
        wrapped()
        for _ in wrapped_gen():
            clock[0] += 0.25  # the consumer's own work belongs to "outer"
        wrapped()
    assert timer.own == {"outer": pytest.approx(1.5), "inner": pytest.approx(4.0), "items": pytest.approx(4.0)}
    assert timer.calls == {"outer": 1, "inner": 2, "items": 3}
    assert sum(timer.own.values()) == pytest.approx(clock[0])


def test_the_full_run_is_the_first_validation_plus_the_mean_of_the_later_ones_and_units_scaled():
    r = {"steps": 40, "validations": 3, "eval_subjects": 2,
         "full": {"steps": 4000, "val_every": 200, "checkpoint_every": 200, "image_every": 500, "test_subjects": 16},
         "calls": {"train: checkpoints": 1},
         "parts": {"train: step (forward, backward, optimiser)": 8.0, "train: checkpoints": 0.5,
                   "train: other (start-up, logging, loop)": 5.0, "eval: synthesis (method.sample)": 6.0,
                   "eval: load checkpoint": 1.0, "val volumes: load sources/target": 3.0,
                   "val volumes: synthesis (method.sample)": 30.0},
         "per_validation": [{"val volumes: load sources/target": 3.0, "val volumes: synthesis (method.sample)": 10.0},
                            {"val volumes: synthesis (method.sample)": 9.0},
                            {"val volumes: synthesis (method.sample)": 11.0}]}
    full = prof.extrapolate(r)
    assert full["train: step (forward, backward, optimiser)"] == pytest.approx(8.0 * 4000 / 40)
    assert full["train: checkpoints"] == pytest.approx(0.5 * 20)
    assert full["train: other (start-up, logging, loop)"] == 5.0 and full["eval: load checkpoint"] == 1.0
    assert full["eval: synthesis (method.sample)"] == pytest.approx(6.0 * 16 / 2)
    assert full["val volumes: load sources/target"] == pytest.approx(3.0)  # the first validation only
    assert full["val volumes: synthesis (method.sample)"] == pytest.approx(10.0 + 19 * 10.0)
