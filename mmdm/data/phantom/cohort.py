"""The simulated cohort: configuration profiles, one subject, and the dataset writer.

A subject is made in five steps, each from its own random stream derived from
``(cfg.seed, index)`` so that changing one part (e.g. the resolution) does not
change the others:

1. covariates: an age and a sex drawn to match the paper's cohort (68.15 +- 7.95 years,
   62.14 % female); age raises the lesion load and the tortuosity and lowers the flow;
2. anatomy: the MNI152 maps pulled through a random scaling/rotation and a smooth
   displacement, white-matter lesions, tissue fractions (CSF = brain - GM - WM);
3. vessels: the arterial tree (``vessels.py``) grown in the deformed brain, rendered
   with partial volume;
4. contrast: each voxel's signal is the fraction-weighted sum of its tissues'
   signals from the sequence equations (``physics.py``), with flow effects for blood;
5. a smooth multiplicative bias field and Rician noise per modality.

The split (:func:`cohort_splits`) is drawn over the first ``n_subjects``;
``extra_test_subjects`` appends test-only subjects with the next indices, so a
cohort can gain test subjects while every existing subject and its split stay
the same (the ``standard`` cohort: the ``quick`` one plus 8).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from mmdm.config import ConfigError, from_dict, to_dict
from mmdm.data.layout import (DatasetError, derivatives_dir, image_path, make_splits, subject_id,
                              write_dataset_description)
from mmdm.data.phantom import anatomy, physics, vessels
from mmdm.io import save_nifti, write_json, write_text

GENERATOR = "mmdm.data.phantom"
#: Bumped whenever the same config would produce different data.
GENERATOR_VERSION = "1.0.0"
PIPELINE = "phantom"
MODALITIES = ("T1w", "T2w", "FLAIR", "angio")
#: Tissue label values of ``sub-XXX_dseg.nii.gz``.
DSEG_LABELS = {0: "background/extracerebral", 1: "CSF", 2: "GM", 3: "WM", 4: "lesion", 5: "vessel"}


@dataclass
class PhantomConfig:
    """Everything that defines a simulated cohort (loadable with ``mmdm.config.from_dict``)."""

    name: str = "quick"
    n_subjects: int = 40
    #: test-only subjects appended after the ``n_subjects`` split ones (indices ``n_subjects ..``): they enlarge
    #: the test split without changing any existing subject or the train/val/test split of the first ones
    extra_test_subjects: int = 0
    resolution: float = 2.0  # mm, isotropic
    seed: int = 0
    split_seed: int = 0
    # grid
    margin_mm: float = 14.0
    in_plane_multiple: int = 16
    # covariates (the paper's cohort)
    age_mean: float = 68.15
    age_sd: float = 7.95
    female_fraction: float = 0.6214
    # anatomy
    deform_mm: tuple[float, float] = (2.0, 6.0)  # range of the max displacement
    scale_sd: float = 0.04  # head size, per axis (log-normal sd)
    rotation_deg: float = 4.0  # sd per axis
    shell_mm: float = 14.0  # extracerebral shell thickness
    lesions: bool = True
    lesion_rate: float = 1.0  # mean count at age 60; grows by 0.6 per 5 years
    lesion_median_radius_mm: float = 3.0
    # vessels
    ica_radius_mm: float = 1.9
    radius_sd: float = 0.06  # log-normal sd of a subject's vessel calibre
    ica_velocity_cm_s: float = 35.0  # at age 68; -0.3 cm/s per year
    velocity_sd: float = 5.0
    velocity_exponent: float = 0.8
    murray_exponent: float = 3.0
    r_min_mm: float = 0.25
    max_generation: int = 14
    max_segments: int = 5000
    tortuosity: tuple[float, float] = (0.03, 0.09)
    psf_sigma_vox: float = 0.5
    # physics
    tissues: dict[str, physics.Tissue] = field(default_factory=physics.default_tissues)
    sequences: physics.SequenceParams = field(default_factory=physics.SequenceParams)
    noise: tuple[float, float] = (0.02, 0.05)  # sigma / GM signal, per subject range
    bias: tuple[float, float] = (0.05, 0.2)  # log-amplitude sd of the bias field
    intensity_scale: float = 1000.0

    def __post_init__(self) -> None:
        if self.n_subjects < 1:
            raise ConfigError(f"PhantomConfig.n_subjects must be >= 1, got {self.n_subjects}")
        if isinstance(self.extra_test_subjects, bool) or not isinstance(self.extra_test_subjects, int) \
                or self.extra_test_subjects < 0:
            raise ConfigError(f"PhantomConfig.extra_test_subjects must be an integer >= 0 (test-only subjects "
                              f"added after the split ones), got {self.extra_test_subjects!r}")
        if self.resolution <= 0:
            raise ConfigError(f"PhantomConfig.resolution must be a positive number of mm, got {self.resolution}")
        missing = {"GM", "WM", "CSF", "blood", "lesion", "extracerebral"} - set(self.tissues)
        if missing:
            raise ConfigError(f"PhantomConfig.tissues lacks {sorted(missing)}; give T1/T2/PD for every tissue")

    @property
    def total_subjects(self) -> int:
        """Subjects written: the ``n_subjects`` split ones plus the ``extra_test_subjects``."""
        return self.n_subjects + self.extra_test_subjects


PROFILES: dict[str, PhantomConfig] = {
    "tiny": PhantomConfig(name="tiny", n_subjects=6, resolution=4.0, r_min_mm=0.4),
    "quick": PhantomConfig(name="quick", n_subjects=40, resolution=2.0),
    # the quick cohort's 40 subjects (same data, same 28/4/8 split) plus 8 test-only subjects: 16 test
    # subjects, enough for a Wilcoxon/Holm family of comparisons to reach significance
    "standard": PhantomConfig(name="standard", n_subjects=40, resolution=2.0, extra_test_subjects=8),
    "paper": PhantomConfig(name="paper", n_subjects=140, resolution=1.0),
}


def resolve_config(cfg: PhantomConfig | str | dict, n_subjects: int | None = None, seed: int | None = None,
                   resolution: float | None = None) -> PhantomConfig:
    """A profile name, a dict or a config, with optional overrides."""
    if isinstance(cfg, str):
        if cfg not in PROFILES:
            raise ConfigError(f"unknown phantom profile '{cfg}'; choose one of {sorted(PROFILES)}")
        cfg = PROFILES[cfg]
    elif isinstance(cfg, dict):
        cfg = from_dict(PhantomConfig, cfg)
    over = {k: v for k, v in (("n_subjects", n_subjects), ("seed", seed), ("resolution", resolution)) if v is not None}
    return dataclasses.replace(cfg, **over) if over else cfg


# --------------------------------------------------------------------------- subject


@dataclass
class Subject:
    """One simulated subject: images, ground truth and parameters."""

    id: str
    images: dict[str, np.ndarray]
    affine: np.ndarray
    vessel_labels: np.ndarray
    vessel_fraction: np.ndarray
    tissue_labels: np.ndarray
    brain_mask: np.ndarray
    tissue_fractions: dict[str, np.ndarray]
    centerlines: dict
    params: dict[str, Any]
    noise_sigma: dict[str, float]


def _streams(cfg: PhantomConfig, index: int) -> dict[str, np.random.Generator]:
    ss = np.random.SeedSequence(entropy=cfg.seed, spawn_key=(index,))
    names = ("covariates", "anatomy", "lesions", "vessels", "physics")
    return {n: np.random.default_rng(s) for n, s in zip(names, ss.spawn(len(names)))}


def generate_subject(index: int, cfg: PhantomConfig | str = "tiny") -> Subject:
    """Simulate subject ``index`` (0-based) of the cohort ``cfg``; deterministic in ``(cfg.seed, index)``."""
    cfg = resolve_config(cfg)
    rng = _streams(cfg, index)
    grid = anatomy.make_grid(cfg.resolution, cfg.margin_mm, cfg.in_plane_multiple)
    template = anatomy.load_template(cfg.shell_mm)

    # 1. covariates
    rc = rng["covariates"]
    age = float(np.clip(rc.normal(cfg.age_mean, cfg.age_sd), 45.0, 90.0))
    female = bool(rc.random() < cfg.female_fraction)
    head_scale = (0.97 if female else 1.02) * np.exp(rc.normal(0, cfg.scale_sd, 3))
    rotation = rc.normal(0, cfg.rotation_deg, 3)
    deform_mm = float(rc.uniform(*cfg.deform_mm))
    lesion_mean = cfg.lesion_rate * max(0.2, 1.0 + 0.12 * (age - 60.0)) if cfg.lesions else 0.0
    n_lesions = int(rc.poisson(lesion_mean)) if cfg.lesions else 0
    tortuosity = float(np.clip(rc.uniform(*cfg.tortuosity) * (1 + 0.01 * (age - 68.0)), 0.0, 0.2))
    v_ica = float(max(10.0, rc.normal(cfg.ica_velocity_cm_s - 0.3 * (age - 68.0), cfg.velocity_sd)))
    r_scale = float(np.exp(rc.normal(0, cfg.radius_sd)))
    noise_level = float(rc.uniform(*cfg.noise))
    bias_strength = float(rc.uniform(*cfg.bias))

    # 2. anatomy
    deformation = anatomy.random_deformation(rng["anatomy"], deform_mm, head_scale, rotation)
    coords = deformation.on_grid(grid)
    maps = anatomy.smoothed_template(cfg.resolution, cfg.shell_mm)
    gm, wm, brain = anatomy.sample([maps["gm"], maps["wm"], maps["brain"]], template.affine, coords)
    brain = np.clip(brain, 0, 1)
    head = np.maximum(np.clip(anatomy.sample(template.head, template.head_affine, coords), 0, 1), brain)
    les_list = anatomy.random_lesions(rng["lesions"], n_lesions, template, cfg.lesion_median_radius_mm)
    lesion = np.zeros_like(wm)
    if les_list:
        lmap = anatomy.lesion_map(les_list, template, cfg.resolution, rng["lesions"])
        nz = np.argwhere(lmap > 0)
        lo, hi = template.affine[:3, 3] + nz.min(0) - 1, template.affine[:3, 3] + nz.max(0) + 1
        inside = (coords[0] >= lo[0]) & (coords[0] <= hi[0]) & (coords[1] >= lo[1]) & (coords[1] <= hi[1])
        inside &= (coords[2] >= lo[2]) & (coords[2] <= hi[2])
        lesion[inside] = np.minimum(anatomy.sample(lmap, template.affine, [c[inside] for c in coords]), 1.0)
        lesion *= wm
    del coords
    wm = wm - lesion
    csf = np.clip(brain - gm - wm - lesion, 0, 1)
    extra = np.clip(head - brain, 0, 1)

    # 3. vessels: grown on a resolution-independent 2 mm depth map of the deformed brain
    dgrid = anatomy.make_grid(2.0, cfg.margin_mm, 1)
    dbrain = anatomy.sample(template.brain, template.affine,
                            deformation.on_grid(dgrid))
    depth = vessels.DepthMap(ndimage.distance_transform_edt(dbrain > 0.5) * 2.0 - 1.0, dgrid)
    tp = vessels.TreeParams(ica_radius=cfg.ica_radius_mm * r_scale, ica_velocity=v_ica,
                            velocity_exponent=cfg.velocity_exponent, gamma=cfg.murray_exponent,
                            r_min=cfg.r_min_mm, max_generation=cfg.max_generation, max_segments=cfg.max_segments,
                            tortuosity=tortuosity)
    tree = vessels.build_tree(rng["vessels"], tp, deformation, depth)
    seq, tis = cfg.sequences, cfg.tissues
    slab_origin = float(anatomy.BRAIN_BOX_MM[0][2] - cfg.margin_mm)
    vessels.inflow_times(tree, seq.tof_slab_mm, slab_origin)

    def props(seg: vessels.Segment) -> dict[str, np.ndarray]:
        n = seg.time_in_slab_ms / seq.tof_tr
        v = np.full(len(seg.points), seg.velocity)
        return {"tof": physics.tof_blood_signal(n, tis["blood"], seq),
                "wash_t2": physics.washout(v, seq.t2w_te, seq.t2w_slice_mm),
                "wash_flair": physics.washout(v, seq.flair_te, seq.flair_slice_mm)}

    ren = vessels.render_tubes(vessels.tubes_from_tree(tree, props), grid, cfg.psf_sigma_vox,
                               prop_names=("tof", "wash_t2", "wash_flair"))
    vf = np.minimum(ren.fraction, head)  # no lumen outside the head
    keep = 1.0 - vf
    fr = {"CSF": csf * keep, "GM": gm * keep, "WM": wm * keep, "lesion": lesion * keep,
          "extracerebral": extra * keep}

    # 4. contrast
    S = physics.tissue_signals(tis, seq)
    blood = tis["blood"]
    ti = physics.flair_ti(seq, tis)
    blood_signal = {
        "T1w": np.float32(S["T1w"]["blood"]),
        "T2w": S["T2w"]["blood"] * ren.props["wash_t2"],
        "FLAIR": float(physics.ir_signal(blood.pd, blood.t1, blood.t2, seq.flair_tr, seq.flair_te, ti))
        * ren.props["wash_flair"],
        "angio": ren.props["tof"],
    }
    rp = rng["physics"]
    images, sigmas = {}, {}
    for m in MODALITIES:
        img = sum(fr[t] * np.float32(S[m][t]) for t in fr) + vf * blood_signal[m]
        img = img.astype(np.float32) * np.float32(cfg.intensity_scale)
        img *= physics.bias_field(grid.shape, grid.spacing, bias_strength, rp)
        sigma = noise_level * cfg.intensity_scale * float(np.mean([S[m]["GM"], S[m]["WM"]]))
        images[m] = physics.rician(img, sigma, rp).astype(np.float32)
        sigmas[m] = sigma

    # ground truth
    brain_mask = (brain >= 0.5).astype(np.uint8)
    classes = [1.0 - vf - sum(fr.values()) + fr["extracerebral"], fr["CSF"], fr["GM"], fr["WM"], fr["lesion"], vf]
    dseg = np.zeros(grid.shape, np.uint8)
    best = classes[0]
    for lab, c in enumerate(classes[1:], start=1):  # argmax without a 6 x N stack
        win = c > best
        dseg[win] = lab
        best = np.maximum(best, c)
    labels = np.where(vf > 0, ren.labels, 0).astype(np.int32)
    seg_r = tree.rendered()
    lengths = np.array([s.length for s in seg_r])
    params = {
        "participant_id": subject_id(index + 1),
        "seed": cfg.seed, "index": index, "age": round(age, 2), "sex": "F" if female else "M",
        "head_scale": round(float(np.prod(head_scale) ** (1 / 3)), 4),
        "deformation_mm": round(deformation.max_displacement, 3),
        "rotation_deg": round(float(np.linalg.norm(rotation)), 3),
        "lesion_count": len(les_list),
        "lesion_volume_ml": round(float(lesion.sum()) * grid.spacing**3 / 1000.0, 4),
        "vessel_segments": len(seg_r),
        "vessel_length_mm": round(float(lengths.sum()), 1),
        "vessel_volume_ml": round(float(vf.sum()) * grid.spacing**3 / 1000.0, 4),
        "ica_radius_mm": round(tp.ica_radius, 4),
        "ica_velocity_cm_s": round(v_ica, 3),
        "mean_velocity_cm_s": round(float(np.sum(lengths * [s.velocity for s in seg_r]) / lengths.sum()), 3),
        "tortuosity": round(tortuosity, 4),
        "noise_level": round(noise_level, 5),
        "bias_strength": round(bias_strength, 4),
        **{f"noise_sigma_{m}": round(sigmas[m], 4) for m in MODALITIES},
    }
    return Subject(id=params["participant_id"], images=images, affine=grid.affine.copy(), vessel_labels=labels,
                   vessel_fraction=vf.astype(np.float32), tissue_labels=dseg, brain_mask=brain_mask,
                   tissue_fractions={k: v.astype(np.float32) for k, v in fr.items()},
                   centerlines=tree.to_json(cfg.murray_exponent), params=params, noise_sigma=sigmas)


# --------------------------------------------------------------------------- writer


def subject_files(root: Path, sub: str) -> dict[str, Path]:
    """Every file of one subject (the centreline JSON is written last and marks completion)."""
    d = derivatives_dir(root, PIPELINE, sub)
    files = {m: image_path(root, sub, m) for m in MODALITIES}
    files.update({k: d / f"{sub}_{k}.nii.gz" for k in ("vessels", "vesselfraction", "dseg", "brainmask")})
    files["centerlines"] = d / f"{sub}_centerlines.json"
    return files


def write_subject(subj: Subject, root: str | Path) -> dict[str, Path]:
    """Write one subject's images and ground truth (atomically, completion marker last)."""
    files = subject_files(Path(root), subj.id)
    for m in MODALITIES:
        save_nifti(files[m], subj.images[m], subj.affine, dtype=np.float32)
    lab_dtype = np.int16 if subj.vessel_labels.max() < 32767 else np.int32
    save_nifti(files["vessels"], subj.vessel_labels, subj.affine, dtype=lab_dtype)
    save_nifti(files["vesselfraction"], subj.vessel_fraction, subj.affine, dtype=np.float32)
    save_nifti(files["dseg"], subj.tissue_labels, subj.affine, dtype=np.uint8)
    save_nifti(files["brainmask"], subj.brain_mask, subj.affine, dtype=np.uint8)
    write_json(files["centerlines"], subj.centerlines, indent=None)
    return files


