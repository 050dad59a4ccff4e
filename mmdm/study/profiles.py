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
from mmdm.data.dataset import DataConfig
from mmdm.methods import METHODS
from mmdm.study.runs import LABELLED_ROWS, study_runs


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


def sci(x: float) -> str:
    """A learning rate as the prose writes it: 3e-4, 1e-2."""
    mantissa, exp = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exp)}"


#: Optimiser steps of every run of the standard profile (one budget for every method).
STANDARD_STEPS = 4000

#: Every run a claim of the claims page compares (Tables 1-3: MMDM full, the six baselines, the other three MMDM
#: variants, the three modality pairs): the profiles that decide claims train each with every seed.
CLAIM_RUNS: tuple[str, ...] = tuple(r.name for r in study_runs())


@dataclass(frozen=True)
class TrainingSetup:
    """The training set-up of the CPU profiles (smoke, quick, standard), every number once.

    Chosen on the validation split by the recorded sweeps ``vessel`` and ``vessel-round3``
    (``mmdm sweep show vessel``; results/sweeps/) and, with whole-volume validation, ``setup-fidelity``
    (:func:`mmdm.study.sweep.setup_decision`): training windows of whole slices (``crop`` None; with a
    side, ``crop`` x ``crop`` in-plane crops of the window's slices, ``crop_vessel_share`` of them
    centred on the target's brightest voxels above its ``crop_quantile``, as the vessel sweeps chose
    and ``setup-fidelity`` replaced); the brightest ``emphasis_fraction`` of each window's target voxels
    weighted ``emphasis_weight`` in every method's per-pixel term; Adam at ``lr`` for the methods in
    ``lr_methods`` (MMDM; sweep ``vessel``: 0.27 against 0.09 validation recovery at 1e-4 after 800
    steps, and the diffusion baselines for the same set-up), NAWS's p_i at ``naws_lr``; the
    validation vessel score every ``val_every`` steps on ``val_windows`` windows, and with it the
    whole-volume validation of what the tables measure (``val_volumes`` validation subjects, every
    slice; window stride ``val_volume_stride``, ``val_volume_steps`` sampler steps); one weight-average
    rule ``ema_mode`` for every method, decided by the recorded sweep ``ema`` with the rule written before
    it ran (:func:`mmdm.study.sweep.ema_decision`): raw weights, since the average ranked above them for
    one of its four methods only (MMDM full; it raised the whole-volume validation PSNR of every method,
    by 0.03 dB for MMDM full and 0.5-1.8 dB for the others, but lowered the vessel recovery of Pix2Pix,
    ResViT and BBDM, and the rule ranks points by recovery within the PSNR margin). The profiles'
    ``train`` and ``method_overrides``, their descriptions, the sweeps' starting point and the
    deviations page (:func:`setup_deviations`) are derived from it.
    """

    #: ``None``: whole slices. Sweep ``setup-fidelity`` (800 steps, whole-volume validation): the only MMDM
    #: point within 0.5 dB of the best whole-volume PSNR (28.3 dB against 25.3 dB for 48x48 crops), at
    #: about 1.6x the training time per step
    crop: int | None = None
    crop_vessel_share: float = 0.7
    crop_quantile: float = 0.99
    emphasis_fraction: float = 0.01
    emphasis_weight: float = 20.0
    lr: float = 3e-4
    lr_methods: tuple[str, ...] = ("mmdm", "ddpm", "bbdm", "rddm")
    naws_lr: float = 1e-2
    #: MMDM's fusion predicts a correction to the mean of its branch predictions (sweep ``haze-fusion``, 200
    #: steps: validation background bias 0.159 -> -0.004 (base) and 0.112 -> -0.001 (full), whole-volume PSNR
    #: +7.6 and +7.4 dB), a deviation from the authors' fusion that the paper profile does not take
    fusion_residual: bool = True
    val_every: int = 200
    val_windows: int = 8
    val_volumes: int = 4
    val_volume_stride: int = 5
    val_volume_steps: int = 5
    ema_mode: str = "none"

    def crops(self, size: int | None = None) -> dict[str, Any] | None:
        """The :class:`~mmdm.data.crops.CropConfig` overrides (``size``: another crop side for a set-up
        that crops); ``None`` (whole slices) when the set-up does not crop."""
        if self.crop is None:
            return None
        side = size or self.crop
        return {"size": [side, side], "vessel_share": self.crop_vessel_share, "quantile": self.crop_quantile}

    def emphasis(self) -> dict[str, Any]:
        """The :class:`~mmdm.losses.emphasis.EmphasisConfig` of the set-up."""
        return {"kind": "top_fraction", "fraction": self.emphasis_fraction, "weight": self.emphasis_weight}

    def train(self) -> dict[str, Any]:
        """The TrainConfig overrides of every run of a CPU profile."""
        return {"crops": self.crops(), "emphasis": self.emphasis(), "val_every": self.val_every,
                "val_windows": self.val_windows, "val_volumes": self.val_volumes,
                "val_volume_stride": self.val_volume_stride, "val_volume_steps": self.val_volume_steps,
                "ema_mode": self.ema_mode}

    def lr_override(self) -> dict[str, Any]:
        """The method keyword arguments that set the learning rate."""
        return {"optim": {"lr": self.lr}}

    def method_overrides(self) -> dict[str, dict[str, Any]]:
        """Per method, its keyword arguments of the set-up (learning rate; MMDM's NAWS rate too)."""
        out = {m: self.lr_override() for m in self.lr_methods}
        out["mmdm"] = {**out.get("mmdm", {}), "naws_lr": self.naws_lr, "fusion_residual": self.fusion_residual}
        return out

    @property
    def emphasis_words(self) -> str:
        return f"brightest {100 * self.emphasis_fraction:g} % x{self.emphasis_weight:g}"

    @property
    def crop_words(self) -> str:
        return self.crop_words_at()

    def crop_words_at(self, size: int | None = None) -> str:
        """The training windows in words (``size``: another crop side, as :meth:`crops`)."""
        if self.crop is None:
            return "whole slices"
        side = size or self.crop
        return f"{side}x{side} crops"

    def summary(self) -> str:
        """The set-up in a few words, for the profile descriptions."""
        fusion = ", MMDM's fusion as a correction to its branches' mean" if self.fusion_residual else ""
        return (f"{self.crop_words}, {self.emphasis_words}, lr {sci(self.lr)} for the diffusion methods, NAWS lr "
                f"{sci(self.naws_lr)}{fusion}")


