"""Every Table 1 method under the artefacts of real scanners, simulated with torchio.

The models are measured as trained: only their test **inputs** change. Each
source volume of a test subject is degraded by one of torchio's artefact
transforms at one of three severities (:data:`SEVERITIES`, stated below),
then every Table 1 method synthesises the TOF-MRA from the degraded sources
and is scored against the clean ground truth as in Tables 1-3 (PSNR, SSIM,
MIP PSNR, every value scaled by the ground truth's maximum) and for vessels
(the contrast recovery of the run records, ``vessel_recovery``). Severity 0 is
the clean input synthesised with the same settings, the reference of each
curve.

Severities (the parameter of each transform fixed to one value, so only the
random pattern is drawn; intensities are fractions of the source's 99.5th
percentile, to which each source is scaled before the transform and from
which it is scaled back after):

=========  ===========================================  ==========================
artefact   torchio transform                            severity 1 / 2 / 3
=========  ===========================================  ==========================
bias       RandomBiasField(coefficients=c, order=3)     c = 0.2 / 0.4 / 0.6
motion     RandomMotion(degrees=d, translation=d mm,    d = 2 / 5 / 10, n = 1 / 2 / 3
           num_transforms=n)
ghosting   RandomGhosting(num_ghosts=g, intensity=i)    (g, i) = (2, 0.2) / (4, 0.5) / (8, 0.9)
noise      RandomNoise(std=s)                           s = 0.02 / 0.05 / 0.10
spike      RandomSpike(num_spikes=1, intensity=i)       i = 0.5 / 1.0 / 2.0
blur       RandomBlur(std=s voxels)                     s = 0.5 / 1.0 / 2.0
=========  ===========================================  ==========================

**Seeding.** Each degraded volume is drawn with torch's RNG seeded from
(seed, artefact, severity, subject, modality) (:func:`degradation_seed`), so
every method sees the same degraded input (the record keeps a hash of each
input to show it), and a rerun draws it again bit for bit.

The record (``results/<profile>/analysis/robustness/``: ``robustness.csv``, one
row per run, subject, artefact and severity, written after every synthesis so
an interrupted run resumes; ``summary.json`` last) needs the trained runs
(``runs/<profile>/<run>``); the missing-modality case is not measured (see
``summary.json``'s ``not_measured``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # not tqdm.auto: in a kernel without ipywidgets it warns with a path on import

from mmdm.data.layout import Layout
from mmdm.data.phantom import has_ground_truth
from mmdm.engine.distributed import resolve_device
from mmdm.engine.evaluate import subject_vessel_scores
from mmdm.engine.infer import load_run_method, subject_sources, synthesize_volume
from mmdm.engine.rundir import RecordWriter, run_paths
from mmdm.io import write_text
from mmdm.metrics import evaluate_volumes
from mmdm.paths import project_path, repo_root
from mmdm.study.api import analysis_dir, retire_if_stale, runs_dir, test_subjects
from mmdm.study.profiles import get_profile
from mmdm.study.records import portable
from mmdm.study.stale import keep_current_rows, stamps
from mmdm.study.runs import REFERENCE_RUN, baselines
from mmdm.study.vessel_eval import reference_volumes

ARTEFACTS = ("bias", "motion", "ghosting", "noise", "spike", "blur")
#: The parameters of each artefact at severities 1, 2, 3 (module doc).
SEVERITIES: dict[str, tuple[dict[str, Any], ...]] = {
    "bias": ({"coefficients": 0.2}, {"coefficients": 0.4}, {"coefficients": 0.6}),
    "motion": ({"degrees": 2.0, "translation": 2.0, "num_transforms": 1},
               {"degrees": 5.0, "translation": 5.0, "num_transforms": 2},
               {"degrees": 10.0, "translation": 10.0, "num_transforms": 3}),
    "ghosting": ({"num_ghosts": 2, "intensity": 0.2}, {"num_ghosts": 4, "intensity": 0.5},
                 {"num_ghosts": 8, "intensity": 0.9}),
    "noise": ({"std": 0.02}, {"std": 0.05}, {"std": 0.10}),
    "spike": ({"num_spikes": 1, "intensity": 0.5}, {"num_spikes": 1, "intensity": 1.0},
              {"num_spikes": 1, "intensity": 2.0}),
    "blur": ({"std_voxels": 0.5}, {"std_voxels": 1.0}, {"std_voxels": 2.0}),
}
#: The intensity each source is scaled to 1 at before a transform: this percentile of its voxels.
SCALE_PERCENTILE = 99.5
QUALITY = ("psnr", "ssim", "mip_psnr", "vessel_recovery")
QUALITY_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "mip_psnr": "MIP PSNR (dB)", "vessel_recovery": "contrast recovery"}


@dataclass
class RobustnessConfig:
    """What the robustness analysis synthesises: the artefacts, how many test subjects, the seeds.
    Sampling steps and window stride are the profile's evaluation settings."""

    artefacts: tuple[str, ...] = ARTEFACTS
    severities: tuple[int, ...] = (1, 2, 3)
    subjects: int = 1
    seed: int = 0  # of the degradations
    sample_seed: int = 0  # of the samplers (one generator per synthesis, seeded with it)

    def validate(self) -> None:
        bad = [a for a in self.artefacts if a not in SEVERITIES]
        if bad:
            raise ValueError(f"unknown artefact(s) {bad}; choose from {', '.join(ARTEFACTS)}")
        if any(s not in (1, 2, 3) for s in self.severities):
            raise ValueError(f"severities are 1, 2 or 3, got {list(self.severities)}")
        if self.subjects < 1:
            raise ValueError(f"the analysis needs at least one test subject, got {self.subjects}")


