"""Import IXI into the study's layout: extract, pair, register to the MRA, write.

Output (see :mod:`mmdm.data.layout`)::

    OUT/sub-IXI002/anat/sub-IXI002_{T1w,T2w,PDw,angio}.nii.gz   on the MRA grid (RAS, axial axis last)
    OUT/participants.tsv     participant_id, ixi_id, site, scanner, age, sex, registration metrics, outlier flag
    OUT/splits.json          subject-level, stratified by site
    OUT/dataset_description.json                                 written last
    OUT/derivatives/ixi-import/sub-IXI002/sub-IXI002_registration.json   per subject (completion marker)
    OUT/derivatives/ixi-import/import_report.json                kept / dropped (and why) / outliers

No intensity normalisation is applied here: the study's loaders normalise each
volume when they read it (:func:`mmdm.data.volumes.normalise`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from mmdm.config import ConfigError, to_dict
from mmdm.data.ixi.archive import extract_members, scan_archive
from mmdm.data.ixi.demographics import find_sheet, read_demographics
from mmdm.data.ixi.naming import IXI_ARCHIVES, IXI_MODALITIES, IXI_SITES, Dropped, IXISubject, pair_scans, parse_name
from mmdm.data.ixi.registration import (RegistrationConfig, coverage, from_sitk, output_grid, reference_image,
                                        register, resample, to_sitk)
from mmdm.data.layout import DatasetError, derivatives_dir, image_path, make_splits, write_dataset_description
from mmdm.data.volumes import load_volume
from mmdm.io import save_nifti, write_json, write_text

PIPELINE = "ixi-import"
IMPORTER = "mmdm.data.ixi"
#: Bumped whenever the same settings would write different files.
IMPORTER_VERSION = "1.0.0"
SOURCE_MODALITIES = ("T1w", "T2w", "PDw")
EXTRACT_DIR = "extracted"


@dataclass
class IXIConfig:
    """Settings of the IXI import (loadable with ``mmdm.config.from_dict``)."""

    n_subjects: int | None = None  # import only the first N complete subjects (by IXI id); None = all
    split_seed: int = 0
    spacing: tuple[float, float, float] | None = None  # None: the MRA's own grid
    in_plane_multiple: int = 16  # only when resampling to ``spacing``
    dtype: str = "float32"  # or int16 (rounded; halves the disk space)
    outlier_k: float = 3.0  # flag metric > median + k * 1.4826 * MAD (per modality)
    min_coverage: float = 0.9  # flag a source that covers less of the MRA grid than this
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "int16"):
            raise ConfigError(f"IXIConfig.dtype: '{self.dtype}'; choose float32 or int16")
        if self.n_subjects is not None and self.n_subjects < 1:
            raise ConfigError(f"IXIConfig.n_subjects must be >= 1 (or None for all), got {self.n_subjects}")
        if self.spacing is not None:
            sp = tuple(float(s) for s in np.broadcast_to(np.asarray(self.spacing, dtype=float), (3,)))
            if min(sp) <= 0:
                raise ConfigError(f"IXIConfig.spacing must be positive mm, got {self.spacing}")
            self.spacing = sp


@dataclass
class ImportReport:
    """What an import kept, dropped and flagged."""

    root: Path
    kept: list[str] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    outliers: dict[str, list[str]] = field(default_factory=dict)  # participant -> reasons
    warnings: list[str] = field(default_factory=list)
    per_site: dict[str, int] = field(default_factory=dict)
    split_sizes: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        sites = ", ".join(f"{k} {v}" for k, v in sorted(self.per_site.items()))
        lines = [f"IXI dataset: {self.root}", f"kept {len(self.kept)} subject(s): {sites}",
                 "splits: " + ", ".join(f"{k} {v}" for k, v in self.split_sizes.items())]
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)} subject(s):")
            lines += [f"  - {d.ixi_id}: {d.reason}" + (f" ({d.details})" if d.details else "") for d in self.dropped]
        if self.outliers:
            lines.append(f"registration outliers flagged in participants.tsv ({len(self.outliers)}); inspect them:")
            lines += [f"  - {s}: {'; '.join(r)}" for s, r in sorted(self.outliers.items())]
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} file(s) that are not IXI T1/T2/PD/MRA images")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(f"details: {self.root / 'derivatives' / PIPELINE / 'import_report.json'}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- sources


def _marker(extract_dir: Path, archive: str) -> Path:
    return extract_dir / f".{archive}.json"


def prepare_archives(archive_dir: str | Path, extract_dir: str | Path | None = None,
                     n_subjects: int | None = None, progress: bool = True,
                     delete_archives: bool = False) -> tuple[list[IXISubject], list[Dropped], list[str]]:
    """Check the four archives, pair their members by subject, and extract the chosen subjects' files.

    Pairing uses the member names, so ``n_subjects`` extracts only what it needs.
    A marker next to the extracted files records each archive's member list and
    what was extracted, so a later run works without the archive
    (``delete_archives`` removes an archive once every file of a complete
    subject is extracted; the files of incomplete subjects are never extracted).
    Returns (subjects with extracted paths, dropped subjects, ignored member names).
    """
    archive_dir = Path(archive_dir)
    extract_dir = Path(extract_dir) if extract_dir is not None else archive_dir / EXTRACT_DIR
    names: dict[str, list[str]] = {}
    extracted: dict[str, set[str]] = {}
    for tag, archive in IXI_ARCHIVES.items():
        tar = archive_dir / archive
        marker = _marker(extract_dir, archive)
        state = json.loads(marker.read_text()) if marker.exists() else {}
        extracted[tag] = set(state.get("extracted", []))
        if tar.exists():
            names[tag] = [m.name for m in scan_archive(tar, extract_dir) if m.isfile()]
        elif state:
            names[tag] = state["members"]
        else:
            raise DatasetError(f"{tar}: archive not found (and nothing extracted from it in {extract_dir}). "
                               f"Put {', '.join(IXI_ARCHIVES.values())} in {archive_dir}, or download them with "
                               f"`mmdm data ixi --download {archive_dir} --out OUT`.")
    all_names = [n for tag in IXI_ARCHIVES for n in names[tag]
                 if (s := parse_name(n)) is not None and s.modality == tag]
    ignored = [n for tag in IXI_ARCHIVES for n in names[tag]
               if (s := parse_name(n)) is None or s.modality != tag]
    subjects, dropped, _ = pair_scans(all_names)
    usable = {f for s in subjects for f in s.files.values()}  # every file of a complete subject
    if n_subjects is not None:
        subjects = subjects[:n_subjects]
    wanted = {f for s in subjects for f in s.files.values()}
    for tag, archive in IXI_ARCHIVES.items():
        tar = archive_dir / archive
        marker = _marker(extract_dir, archive)
        extracted[tag] = {n for n in extracted[tag] if (extract_dir / n).is_file()}  # a file removed since
        need = {n for n in names[tag] if n in wanted} - extracted[tag]
        if need:
            if not tar.exists():
                raise DatasetError(f"{tar}: needed to extract {len(need)} more file(s) but the archive is gone. "
                                   f"Download it again (`mmdm data ixi --download {archive_dir} --out OUT`).")
            extract_members(tar, extract_dir, select=lambda m: m.name in need, progress=progress)
            extracted[tag] |= need
        complete = {n for n in names[tag] if n in usable} <= extracted[tag]
        if need or not marker.exists():
            write_json(marker, {"archive": archive, "members": names[tag], "extracted": sorted(extracted[tag]),
                                "complete": complete})
        if delete_archives and complete and tar.exists():
            tar.unlink()
    for s in subjects:
        s.files = {tag: str(extract_dir / name) for tag, name in s.files.items()}
    return subjects, dropped, ignored


def find_nifti(folder: str | Path) -> tuple[list[IXISubject], list[Dropped], list[str]]:
    """Pair IXI NIfTI files found anywhere under ``folder`` (already extracted archives)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder of IXI NIfTI files")
    return pair_scans(sorted(str(p) for p in folder.rglob("IXI*.nii*")))


