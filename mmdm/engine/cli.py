"""``mmdm train``, ``mmdm synthesize`` and ``mmdm evaluate-run``.

The functions ``add_*_parser(subparsers)`` register the subcommands on an
argparse sub-parsers object (``mmdm/cli.py`` calls them). Each sets
``func`` to a handler ``(args) -> exit status``. ``python -m mmdm.engine.cli``
runs the three commands on their own (used by tests and under torchrun)::

    torchrun --nproc-per-node 2 -m mmdm.engine.cli train --config run.yaml --run-dir runs/x
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from mmdm.config import ConfigError, load_yaml, to_dict
from mmdm.data.layout import DatasetError
from mmdm.engine.distributed import env_ranks
from mmdm.engine.evaluate import evaluate_run
from mmdm.engine.infer import AMP_MODES, synthesize_files
from mmdm.engine.rundir import RunLockedError
from mmdm.engine.spec import ALLOW_CODE_HELP, TrainConfig, resolve
from mmdm.engine.train import train
from mmdm.io import os_error_message

#: convenience flags of `mmdm synthesize` (modality names as in the dataset layout)
MODALITY_FLAGS = ("T1w", "T2w", "FLAIR", "PDw")


#: the errors a command reports as one line (what went wrong, what to do) instead of a traceback
USER_ERRORS = (DatasetError, ConfigError, RunLockedError, RuntimeError, ValueError, OSError)


def error_line(e: BaseException) -> str:
    """The one-line message of a user-facing error (:data:`USER_ERRORS`)."""
    return os_error_message(e) if isinstance(e, OSError) else str(e)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def user_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command handler: a :data:`USER_ERRORS` error prints ``error: <one line>`` and exits 2;
    warnings print as ``warning: <message>`` (without the code location)."""
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return handler(args)
            except USER_ERRORS as e:
                print(f"error: {error_line(e)}", file=sys.stderr)
                return 2
    return run