#: Per profile: the smoke study keeps it to one subject; the others use a few test subjects.
PROFILE_SETTINGS: dict[str, RobustnessConfig] = {
    "smoke": RobustnessConfig(subjects=1), "quick": RobustnessConfig(subjects=2),
    "standard": RobustnessConfig(subjects=4), "paper": RobustnessConfig(subjects=8),
}


#: Each artefact's torchio transform and the parameters a severity sets (for :func:`severity_table`).
TRANSFORMS = {"bias": "RandomBiasField (order 3): coefficients up to ±c", "motion": "RandomMotion: rotation, "
              "translation, movements", "ghosting": "RandomGhosting: ghosts, intensity", "noise": "RandomNoise: "
              "standard deviation", "spike": "RandomSpike: spikes, intensity", "blur": "RandomBlur: Gaussian "
              "standard deviation (voxels)"}


def describe_severity(artefact: str, p: dict[str, Any]) -> str:
    """One severity's parameters in the order :data:`TRANSFORMS` names them, e.g. ``"5°, 5 mm, 2"``."""
    if artefact == "bias":
        return f"{p['coefficients']:g}"
    if artefact == "motion":
        return f"{p['degrees']:g}°, {p['translation']:g} mm, {p['num_transforms']}"
    if artefact == "ghosting":
        return f"{p['num_ghosts']}, {p['intensity']:g}"
    if artefact == "noise":
        return f"{p['std']:g}"
    if artefact == "spike":
        return f"{p['num_spikes']}, {p['intensity']:g}"
    return f"{p['std_voxels']:g}"


def severity_table(artefacts: Sequence[str] = ARTEFACTS) -> "pd.DataFrame":
    """The stated severities, one row per artefact (from :data:`SEVERITIES`, so the page cannot drift)."""
    return pd.DataFrame([{"artefact": a, "torchio transform": TRANSFORMS[a],
                          **{f"severity {i + 1}": describe_severity(a, p) for i, p in enumerate(SEVERITIES[a])}}
                         for a in artefacts]).set_index("artefact")


def robustness_runs() -> list[str]:
    """The Table 1 runs: MMDM full and the six baselines."""
    return [REFERENCE_RUN, *baselines()]