#: The set-up of the CPU profiles.
SETUP = TrainingSetup()
VESSEL_TRAIN: dict[str, Any] = SETUP.train()
VESSEL_METHODS: dict[str, dict[str, Any]] = SETUP.method_overrides()


def setup_deviations(setup: TrainingSetup = SETUP) -> list[str]:
    """Where the training set-up of the CPU profiles departs from every method's published one (the
    `paper` profile keeps the published objectives); the deviations page lists them."""
    window = DataConfig().window
    gan_lr = ", ".join(sorted({sci(METHODS.get(m).method_class.make_config("small").optim.lr)
                               for m in ("pix2pix", "resvit")}))
    fraction = f"{100 * setup.emphasis_fraction:g} %"
    return [
        f"**Vessel emphasis (every method).** In each method's per-pixel reconstruction term the brightest {fraction} "
        f"of each training window's target voxels weigh x{setup.emphasis_weight:g}, computed from the target image "
        "alone: MMDM's MSE part of eq. (7) for the fused and every branch prediction (the MIP part as published), "
        "the L1 of Pix2Pix, ResViT and UNest's paired variant, DDPM's noise MSE, BBDM's objective and both RDDM "
        "terms at the same pixels. Why: at a CPU budget an unweighted loss learns no artery; the form and strength "
        "were chosen on the validation split by the recorded sweeps (the sweeps page). UNest's published objective "
        "is unpaired and has no term that compares a synthesis with its own target, so the emphasis does not "
        "apply to it.",
        *([f"**2.5D crops (every method).** Training windows are {setup.crop}x{setup.crop} in-plane crops of "
           f"{window} slices, {100 * setup.crop_vessel_share:g} % of them centred on the target's brightest voxels, "
           "instead of whole slices (the sweeps page: more vessel recovery per step, at a fifth of the pixels). "
           "Synthesis still slides over whole slices."] if setup.crop is not None else []),
        f"**Learning rate {sci(setup.lr)} for MMDM and the diffusion baselines** (DDPM, BBDM, RDDM), chosen for "
        "MMDM on the validation split and given to the diffusion baselines for the same set-up; the GANs keep "
        f"their published {gan_lr}.",
        f"**NAWS's p_i at their own learning rate, {sci(setup.naws_lr)}** (`naws_lr`; the paper is silent, the "
        "authors' code uses the model's): at the model's rate they move by at most that rate per step, so in a "
        "short run the learnt weighting stays at its start.",
        "**Extra runs beside the tables (standard profile).** MMDM full and the strongest baseline are trained "
        "once more without the emphasis, everything else equal (the emphasis ablation on the results page), and "
        "DDPM with x0 prediction fills a labelled extra row of Table 1 after the published eps row (the sweep "
        "ddpm-prediction chose x0 over v and eps on the validation split); `RUN_OPTIONS` in `mmdm/study/runs.py`.",
        "**Precision.** The CPU profiles train in fp32: bf16 autocast agreed with fp32 within the seed "
        "spread (the sweeps page) but was hardly faster for the small networks (measured on the vessel sweeps' crops). The `paper` profile "
        "uses bf16 autocast, the usual practice on GPUs.",
    ]