# --------------------------------------------------------------------------- one subject


def _subject_record(cfg: IXIConfig) -> dict:
    """The settings that determine one subject's files (not the selection or the split)."""
    rec = {"importer": IMPORTER, "version": IMPORTER_VERSION, "spacing": cfg.spacing,
           "in_plane_multiple": cfg.in_plane_multiple, "dtype": cfg.dtype,
           "registration": {k: v for k, v in to_dict(cfg.registration).items() if k != "threads"}}
    return json.loads(json.dumps(rec))  # as it reads back from JSON (tuples -> lists)


def _report_path(out: Path, sub: str) -> Path:
    return derivatives_dir(out, PIPELINE, sub) / f"{sub}_registration.json"


def _cast(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, type]:
    if dtype == "int16":
        return np.clip(np.rint(arr), -32768, 32767).astype(np.int16), np.int16
    return arr.astype(np.float32), np.float32


def process_subject(subject: IXISubject, out: str | Path, cfg: IXIConfig) -> dict:
    """Register one subject's sources to its MRA and write its four volumes and its report.

    Returns ``{"status": "ok", "report": {...}}`` or ``{"status": "dropped", "reason", "details"}``;
    never raises for a bad file or a failed registration. A subject already written with the
    same settings is not redone.
    """
    try:
        return _process_subject(subject, Path(out), cfg)
    except (RuntimeError, ValueError) as e:  # SimpleITK/geometry failures: drop, do not stop (disk errors do)
        return {"status": "dropped", "reason": "processing failed", "details": f"{type(e).__name__}: {e}"}


