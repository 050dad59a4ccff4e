"""Recorded sweeps on the validation split: how the study's training settings were chosen.

A sweep is a named list of training runs (:class:`SweepPoint`) that differ
from a study profile's run in a few settings: the vessel emphasis, crops, the
MIP loss's temperature and noise, NAWS's learning rate, the precision. Each
point trains with ``val_every`` so that its run directory gets a
``validation.jsonl`` (validation losses and the vessel score on fixed
validation windows, :mod:`mmdm.engine.validation`); nothing looks at the test
split. :func:`collect_sweep` copies each point's config, provenance and
validation log to ``results/sweeps/<sweep>/<point>/`` and writes
``summary.csv``; :func:`sweep_summary` ranks the points by the rule the sweep
declares up front (its :class:`SelectionRule`, data in the sweep's definition:
the recorded vessel sweeps by the vessel score alone (:data:`VESSEL_ONLY`),
every sweep defined since whole-volume validation existed by whole-volume
fidelity and the vessel score together (:data:`FIDELITY_AND_VESSELS`)).

``mmdm sweep run vessel --jobs 2`` repeats one; ``mmdm sweep list`` lists them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from mmdm.config import ConfigError, save_yaml
from mmdm.engine.rundir import VALIDATION_LOG, run_status
from mmdm.engine.spec import resolve
from mmdm.io import write_text
from mmdm.paths import project_path
from mmdm.study.api import ensure_data, make_spec, train_config
from mmdm.study.footing import convergence
from mmdm.study.profiles import SETUP, get_profile
from mmdm.study.records import TRAINING_RECORD_FILES, read_validation_log

#: whole-volume validation scores kept in a sweep's summary.csv (as ``volume_<score>``)
VOLUME_COLUMNS = ("psnr", "ssim", "mip_psnr", "vessel_recovery")


@dataclass(frozen=True)
class SelectionRule:
    """How a sweep's points are ranked, fixed in the sweep's definition before it runs (validation only).

    Each point's scores are the means of its last ``last_n`` validations. With ``psnr_margin_db``
    set, a point is *eligible* only when its whole-volume validation PSNR (every slice of the
    validation subjects, :mod:`mmdm.engine.volume_validation`) is within that many dB of the best
    point's; eligible points come first, ranked by the vessel contrast recovery (the whole-volume
    one where recorded, else the validation windows'), rounded to ``round_to``; equal ones by the
    last validation loss (lower first). Without ``psnr_margin_db`` the vessel score alone ranks.
    With ``recovery_target`` set, the recovery ranks by its distance from that value (``|target -
    recovery|``, lower first) instead of by its height: a recovery above 1 is a synthesis whose vessels
    stand out more than the target's, an overshoot, not a better one."""

    key: str
    psnr_margin_db: float | None = 0.5
    last_n: int = 2
    round_to: float = 0.01
    recovery_target: float | None = None

    @property
    def text(self) -> str:
        how = ("(higher is better)" if self.recovery_target is None else
               f"by its distance from {self.recovery_target:g} (|{self.recovery_target:g} - recovery|, lower is "
               "better: above 1 the vessels overshoot the target's contrast)")
        vessel = (f"mean validation contrast recovery of the last {self.last_n} validations, to {self.round_to:g} "
                  f"{how}; equal ones are ordered by the last validation loss (lower is better)")
        if self.psnr_margin_db is None:
            return vessel
        return (f"a point is eligible when its whole-volume validation PSNR (every slice of the validation "
                f"subjects; mean of the last {self.last_n} validations) is within {self.psnr_margin_db:g} dB of the "
                f"best point's; eligible points first, each group ranked by the {vessel.replace('mean validation', 'mean whole-volume validation')}")


#: The rule of the recorded vessel sweeps (chosen before whole-volume validation existed).
VESSEL_ONLY = SelectionRule("vessel-only", psnr_margin_db=None)
#: The rule of every sweep defined with whole-volume validation: fidelity and vessels together.
FIDELITY_AND_VESSELS = SelectionRule("fidelity-and-vessels", psnr_margin_db=0.5)
#: As :data:`FIDELITY_AND_VESSELS`, the recovery ranked by its distance from 1: written after the sweep ``ema``'s
#: first validations showed whole-volume recoveries of 1.1-1.25 with the residual fusion (vessels brighter
#: against the brain than the target's), which a higher-is-better rule would reward.
FIDELITY_AND_VESSELS_TO_ONE = SelectionRule("fidelity-and-vessels-to-one", psnr_margin_db=0.5, recovery_target=1.0)
#: The rule of the recorded sweeps, as text (kept for the pages and the CLI that print it).
SELECTION_RULE = VESSEL_ONLY.text


@dataclass(frozen=True)
class ReferenceRule:
    """A rule that judges each candidate point against its ``reference`` point rather than ranking them
    (decided by :func:`mmdm.study.haze.judge_sweep` on whole validation volumes). ``sweep show`` still
    lists the points by their vessel score, as :data:`VESSEL_ONLY` does."""

    key: str
    text: str
    psnr_margin_db: None = None
    last_n: int = 2
    round_to: float = 0.01