#: The ablation of the vessel emphasis: MMDM full and the strongest baseline trained again
#: without it, everything else equal.
EMPHASIS_ABLATION: tuple[tuple[str, str], ...] = (("mmdm-full", "no-emphasis"), ("strongest-baseline", "no-emphasis"))
#: The smoke profile's crop side (its tiny phantom's slices are smaller than the set-up's crops).
SMOKE_CROP = 32

PROFILES: dict[str, StudyProfile] = {
    "smoke": StudyProfile(
        name="smoke", description="every run, tiny: a 6-subject 4 mm phantom, 3 training steps on "
        f"{SETUP.crop_words_at(SMOKE_CROP)} with the vessel emphasis, 2 sampling steps, one test subject; checks the machinery, says nothing about "
        "the methods",
        cohort="tiny", steps=3, checkpoint_every=3, image_every=0, log_every=1, eval_sample_steps=2,
        eval_stride=5, eval_subjects=1, seeds=(0, 1), seed_runs=("mmdm-full",), uncertainty_samples=2,
        uncertainty_subjects=1, uncertainty_steps=3, frontier_steps=(2, 3), frontier_strides=(2, 5),
        train={**VESSEL_TRAIN, "crops": SETUP.crops(SMOKE_CROP), "val_every": 3, "val_windows": 2,
               "val_volumes": 1, "val_volume_steps": 2},
        method_overrides=VESSEL_METHODS, option_runs=EMPHASIS_ABLATION),
    "quick": StudyProfile(
        name="quick", description="the CPU main job: 40-subject 2 mm phantom (28/4/8), small models with the "
        f"vessel set-up of the standard profile ({SETUP.crop_words}, emphasis), 120 steps per run (more for the fast GAN "
        "baselines; too few to learn vessels), 5 sampling steps, windows every 5th slice",
        cohort="quick", steps=120, steps_per_method={"pix2pix": 600, "resvit": 300, "unest": 300},
        checkpoint_every=60, image_every=60, eval_sample_steps=5, eval_stride=5, uncertainty_samples=3,
        uncertainty_subjects=2, frontier_steps=(2, 5, 10), frontier_strides=(2, 5),
        train={**VESSEL_TRAIN, "val_every": 60}, method_overrides=VESSEL_METHODS),
    "standard": StudyProfile(
        name="standard", description="the published book: the standard cohort (the quick one plus 8 test "
        f"subjects: 28/4/16), small models, the vessel set-up ({SETUP.summary()}; chosen on validation by the "
        f"recorded sweeps), {STANDARD_STEPS} steps for every run, 10 sampling steps, windows every slice (as the authors' inference); 3 "
        "seeds of every run a claim compares (Tables 1-3); MMDM full and the strongest baseline once more without "
        "the emphasis; DDPM with x0 "
        "prediction as a labelled extra row; uncertainty "
        "(4 draws x 4 subjects) and the frontier (5-50 steps x stride "
        "1/2/5 x coupled/independent, 1 subject)",
        cohort="standard", steps=STANDARD_STEPS, checkpoint_every=200, image_every=500, eval_sample_steps=10, eval_stride=1,
        seeds=(0, 1, 2), seed_runs=CLAIM_RUNS, uncertainty_samples=4, uncertainty_subjects=4,
        frontier_steps=(5, 10, 20, 50), train=VESSEL_TRAIN, method_overrides=VESSEL_METHODS,
        option_runs=EMPHASIS_ABLATION + LABELLED_ROWS),
    "paper": StudyProfile(
        name="paper", description="the paper's settings: 140-subject 1 mm phantom, paper configurations, "
        "200 epochs, batch 4, 200 sampling steps, stride 1, each method's published objective (no emphasis, "
        "whole slices), bf16 autocast where the device computes it natively (amp auto; a GPU machine or cluster)",
        cohort="paper", method_config="paper", steps=None, epochs=200, checkpoint_every=2000,
        image_every=2000, log_every=50, eval_sample_steps=200, eval_stride=1, seeds=(0, 1, 2),
        seed_runs=("mmdm-full", "mmdm-base", "strongest-baseline"), uncertainty_samples=8, uncertainty_subjects=8,
        frontier_steps=(10, 20, 50, 100, 200), frontier_subjects=4,
        train={"amp": "auto", "val_every": 2000}),
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
