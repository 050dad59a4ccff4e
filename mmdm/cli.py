"""The `mmdm` command line.

    mmdm data phantom --out DIR [--profile quick] [--subjects N] [--seed S] [--resolution MM]
    mmdm data check DIR
    mmdm data ixi --download DIR --out data/ixi      (or --from-tars DIR)
    mmdm evaluate --pred P.nii.gz --target T.nii.gz [--mask M.nii.gz] [--json]
    mmdm methods
    mmdm train --method mmdm --variant full --data DIR --run-dir RUN [--resume]
    mmdm synthesize --run RUN --t1w T1.nii.gz --t2w T2.nii.gz --flair FLAIR.nii.gz --out tof.nii.gz
    mmdm evaluate-run RUN
    mmdm study --profile quick [--only RUN ...] [--device D] [--jobs N]
    mmdm sweep list | run NAME [--jobs N] | show NAME

Run any subcommand with --help for its options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmdm import __version__
from mmdm.data.check import check_dataset
from mmdm.data.ixi import add_ixi_parser
from mmdm.data.phantom import PROFILES, build_cohort
from mmdm.engine.cli import add_evaluate_run_parser, add_synthesize_parser, add_train_parser, user_errors
from mmdm.io import write_text
from mmdm.methods import METHODS, deviations_markdown, display_name, method_class
from mmdm.metrics import evaluate_files
from mmdm.study.cli import add_study_parser, add_sweep_parser
from mmdm.study.profiles import setup_deviations

EPILOG = """examples:
  mmdm data phantom --profile quick --out data/phantom-quick
  mmdm data check data/phantom-quick
  mmdm train --method mmdm --variant full --method-config small --data data/phantom-quick --steps 500 --run-dir runs/mmdm-full
  mmdm evaluate-run runs/mmdm-full
  mmdm synthesize --run runs/mmdm-full --t1w T1.nii.gz --t2w T2.nii.gz --flair FLAIR.nii.gz --out tof.nii.gz
  mmdm evaluate --pred pred.nii.gz --target sub-001_angio.nii.gz --json
"""


def _cmd_phantom(args: argparse.Namespace) -> int:
    if args.profile not in PROFILES:
        print(f"error: unknown profile '{args.profile}'; choose one of {sorted(PROFILES)}", file=sys.stderr)
        return 2
    out = build_cohort(args.out, args.profile, n_subjects=args.subjects, seed=args.seed,
                       resolution=args.resolution, workers=args.workers, overwrite=args.overwrite,
                       progress=not args.quiet)
    print(f"phantom cohort ready: {out}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    report = check_dataset(args.dir, modalities=args.modalities, target=args.target)
    print(report.summary())
    return 0 if report.ok else 1


@user_errors
def _cmd_evaluate(args: argparse.Namespace) -> int:
    res = evaluate_files(args.pred, args.target, args.mask)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{'':10s}{'PSNR (dB)':>12s}{'SSIM':>10s}{'RMSE (%)':>10s}")
        print(f"{'volume':10s}{res['psnr']:12.4f}{res['ssim']:10.4f}{res['rmse']:10.3f}")
        print(f"{'axial MIP':10s}{res['mip_psnr']:12.4f}{res['mip_ssim']:10.4f}{res['mip_rmse']:10.3f}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    if args.deviations:
        text = deviations_markdown(setup_deviations())
        if args.out:
            write_text(args.out, text)
        else:
            print(text)
        return 0
    for name in METHODS.names():  # registry name, paper name, family, variants
        cls = method_class(name)
        variants = f"variants: {', '.join(cls.variants)}" if cls.variants else ""
        print(f"{name:10s}{display_name(name):26s}{cls.family:11s}{variants}".rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmdm", description="A reproducible study of MMDM (multi-modal Brownian-bridge diffusion "
        "for TOF-MRA synthesis from T1W/T2W/FLAIR).", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"mmdm-study {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    data = sub.add_parser("data", help="build, import and check datasets",
                          description="Build the digital phantom cohort or check a dataset in the study's layout.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dsub.required = True

    ph = dsub.add_parser(
        "phantom", help="build the digital phantom cohort (simulated subjects on MNI152 anatomy)",
        description="Simulate a cohort of T1W/T2W/FLAIR/TOF-MRA volumes from the MNI152 2009a tissue maps "
        "with a synthetic arterial tree and MR signal equations. This is a simulation, not patient data; "
        "see data_cards/phantom.md.")
    ph.add_argument("--out", required=True, type=Path, help="output directory (BIDS-like layout)")
    ph.add_argument("--profile", default="quick",
                    help="cohort profile: tiny (tests), quick (CPU main job), paper (140 subjects at 1 mm)")
    ph.add_argument("--subjects", type=int, default=None, help="number of subjects (default: the profile's)")
    ph.add_argument("--seed", type=int, default=None, help="cohort seed (default: the profile's)")
    ph.add_argument("--resolution", type=float, default=None, help="isotropic voxel size in mm (default: the profile's)")
    ph.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    ph.add_argument("--overwrite", action="store_true", help="rebuild even if a complete cohort is there")
    ph.add_argument("--quiet", action="store_true", help="no progress bar")
    ph.set_defaults(func=_cmd_phantom)

    ck = dsub.add_parser("check", help="validate a dataset and print a summary table",
                         description="Read every volume of a dataset, check shapes, affines, finiteness, "
                         "emptiness and the split file; print one row per subject. Exit status 1 on any error.")
    ck.add_argument("dir", type=Path, help="dataset directory")
    ck.add_argument("--modalities", nargs="+", default=None,
                    help="modalities every subject must have (default: every modality found in the dataset)")
    ck.add_argument("--target", default="angio", help="target modality (default: angio = TOF-MRA)")
    ck.set_defaults(func=_cmd_check)

    add_ixi_parser(dsub)

    ev = sub.add_parser("evaluate", help="PSNR/SSIM/RMSE on a volume and its axial MIP",
                        description="Compare a synthesised TOF-MRA with the real one: PSNR, SSIM and RMSE(%) "
                        "on the volume and on the axial MIP, both scaled by the ground truth's max. A prediction "
                        "written by `mmdm synthesize` or `mmdm evaluate-run` declares its scale (a fraction of the "
                        "TOF maximum, times --scale) and is compared with the ground truth divided by its maximum, "
                        "so the numbers equal evaluate-run's.")
    ev.add_argument("--pred", required=True, type=Path, help="synthesised volume (NIfTI)")
    ev.add_argument("--target", required=True, type=Path, help="ground-truth volume (NIfTI)")
    ev.add_argument("--mask", type=Path, default=None, help="optional brain mask (NIfTI)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(func=_cmd_evaluate)

    me = sub.add_parser("methods", help="list the registered synthesis methods",
                        description="List the registered synthesis methods, or print every method's deviations "
                        "from its official implementation as a MyST page (--deviations).")
    me.add_argument("--deviations", action="store_true", help="print the deviations page (markdown)")
    me.add_argument("--out", type=Path, default=None, help="with --deviations: write the page to this file")
    me.set_defaults(func=_cmd_methods)

    add_train_parser(sub)
    add_synthesize_parser(sub)
    add_evaluate_run_parser(sub)

    add_study_parser(sub)
    add_sweep_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(user_errors(args.func)(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