def _process_subject(subject: IXISubject, out: Path, cfg: IXIConfig) -> dict:
    import nibabel as nib

    sub = subject.participant_id
    record = _subject_record(cfg)
    rpath = _report_path(out, sub)
    if rpath.exists():
        try:
            old = json.loads(rpath.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("settings") == record and all(image_path(out, sub, m).exists() for m in IXI_MODALITIES.values()):
            old["resumed"] = True
            return {"status": "ok", "report": old}
    vols = {}
    for tag, path in subject.files.items():
        try:
            vols[tag] = load_volume(path)
        except DatasetError as e:
            return {"status": "dropped", "reason": f"unreadable or truncated {tag} file", "details": str(e)}
    mra = nib.as_closest_canonical(nib.Nifti1Image(vols["MRA"].data, vols["MRA"].affine))
    mra_data = np.asarray(mra.dataobj, dtype=np.float32)
    shape, affine = output_grid(mra_data.shape, mra.affine, cfg.spacing, cfg.in_plane_multiple)
    fixed = to_sitk(mra_data, mra.affine, f"{subject.files['MRA']}")
    reference = reference_image(shape, affine)
    outputs: dict[str, np.ndarray] = {}
    if cfg.spacing is None:
        outputs["angio"] = mra_data
    else:
        outputs["angio"] = from_sitk(resample(fixed, reference))[0]
    reg_report: dict[str, dict] = {}
    for tag, mod in IXI_MODALITIES.items():
        if tag == "MRA":
            continue
        moving = to_sitk(vols[tag].data, vols[tag].affine, subject.files[tag])
        try:
            res = register(fixed, moving, cfg.registration)
        except DatasetError as e:
            return {"status": "dropped", "reason": f"registration of {tag} failed", "details": str(e)}
        outputs[mod] = from_sitk(resample(moving, reference, res.matrix_ras))[0]
        # coverage of the MRA's own slab (a resampled output grid may be padded beyond it)
        reg_report[mod] = {**res.to_json(), "coverage": coverage(moving, fixed, res.matrix_ras)}
    for mod, arr in outputs.items():
        data, dt = _cast(arr, cfg.dtype)
        save_nifti(image_path(out, sub, mod), data, affine, dtype=dt)
    institution, vendor, field_t = IXI_SITES.get(subject.site, ("unknown", "unknown", float("nan")))
    report = {
        "participant_id": sub, "ixi_id": subject.ixi_id, "site": subject.site, "institution": institution,
        "scanner": vendor, "field_strength_T": field_t,
        "source_files": {IXI_MODALITIES[t]: Path(p).name for t, p in subject.files.items()},
        "mra_original": {"shape": list(vols["MRA"].data.shape), "affine": vols["MRA"].affine.round(6).tolist(),
                         "orientation": "".join(nib.aff2axcodes(vols["MRA"].affine))},
        "output_grid": {"shape": list(shape), "affine": affine.round(6).tolist(),
                        "spacing_mm": np.linalg.norm(affine[:3, :3], axis=0).round(6).tolist()},
        "registration": reg_report,
        "metric": "Mattes mutual information (SimpleITK sign: negative, lower = better), full resolution, "
                  "over the MRA's head mask when fixed_mask is on",
        "settings": record,
    }
    write_json(rpath, report)
    return {"status": "ok", "report": report}


def _process(args: tuple[IXISubject, str, IXIConfig]) -> dict:
    subject, out, cfg = args
    res = process_subject(subject, out, cfg)
    res["ixi_id"] = subject.ixi_id
    return res


# --------------------------------------------------------------------------- cohort


def flag_outliers(values: dict[str, float], k: float = 3.0) -> tuple[dict[str, bool], float]:
    """Flag values above ``median + k * 1.4826 * MAD`` (higher = worse; the MAD is floored at
    1 % of |median| so that a cohort of near-identical values does not flag noise)."""
    if not values:
        return {}, float("nan")
    v = np.asarray(list(values.values()), dtype=np.float64)
    med = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - med)))
    threshold = med + k * max(mad, 0.01 * abs(med), 1e-12)
    return {s: bool(x > threshold) for s, x in values.items()}, threshold


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _tsv(rows: list[dict]) -> str:
    cols = list(rows[0])
    return "\n".join(["\t".join(cols)] + ["\t".join(_fmt(r[c]) for c in cols) for r in rows]) + "\n"


