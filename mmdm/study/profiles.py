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


PROFILES: dict[str, StudyProfile] = {
    "smoke": StudyProfile(
        name="smoke", description="every run, tiny: a 6-subject 4 mm phantom, 3 training steps, "
        "2 sampling steps, one test subject; checks the machinery, says nothing about the methods",
        cohort="tiny", steps=3, checkpoint_every=3, image_every=0, log_every=1, eval_sample_steps=2,
        eval_stride=5, eval_subjects=1, seeds=(0, 1), seed_runs=("mmdm-full",), uncertainty_samples=2,
        uncertainty_subjects=1, uncertainty_steps=3, frontier_steps=(2, 3), frontier_strides=(2, 5)),
    "quick": StudyProfile(
        name="quick", description="the CPU main job: 40-subject 2 mm phantom (28/4/8), small models, "
        "120 steps per run (more for the fast GAN baselines), 5 sampling steps, windows every 5th slice",
        cohort="quick", steps=120, steps_per_method={"pix2pix": 600, "resvit": 300, "unest": 300},
        checkpoint_every=60, image_every=60, eval_sample_steps=5, eval_stride=5, uncertainty_samples=3,
        uncertainty_subjects=2, frontier_steps=(2, 5, 10), frontier_strides=(2, 5)),
    "standard": StudyProfile(
        name="standard", description="the published book: the quick cohort, small models, 600 steps per "
        "diffusion run (more for the fast GAN baselines), 10 sampling steps, windows every 2nd slice; 3 seeds "
        "of MMDM full, MMDM base and the strongest baseline; uncertainty (4 draws x 4 subjects) and the "
        "frontier (5-50 steps x stride 1/2/5 x coupled/independent, 1 subject)",
        cohort="standard", steps=600, steps_per_method={"pix2pix": 3000, "resvit": 1500, "unest": 1500},
        checkpoint_every=100, image_every=200, eval_sample_steps=10, eval_stride=2, seeds=(0, 1, 2),
        seed_runs=("mmdm-full", "mmdm-base", "strongest-baseline"), uncertainty_samples=4, uncertainty_subjects=4,
        frontier_steps=(5, 10, 20, 50)),
    "paper": StudyProfile(
        name="paper", description="the paper's settings: 140-subject 1 mm phantom, paper configurations, "
        "200 epochs, batch 4, 200 sampling steps, stride 1 (a GPU machine or cluster)",
        cohort="paper", method_config="paper", steps=None, epochs=200, checkpoint_every=2000,
        image_every=2000, log_every=50, eval_sample_steps=200, eval_stride=1, seeds=(0, 1, 2),
        seed_runs=("mmdm-full", "mmdm-base", "strongest-baseline"), uncertainty_samples=8, uncertainty_subjects=8,
        frontier_steps=(10, 20, 50, 100, 200), frontier_subjects=4),
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