@dataclass(frozen=True)
class SweepPoint:
    """One training run of a sweep: a study run (method, variant) with ``train`` overrides of its
    :class:`~mmdm.engine.spec.TrainConfig` (nested dicts) and ``method`` overrides of its method config."""

    name: str
    method: str = "mmdm"
    variant: str | None = "full"
    train: dict[str, Any] = field(default_factory=dict, hash=False)
    method_overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    note: str = ""
    #: the point this one is judged against (None: a reference or an unpaired point)
    reference: str | None = None


@dataclass(frozen=True)
class Sweep:
    """A named sweep: the profile whose runs it varies, the shared settings and the points."""

    name: str
    description: str
    points: tuple[SweepPoint, ...]
    profile: str = "standard"
    steps: int = 800
    val_every: int = 200
    val_windows: int = 8
    base_train: dict[str, Any] = field(default_factory=dict, hash=False)
    #: how the points are ranked or judged (declared with the sweep, before it runs)
    rule: SelectionRule | ReferenceRule = FIDELITY_AND_VESSELS
    #: whole-volume validation of every point (:class:`~mmdm.engine.spec.TrainConfig`'s ``val_volume*``)
    val_volumes: int = 4
    val_volume_stride: int = 5
    val_volume_steps: int | None = 5


#: The crops and emphasis the vessel sweeps chose and the later sweeps started from (48x48 crops, 70 %
#: centred on the target's voxels above its 0.99 quantile; the brightest 1 % x20), written out so a recorded
#: sweep stays repeatable when the set-up (:data:`mmdm.study.profiles.SETUP`) moves on; sweep
#: ``setup-fidelity`` replaced the crops by whole slices. A collected point keeps its resolved config
#: (results/sweeps/<sweep>/<point>/config.yaml).
CROPS = {"size": [48, 48], "vessel_share": 0.7, "quantile": 0.99}
TOP20 = {"kind": "top_fraction", "fraction": 0.01, "weight": 20.0}

#: The selection rule of the haze sweeps (written before they ran): whole validation volumes.
HAZE_RULE = ReferenceRule("haze-reference", "each candidate point is judged against its reference point (same method, steps and seed) on the "
             "whole volumes of the 4 validation subjects (every slice, the records' synthesis with non-overlapping "
             "windows, stride 5, and 5 sampling steps to fit a shared 2-core machine; mean over subjects): "
             "adopted if its background bias (mean prediction - target where the target is below 0.05) is <= 0.02, "
             "its whole-volume PSNR is not more than 0.3 dB below the reference's and its vessel contrast recovery "
             "not more than 0.03 below; of several adopted candidates of one method, the one with the lowest "
             "background bias")

#: The learning rate round 1 pointed to (3e-4, the probes before it used it too); the small config's own is 1e-4.
LR3 = {"optim": {"lr": 3e-4}}
#: MMDM's keyword arguments in the set-up of the CPU profiles as the sweeps after the haze diagnosis
#: start from (lr 3e-4, NAWS at 1e-2, the residual fusion), written out so a recorded sweep stays repeatable
MMDM_SETUP = {**LR3, "naws_lr": 1e-2, "fusion_residual": True}

