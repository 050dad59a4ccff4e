"""The runs of the study: which trained models fill which row of the paper's tables.

Table 1 compares MMDM ("full") with the six baselines, Table 2 the ablation
variants of MMDM, Table 3 MMDM on modality subsets. "full" with all sources
is shared by the three tables, so 13 models answer them.

The rows come from the methods' own declarations (:mod:`mmdm.methods`): a
registered method with a ``table1`` position is a baseline of Table 1, labelled
by its ``display_name``; MMDM's ``variants`` are the rows of Table 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Sequence

from mmdm.methods import display_name, method_class, table1_methods

#: The method of the paper and the variant every comparison is made against.
REFERENCE_METHOD = "mmdm"
REFERENCE_VARIANT = "full"
REFERENCE_RUN = f"{REFERENCE_METHOD}-{REFERENCE_VARIANT}"


def baselines() -> tuple[str, ...]:
    """Table 1's comparison methods in the paper's row order: every registered method with a
    ``table1`` position except the reference."""
    return tuple(m for m in table1_methods() if m != REFERENCE_METHOD)


def ablation_variants() -> tuple[str, ...]:
    """Table 2's rows in the paper's order: the reference method's variants."""
    return tuple(method_class(REFERENCE_METHOD).variants)


def variant_label(method: str, variant: str) -> str:
    """The row label of ``method``'s variant ``variant`` (its :class:`~mmdm.methods.Variant` label)."""
    variants = method_class(method).variants
    if variant not in variants:
        raise KeyError(f"{method} has no variant '{variant}'; known: {', '.join(variants) or 'none'}")
    return variants[variant].label


def method_label(method: str) -> str:
    """The row label of ``method`` in Table 1 (its ``display_name``)."""
    return display_name(method)


@dataclass(frozen=True)
class RunSpec:
    """One trained model of the study and the table rows it fills."""

    name: str
    method: str
    variant: str | None = None
    sources: tuple[str, ...] | None = None  # None: the profile's sources
    tables: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)  # table -> row label
    option: str | None = None  # a named change of the set-up (:data:`RUN_OPTIONS`), e.g. "no-emphasis"

    def method_kwargs(self, config: str, profile_sources: Sequence[str]) -> dict:
        kw: dict = {"config": config, "sources": list(self.sources or profile_sources)}
        if self.variant is not None:
            kw["variant"] = self.variant
        return kw


@dataclass(frozen=True)
class RunOption:
    """A named change of one run's training set-up, trained as an extra run ``<run>-<name>``.

    Either an ablation beside the table row, showing what the change does (``tables`` empty: it
    fills no row), or a **labelled extra row** of the tables it names (``row_label`` added to the
    run's own label), e.g. a faster-converging option of a baseline's original that is not the
    published method; such a row is shown only where its record exists and never replaces the
    published row. ``train``: overrides of the run's :class:`~mmdm.engine.spec.TrainConfig`
    (nested dicts), applied after the profile's; ``method``: overrides of its method keyword
    arguments."""

    name: str
    label: str
    train: dict[str, Any] = field(default_factory=dict, hash=False)
    method: dict[str, Any] = field(default_factory=dict, hash=False)
    tables: tuple[str, ...] = ()
    row_label: str = ""


#: The run options a profile may train (``StudyProfile.option_runs``).
RUN_OPTIONS: dict[str, RunOption] = {
    "no-emphasis": RunOption("no-emphasis", "without the vessel emphasis (the published per-pixel loss)",
                             train={"emphasis": {"kind": "none"}}),
    "x0-prediction": RunOption(
        "x0-prediction", "DDPM's network predicts x0 instead of the noise (Ho et al. 2020, sec. 3.2 discuss it); "
        "chosen over eps and v on the validation split by the sweep ddpm-prediction",
        method={"prediction": "x0"}, tables=("table1",), row_label="x0 prediction, not the published objective"),
}

#: The labelled extra rows of the tables: (run, option) pairs whose option has ``tables``.
LABELLED_ROWS: tuple[tuple[str, str], ...] = (("ddpm", "x0-prediction"),)


def get_option(name: str) -> RunOption:
    if name not in RUN_OPTIONS:
        raise KeyError(f"unknown run option '{name}'; known: {', '.join(RUN_OPTIONS)}")
    return RUN_OPTIONS[name]


def option_spec(spec: RunSpec, option: str) -> RunSpec:
    """``spec`` trained with run option ``option``, named ``<spec.name>-<option>``: in no table, or,
    for an option with ``tables``, a labelled extra row of those of ``spec``'s tables."""
    opt = get_option(option)
    if spec.option:
        raise ValueError(f"run '{spec.name}' already has the option '{spec.option}'")
    tables = tuple(t for t in spec.tables if t in opt.tables)
    labels = {t: f"{spec.labels[t]} ({opt.row_label})" for t in tables}
    return RunSpec(f"{spec.name}-{option}", spec.method, spec.variant, spec.sources, tables, labels, option)


def labelled_rows(sources: Sequence[str] = ("T1w", "T2w", "FLAIR")) -> list[RunSpec]:
    """The runs of :data:`LABELLED_ROWS` (each a table row labelled as not the published method)."""
    by_name = {r.name: r for r in study_runs(sources)}
    return [option_spec(by_name[run], option) for run, option in LABELLED_ROWS]


def run_name(method: str, variant: str | None = None, sources: Sequence[str] | None = None,
             all_sources: Sequence[str] | None = None, seed: int = 0, option: str | None = None) -> str:
    """``mmdm-full``, ``bbdm``, ``mmdm-full-T1w+T2w`` (a subset), ``mmdm-full-no-emphasis`` (a run
    option), ``...-s1`` (seed 1)."""
    name = method if variant is None else f"{method}-{variant}"
    if sources is not None and all_sources is not None and tuple(sources) != tuple(all_sources):
        name += "-" + "+".join(sources)
    if option:
        name += f"-{option}"
    return name if seed == 0 else f"{name}-s{seed}"


def study_runs(sources: Sequence[str] = ("T1w", "T2w", "FLAIR")) -> list[RunSpec]:
    """The 13 runs (for three sources) in execution order: MMDM full first, then Table 1's
    baselines, Table 2's other variants, Table 3's modality subsets."""
    sources = tuple(sources)
    ref, var = REFERENCE_METHOD, REFERENCE_VARIANT
    full = RunSpec(REFERENCE_RUN, ref, var, None, ("table1", "table2", "table3"),
                   {"table1": method_label(ref), "table2": variant_label(ref, var), "table3": " + ".join(sources)})
    runs = [full]
    runs += [RunSpec(m, m, None, None, ("table1",), {"table1": method_label(m)}) for m in baselines()]
    runs += [RunSpec(f"{ref}-{v}", ref, v, None, ("table2",), {"table2": variant_label(ref, v)})
             for v in ablation_variants() if v != var]
    for sub in combinations(sources, len(sources) - 1) if len(sources) > 2 else []:
        runs.append(RunSpec(run_name(ref, var, sub, sources), ref, var, tuple(sub), ("table3",),
                            {"table3": " + ".join(sub)}))
    return runs


def find_run(name: str, sources: Sequence[str] = ("T1w", "T2w", "FLAIR")) -> RunSpec:
    for r in study_runs(sources):
        if r.name == name:
            return r
    known = ", ".join(r.name for r in study_runs(sources))
    raise KeyError(f"unknown study run '{name}'; known: {known}")
