"""What the study's notebooks call: train one run, evaluate it, export its record.

Paths are relative to the repository root (:func:`mmdm.paths.project_path`):
runs in ``runs/<profile>/<run>``, records in ``results/<profile>/<run>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from mmdm.config import ConfigError
from mmdm.data.dataset import DataConfig
from mmdm.data.layout import DatasetError, Layout
from mmdm.data.phantom import ensure_cohort
from mmdm.engine.evaluate import evaluate_run
from mmdm.engine.rundir import is_finished, run_paths, run_status
from mmdm.engine.spec import TrainConfig, extends, resolve
from mmdm.engine.train import train
from mmdm.io import write_text
from mmdm.paths import project_path
from mmdm.study.profiles import StudyProfile, get_profile
from mmdm.study.records import export_record, portable, record_complete
from mmdm.study.runs import REFERENCE_RUN, RunSpec, get_option, run_name
from mmdm.study.stale import (MISSING, changed_inputs, prepare_re_evaluation, retire, stale_reasons, stored_config,
                              trained_after)
from mmdm.study.vessel_eval import cohort_segmentation, vessel_metrics


def runs_dir(profile: StudyProfile | str) -> Path:
    return project_path(Path("runs") / get_profile(profile).name)


def results_dir(profile: StudyProfile | str) -> Path:
    return project_path(Path("results") / get_profile(profile).name)


def analysis_dir(profile: StudyProfile | str) -> Path:
    """Records of the analyses of trained models (uncertainty, frontier): ``results/<profile>/analysis``."""
    return results_dir(profile) / "analysis"


def test_subjects(profile: StudyProfile, n: int | None = None) -> list[str] | None:
    """The first ``n`` (None: all) test subjects of the profile's cohort, or None when the cohort is not here
    (a checkout with committed records only: they are kept, nothing can be measured again)."""
    try:
        return Layout(project_path(profile.data_dir)).split("test")[:n]
    except DatasetError:
        return None


def as_recorded(settings: dict) -> dict:
    """``settings`` as a record's ``summary.json`` holds them (repository-relative paths, JSON types), so a
    record's settings compare equal to the ones that made it."""
    return json.loads(json.dumps(portable(settings)))


def retire_if_stale(profile: StudyProfile, analysis: str, run_dirs, log=print, kind: str = "models",
                    settings: dict | None = None) -> bool:
    """Move the record of ``analysis`` aside (``runs/<profile>/superseded-analyses/``) when what it read of a
    run it covers has changed since: the run's model (``kind="models"``: trained again) or its written
    predictions (``kind="predictions"``: evaluated again), by the stamps the record holds
    (:func:`mmdm.study.stale.changed_inputs`; a record from before stamps is compared by time,
    :func:`mmdm.study.stale.trained_after`), or when the record's ``settings`` (how it sampled: steps,
    stride, ...) differ from ``settings``, what the profile asks now. True when it was moved, so it is
    measured again."""
    out = analysis_dir(profile) / analysis
    path = out / "summary.json"
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    recorded = summary.get(kind)
    runs = {Path(d).name: Path(d) for d in run_dirs}
    if isinstance(recorded, dict):
        newer = changed_inputs(recorded, runs, kind)
        why = "trained" if kind == "models" else "evaluated"
    else:
        newer, why = trained_after(out, runs.values()), "trained"
    old = summary.get("settings")
    if newer:
        reason = f"measured before {', '.join(newer)} was {why} again"
    elif settings is not None and isinstance(old, dict) and old != as_recorded(settings):
        now = as_recorded(settings)
        reason = "measured with other settings (" + "; ".join(
            f"{k}: {old.get(k, MISSING)} -> {now.get(k, MISSING)}" for k in sorted(set(old) | set(now))
            if old.get(k, MISSING) != now.get(k, MISSING)) + ")"
    else:
        return False
    dest = retire(out, runs_dir(profile) / "superseded-analyses")
    log(f"[stale] {analysis}: {reason}; the old record moved to {dest}, measuring again")
    return True