SWEEPS: dict[str, Sweep] = {
    "vessel-round1": Sweep(
        name="vessel-round1",
        rule=VESSEL_ONLY, val_volumes=0,
        description="round 1, MMDM full (small, lr 1e-4) on the standard cohort's training split, 800 steps, "
                    "scored on validation windows: the vessel emphasis (form and strength), crops against whole "
                    "slices, the learning rate, the MIP loss's noise and temperature and NAWS's learning rate; "
                    "Pix2Pix with and without the emphasis. Ran on a 16-core machine with 15 points at once and "
                    "was stopped by that machine's time limit after 200-400 steps (Pix2Pix: all 800); only the "
                    "learning rate separated the points, so round 2 (`vessel`) starts from lr 3e-4",
        base_train={"crops": CROPS, "emphasis": TOP20},
        points=(
            SweepPoint("none", train={"emphasis": {"kind": "none"}}, note="no emphasis (the published loss)"),
            SweepPoint("top1-w20", note="brightest 1 % x20 (the issue's probe)"),
            SweepPoint("top1-w5", train={"emphasis": {"weight": 5.0}}),
            SweepPoint("top1-w50", train={"emphasis": {"weight": 50.0}}),
            SweepPoint("top3-w20", train={"emphasis": {"fraction": 0.03}}),
            SweepPoint("smooth-w20", train={"emphasis": {"kind": "smooth"}}),
            SweepPoint("steerable-w5", train={"emphasis": {"kind": "steerable", "weight": 5.0}}),
            SweepPoint("top1-w20-slices", train={"crops": None}, note="whole-slice windows instead of crops"),
            SweepPoint("top1-w20-uniform", train={"crops": {"vessel_share": 0.0}}, note="crops placed uniformly"),
            SweepPoint("top1-w20-lr3e-4", method_overrides=LR3),
            SweepPoint("top1-w20-gumbel0.1", method_overrides={"mip_noise_scale": 0.1}),
            SweepPoint("top1-w20-gumbel0.1-tau0.25", method_overrides={"mip_noise_scale": 0.1, "mip_tau": 0.25}),
            SweepPoint("top1-w20-nawslr1e-2", method_overrides={"naws_lr": 1e-2}),
            SweepPoint("pix2pix-none", method="pix2pix", variant=None, train={"emphasis": {"kind": "none"}}),
            SweepPoint("pix2pix-top1-w20", method="pix2pix", variant=None),
        )),
    "vessel": Sweep(
        name="vessel",
        rule=VESSEL_ONLY, val_volumes=0,
        description="round 2, MMDM full (small, lr 3e-4 from round 1) on the standard cohort's training split, "
                    "800 steps, scored on validation windows: the vessel emphasis (none, brightest 1 % x5 / x20, "
                    "brightest 3 % x20, smooth ramp, steerable features), whole slices against crops, the paper's "
                    "lr 1e-4, the MIP loss's Gumbel noise scaled to 0.1, NAWS's own learning rate; Pix2Pix "
                    "(its published lr 2e-4) with and without the emphasis",
        base_train={"crops": CROPS, "emphasis": TOP20},
        points=(
            SweepPoint("slices-top1-w20", train={"crops": None}, method_overrides=LR3,
                       note="whole-slice windows instead of crops (4.7x the pixels per step)"),
            SweepPoint("none", train={"emphasis": {"kind": "none"}}, method_overrides=LR3,
                       note="no emphasis (the published loss)"),
            SweepPoint("top1-w20", method_overrides=LR3, note="brightest 1 % x20"),
            SweepPoint("top1-w5", train={"emphasis": {"weight": 5.0}}, method_overrides=LR3),
            SweepPoint("top3-w20", train={"emphasis": {"fraction": 0.03}}, method_overrides=LR3),
            SweepPoint("smooth-w20", train={"emphasis": {"kind": "smooth"}}, method_overrides=LR3),
            SweepPoint("steerable-w5", train={"emphasis": {"kind": "steerable", "weight": 5.0}}, method_overrides=LR3),
            SweepPoint("top1-w20-lr1e-4", note="the small config's own learning rate"),
            SweepPoint("top1-w20-gumbel0.1", method_overrides={**LR3, "mip_noise_scale": 0.1}),
            SweepPoint("top1-w20-nawslr1e-2", method_overrides={**LR3, "naws_lr": 1e-2}),
            SweepPoint("pix2pix-none", method="pix2pix", variant=None, train={"emphasis": {"kind": "none"}}),
            SweepPoint("pix2pix-top1-w20", method="pix2pix", variant=None),
        )),
    "vessel-round3": Sweep(
        name="vessel-round3",
        rule=VESSEL_ONLY, val_volumes=0,
        description="round 3, as round 2 (`vessel`): the two devices of the paper that each helped there (the MIP "
                    "loss's Gumbel noise scaled to 0.1, NAWS's own learning rate 1e-2) together, with the two "
                    "emphasis forms that tied (brightest 1 % and 3 %, x20)",
        base_train={"crops": CROPS, "emphasis": TOP20},
        points=(
            SweepPoint("top1-w20-gumbel0.1-nawslr1e-2", method_overrides={**LR3, "mip_noise_scale": 0.1, "naws_lr": 1e-2}),
            SweepPoint("top3-w20-gumbel0.1-nawslr1e-2", train={"emphasis": {"fraction": 0.03}},
                       method_overrides={**LR3, "mip_noise_scale": 0.1, "naws_lr": 1e-2}),
        )),
    "bf16": Sweep(
        name="bf16",
        rule=VESSEL_ONLY, val_volumes=0,
        description="bf16 autocast on the CPU against fp32: MMDM full (small) in the vessel regime "
                    "(48x48 crops, brightest 1 % x20, lr 3e-4), 600 steps, 3 seeds each; the validation curves and the "
                    "vessel score must agree within the seed spread before bf16 may become a CPU default",
        steps=600, val_every=100,
        base_train={"crops": CROPS, "emphasis": TOP20},
        points=tuple(SweepPoint(f"{amp}-s{seed}", train={"amp": "none" if amp == "fp32" else "bf16", "seed": seed},
                                method_overrides=LR3)
                     for seed in (0, 1, 2) for amp in ("fp32", "bf16"))),
    "paper-gpu": Sweep(
        name="paper-gpu",
        rule=VESSEL_ONLY, val_volumes=0,
        description="MMDM full in the paper configuration (the authors' network, lr 1e-4, whole-slice windows "
                    "as the paper trains) on the standard cohort, 4000 steps on a GPU, with and without the "
                    "vessel emphasis: whether the paper's network reaches vessels unaided at a budget a CPU cannot give",
        steps=4000, val_every=500,
        base_train={"emphasis": TOP20, "amp": "bf16"},
        points=(
            SweepPoint("paper-none", train={"emphasis": {"kind": "none"}}, method_overrides={"config": "paper"},
                       note="the published objective"),
            SweepPoint("paper-top1-w20", method_overrides={"config": "paper"}, note="brightest 1 % x20"),
        )),
    "ddpm-prediction": Sweep(
        name="ddpm-prediction",
        rule=VESSEL_ONLY, val_volumes=0,
        description="chooses, on the validation split, DDPM's prediction target for a second, labelled DDPM row "
                    "of Table 1: Ho et al.'s eps (the Table 1 row), x0 (Ho et al. 2020 discuss "
                    "predicting x0) and v (Salimans & Ho 2022), each in the standard profile's set-up of the time (small, "
                    "48x48 crops, brightest 1 % x20, lr 3e-4) with its DDPM budget of 2000 steps",
        steps=2000, val_every=400,
        base_train={"crops": CROPS, "emphasis": TOP20},
        points=(
            SweepPoint("eps", method="ddpm", variant=None, method_overrides=LR3,
                       note="Ho et al.'s eps prediction (the Table 1 row)"),
            SweepPoint("x0", method="ddpm", variant=None, method_overrides={**LR3, "prediction": "x0"},
                       note="x0 prediction (Ho et al. 2020, sec. 3.2)"),
            SweepPoint("v", method="ddpm", variant=None, method_overrides={**LR3, "prediction": "v"},
                       note="v prediction (Salimans & Ho 2022)"),
        )),
    "setup-fidelity": Sweep(
        name="setup-fidelity", rule=FIDELITY_AND_VESSELS_TO_ONE,
        description="the choices of the vessel sweeps (`vessel`, `vessel-round3`) made again with whole-volume "
                    "validation (every slice of the 4 validation subjects, window stride 5, 5 sampler steps) and "
                    "ranked by fidelity and vessels together: the emphasis (none, brightest 1 % / 3 % x20), crops "
                    "against whole slices, lr 1e-4 against 3e-4, the MIP loss's Gumbel noise 0.1 with NAWS lr 1e-2; "
                    "Pix2Pix with and without the emphasis. The set-up follows the first of the MMDM points ranked "
                    "among themselves; the Pix2Pix pair says whether the emphasis helps a baseline too "
                    "(`setup_decision`, written before the sweep's results were read). The recovery ranks by its "
                    "distance from 1: the rule was changed to that before any of this sweep's points had finished, "
                    "after the `ema` sweep's first validations showed recoveries of 1.1-1.25 (overshoot)",
        base_train={"crops": CROPS, "emphasis": TOP20},
        points=(
            SweepPoint("none", train={"emphasis": {"kind": "none"}}, method_overrides=MMDM_SETUP,
                       note="no emphasis (the published loss)"),
            SweepPoint("top1-w20", method_overrides=MMDM_SETUP, note="the set-up this sweep started from"),
            SweepPoint("top3-w20", train={"emphasis": {"fraction": 0.03}}, method_overrides=MMDM_SETUP),
            SweepPoint("slices-top1-w20", train={"crops": None}, method_overrides=MMDM_SETUP,
                       note="whole-slice windows instead of crops"),
            SweepPoint("top1-w20-lr1e-4", method_overrides={k: v for k, v in MMDM_SETUP.items() if k != "optim"}, note="the small config's own lr"),
            SweepPoint("top1-w20-gumbel0.1", method_overrides={**MMDM_SETUP, "mip_noise_scale": 0.1}),
            SweepPoint("pix2pix-none", method="pix2pix", variant=None, train={"emphasis": {"kind": "none"}}),
            SweepPoint("pix2pix-top1-w20", method="pix2pix", variant=None),
        )),
    "haze-fusion": Sweep(
        name="haze-fusion",
        description="the haze of MMDM in the air and at the ends of the stack: MMDM base (small, the vessel "
                    "set-up of the time: 48x48 crops, 70 % vessel-centred, brightest 1 % x20, lr 3e-4) on the "
                    "standard cohort's training split, 200 steps (a short budget a shared 2-core machine finishes; "
                    "the standard runs train 2000), seed 0: the fusion as a correction to the mean of the branch "
                    "predictions (fusion_residual, a deviation from the authors' fusion) and 30 % air-centred crops "
                    "(CropConfig.background_share), each against the unchanged set-up; then MMDM full (MIP loss, NAWS "
                    "with lr 1e-2) with and without the residual fusion",
        steps=200, val_every=200, rule=HAZE_RULE,
        base_train={"crops": CROPS, "emphasis": TOP20},
        points=(
            SweepPoint("base", variant="base", method_overrides=LR3, note="reference: the set-up of the time"),
            SweepPoint("base-fusion-residual", variant="base", method_overrides={**LR3, "fusion_residual": True},
                       reference="base", note="fusion predicts a correction to the branches' mean"),
            SweepPoint("base-air30", variant="base", method_overrides=LR3,
                       train={"crops": {"vessel_share": 0.7, "background_share": 0.3}}, reference="base",
                       note="30 % of the crops centred on air"),
            # added after the base points were judged, under the same rule: does the fix carry to the full model
            # (MIP loss, NAWS with its own learning rate, as in the standard profile)?
            SweepPoint("full", variant="full", method_overrides={**LR3, "naws_lr": 1e-2},
                       note="reference: MMDM full, the set-up of the time"),
            SweepPoint("full-fusion-residual", variant="full",
                       method_overrides=MMDM_SETUP, reference="full",
                       note="MMDM full, fusion predicts a correction to the branches' mean"),
        )),
    "haze-crops": Sweep(
        name="haze-crops",
        description="the haze of BBDM: BBDM (small, the standard profile's vessel set-up of the time, lr 3e-4) on the "
                    "standard cohort's training split, 200 steps, seed 0, EMA as configured, sampled as the official "
                    "test-time sampler does (no clamp of x0 inside the loop; the clamp of every step, the former "
                    "setting, changes only sampling and is measured on the reference point by "
                    "benchmarks/haze_diagnose.py): 30 % air-centred crops against the unchanged set-up",
        steps=200, val_every=200, rule=HAZE_RULE,
        base_train={"crops": CROPS, "emphasis": TOP20},
        points=(
            SweepPoint("bbdm", method="bbdm", variant=None, method_overrides=LR3,
                       note="reference: official sampler (no per-step clamp)"),
            SweepPoint("bbdm-air30", method="bbdm", variant=None, method_overrides=LR3,
                       train={"crops": {"vessel_share": 0.7, "background_share": 0.3}}, reference="bbdm",
                       note="30 % of the crops centred on air"),
        )),
    "ema": Sweep(
        name="ema",
        description="decides the weight-average rule of the standard profile (TrainConfig.ema_mode) once for every "
                    "method: MMDM full and three baselines (Pix2Pix, BBDM, ResViT: the GANs without an average of "
                    "their own, and a diffusion baseline with one) in the set-up of the time (48x48 crops), each trained with raw "
                    "weights (ema_mode none) and with the same average (ema_mode all: decay 0.995 from step 100), "
                    "2000 steps, whole-volume validation; the average is kept for every method when it ranks above "
                    "raw weights for more than half of the four (`ema_decision`, written before the sweep ran)",
        steps=2000, val_every=400,
        base_train={"crops": CROPS, "emphasis": TOP20},
        points=tuple(SweepPoint(f"{run}-{mode}", method=m, variant=v, train={"ema_mode": mode}, method_overrides=mo)
                     for run, m, v, mo in (("mmdm-full", "mmdm", "full", MMDM_SETUP),
                                           ("pix2pix", "pix2pix", None, {}), ("bbdm", "bbdm", None, LR3),
                                           ("resvit", "resvit", None, {}))
                     for mode in ("none", "all"))),
}