def _check_output(out: Path, cfg: IXIConfig, overwrite: bool) -> None:
    state = out / "derivatives" / PIPELINE / "importer.json"
    desc = out / "dataset_description.json"
    if overwrite:
        for p in out.glob("sub-IXI*"):
            if p.is_dir():
                shutil.rmtree(p)
        for name in ("dataset_description.json", "participants.tsv", "splits.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "derivatives" / PIPELINE, ignore_errors=True)
        return
    if desc.exists() and not state.exists():
        raise DatasetError(f"{out} already holds a dataset that the IXI importer did not write. "
                           "Choose another --out folder.")
    if state.exists() and json.loads(state.read_text()) != _subject_record(cfg):
        raise DatasetError(f"{out} holds IXI subjects imported with different settings ({state}). Choose another "
                           "--out folder, or pass --overwrite to redo them all.")


def import_subjects(subjects: Iterable[IXISubject], out: str | Path, cfg: IXIConfig = IXIConfig(),
                    dropped: Iterable[Dropped] = (), ignored: Iterable[str] = (),
                    demographics: str | Path | None = None, workers: int = 1, progress: bool = True,
                    overwrite: bool = False, sources: dict | None = None) -> ImportReport:
    """Register and write paired subjects, then the cohort files (participants, splits, description).

    Subjects already in ``out`` from an earlier run with the same settings are
    kept and listed; a subject whose files cannot be read or registered is
    dropped and reported, never fatal. Raises :class:`DatasetError` only when
    no subject at all can be imported.
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_output(out, cfg, overwrite)
    write_json(out / "derivatives" / PIPELINE / "importer.json", _subject_record(cfg))
    subjects = list(subjects)
    report = ImportReport(root=out, dropped=list(dropped), ignored=list(ignored))
    demo: dict[str, dict] = {}
    if demographics is not None:
        try:
            demo = read_demographics(demographics)
        except DatasetError as e:
            report.warnings.append(f"no age/sex in participants.tsv: {e}")
    else:
        report.warnings.append("no demographics sheet given (IXI.xls or a CSV export): age and sex are n/a")
    jobs = [(s, str(out), cfg) for s in subjects]
    results: list[dict] = []
    bar = tqdm(total=len(jobs), desc="register to MRA", unit="subject", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        if not cfg.registration.threads:  # share the cores between the workers
            threads = max(1, (os.cpu_count() or 1) // workers)
            cfg = dataclasses.replace(cfg, registration=dataclasses.replace(cfg.registration, threads=threads))
            jobs = [(s, str(out), cfg) for s in subjects]
        with cf.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
            for res in pool.map(_process, jobs):
                results.append(res)
                bar.update()
    else:
        for job in jobs:
            results.append(_process(job))
            bar.update()
    bar.close()
    for res in results:
        if res["status"] == "dropped":
            report.dropped.append(Dropped(res["ixi_id"], res["reason"], res["details"]))
    # every subject written with these settings, this run or an earlier one
    reports: dict[str, dict] = {}
    for rpath in sorted((out / "derivatives" / PIPELINE).glob("sub-*/sub-*_registration.json")):
        rep = json.loads(rpath.read_text())
        sub = rep["participant_id"]
        if rep.get("settings") == _subject_record(cfg) and all(
                image_path(out, sub, m).exists() for m in IXI_MODALITIES.values()):
            reports[sub] = rep
    if not reports:
        raise DatasetError("no IXI subject could be imported: " + (
            "; ".join(f"{d.ixi_id}: {d.reason}" for d in report.dropped[:10]) or "no subject has all of T1, T2, "
            "PD and MRA") + ". Check the archives (or the NIfTI folder) and run again.")
    # registration quality: per-modality outliers of the final metric, failed improvement, coverage
    reasons: dict[str, list[str]] = {s: [] for s in reports}
    thresholds: dict[str, float] = {}
    for mod in SOURCE_MODALITIES:
        metric = {s: r["registration"][mod]["metric_final"] for s, r in reports.items()}
        flags, thresholds[mod] = flag_outliers(metric, cfg.outlier_k)
        for s, r in reports.items():
            reg = r["registration"][mod]
            if flags[s]:
                reasons[s].append(f"{mod} metric {reg['metric_final']:.4f} above the cohort threshold "
                                  f"{thresholds[mod]:.4f}")
            if reg["metric_final"] > reg["metric_initial"]:
                reasons[s].append(f"{mod} registration made the metric worse "
                                  f"({reg['metric_initial']:.4f} -> {reg['metric_final']:.4f})")
            if reg["coverage"] < cfg.min_coverage:
                reasons[s].append(f"{mod} covers only {reg['coverage']:.0%} of the MRA grid")
    report.outliers = {s: r for s, r in reasons.items() if r}
    rows = []
    for s, r in reports.items():
        d = demo.get(r["ixi_id"], {})
        row = {"participant_id": s, "ixi_id": r["ixi_id"], "site": r["site"], "institution": r["institution"],
               "scanner": r["scanner"], "field_strength_T": r["field_strength_T"], "age": d.get("age"),
               "sex": d.get("sex")}
        for mod in SOURCE_MODALITIES:
            row[f"reg_metric_{mod}"] = r["registration"][mod]["metric_final"]
        row["reg_outlier"] = s in report.outliers
        rows.append(row)
    if demo:
        missing = [r["ixi_id"] for r in rows if r["ixi_id"] not in demo]
        if missing:
            report.warnings.append(f"{len(missing)} subject(s) are not in the demographics sheet: {missing[:5]}")
    write_text(out / "participants.tsv", _tsv(rows))
    report.kept = sorted(reports)
    strata = {r["participant_id"]: r["site"] for r in rows}
    splits = make_splits(report.kept, seed=cfg.split_seed, strata=strata)
    write_json(out / "splits.json", splits)
    report.split_sizes = {k: len(v) for k, v in splits.items()}
    for r in rows:
        report.per_site[r["site"]] = report.per_site.get(r["site"], 0) + 1
    import SimpleITK as sitk

    write_json(out / "derivatives" / PIPELINE / "import_report.json", {
        "kept": report.kept, "per_site": report.per_site, "split_sizes": report.split_sizes,
        "dropped": [{"ixi_id": d.ixi_id, "reason": d.reason, "details": d.details} for d in report.dropped],
        "ignored_files": report.ignored,
        "outliers": report.outliers, "outlier_thresholds": thresholds,
        "outlier_rule": f"metric_final > median + {cfg.outlier_k} * 1.4826 * MAD (per modality), or the "
                        f"registration made the metric worse, or coverage < {cfg.min_coverage}",
        "warnings": report.warnings, "config": to_dict(cfg), "sources": sources or {},
        "simpleitk": sitk.Version_VersionString(),
    })
    write_dataset_description(
        out, name="IXI (T1w/T2w/PDw -> TOF-MRA), imported for the MMDM study",
        description=("IXI brain MRI of healthy adults (Guy's, Hammersmith and IOP, London): T1w, T2w and PDw "
                     "registered (rigid then affine, Mattes mutual information, SimpleITK) to each subject's "
                     "TOF-MRA and resampled onto its grid. PDw stands in for FLAIR, which IXI does not have. "
                     "See data_cards/ixi.md."),
        generated_by=[{"Name": IMPORTER, "Version": IMPORTER_VERSION,
                       "Parameters": {"config": to_dict(cfg), "sources": sources or {}}}],
        License="CC BY-SA 3.0",
        Acknowledgements="IXI dataset, https://brain-development.org/ixi-dataset/ (CC BY-SA 3.0).",
        SourceDatasets=[{"URL": "https://brain-development.org/ixi-dataset/"}],
        SourceModalities=list(SOURCE_MODALITIES), TargetModality="angio",
    )
    return report


def import_ixi(out: str | Path, archive_dir: str | Path | None = None, nifti_dir: str | Path | None = None,
               cfg: IXIConfig = IXIConfig(), demographics: str | Path | None = None, workers: int = 1,
               progress: bool = True, overwrite: bool = False, delete_archives: bool = False,
               sources: dict | None = None) -> ImportReport:
    """Import IXI from its four archives (``archive_dir``) or from extracted NIfTI files (``nifti_dir``).

    The demographics sheet is looked up next to the archives (IXI.csv, IXI.tsv,
    IXI.xlsx, IXI.xls) unless ``demographics`` names it.
    """
    if (archive_dir is None) == (nifti_dir is None):
        raise DatasetError("give exactly one of archive_dir (the IXI tarballs) or nifti_dir (extracted NIfTI files)")
    if archive_dir is not None:
        subjects, dropped, ignored = prepare_archives(archive_dir, n_subjects=cfg.n_subjects, progress=progress,
                                                      delete_archives=delete_archives)
        folder = Path(archive_dir)
    else:
        subjects, dropped, ignored = find_nifti(nifti_dir)
        subjects = subjects[:cfg.n_subjects] if cfg.n_subjects else subjects
        folder = Path(nifti_dir)
    if demographics is None:
        demographics = find_sheet(folder)
    return import_subjects(subjects, out, cfg, dropped=dropped, ignored=ignored, demographics=demographics,
                           workers=workers, progress=progress, overwrite=overwrite, sources=sources)
