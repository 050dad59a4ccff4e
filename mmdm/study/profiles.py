"""Named study profiles: the cohort, model sizes, steps and evaluation settings of every run.

==========  =====================================================================
profile     use
==========  =====================================================================
smoke       every run, tiny, for CI and the tests (whole study in minutes on 2 cores)
quick       the README's main job on a CPU: all 13 runs, small models, 40 subjects
standard    the numbers the published book shows: the best 2 CPU cores do in a few
            sittings; its run records are committed under ``results/standard``
paper       the paper's settings (1 mm cohort, paper configurations, 200 epochs,
            200 sampling steps) for a GPU machine or cluster
==========  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmdm.config import ConfigError, replace
from mmdm.study.runs import LABELLED_ROWS


@dataclass
class StudyProfile:
    """Everything that differs between profiles; every run of a profile shares it."""

    name: str
    description: str
    #: "phantom" (build the cohort ``cohort``) or the path of a dataset in the study's layout (e.g. IXI)
    dataset: str = "phantom"
    cohort: str = "quick"  # phantom profile (mmdm.data.phantom.PROFILES)
    cohort_subjects: int | None = None
    cohort_resolution: float | None = None
    sources: tuple[str, ...] = ("T1w", "T2w", "FLAIR")
    method_config: str = "small"  # named method configuration ("small" or "paper")
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method name
    #: TrainConfig overrides of every run (nested dicts), e.g. the vessel emphasis, crops, validation
    train: dict[str, Any] = field(default_factory=dict)
    steps: int | None = 100  # optimiser steps per run (None: use epochs)
    epochs: int | None = None
    steps_per_method: dict[str, int] = field(default_factory=dict)
    batch_size: int = 4
    checkpoint_every: int = 50
    image_every: int = 50
    log_every: int = 5
    eval_sample_steps: int | None = None  # None: the method configuration's sampling steps
    eval_stride: int = 1  # axial stride of the 2.5D sliding window at evaluation (authors: 1)
    eval_subjects: int | None = None  # None: every test subject
    #: training seeds of the runs in ``seed_runs`` (every other run: seed 0 only)
    seeds: tuple[int, ...] = (0,)
    #: runs repeated with every seed; "strongest-baseline": the best Table 1 baseline (mean PSNR, seed 0)
    seed_runs: tuple[str, ...] = ()
    #: extra runs (run, option of :data:`mmdm.study.runs.RUN_OPTIONS`), trained after the seed runs,
    #: e.g. ``("mmdm-full", "no-emphasis")``; the run may be "strongest-baseline" as in ``seed_runs``
    option_runs: tuple[tuple[str, str], ...] = ()
    #: repeated sampling of MMDM full for per-voxel uncertainty (0: skip); test subjects used (None: all)
    uncertainty_samples: int = 0
    uncertainty_subjects: int | None = None
    uncertainty_steps: int | None = None  # None: eval_sample_steps (a bridge needs >= 3 to inject any noise)
    #: speed-quality frontier of MMDM full: sampling steps x window stride x sampling mode (no steps: skip)
    frontier_steps: tuple[int, ...] = ()
    frontier_strides: tuple[int, ...] = (1, 2, 5)
    frontier_modes: tuple[str, ...] = ("coupled", "independent")
    frontier_subjects: int = 1
    device: str = "auto"

    @property
    def data_dir(self) -> str:
        return f"data/phantom-{self.cohort}" if self.dataset == "phantom" else self.dataset

    def run_steps(self, method: str) -> int | None:
        return self.steps_per_method.get(method, self.steps)


#: The vessel set-up of the CPU profiles (issue #15), chosen on the validation split by the recorded
#: sweeps ``vessel`` and ``vessel-round3`` (``mmdm sweep show vessel``; results/sweeps/): 48x48 crops, 70 %
#: centred on the target's brightest voxels, the brightest 1 % of each window's target voxels weighted x20
#: in every method's per-pixel term, the validation vessel score every 200 steps.
VESSEL_TRAIN: dict[str, Any] = {
    "crops": {"size": [48, 48], "vessel_share": 0.7, "quantile": 0.99},
    "emphasis": {"kind": "top_fraction", "fraction": 0.01, "weight": 20.0},
    "val_every": 200, "val_windows": 8,
}
#: Learning rates of the CPU profiles: 3e-4 for MMDM (sweep `vessel`: 0.27 against 0.09 validation recovery
#: at 1e-4 after 800 steps) and, for the same set-up, for the three diffusion baselines; NAWS's p_i at 1e-2
#: (the sweeps' best point). The GANs keep their published 2e-4.
#: MMDM's fusion predicts a correction to the mean of its branch predictions (fusion_residual; sweep
#: `haze-fusion`, 200 steps: validation background bias 0.159 -> -0.004 (base) and 0.112 -> -0.001 (full),
#: whole-volume PSNR +7.6 and +7.4 dB), a deviation from the authors' fusion that the paper profile does not take.
VESSEL_METHODS: dict[str, dict[str, Any]] = {
    "mmdm": {"optim": {"lr": 3e-4}, "naws_lr": 1e-2, "fusion_residual": True},
    **{m: {"optim": {"lr": 3e-4}} for m in ("ddpm", "bbdm", "rddm")},
}

#: The ablation of the vessel emphasis (issue #15): MMDM full and the strongest baseline trained again
#: without it, everything else equal.
EMPHASIS_ABLATION: tuple[tuple[str, str], ...] = (("mmdm-full", "no-emphasis"), ("strongest-baseline", "no-emphasis"))

PROFILES: dict[str, StudyProfile] = {
    "smoke": StudyProfile(
        name="smoke", description="every run, tiny: a 6-subject 4 mm phantom, 3 training steps on 32x32 crops "
        "with the vessel emphasis, 2 sampling steps, one test subject; checks the machinery, says nothing about "
        "the methods",
        cohort="tiny", steps=3, checkpoint_every=3, image_every=0, log_every=1, eval_sample_steps=2,
        eval_stride=5, eval_subjects=1, seeds=(0, 1), seed_runs=("mmdm-full",), uncertainty_samples=2,
        uncertainty_subjects=1, uncertainty_steps=3, frontier_steps=(2, 3), frontier_strides=(2, 5),
        train={**VESSEL_TRAIN, "crops": {**VESSEL_TRAIN["crops"], "size": [32, 32]}, "val_every": 3,
               "val_windows": 2},
        method_overrides=VESSEL_METHODS, option_runs=EMPHASIS_ABLATION),
    "quick": StudyProfile(
        name="quick", description="the CPU main job: 40-subject 2 mm phantom (28/4/8), small models with the "
        "vessel set-up of the standard profile (48x48 crops, emphasis), 120 steps per run (more for the fast GAN "
        "baselines; too few to learn vessels), 5 sampling steps, windows every 5th slice",
        cohort="quick", steps=120, steps_per_method={"pix2pix": 600, "resvit": 300, "unest": 300},
        checkpoint_every=60, image_every=60, eval_sample_steps=5, eval_stride=5, uncertainty_samples=3,
        uncertainty_subjects=2, frontier_steps=(2, 5, 10), frontier_strides=(2, 5),
        train={**VESSEL_TRAIN, "val_every": 60}, method_overrides=VESSEL_METHODS),
    "standard": StudyProfile(
        name="standard", description="the published book: the standard cohort (the quick one plus 8 test "
        "subjects: 28/4/16), small models, the vessel set-up (48x48 crops, brightest 1 % x20, lr 3e-4 for the "
        "diffusion methods, NAWS lr 1e-2; chosen on validation by the recorded sweeps), 2000 steps per diffusion "
        "run (more for Pix2Pix), 10 sampling steps, windows every 2nd slice; 3 seeds of MMDM full, MMDM base and "
        "the strongest baseline; MMDM full and the strongest baseline once more without the emphasis; DDPM with x0 "
        "prediction as a labelled extra row; uncertainty "
        "(4 draws x 4 subjects) and the frontier (5-50 steps x stride "
        "1/2/5 x coupled/independent, 1 subject)",
        cohort="standard", steps=2000, steps_per_method={"pix2pix": 4000, "resvit": 2000, "unest": 2000},
        checkpoint_every=200, image_every=500, eval_sample_steps=10, eval_stride=2, seeds=(0, 1, 2),
        seed_runs=("mmdm-full", "mmdm-base", "strongest-baseline"), uncertainty_samples=4, uncertainty_subjects=4,
        frontier_steps=(5, 10, 20, 50), train=VESSEL_TRAIN, method_overrides=VESSEL_METHODS,
        option_runs=EMPHASIS_ABLATION + LABELLED_ROWS),
    "paper": StudyProfile(
        name="paper", description="the paper's settings: 140-subject 1 mm phantom, paper configurations, "
        "200 epochs, batch 4, 200 sampling steps, stride 1, each method's published objective (no emphasis, "
        "whole slices), bf16 autocast (a GPU machine or cluster)",
        cohort="paper", method_config="paper", steps=None, epochs=200, checkpoint_every=2000,
        image_every=2000, log_every=50, eval_sample_steps=200, eval_stride=1, seeds=(0, 1, 2),
        seed_runs=("mmdm-full", "mmdm-base", "strongest-baseline"), uncertainty_samples=8, uncertainty_subjects=8,
        frontier_steps=(10, 20, 50, 100, 200), frontier_subjects=4,
        train={"amp": "bf16", "val_every": 2000}),
}


def get_profile(name: str | StudyProfile, **overrides: Any) -> StudyProfile:
    """A named profile, optionally with field overrides (e.g. ``dataset="data/ixi"``)."""
    if isinstance(name, StudyProfile):
        prof = name
    elif name in PROFILES:
        prof = PROFILES[name]
    else:
        raise ConfigError(f"unknown study profile '{name}'; choose one of {', '.join(PROFILES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(prof, overrides) if overrides else prof