def get_sweep(name: str) -> Sweep:
    if name not in SWEEPS:
        raise ConfigError(f"unknown sweep '{name}'; known: {', '.join(SWEEPS)}")
    return SWEEPS[name]


def point_config(sweep: Sweep, point: SweepPoint, device: str = "cpu"):
    """The TrainConfig of one point: the profile's run (cohort, model size, batch) without the profile's
    own training set-up (``train``, ``method_overrides``: often what a sweep chose, so a recorded sweep
    stays repeatable), then the sweep's settings, then the point's."""
    profile = dataclasses.replace(get_profile(sweep.profile), train={}, method_overrides={})
    spec = make_spec(point.method, point.variant, None, profile)
    shared = {"steps": sweep.steps, "epochs": None, "val_every": sweep.val_every, "val_windows": sweep.val_windows,
              "checkpoint_every": sweep.steps // 2, "image_every": 0, "val_volumes": sweep.val_volumes,
              "val_volume_stride": sweep.val_volume_stride, "val_volume_steps": sweep.val_volume_steps}
    # nested dicts merge; None replaces a whole sub-config (crops: None)
    return resolve(train_config(spec, profile, 0, device), {"method_kwargs": point.method_overrides}, shared,
                   sweep.base_train, point.train)


def _run_one(cfg_path: Path, run_dir: Path, threads: int, log: Callable[[str], None]) -> tuple[str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "mmdm.engine.cli", "train", "--config", str(cfg_path), "--run-dir", str(run_dir),
           "--quiet"]
    if (run_dir / "config.yaml").is_file():
        cmd.append("--resume")
    log(f"[sweep] start {run_dir.name}")
    with open(run_dir.parent / f"{run_dir.name}.log", "a", encoding="utf-8") as f:
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    log(f"[sweep] {'done' if rc == 0 else f'FAILED (exit {rc})'} {run_dir.name}")
    return run_dir.name, rc