def _one(args: tuple[int, PhantomConfig, str]) -> dict[str, Any]:
    index, cfg, root = args
    subj = generate_subject(index, cfg)
    write_subject(subj, root)
    write_json(Path(root) / "derivatives" / PIPELINE / subj.id / f"{subj.id}_params.json", subj.params)
    return subj.params


def cohort_splits(cfg: PhantomConfig) -> dict[str, list[str]]:
    """The cohort's split: :func:`make_splits` of the first ``n_subjects`` (seed ``split_seed``), then every
    ``extra_test_subjects`` subject in ``test`` only, so adding them changes no existing assignment."""
    split = make_splits([subject_id(i + 1) for i in range(cfg.n_subjects)], seed=cfg.split_seed)
    split["test"] = sorted(split["test"] + [subject_id(i + 1) for i in range(cfg.n_subjects, cfg.total_subjects)])
    return split


def _config_record(cfg: PhantomConfig) -> dict:
    return {"generator": GENERATOR, "version": GENERATOR_VERSION, "config": to_dict(cfg)}


#: Config fields added after cohorts were built, with the value that reproduces those cohorts.
_ADDED_FIELDS = {"extra_test_subjects": 0}


def _same_record(old: Any, new: dict) -> bool:
    """Whether a cohort's stored record describes the config ``new``; a record written before a field of
    :data:`_ADDED_FIELDS` existed counts as having its default (the data it made is the same)."""
    if isinstance(old, dict) and isinstance(old.get("config"), dict):
        old = {**old, "config": {**_ADDED_FIELDS, **old["config"]}}
    return old == new