def degradation_seed(seed: int, artefact: str, severity: int, subject: str, modality: str) -> int:
    """A 63-bit seed from everything that names one degraded volume (stable across processes)."""
    key = f"{seed}|{artefact}|{severity}|{subject}|{modality}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def transform(artefact: str, severity: int, spacing: Sequence[float] = (1.0, 1.0, 1.0)):
    """The torchio transform of ``artefact`` at ``severity`` (1-3), each parameter fixed (module doc)."""
    import torchio as tio  # lazy: only this analysis imports torchio (slow to import)

    if artefact not in SEVERITIES:
        raise ValueError(f"unknown artefact '{artefact}'; choose from {', '.join(ARTEFACTS)}")
    if severity not in (1, 2, 3):
        raise ValueError(f"severity is 1, 2 or 3, got {severity}")
    p = SEVERITIES[artefact][severity - 1]
    if artefact == "bias":
        return tio.RandomBiasField(coefficients=p["coefficients"], order=3)
    if artefact == "motion":
        return tio.RandomMotion(degrees=(p["degrees"], p["degrees"]), translation=(p["translation"], p["translation"]),
                                num_transforms=p["num_transforms"])
    if artefact == "ghosting":
        return tio.RandomGhosting(num_ghosts=(p["num_ghosts"], p["num_ghosts"]),
                                  intensity=(p["intensity"], p["intensity"]))
    if artefact == "noise":
        return tio.RandomNoise(mean=0.0, std=(p["std"], p["std"]))
    if artefact == "spike":
        return tio.RandomSpike(num_spikes=(p["num_spikes"], p["num_spikes"]), intensity=(p["intensity"], p["intensity"]))
    s = [p["std_voxels"] * float(v) for v in spacing]  # torchio's blur std is in mm
    return tio.RandomBlur(std=(s[0], s[0], s[1], s[1], s[2], s[2]))