def run_sweep(name: str, runs_root: str | Path = "runs/sweeps", results_root: str | Path = "results/sweeps",
              jobs: int = 1, threads: int = 1, device: str = "cpu", only: Sequence[str] | None = None,
              log: Callable[[str], None] = print) -> Path:
    """Train every point of sweep ``name`` (``jobs`` at a time, ``threads`` CPU threads each; a finished
    point is skipped, an interrupted one resumes), then :func:`collect_sweep`. Returns the results folder."""
    sweep = get_sweep(name)
    points = [p for p in sweep.points if not only or p.name in only]
    unknown = sorted(set(only or ()) - {p.name for p in sweep.points})
    if unknown:
        raise ConfigError(f"sweep '{name}' has no point(s) {unknown}; its points: "
                          f"{', '.join(p.name for p in sweep.points)}")
    ensure_data(sweep.profile)
    root = project_path(runs_root) / name
    root.mkdir(parents=True, exist_ok=True)
    todo = []
    for p in points:
        run_dir = root / p.name
        if run_status(run_dir) in ("trained", "evaluating", "finished"):
            log(f"[sweep] {p.name}: already trained")
            continue
        cfg_path = root / f"{p.name}.yaml"
        save_yaml(point_config(sweep, p, device), cfg_path)
        run_dir.mkdir(exist_ok=True)
        todo.append((cfg_path, run_dir))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(lambda a: _run_one(a[0], a[1], threads, log), todo))
    failed = [n for n, rc in results if rc != 0]
    out = collect_sweep(name, runs_root, results_root)
    if failed:
        raise RuntimeError(f"sweep '{name}': point(s) {failed} failed; see their logs in {root}. Run the same "
                           "command again to resume them.")
    return out