def _tsv(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["\t".join(cols)] + ["\t".join(str(r[c]) for c in cols) for r in rows]
    return "\n".join(lines) + "\n"


def build_cohort(out_dir: str | Path, cfg: PhantomConfig | str = "quick", n_subjects: int | None = None,
                 seed: int | None = None, resolution: float | None = None, workers: int = 1,
                 overwrite: bool = False, progress: bool = True) -> Path:
    """Simulate a cohort and write it in the study's layout (see ``mmdm.data.layout``).

    ``dataset_description.json`` is written last: a folder without it is an
    unfinished cohort and is resumed (subjects whose completion marker exists are
    kept) when the config is the same. A finished cohort with the same config is
    left alone; one with a different config needs ``overwrite=True``.
    """
    import json

    from tqdm import tqdm

    cfg = resolve_config(cfg, n_subjects, seed, resolution)
    root = Path(out_dir)
    record = _config_record(cfg)
    desc = root / "dataset_description.json"
    state = root / "derivatives" / PIPELINE / "generator.json"
    if overwrite:
        _remove_cohort(root)
    elif desc.exists():
        try:
            old = json.loads(desc.read_text()).get("GeneratedBy", [{}])[0].get("Parameters")
        except (json.JSONDecodeError, IndexError, AttributeError):
            old = None
        if _same_record(old, record):
            print(f"{root}: a complete phantom cohort with this config already exists; skipping "
                  "(pass overwrite=True / --overwrite to rebuild).")
            return root
        raise DatasetError(f"{root} already holds a dataset made with a different configuration. "
                           "Choose another output folder or pass overwrite=True (--overwrite) to replace it.")
    elif state.exists() and not _same_record(json.loads(state.read_text()), record):
        raise DatasetError(f"{root} holds an unfinished phantom cohort made with a different configuration. "
                           "Choose another output folder or pass overwrite=True (--overwrite) to replace it.")
    write_json(state, record)
    todo = [i for i in range(cfg.total_subjects)
            if not subject_files(root, subject_id(i + 1))["centerlines"].exists()
            or not (root / "derivatives" / PIPELINE / subject_id(i + 1) / f"{subject_id(i + 1)}_params.json").exists()]
    jobs = [(i, cfg, str(root)) for i in todo]
    bar = tqdm(total=cfg.total_subjects, initial=cfg.total_subjects - len(todo), desc=f"phantom {cfg.name}",
               unit="subject", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for _ in pool.imap_unordered(_one, jobs):
                bar.update()
    else:
        for job in jobs:
            _one(job)
            bar.update()
    bar.close()
    rows = []
    for i in range(cfg.total_subjects):
        sub = subject_id(i + 1)
        rows.append(json.loads((root / "derivatives" / PIPELINE / sub / f"{sub}_params.json").read_text()))
    write_text(root / "participants.tsv", _tsv(rows))
    write_json(root / "splits.json", cohort_splits(cfg))
    write_dataset_description(
        root, name=f"MMDM-study digital phantom ({cfg.name})",
        description=("SIMULATED data, not patient data: a digital phantom cohort built on the MNI152 2009a "
                     "template (nilearn) with synthetic arterial trees, lesions, deformations and MR physics "
                     "(T1w spoiled GRE, T2w TSE, FLAIR, TOF-MRA). See data_cards/phantom.md."),
        generated_by=[{"Name": GENERATOR, "Version": GENERATOR_VERSION, "Parameters": record}],
        Simulation=True, License="CC0 (simulated data)",
        TissueLabels={str(k): v for k, v in DSEG_LABELS.items()},
    )
    return root


def _remove_cohort(root: Path) -> None:
    """Remove only what :func:`build_cohort` writes."""
    if not root.exists():
        return
    for p in root.glob("sub-[0-9][0-9][0-9]"):
        if p.is_dir():
            shutil.rmtree(p)
    for name in ("dataset_description.json", "participants.tsv", "splits.json"):
        (root / name).unlink(missing_ok=True)
    shutil.rmtree(root / "derivatives" / PIPELINE, ignore_errors=True)


def ensure_cohort(out_dir: str | Path, cfg: PhantomConfig | str = "quick", **kw: Any) -> Path:
    """Use the complete dataset already in ``out_dir`` whatever its configuration
    (its ``dataset_description.json`` records it), or build the cohort there."""
    out = Path(out_dir)
    if (out / "dataset_description.json").exists():
        return out
    return build_cohort(out, cfg, **kw)
