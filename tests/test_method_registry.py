"""A method declares itself once (its module): the study's run list, tables and labels read the
declarations, so a new method is one module plus one import line."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mmdm.config import ConfigError
from mmdm.methods import METHODS, SynthesisMethod, Variant, build_method, display_name, register_method
from mmdm.methods import deviations_markdown, table1_methods
from mmdm.study.runs import (REFERENCE_METHOD, REFERENCE_RUN, ablation_variants, baselines, study_runs,
                             variant_label)
from mmdm.study.tables import table_rows


@dataclass
class ToyConfig:
    sources: tuple[str, ...] = ("T1w", "T2w")
    window: int = 5
    scale: float = 1.0

    def validate(self) -> None:
        if self.scale <= 0:
            raise ConfigError(f"ToyConfig.scale must be > 0, got {self.scale}")


def _small() -> ToyConfig:
    return ToyConfig(scale=0.5)


@pytest.fixture()
def toy():
    """A toy method registered for one test only: Table 1's second row, with one variant."""

    @register_method("toy")
    class Toy(SynthesisMethod):
        config_class = ToyConfig
        named_configs = {"paper": ToyConfig, "small": _small}
        display_name = "Toy (a test method)"
        family = "regression"
        table1 = 1.5  # between the first and the second row
        variants = {"double": Variant({"scale": 2.0}, "Toy x2")}

        def __init__(self, cfg: ToyConfig):
            super().__init__()
            self.cfg, self.sources, self.window = cfg, tuple(cfg.sources), cfg.window
            self.w = torch.nn.Parameter(torch.tensor(cfg.scale))

        def training_losses(self, batch, generator=None, group="main"):
            x0, ys = self.check_batch(batch)
            return {"loss": self.pixel_loss.bind(x0)(self.w * ys[0], x0)}

        def sample(self, sources, steps=None, eta=None, generator=None, progress=False):
            return self.w * sources[self.sources[0]]

    try:
        yield Toy
    finally:
        if "toy" in METHODS:
            METHODS.unregister("toy")


def test_a_registered_toy_method_is_a_study_run_and_a_table1_row_and_goes_away_after(toy):
    first = table1_methods()[0]
    assert table1_methods()[1] == "toy" and "toy" in baselines()
    runs = {r.name: r for r in study_runs()}
    assert runs["toy"].method == "toy" and runs["toy"].tables == ("table1",)
    assert runs["toy"].labels["table1"] == "Toy (a test method)" == display_name("toy")
    rows = [run for _, run in table_rows("table1")]
    assert rows.index(first) < rows.index("toy") < rows.index(table1_methods()[2])
    assert rows[-1] == REFERENCE_RUN  # the reference stays the last row, as in the paper
    assert "| Toy (a test method) | `toy` | regression | 2 | `double` (Toy x2) |" in deviations_markdown()  # the book
    METHODS.unregister("toy")
    assert "toy" not in baselines() and "toy" not in {r.name for r in study_runs()}
    assert "toy" not in [run for _, run in table_rows("table1")]


def test_make_config_applies_name_then_variant_then_overrides_for_any_method(toy):
    assert build_method("toy", config="small").cfg.scale == 0.5
    assert build_method("toy", config="small", variant="double").cfg.scale == 2.0
    assert build_method("toy", config="small", variant="double", scale=3.0).cfg.scale == 3.0  # overrides last
    assert build_method("toy", config={"scale": 4.0}, sources=("T2w", "FLAIR")).sources == ("T2w", "FLAIR")
    with pytest.raises(ConfigError, match="unknown Toy variant 'triple'; known: double"):
        build_method("toy", variant="triple")
    with pytest.raises(ConfigError, match="unknown Toy configuration 'huge'; known: paper, small"):
        build_method("toy", config="huge")
    with pytest.raises(ConfigError, match="scale must be > 0"):
        build_method("toy", scale=-1.0)


def test_the_study_rows_come_from_the_declarations():
    from mmdm.methods.mmdm import MMDM
    from mmdm.methods.unest import UNest

    assert table1_methods()[-1] == REFERENCE_METHOD and len(baselines()) == 6
    assert ablation_variants() == tuple(MMDM.variants) == ("base", "mip", "naws", "full")
    runs = {r.name: r for r in study_runs()}
    for v in ablation_variants():
        assert runs[f"mmdm-{v}"].labels["table2"] == variant_label("mmdm", v) == MMDM.variants[v].label
    # UNest's objective presets are variants by the same mechanism as MMDM's ablation flags
    assert set(UNest.variants) == {"unpaired", "paired"}
    assert build_method("unest", config="small", variant="paired").cfg.objective == "paired"
    with pytest.raises(KeyError, match="has no variant 'paired'"):
        variant_label("mmdm", "paired")