def collect_sweep(name: str, runs_root: str | Path = "runs/sweeps",
                  results_root: str | Path = "results/sweeps") -> Path:
    """Copy each point's record files to ``results_root/name/<point>/`` and write ``summary.csv``
    (one row per point and validation: step, validation loss, contrast recovery and vessel PSNR on the
    validation windows, and where recorded the whole-volume PSNR, SSIM, MIP PSNR and recovery)."""
    sweep = get_sweep(name)
    src_root, dst_root = project_path(runs_root) / name, project_path(results_root) / name
    rows = []
    for p in sweep.points:
        src = src_root / p.name
        if not (src / VALIDATION_LOG).is_file():
            continue
        dst = dst_root / p.name
        dst.mkdir(parents=True, exist_ok=True)
        for f in TRAINING_RECORD_FILES:
            if (src / f).is_file():
                tmp = dst / f".{f}.tmp"
                shutil.copyfile(src / f, tmp)
                os.replace(tmp, dst / f)
        complete = (src / "train_complete.json").is_file()
        for v in read_validation_log(src / VALIDATION_LOG):
            vol = v.get("volume") or {}
            rows.append({"point": p.name, "method": p.method, "note": p.note, "step": v["step"],
                         "val_loss": v.get("losses", {}).get("loss"),
                         "recovery": v.get("vessel", {}).get("recovery"), "vessel_psnr": v.get("vessel", {}).get("psnr"),
                         **{f"volume_{k}": vol.get(k) for k in VOLUME_COLUMNS},
                         "complete": complete})
    dst_root.mkdir(parents=True, exist_ok=True)
    write_text(dst_root / "summary.csv", pd.DataFrame(rows).to_csv(index=False))
    write_text(dst_root / "README.md", f"# Sweep `{name}`\n\n{sweep.description}.\n\nSelection rule: "
               f"{sweep.rule.text}.\n\nRepeat: `mmdm sweep run {name}`; table: `mmdm sweep show {name}`.\n")
    return dst_root


def sweep_summary(name: str, results_root: str | Path = "results/sweeps") -> pd.DataFrame:
    """One row per point, ranked by the sweep's :class:`SelectionRule`: final step, the recovery of the
    last validations (mean; whole-volume where recorded), the last one, vessel PSNR, the whole-volume
    PSNR (mean of the last validations; NaN where not recorded), whether the point is eligible under
    the rule's PSNR margin, the last validation loss, whether training completed."""
    rule = get_sweep(name).rule
    path = project_path(results_root) / name / "summary.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: sweep '{name}' has no results yet; run `mmdm sweep run {name}`")
    df = pd.read_csv(path)
    out = []
    for point, g in df.sort_values("step").groupby("point", sort=False):
        last = g.tail(rule.last_n)
        whole = "volume_vessel_recovery" in g and last["volume_vessel_recovery"].notna().all()
        rec = last["volume_vessel_recovery"] if whole else last["recovery"]
        out.append({"point": point, "method": g["method"].iloc[0], "steps": int(g["step"].max()),
                    "recovery": float(rec.mean()), "recovery_last": float(rec.iloc[-1]),
                    "vessel_psnr": float(g["vessel_psnr"].iloc[-1]),
                    "volume_psnr": float(last["volume_psnr"].mean()) if "volume_psnr" in g else float("nan"),
                    "val_loss": float(g["val_loss"].iloc[-1]),
                    "complete": bool(g["complete"].iloc[-1]), "note": g["note"].iloc[0]})
    table = pd.DataFrame(out)
    if table.empty:
        return table
    return rank_points(table, rule)


def rank_points(table: pd.DataFrame, rule: SelectionRule) -> pd.DataFrame:
    """``table`` (columns ``recovery``, ``val_loss`` and, for a rule with a PSNR margin, ``volume_psnr``)
    ordered by ``rule``, with an ``eligible`` column (always True without a margin). A rule with a
    margin refuses a table without whole-volume PSNR: such a sweep cannot be ranked by it."""
    table = table.copy()
    if rule.psnr_margin_db is None:
        table["eligible"] = True
    else:
        if "volume_psnr" not in table or table["volume_psnr"].isna().all():
            raise ValueError(f"selection rule '{rule.key}' needs whole-volume validation PSNR, but no point has "
                             "it: train the sweep with val_volumes > 0")
        best = table["volume_psnr"].max()
        table["eligible"] = table["volume_psnr"] >= best - rule.psnr_margin_db
    target = getattr(rule, "recovery_target", None)  # a ReferenceRule lists points by the recovery's height
    key = table["recovery"] if target is None else -(table["recovery"] - target).abs()
    table["_rank"] = (key / rule.round_to).round() * rule.round_to
    return (table.sort_values(["eligible", "_rank", "val_loss"], ascending=[False, False, True])
            .drop(columns="_rank").reset_index(drop=True))


