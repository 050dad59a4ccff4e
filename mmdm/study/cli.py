"""`mmdm study`: the whole study for a profile, resumable."""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from mmdm.paths import project_path
from mmdm.study.profiles import PROFILES, get_profile
from mmdm.study.runner import build_book, run_study
from mmdm.study.sweep import (FIDELITY_AND_VESSELS, SWEEPS, ReferenceRule, collect_sweep, get_sweep, run_sweep,
                              sweep_summary)


def _cmd_study(args: argparse.Namespace) -> int:
    if args.show:
        profile = get_profile(args.profile, dataset=args.dataset)
        print(profile.cohort if args.show == "cohort" else profile.data_dir)
        return 0
    if args.book_only:
        build_book(profile=args.profile)
        return 0
    overrides = {}
    if args.dataset:
        overrides["dataset"] = args.dataset
    if args.sources:
        overrides["sources"] = args.sources
    try:
        run_study(args.profile, only=args.only, device=args.device, jobs=args.jobs, book=not args.no_book,
                  records_only=args.records_only, backend=args.backend, address=args.address,
                  keep_stale=args.keep_stale, **overrides)
    except (KeyError, RuntimeError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    profiles = "\n".join(f"  {p.name:9s} {p.description}" for p in PROFILES.values())
    p = subparsers.add_parser(
        "study", help="run the whole study (13 trainings, evaluation, notebooks, book) for a profile",
        description="Execute the study's notebooks with papermill in order: the cohort (01_data), every run's "
        "training (02_train) and evaluation (03_evaluate), the seed repeats of the profile's seed runs, the "
        "analyses of the trained models (uncertainty from repeated sampling, the speed-quality frontier, the premise "
        "by vessel visibility, robustness to artefacts, the slice viewer), then the "
        "aggregate notebooks (04_results ... 13_viewer), then `jupyter-book build`. Runs whose record under results/PROFILE is "
        "complete are skipped, so an interrupted study resumes.",
        epilog="profiles:\n" + profiles, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick", choices=sorted(PROFILES), help="study profile (default: quick)")
    p.add_argument("--only", nargs="+", default=None, metavar="RUN",
                   help="run only these runs (e.g. mmdm-full bbdm; a seed run: mmdm-full-s1) or analyses "
                   "(uncertainty, frontier, premise, robustness, viewer); the aggregate notebooks still show all records")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the profile's)")
    p.add_argument("--jobs", type=int, default=1, help="independent runs in parallel: the GPUs dealt out in turn (more jobs than GPUs share them) and the CPU cores shared out, C // N threads per job")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="where runs execute: local processes (default) or the tasks of a Ray cluster "
                   "(needs `pip install -e .[cluster]`; data, runs/ and results/ on storage every node sees)")
    p.add_argument("--address", default=None, help="with --backend ray: 'auto' (the cluster this machine "
                   "belongs to) or HOST:PORT of the head node; default: start a local Ray instance")
    p.add_argument("--dataset", default=None, help="a dataset directory in the study's layout instead of the phantom "
                   "(e.g. data/ixi)")
    p.add_argument("--sources", nargs="+", default=None, help="source modalities (e.g. T1w T2w PDw for IXI)")
    p.add_argument("--no-book", action="store_true", help="skip `jupyter-book build`")
    p.add_argument("--records-only", action="store_true",
                   help="train and evaluate nothing: execute the result notebooks on the records already in "
                   "results/PROFILE and build the book (how the published book is rebuilt)")
    p.add_argument("--keep-stale", action="store_true",
                   help="skip every run with a complete record, also one made under another config than the profile "
                   "now gives it (by default such a run is trained and evaluated again, and its record replaced "
                   "when the new one is complete; the log names the fields that differ)")
    p.add_argument("--book-only", action="store_true", help="only rebuild the book from the executed notebooks")
    p.add_argument("--show", choices=["cohort", "data-dir"], default=None,
                   help="print the profile's phantom cohort or its data directory and exit (the Makefile reads them)")
    p.set_defaults(func=_cmd_study)
    return p


def _cmd_sweep(args: argparse.Namespace) -> int:
    try:
        if args.action == "list":
            for sw in SWEEPS.values():
                print(f"{sw.name}: {sw.description}")
                for pt in sw.points:
                    print(f"  {pt.name}" + (f"  ({pt.note})" if pt.note else ""))
            return 0
        if args.name is None:
            print(f"error: name a sweep ({', '.join(SWEEPS)})", file=sys.stderr)
            return 2
        if args.action == "run":
            out = run_sweep(args.name, runs_root=args.runs, results_root=args.results, jobs=args.jobs,
                            threads=args.threads, device=args.device, only=args.only)
            print(f"sweep records: {out}")
        elif args.action == "collect":
            print(f"sweep records: {collect_sweep(args.name, args.runs, args.results)}")
        sweep = get_sweep(args.name)
        print(f"ranked by: {sweep.rule.text}")
        print(sweep_summary(args.name, args.results).to_string(index=False))
        selection = project_path(args.results) / args.name / "selection.csv"
        if isinstance(sweep.rule, ReferenceRule) and selection.is_file():  # each point against its reference
            print(f"\njudged by its own rule: {sweep.rule.text}")
            print(pd.read_csv(selection).to_string(index=False))
    except (KeyError, RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="recorded sweeps on the validation split (how the training settings were chosen)",
        description="Train the points of a named sweep (mmdm/study/sweep.py) with validation every few steps, "
        "copy their configs and validation logs to results/sweeps/NAME and rank them on the validation split "
        "by the rule the sweep declares (the recorded vessel sweeps: the vessel score alone; newer ones: "
        f"{FIDELITY_AND_VESSELS.text}). Finished points are skipped, interrupted ones resume.")
    p.add_argument("action", choices=["list", "run", "collect", "show"],
                   help="list the sweeps; run one (then collect and show); collect its records; show its ranking")
    p.add_argument("name", nargs="?", default=None, help=f"the sweep ({', '.join(SWEEPS)})")
    p.add_argument("--only", nargs="+", default=None, metavar="POINT", help="only these points")
    p.add_argument("--jobs", type=int, default=1, help="points trained at once (default 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per point (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--runs", default="runs/sweeps", help="where the run directories go (default runs/sweeps)")
    p.add_argument("--results", default="results/sweeps", help="where the records go (default results/sweeps)")
    p.set_defaults(func=_cmd_sweep)
    return p
