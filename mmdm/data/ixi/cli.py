"""`mmdm data ixi`: download or read the IXI archives and write the study's layout.

Exit status: 0 dataset written (dropped subjects and outliers are reported, not
errors); 1 the download or the import failed (the message says why and what to
do); 2 invalid options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mmdm.config import ConfigError, load_yaml
from mmdm.data.ixi.download import IXI_BASE_URL, IXI_FILES, DownloadError, fetch_ixi
from mmdm.data.ixi.importer import EXTRACT_DIR, IXIConfig, import_ixi
from mmdm.data.ixi.naming import IXI_ARCHIVES
from mmdm.data.layout import DatasetError

EPILOG = """examples:
  mmdm data ixi --download ~/ixi-archives --out data/ixi              # fetch (~tens of GB) and import
  mmdm data ixi --download ~/ixi-archives --out data/ixi-trial --subjects 5
  mmdm data ixi --from-tars ~/ixi-archives --out data/ixi --spacing 1 --workers 4
  mmdm train --method mmdm --data data/ixi --sources T1w T2w PDw ...   # PD stands in for FLAIR

The demographics sheet IXI.xls needs the optional package xlrd; without it, export the
sheet as CSV (IXI.csv next to the archives, or --demographics FILE). See data_cards/ixi.md.
"""


def _spacing(values: list[float] | None) -> tuple[float, float, float] | None:
    if values is None:
        return None
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) == 3:
        return tuple(values)  # type: ignore[return-value]
    raise ConfigError(f"--spacing takes 1 or 3 numbers (mm), got {len(values)}")


def _complete(extracted: Path, archive: str) -> bool:
    """Whether an earlier run extracted every usable file of ``archive`` (then it need not be fetched)."""
    marker = extracted / f".{archive}.json"
    try:
        return bool(json.loads(marker.read_text()).get("complete"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _cmd_ixi(args: argparse.Namespace) -> int:
    try:
        cfg = load_yaml(IXIConfig, args.config) if args.config is not None else IXIConfig()
        over = {"n_subjects": args.subjects, "split_seed": args.seed, "spacing": _spacing(args.spacing),
                "dtype": args.dtype}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress = not args.quiet
    try:
        if args.download is not None:
            folder = args.download
            extracted = folder / EXTRACT_DIR
            done = [a for a in IXI_ARCHIVES.values() if not (folder / a).exists() and _complete(extracted, a)]
            print(f"downloading IXI from {args.base_url} into {folder}", file=sys.stderr)
            fetch_ixi(folder, args.base_url, IXI_FILES, skip=done, progress=progress)
            delete = not args.keep_archives and args.subjects is None
        else:
            folder = args.from_tars or args.from_nifti
            delete = False  # never delete archives the user brought
        where = {"nifti_dir": folder} if args.from_nifti is not None else {"archive_dir": folder}
        report = import_ixi(args.out, cfg=cfg, demographics=args.demographics, workers=args.workers,
                            progress=progress, overwrite=args.overwrite, delete_archives=delete,
                            sources={"archives" if args.from_nifti is None else "nifti": str(folder),
                                     "base_url": args.base_url if args.download else None}, **where)
    except (DownloadError, DatasetError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"\nnext: mmdm data check {args.out} --modalities T1w T2w PDw angio")
    return 0


def add_ixi_parser(data_subparsers) -> argparse.ArgumentParser:
    """Register `mmdm data ixi` on the `mmdm data` subparsers; returns the new parser."""
    p = data_subparsers.add_parser(
        "ixi", help="download/import IXI (T1w, T2w, PDw -> TOF-MRA), registered to the MRA",
        description="Fetch the IXI archives (or use ones you have), pair the files by subject, register T1, T2 "
        "and PD to each subject's TOF-MRA (rigid then affine, mutual information, SimpleITK), resample them "
        "onto the MRA grid and write the study's layout with participants.tsv and a site-stratified split. "
        "IXI has no FLAIR: PD (modality PDw) stands in for it. Data licence: CC BY-SA 3.0.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--download", type=Path, metavar="DIR",
                     help="download the archives and IXI.xls into DIR (resumable), then import")
    src.add_argument("--from-tars", type=Path, metavar="DIR",
                     help=f"import from archives already in DIR ({', '.join(IXI_ARCHIVES.values())})")
    src.add_argument("--from-nifti", type=Path, metavar="DIR",
                     help="import from IXI NIfTI files already extracted anywhere under DIR (IXI*-T1.nii.gz, ...)")
    p.add_argument("--out", required=True, type=Path, help="output dataset directory (the study's layout)")
    p.add_argument("--base-url", default=IXI_BASE_URL, help=f"where to download from (default {IXI_BASE_URL})")
    p.add_argument("--subjects", type=int, default=None, metavar="N",
                   help="import only the first N complete subjects by IXI id (for a trial); default all")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes for registration")
    p.add_argument("--seed", type=int, default=None, help="seed of the site-stratified train/val/test split "
                   "(default 0)")
    p.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                   help="resample onto this voxel size (1 or 3 numbers, mm) over the MRA's field of view; "
                   "default: the MRA's own grid")
    p.add_argument("--dtype", choices=("float32", "int16"), default=None,
                   help="stored voxel type (default float32; int16 rounds intensities and halves the disk space)")
    p.add_argument("--config", type=Path, default=None, metavar="YAML",
                   help="import settings (mmdm.data.ixi.IXIConfig as YAML, e.g. registration: {shrink_factors: "
                   "[4, 2, 1]}); the options above override it")
    p.add_argument("--demographics", type=Path, default=None, metavar="FILE",
                   help="the demographics sheet (IXI.xls needs xlrd; a CSV export works without it); "
                   "default: IXI.csv/IXI.tsv/IXI.xlsx/IXI.xls next to the archives")
    p.add_argument("--keep-archives", action="store_true",
                   help="with --download: keep the tarballs after a complete extraction (default: delete them; "
                   "archives given with --from-tars are never deleted)")
    p.add_argument("--overwrite", action="store_true", help="redo every subject in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_ixi)
    return p