def degrade(volume: np.ndarray, affine: np.ndarray, artefact: str, severity: int, seed: int) -> np.ndarray:
    """``volume`` (X, Y, Z) with one artefact, drawn with torch's RNG seeded with ``seed``; float32, same shape.

    The volume is scaled so that its :data:`SCALE_PERCENTILE` percentile is 1, transformed and scaled back;
    the global torch RNG is restored afterwards."""
    import torchio as tio  # lazy: only this analysis imports torchio (slow to import)

    v = np.asarray(volume, np.float32)
    if v.ndim != 3:
        raise ValueError(f"degrade takes one (X, Y, Z) volume, got shape {v.shape}")
    scale = float(np.percentile(v, SCALE_PERCENTILE))
    if not scale > 0:
        raise ValueError("the volume's intensities are all <= 0: nothing to scale an artefact to")
    spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
    img = tio.ScalarImage(tensor=torch.from_numpy(v / scale)[None], affine=np.asarray(affine, np.float64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = transform(artefact, severity, spacing)(img)
    return (out.data[0].numpy() * scale).astype(np.float32)


def input_hash(sources: dict[str, np.ndarray]) -> str:
    """A short hash of the (degraded) sources, in modality order: equal hashes, equal inputs."""
    h = hashlib.sha1()
    for m in sorted(sources):
        h.update(m.encode())
        h.update(np.ascontiguousarray(sources[m], np.float32).tobytes())
    return h.hexdigest()[:16]


def robustness_settings(cfg: RobustnessConfig, subjects: Sequence[str], steps: int | None,
                        stride: int | None) -> dict[str, Any]:
    """What a robustness record was measured with beyond the models: the artefact grid, the subjects and the
    sampler (recorded; a record with other settings than the profile's now is measured again)."""
    return {"robustness": asdict(cfg), "subjects": list(subjects), "steps": steps, "stride": stride}


def run_robustness(data_root: str | Path, runs: dict[str, Path], out_dir: str | Path, subjects: Sequence[str],
                   cfg: RobustnessConfig, steps: int | None = None, stride: int | None = None,
                   device: str = "auto", profile: str | None = None, progress: bool = True,
                   log: Callable[[str], None] = print, runs_missing: Sequence[str] = ()) -> Path:
    """Synthesise every subject with every run from clean and degraded sources; resumable, ``summary.json`` last."""
    cfg.validate()
    root = Path(data_root)
    record = RecordWriter(out_dir)
    out = record.root
    dev = resolve_device(device)
    csv = out / "robustness.csv"
    done = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=["run", "subject", "artefact", "severity"])
    rows, dropped = keep_current_rows(done.to_dict("records"), runs, "models", "model")
    if dropped and len(done):
        log(f"[robustness] measured before with another model of {', '.join(map(str, dropped))}: measuring those rows again")
    models = stamps(runs, "models")
    have = {(r["run"], r["subject"], r["artefact"], int(r["severity"])) for r in rows}
    settings = [("clean", 0)] + [(a, s) for a in cfg.artefacts for s in cfg.severities]
    todo = {n: [(s, a, v) for s in subjects for a, v in settings if (n, s, a, v) not in have] for n in runs}
    record.start_clock()
    bar = tqdm(total=sum(map(len, todo.values())), desc="robustness", unit="synthesis", dynamic_ncols=True) \
        if progress else None
    refs: dict[str, Any] = {}
    checkpoints: dict[str, Any] = {}
    unscored: set[str] = set()
    try:
        for name, run_dir in runs.items():
            if not todo[name]:
                continue
            method, tcfg, ckpt = load_run_method(run_dir, device=dev)
            checkpoints[name] = ckpt.get("step")
            need = sorted({s for s, _, _ in todo[name]}, key=list(subjects).index)
            for item in subject_sources(tcfg.data, need, root=root):
                s = item.subject
                if s not in refs:
                    target, _, _, _, affine = reference_volumes(root, s)
                    refs[s] = (target, affine)
                target, affine = refs[s]
                for _, art, sev in [t for t in todo[name] if t[0] == s]:
                    srcs = item.sources if art == "clean" else {
                        m: degrade(v, affine, art, sev, degradation_seed(cfg.seed, art, sev, s, m))
                        for m, v in item.sources.items()}
                    gen = torch.Generator(device=dev).manual_seed(cfg.sample_seed)
                    res = synthesize_volume(method, srcs, window=tcfg.data.window,
                                            stride=stride or tcfg.data.eval_stride, steps=steps, norm=tcfg.data.norm,
                                            generator=gen, progress=False)
                    q = evaluate_volumes(res["mean"], target)
                    with warnings.catch_warnings(record=True) as caught:  # why a subject has no score: once
                        warnings.simplefilter("always")
                        v = subject_vessel_scores(res["mean"], target, root, s)
                    if caught and s not in unscored:
                        unscored.add(s)
                        log(f"[robustness] {caught[0].message}")
                    rows.append({"run": name, "model": models[name], "subject": s, "artefact": art,
                                 "severity": sev, "input_hash": input_hash(srcs),
                                 **{k: q[k] for k in ("psnr", "ssim", "mip_psnr")},
                                 "vessel_recovery": v["vessel_recovery"]})
                    write_text(csv, pd.DataFrame(rows).to_csv(index=False))
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"{name} {s} {art} {sev}")
            log(f"[robustness] {name}: done")
            del method
    finally:
        if bar is not None:
            bar.close()
    record.finish(portable({
        "analysis": "robustness", "profile": profile, "subjects": list(subjects), "runs": list(runs),
        "runs_missing": list(runs_missing),
        "config": asdict(cfg), "severities": {a: list(SEVERITIES[a]) for a in cfg.artefacts},
        "scale_percentile": SCALE_PERCENTILE, "sampling": {"steps": steps, "stride": stride},
        "checkpoint_steps": checkpoints, "models": models,
        "settings": robustness_settings(cfg, subjects, steps, stride),
        "not_measured": "a missing source: no method of the study defines a synthesis without one of its "
                        "sources (each refuses a missing modality), and neither the paper nor the authors' code "
                        "says how MMDM would drop a branch",
        **record.session(dev, git_root=repo_root())}))
    return out


def load_robustness(out_dir: str | Path) -> dict[str, Any] | None:
    """``{"table": per run, subject, artefact and severity, "summary": ...}``, or None while missing or unfinished."""
    out_dir = Path(out_dir)
    if not (out_dir / "summary.json").is_file():
        return None
    return {"table": pd.read_csv(out_dir / "robustness.csv"),
            "summary": json.loads((out_dir / "summary.json").read_text())}