def analysis_target(profile: StudyProfile, analysis: str, log=print,
                    settings: dict | None = None) -> tuple[Path, Path | None]:
    """(record folder of ``analysis``, MMDM full's run folder to analyse, or None when the record
    is complete or no trained model is here -- said in ``log``). A record made with another model of the
    run or other ``settings`` is moved aside first (:func:`retire_if_stale`)."""
    out = analysis_dir(profile) / analysis
    run_dir = runs_dir(profile) / REFERENCE_RUN
    retire_if_stale(profile, analysis, [run_dir], log, settings=settings)
    if (out / "summary.json").is_file():
        log(f"[skip] {analysis}: record complete ({out})")
        return out, None
    if not run_paths(run_dir).train_complete.is_file():
        log(f"[skip] {analysis}: {run_dir} holds no trained model (a record alone cannot be sampled); "
            f"run `mmdm study --profile {profile.name}` where the checkpoint is")
        return out, None
    return out, run_dir


def parse_sources(sources: str | Sequence[str] | None, profile: StudyProfile) -> tuple[str, ...]:
    """``"T1w,T2w"`` / a list / empty -> a tuple of modality names (empty: the profile's)."""
    if not sources:
        return tuple(profile.sources)
    if isinstance(sources, str):
        sources = [s.strip() for s in sources.replace("+", ",").split(",") if s.strip()]
    return tuple(sources)


def make_spec(method: str, variant: str | None, sources: str | Sequence[str] | None,
              profile: StudyProfile, seed: int = 0, option: str | None = None) -> RunSpec:
    """The run of (method, variant, sources, seed) under ``profile``, named as the study names it;
    ``option``: a run option (:data:`mmdm.study.runs.RUN_OPTIONS`, e.g. ``"no-emphasis"``) or none."""
    if method != "mmdm" and variant:
        raise ConfigError(f"method '{method}' has no variants (only mmdm does: base, mip, naws, full)")
    variant = (variant or "full") if method == "mmdm" else None
    src = parse_sources(sources, profile)
    missing = [s for s in src if s not in profile.sources] if profile.dataset == "phantom" else []
    if missing:
        raise ConfigError(f"source modality {missing} is not in the profile's sources {list(profile.sources)}")
    if option:
        try:
            get_option(option)
        except KeyError as err:
            raise ConfigError(err.args[0]) from None
    name = run_name(method, variant, src, profile.sources, seed, option or None)
    return RunSpec(name, method, variant, None if src == tuple(profile.sources) else src, option=option or None)


def train_config(spec: RunSpec, profile: StudyProfile, seed: int = 0, device: str | None = None):
    """The engine's TrainConfig of one run under ``profile``, by :func:`mmdm.engine.spec.resolve`:
    the run (the profile's named method configuration, sources, steps) -> the profile's method
    overrides -> the run option's method overrides -> the profile's ``train`` -> the option's ``train``."""
    sources = tuple(spec.sources or profile.sources)
    option = get_option(spec.option) if spec.option else None
    data = DataConfig(root=str(project_path(profile.data_dir)), sources=sources, eval_stride=profile.eval_stride)
    base = TrainConfig(method=spec.method, method_kwargs=spec.method_kwargs(profile.method_config, profile.sources),
                       data=data, steps=profile.run_steps(spec.method), epochs=profile.epochs,
                       batch_size=profile.batch_size, seed=seed, device=device or profile.device,
                       checkpoint_every=profile.checkpoint_every, image_every=profile.image_every,
                       log_every=profile.log_every)
    return resolve(base, {"method_kwargs": profile.method_overrides.get(spec.method, {})},
                   {"method_kwargs": option.method if option else {}}, profile.train,
                   option.train if option else None)