def _set_nested(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a mapping in the config")
    d[keys[-1]] = value


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["steps=100", "data.window=3"]`` -> nested dict (values parsed as YAML scalars/lists)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set steps=1000 or --set data.window=5")
        key, raw = item.split("=", 1)
        _set_nested(out, key.strip(), yaml.safe_load(raw))
    return out


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of ``mmdm train``: YAML (or the defaults), then the convenience flags, then ``--set``
    (:func:`mmdm.engine.spec.resolve`; a flag that changes the method drops a stored ``method_config``)."""
    if args.config is not None:
        base = to_dict(load_yaml(TrainConfig, args.config))
    else:
        base = to_dict(TrainConfig())
    flags: dict[str, Any] = {}
    if args.method is not None:
        flags["method"] = args.method
        if args.config is None:
            base["method_kwargs"] = {}
    mk: dict[str, Any] = {}
    if args.variant is not None:
        mk["variant"] = args.variant
    if args.method_config is not None:
        mk["config"] = args.method_config
    if mk:
        flags["method_kwargs"] = mk
    data: dict[str, Any] = {}
    if args.data is not None:
        data["root"] = str(args.data)
    if args.sources is not None:
        data["sources"] = list(args.sources)
    if data:
        flags["data"] = data
    for k in ("steps", "epochs", "batch_size", "seed", "device"):
        v = getattr(args, k)
        if v is not None:
            flags[k] = v
    if args.steps is not None and args.epochs is None:
        flags["epochs"] = None
    return resolve(base, flags, parse_set(args.set))


@user_errors
def _cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run = train(cfg, args.run_dir, resume=args.resume, progress=not args.quiet, profile=args.profile,
                force_new=args.force_new)
    if env_ranks()[0] == 0:
        print(f"training complete: {run}")
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``mmdm train``."""
    p = subparsers.add_parser(
        "train", help="train a synthesis method (CPU, GPU, or several GPUs under torchrun)",
        description="Train a method on 2.5D windows. The config comes from --config (YAML, a TrainConfig), "
        "else the defaults, then the convenience flags, then --set key=value overrides. Checkpoints, "
        "TensorBoard logs (RUN/tb) and provenance go to --run-dir; an interrupted run continues with --resume.",
        epilog="examples:\n  mmdm train --method mmdm --variant full --method-config small --data data/phantom-quick "
        "--steps 2000 --run-dir runs/mmdm-small\n  mmdm train --config configs/mmdm.yaml --run-dir runs/a --resume\n"
        "  torchrun --nproc-per-node 2 -m mmdm.engine.cli train --config cfg.yaml --run-dir runs/a",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="TrainConfig YAML")
    p.add_argument("--run-dir", required=True, type=Path, help="run directory (created if missing)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its latest checkpoint (with a larger --steps than it "
                        "was trained to: continue it to the new total)")
    p.add_argument("--force-new", action="store_true",
                   help="start over in --run-dir: move its old run files (config, checkpoints, logs, records) into "
                   "RUN/superseded-<time>/ first")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set steps=500 --set data.window=5 (repeatable)")
    p.add_argument("--method", default=None, help="registered method name (see `mmdm methods`)")
    p.add_argument("--variant", default=None, help="method variant (MMDM: base, mip, naws, full)")
    p.add_argument("--method-config", default=None, help="named method configuration (MMDM: paper, small)")
    p.add_argument("--data", type=Path, default=None, help="dataset directory (the study's layout)")
    p.add_argument("--sources", nargs="+", default=None, help="source modalities, e.g. T1w T2w FLAIR")
    p.add_argument("--steps", type=int, default=None, help="total optimiser steps (overrides epochs)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (if --steps is not given)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per step and process (paper: 4)")
    p.add_argument("--seed", type=int, default=None, help="training seed")
    p.add_argument("--profile", default=None, help="free-text profile name recorded in provenance.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    return p


class _SourceAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if "=" not in values:
            parser.error(f"--source {values!r}: expected NAME=PATH, e.g. --source T1w=sub-001_T1w.nii.gz")
        name, path = values.split("=", 1)
        d = dict(getattr(namespace, "inputs", None) or {})
        d[name] = Path(path)
        namespace.inputs = d


def collect_inputs(args: argparse.Namespace) -> dict[str, Path]:
    """Modality -> path from ``--t1w``-style flags and ``--source NAME=PATH`` pairs."""
    out = dict(getattr(args, "inputs", None) or {})
    for m in MODALITY_FLAGS:
        v = getattr(args, m.lower(), None)
        if v is not None:
            out[m] = Path(v)
    return out


@user_errors
def _cmd_synthesize(args: argparse.Namespace) -> int:
    res = synthesize_files(args.run, collect_inputs(args), args.out, steps=args.steps, eta=args.eta,
                           n_samples=args.samples, batch_size=args.batch_size, scale=args.scale,
                           device=args.device, checkpoint=args.checkpoint, seed=args.seed,
                           progress=not args.quiet, amp=args.amp, allow_code=args.allow_code)
    print(f"wrote {res['mean']}" + (f" and {res['std']}" if "std" in res else ""))
    return 0


def _add_amp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--amp", choices=AMP_MODES, default="none",
                   help="precision of the networks while sampling: none (fp32, the default) or bf16 (autocast on "
                   "CUDA with bf16 or a CPU with AVX512_BF16/AMX; refused where bf16 would be emulated; the sampler's "
                   "arithmetic, the window average and the output stay fp32)")


def add_synthesize_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``mmdm synthesize``."""
    p = subparsers.add_parser(
        "synthesize", help="synthesise a TOF-MRA volume from source NIfTI files with a trained run",
        description="Whole-volume synthesis with a 2.5D sliding window (stride from the run's config, overlaps "
        "averaged). Give every source modality the run was trained on. The output has the first source's "
        "affine and header and values in [0, 1] (fraction of the TOF maximum) times --scale, a scale its "
        "NIfTI description declares: `mmdm evaluate` reads it and compares the file with a raw TOF volume "
        "divided by its maximum, as `mmdm evaluate-run` does.",
        epilog="example:\n  mmdm synthesize --run runs/mmdm-small --t1w T1.nii.gz --t2w T2.nii.gz "
        "--flair FLAIR.nii.gz --out tof.nii.gz --steps 20",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="trained run directory")
    for m in MODALITY_FLAGS:
        p.add_argument(f"--{m.lower()}", type=Path, default=None, help=f"{m} volume (NIfTI)")
    p.add_argument("--source", action=_SourceAction, metavar="NAME=PATH",
                   help="any source modality by name (repeatable), e.g. --source PDw=pd.nii.gz")
    p.add_argument("--out", required=True, type=Path, help="output NIfTI path")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the method's)")
    p.add_argument("--eta", type=float, default=None, help="sampler stochasticity (default: the method's)")
    p.add_argument("--samples", type=int, default=1, help="number of samples; >1 also writes <out>_std.nii.gz")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the [0, 1] output by this")
    p.add_argument("--checkpoint", default="latest", help="'latest', a step number, or a checkpoint path")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    _add_amp_flag(p)
    p.add_argument("--allow-code", action="store_true", help=ALLOW_CODE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synthesize, inputs=None)
    return p


@user_errors
def _cmd_evaluate_run(args: argparse.Namespace) -> int:
    summary = evaluate_run(args.run_dir, split=args.split, steps=args.steps, eta=args.eta,
                           n_samples=args.samples, batch_size=args.batch_size, device=args.device,
                           checkpoint=args.checkpoint, seed=args.seed, progress=not args.quiet, amp=args.amp,
                           allow_code=args.allow_code)
    m = summary["metrics"]
    print(f"{summary['n_subjects']} subject(s), split '{summary['split']}':")
    print(f"{'':10s}{'PSNR (dB)':>12s}{'SSIM':>10s}{'RMSE (%)':>10s}")
    print(f"{'volume':10s}{m['psnr']:12.4f}{m['ssim']:10.4f}{m['rmse']:10.3f}")
    print(f"{'axial MIP':10s}{m['mip_psnr']:12.4f}{m['mip_ssim']:10.4f}{m['mip_rmse']:10.3f}")
    v = summary.get("vessel") or {}
    if v.get("recovery") is not None:
        print(f"vessel score ({v['n_scored']} subject(s), lumen: {', '.join(v['mask_source'])}): contrast recovery "
              f"{v['recovery']:.3f}, vessel PSNR {v['psnr']:.2f} dB")
    return 0


def add_evaluate_run_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``mmdm evaluate-run``."""
    p = subparsers.add_parser(
        "evaluate-run", help="synthesise and score every subject of a split with a trained run",
        description="Write RUN/predictions/, RUN/metrics.csv (per subject) and, last, RUN/summary.json "
        "(means over subjects + provenance).")
    p.add_argument("run_dir", type=Path, help="trained run directory")
    p.add_argument("--split", default="test", help="train, val, test or all (default: test)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the method's)")
    p.add_argument("--eta", type=float, default=None, help="sampler stochasticity (default: the method's)")
    p.add_argument("--samples", type=int, default=1, help="samples per subject (>1 also writes std maps)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--checkpoint", default="latest", help="'latest', a step number, or a checkpoint path")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    _add_amp_flag(p)
    p.add_argument("--allow-code", action="store_true", help=ALLOW_CODE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_evaluate_run)
    return p


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with the three engine subcommands."""
    p = argparse.ArgumentParser(prog="python -m mmdm.engine.cli")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_train_parser(sub)
    add_synthesize_parser(sub)
    add_evaluate_run_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(user_errors(args.func)(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