def ema_decision(table: pd.DataFrame) -> dict[str, Any]:
    """The weight-average rule chosen by the sweep ``ema`` (points ``<run>-none`` and ``<run>-all``), fixed
    before it ran: for each run, the average *helps* when its point ranks above the raw-weights point in
    the sweep's ranking (:func:`sweep_summary`); ``ema_mode`` is ``"all"`` when it helps for more than
    half of the runs, else ``"none"`` (one rule for every method either way). Returns the choice and
    the per-run outcome."""
    order = {p: i for i, p in enumerate(table["point"])}
    runs = sorted({p.rsplit("-", 1)[0] for p in order if p.endswith(("-none", "-all"))})
    helps = {r: order[f"{r}-all"] < order[f"{r}-none"] for r in runs if f"{r}-all" in order and f"{r}-none" in order}
    if not helps:
        raise ValueError("the sweep has no run with both an '-all' and a '-none' point: nothing to decide")
    return {"ema_mode": "all" if sum(helps.values()) > len(helps) / 2 else "none", "helps": helps}


#: What each MMDM point of the sweep ``setup-fidelity`` would change in the set-up (:data:`SETUP`) if it won;
#: ``top1-w20`` is the set-up as it stands.
SETUP_POINTS: dict[str, dict[str, Any]] = {
    "top1-w20": {},
    "none": {"emphasis": "none"},
    "top3-w20": {"emphasis_fraction": 0.03},
    "slices-top1-w20": {"crops": "whole slices"},
    "top1-w20-lr1e-4": {"lr": 1e-4},
    "top1-w20-gumbel0.1": {"mip_noise_scale": 0.1},
}


def setup_decision(table: pd.DataFrame) -> dict[str, Any]:
    """The set-up chosen by the sweep ``setup-fidelity``, by a rule fixed before it ran.

    The set-up is chosen for MMDM (as the vessel sweeps chose it) and given to every method: the MMDM
    points alone are ranked by the sweep's rule (:data:`FIDELITY_AND_VESSELS_TO_ONE`, so the PSNR margin is
    taken from the best MMDM point, not from a baseline's), and the first one is the set-up
    (:data:`SETUP_POINTS` says what it changes). The Pix2Pix pair says whether the emphasis helps a
    baseline too: ``pix2pix-top1-w20`` ranked above ``pix2pix-none`` by the same rule. ``table``: the
    rows of :func:`sweep_summary` (columns ``point``, ``method``, ``recovery``, ``volume_psnr``,
    ``val_loss``)."""
    mmdm = table[table["method"] == "mmdm"]
    if mmdm.empty:
        raise ValueError("the sweep has no MMDM point: nothing to decide")
    rule = get_sweep("setup-fidelity").rule
    ranked = rank_points(mmdm, rule)
    winner = str(ranked["point"].iloc[0])
    pair = table[table["point"].isin(["pix2pix-top1-w20", "pix2pix-none"])]
    helps = None
    if len(pair) == 2:
        helps = bool(rank_points(pair, rule)["point"].iloc[0] == "pix2pix-top1-w20")
    return {"winner": winner, "changes": SETUP_POINTS.get(winner, {"unknown point": winner}),
            "ranking": [str(p) for p in ranked["point"]], "pix2pix_emphasis_helps": helps}


def sweep_convergence(curves: pd.DataFrame) -> pd.DataFrame:
    """Per point of a sweep with whole-volume validation: the study's convergence rule
    (:func:`mmdm.study.footing.convergence`) over its last quarter of steps (``point``, ``converged``,
    ``psnr_gain``, ``recovery_gain``, ``from_step``, ``to_step``); empty without whole-volume curves."""
    if curves.empty or "volume_psnr" not in curves or curves["volume_psnr"].isna().all():
        return pd.DataFrame()
    rows = []
    for point, g in curves.groupby("point", sort=False):
        c = pd.DataFrame({"step": g["step"], "psnr": g["volume_psnr"], "recovery": g["volume_vessel_recovery"]})
        rows.append({"point": point, **convergence(c)})
    return pd.DataFrame(rows)