def curves(table: pd.DataFrame) -> pd.DataFrame:
    """Mean over subjects per run, artefact and severity; severity 0 (the clean input) repeated for every artefact."""
    clean = table[table.artefact == "clean"]
    parts = [table[table.artefact != "clean"]]
    for a in sorted(set(table.artefact) - {"clean"}):
        parts.append(clean.assign(artefact=a))
    t = pd.concat(parts, ignore_index=True)
    cols = [q for q in QUALITY if q in t]
    return t.groupby(["run", "artefact", "severity"], as_index=False)[cols].mean()


def drop_table(table: pd.DataFrame, metric: str = "psnr") -> pd.DataFrame:
    """Per run (rows) and artefact (columns): the change of mean ``metric`` from the clean input to severity 3
    (paired by subject: the mean over subjects of each subject's change)."""
    clean = table[table.artefact == "clean"].set_index(["run", "subject"])[metric]
    worst = table[table.severity == table[table.artefact != "clean"].severity.max()]
    d = worst.assign(delta=worst[metric].to_numpy() - clean.reindex(list(zip(worst.run, worst.subject))).to_numpy())
    return d.pivot_table(index="run", columns="artefact", values="delta", aggfunc="mean")


def same_inputs(table: pd.DataFrame) -> bool:
    """Whether every run saw the same input for each subject, artefact and severity (one hash each)."""
    return bool((table.groupby(["subject", "artefact", "severity"]).input_hash.nunique() == 1).all())


def ensure_robustness(profile, device: str | None = None, log: Callable[[str], None] = print,
                      progress: bool = True) -> Path | None:
    """The profile's robustness record, synthesised with the Table 1 runs' checkpoints unless complete (every
    Table 1 run trained here measured).
    Returns None (and says why) when no Table 1 run is trained here."""
    profile = get_profile(profile)
    out = analysis_dir(profile) / "robustness"
    runs = {n: runs_dir(profile) / n for n in robustness_runs()}
    missing = [n for n, d in runs.items() if not run_paths(d).train_complete.is_file()]
    root = project_path(profile.data_dir)
    cfg = PROFILE_SETTINGS.get(profile.name, RobustnessConfig())
    subjects = test_subjects(profile, cfg.subjects)
    retire_if_stale(profile, "robustness", runs.values(), log, settings=None if subjects is None else
                    robustness_settings(cfg, subjects, profile.eval_sample_steps, profile.eval_stride))
    if (out / "summary.json").is_file():
        new = [n for n in runs if n not in missing and n not in json.loads((out / "summary.json").read_text())["runs"]]
        if not new:
            log(f"[skip] robustness: record complete ({out})")
            return out
        log(f"[robustness] the record has no measurement of {', '.join(new)}, trained here now")
    if len(missing) == len(runs):
        log(f"[skip] robustness: no Table 1 run under {runs_dir(profile)} holds a trained model (a record alone "
            f"cannot be sampled); run `mmdm study --profile {profile.name}` where the checkpoints are")
        return None
    if missing:
        log(f"[robustness] not trained here, left out: {', '.join(missing)}")
    runs = {n: d for n, d in runs.items() if n not in missing}
    subjects = Layout(root).split("test")[: cfg.subjects]  # says what to do when the cohort is missing
    n = len(runs) * len(subjects) * (1 + len(cfg.artefacts) * len(cfg.severities))
    log(f"[analysis] robustness: {n} syntheses ({len(runs)} runs, {len(subjects)} test subject(s))")
    if not has_ground_truth(root):
        log("[robustness] no vessel ground truth: the contrast recovery uses the brightest 1 % of the real TOF")
    return run_robustness(root, runs, out, subjects, cfg, steps=profile.eval_sample_steps,
                          stride=profile.eval_stride, device=device or profile.device, profile=profile.name,
                          progress=progress, log=log, runs_missing=missing)