def ensure_data(profile: StudyProfile | str, progress: bool = True) -> Path:
    """The profile's dataset: the phantom cohort is built if missing; another dataset must exist."""
    profile = get_profile(profile)
    root = project_path(profile.data_dir)
    if profile.dataset == "phantom":
        return ensure_cohort(root, profile.cohort, n_subjects=profile.cohort_subjects,
                             resolution=profile.cohort_resolution, progress=progress)
    if not (root / "splits.json").is_file():
        raise DatasetError(f"{root}: no dataset in the study's layout (no splits.json). Import one first, "
                           "e.g. `mmdm data ixi --from-tars DIR --out data/ixi`.")
    return root


def train_study_run(spec: RunSpec, profile: StudyProfile | str, seed: int = 0, device: str | None = None,
                    run_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Train (or resume, or skip if trained) one run of the study."""
    profile = get_profile(profile)
    ensure_data(profile, progress=progress)
    run_dir = Path(run_dir) if run_dir else runs_dir(profile) / spec.name
    cfg = train_config(spec, profile, seed, device)
    stored = stored_config(run_dir)
    if stored is not None and extends(stored, cfg):
        # only the budget grew: the engine continues the run from its last checkpoint (spec.extend_run_dir)
        return train(cfg, run_dir, resume=True, progress=progress, profile=profile.name)
    why = stale_reasons(run_dir, cfg, training_only=True)
    if why:  # made under another config (the profile changed since): its files moved aside, trained anew
        print(f"{run_dir}: trained under another config ({'; '.join(why)}); starting over", file=sys.stderr)
        return train(cfg, run_dir, resume=False, progress=progress, profile=profile.name, force_new=True)
    changed, moved = prepare_re_evaluation(run_dir, cfg)
    if changed:  # only how it is evaluated changed: the trained model is kept and evaluated again
        kept = "the trained model is kept" if run_paths(run_dir).train_complete.is_file() else \
            "its training resumes (they do not change it)"
        print(f"{run_dir}: evaluated under other settings ({'; '.join(changed)}); {kept}"
              + (f", its evaluation moved to {moved}" if moved else ""), file=sys.stderr)
    if run_status(run_dir) in ("trained", "evaluating", "finished"):
        return run_dir
    resume = (run_dir / "config.yaml").is_file()
    return train(cfg, run_dir, resume=resume, progress=progress, profile=profile.name)


def evaluate_study_run(spec: RunSpec, profile: StudyProfile | str, device: str | None = None,
                       run_dir: str | Path | None = None, record_dir: str | Path | None = None,
                       progress: bool = True) -> Path:
    """Evaluate a trained run on the test split with the profile's settings and export its record."""
    profile = get_profile(profile)
    run_dir = Path(run_dir) if run_dir else runs_dir(profile) / spec.name
    record_dir = Path(record_dir) if record_dir else results_dir(profile) / spec.name
    if not is_finished(run_dir):
        subjects = Layout(project_path(profile.data_dir)).split("test")
        if profile.eval_subjects is not None:
            subjects = subjects[: profile.eval_subjects]
        evaluate_run(run_dir, split="test", steps=profile.eval_sample_steps, subjects=subjects,
                     device=device or profile.device, progress=progress)
    vessel_csv = run_dir / "vessel_metrics.csv"
    if not vessel_csv.is_file():
        seg = cohort_segmentation(project_path(profile.data_dir), results_dir(profile) / "vessel_segmentation.yaml")
        subjects = json.loads((run_dir / "summary.json").read_text())["subjects"]
        table = vessel_metrics(run_dir, project_path(profile.data_dir), seg, subjects)
        write_text(vessel_csv, table.to_csv(index=False))
    run_cfg = stored_config(run_dir)
    if not record_complete(record_dir) or (run_cfg is not None and stale_reasons(record_dir, run_cfg)):
        export_record(run_dir, record_dir)  # a record of an older config is replaced (summary.json last)
    return record_dir