def sweep_decision_markdown(name: str, table: pd.DataFrame, curves: pd.DataFrame) -> str:
    """What a recorded sweep decided, in words, by the decision rule written with it: the weight average
    (``ema``: :func:`ema_decision`) or the set-up (``setup-fidelity``: :func:`setup_decision`), and, for a
    sweep with whole-volume validation, which points meet the convergence rule at their last step.
    Empty for a sweep that decides nothing beyond its ranking."""
    lines = []
    if name == "ema":
        d = ema_decision(table)
        helps = ", ".join(f"{r}: {'helps' if h else 'does not help'}" for r, h in d["helps"].items())
        lines.append(f"**Decision:** `ema_mode: {d['ema_mode']}` for every method ({helps}; the average is kept "
                     "when it ranks above raw weights for more than half of the runs). The CPU profiles use "
                     f"`ema_mode: {SETUP.ema_mode}`.")
        if {"recovery", "volume_psnr", "val_loss"} <= set(table.columns):
            alt = ema_decision(rank_points(table, FIDELITY_AND_VESSELS_TO_ONE))
            same = "the same decision" if alt["ema_mode"] == d["ema_mode"] else f"`ema_mode: {alt['ema_mode']}`"
            lines.append("Ranked with the recovery's distance from 1 instead of its height (the rule written "
                         f"after this sweep's validations showed overshoot): {same} ("
                         + ", ".join(f"{r}: {'helps' if h else 'does not help'}" for r, h in alt["helps"].items())
                         + ").")
    elif name == "setup-fidelity":
        d = setup_decision(table)
        change = "; ".join(f"`{k}`: {v}" for k, v in d["changes"].items()) or "none"
        helps = {True: "helps", False: "does not help", None: "is not measured"}[d["pix2pix_emphasis_helps"]]
        lines.append(f"**Decision:** the first MMDM point is `{d['winner']}` (change to the set-up: {change}; MMDM points "
                     f"in order: {', '.join(d['ranking'])}); the emphasis {helps} Pix2Pix by the same rule. The CPU "
                     f"profiles' set-up: {SETUP.summary()}.")
    conv = sweep_convergence(curves)
    if len(conv):
        judged = conv[conv["converged"].notna()]
        if len(judged):
            said = "; ".join(f"{r.point}: {'yes' if r.converged else 'no'} ({r.psnr_gain:+.2f} dB, "
                             f"{r.recovery_gain:+.3f} recovery, last quarter against the one from step {r.from_step})"
                             for r in judged.itertuples())
            lines.append(f"**Converged at {int(judged['to_step'].max())} steps** (the footing's rule): {said}.")
    return "\n\n".join(lines)


def sweep_curves(name: str, results_root: str | Path = "results/sweeps") -> pd.DataFrame:
    """Every validation of every point of a recorded sweep (``summary.csv``): point, step, val_loss,
    recovery, vessel_psnr; empty when the sweep has no records."""
    path = project_path(results_root) / name / "summary.csv"
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def compare_precision(name: str = "bf16", results_root: str | Path = "results/sweeps") -> dict[str, Any] | None:
    """fp32 against bf16 from a sweep whose points are named ``<fp32|bf16>-s<seed>``.

    For the last validation of every point: the mean and the seed spread (max - min over seeds)
    of the vessel recovery and of the validation loss, per precision; the two precisions
    *agree* on a quantity when their means differ by no more than the larger of the two seed
    spreads. Returns None when the sweep has no records."""
    curves = sweep_curves(name, results_root)
    if curves.empty:
        return None
    parts = curves["point"].str.extract(r"^(?P<amp>fp32|bf16)-s(?P<seed>\d+)$")
    curves = curves.assign(amp=parts["amp"], seed=pd.to_numeric(parts["seed"])).dropna(subset=["amp"])
    last = curves.sort_values("step").groupby("point").tail(1)
    rows, agree = [], {}
    for q in ("recovery", "val_loss"):
        stats = {}
        for amp, g in last.groupby("amp"):
            stats[amp] = {"mean": float(g[q].mean()), "spread": float(g[q].max() - g[q].min()), "n": len(g)}
            rows.append({"quantity": q, "precision": amp, "seeds": len(g), "mean": stats[amp]["mean"],
                         "min": float(g[q].min()), "max": float(g[q].max())})
        if {"fp32", "bf16"} <= set(stats):
            diff = abs(stats["bf16"]["mean"] - stats["fp32"]["mean"])
            agree[q] = {"difference": diff, "spread": max(stats["fp32"]["spread"], stats["bf16"]["spread"]),
                        "agree": bool(diff <= max(stats["fp32"]["spread"], stats["bf16"]["spread"]))}
    return {"table": pd.DataFrame(rows), "agree": agree, "steps": int(last["step"].max()),
            "curves": curves, "complete": bool(last["complete"].all())}


def recorded_sweeps(results_root: str | Path = "results/sweeps") -> list[Sweep]:
    """The sweeps of :data:`SWEEPS` that have records under ``results_root``, in definition order."""
    root = project_path(results_root)
    return [sw for sw in SWEEPS.values() if (root / sw.name / "summary.csv").is_file()]


__all__ = ["ema_decision", "setup_decision", "sweep_convergence", "sweep_decision_markdown", "SETUP_POINTS", "FIDELITY_AND_VESSELS", "FIDELITY_AND_VESSELS_TO_ONE", "HAZE_RULE", "ReferenceRule", "SELECTION_RULE", "SWEEPS", "SelectionRule", "VESSEL_ONLY", "rank_points", "Sweep", "SweepPoint", "collect_sweep", "compare_precision", "get_sweep", "point_config", "recorded_sweeps", "sweep_curves",
           "run_sweep", "sweep_summary"]
