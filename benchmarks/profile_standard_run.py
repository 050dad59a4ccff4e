"""Where a `standard` study run spends its CPU time: training step, validation, evaluation, metrics.

A short run with the `standard` profile's resolved config (every setting the profile's, only
``--steps`` and ``--val-every`` shortened) is trained and then evaluated as the study does
(test split, the profile's sampling steps and window stride, the vessel metrics) on the first
``--eval-subjects`` test subjects, with every part of the work wrapped in a CPU timer
(``time.process_time``: this process's CPU seconds, the steady measure on a shared machine).
Each timer records the time spent inside its part minus the time of the timed parts nested in it,
so the parts add up to the whole.

The per-unit costs (per training step, per validation, per evaluated test subject) are then
scaled to a full `standard` run (``STANDARD_STEPS`` steps, a validation every ``val_every``
steps, a checkpoint every ``checkpoint_every``, the 16 test subjects), which gives the
breakdown of the full run's CPU time by part. ``--cprofile`` adds the functions with the most
own CPU time in the validation and the evaluation.

Usage::

    python benchmarks/profile_standard_run.py --runs mmdm-full pix2pix --steps 40 --val-every 20 --eval-subjects 2
    python benchmarks/profile_standard_run.py --base-code /tmp/mmdm-bench-856ee0d     # beside another commit

Results: ``benchmarks/results/cpu/standard-run-profile.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import importlib
import io
import json
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"mmdm-full": ("mmdm", "full"), "pix2pix": ("pix2pix", None)}


class PartTimer:
    """CPU seconds per named part, exclusive of the timed parts nested inside it (a stack of parts)."""

    def __init__(self) -> None:
        self.own: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [label, start, nested seconds]

    @contextlib.contextmanager
    def part(self, label: str):
        self._stack.append([label, time.process_time(), 0.0])
        try:
            yield
        finally:
            lab, start, nested = self._stack.pop()
            total = time.process_time() - start
            self.own[lab] += total - nested
            self.calls[lab] += 1
            if self._stack:
                self._stack[-1][2] += total

    def wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*a: Any, **k: Any) -> Any:
            with self.part(label):
                return fn(*a, **k)

        def gen(*a: Any, **k: Any) -> Any:  # a generator: time each resumption, not the creation
            it = fn(*a, **k)
            while True:
                with self.part(label):
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                yield item

        import inspect
        return gen if inspect.isgeneratorfunction(fn) else run


#: (module, attribute, part label): every place a part is called from (a function imported by name is
#: patched in each module that uses it). Methods of classes are given as "Class.method".
PARTS: list[tuple[str, str, str]] = [
    ("mmdm.engine.train", "Trainer.train_step", "train: step (forward, backward, optimiser)"),
    ("mmdm.engine.train", "Trainer.batches", "train: batches (crops)"),
    ("mmdm.engine.train", "Trainer.save_checkpoint", "train: checkpoints"),
    ("mmdm.engine.infer", "load_subject_volumes", "{phase}: load sources/target"),
    ("mmdm.engine.infer", "synthesize_volume", "{phase}: synthesis (window assembly)"),
    ("mmdm.engine.volume_validation", "synthesize_volume", "{phase}: synthesis (window assembly)"),
    ("mmdm.engine.volume_validation", "evaluate_volumes", "val volumes: PSNR/SSIM/MIP"),
    ("mmdm.engine.volume_validation", "phantom_vessel_scores", "val volumes: vessel contrast"),
    ("mmdm.engine.volume_validation", "load_ground_truth", "val volumes: load ground truth"),
    ("mmdm.engine.evaluate", "load_run_method", "eval: load checkpoint"),
    ("mmdm.engine.evaluate", "save_nifti", "eval: save predictions"),
    ("mmdm.engine.evaluate", "evaluate_volumes", "eval: PSNR/SSIM/MIP"),
    ("mmdm.engine.evaluate", "subject_vessel_scores", "eval: vessel contrast"),
    ("mmdm.engine.evaluate", "load_ground_truth", "eval: load ground truth"),
    ("mmdm.engine.evaluate", "region_errors", "eval: regions"),
    ("mmdm.engine.evaluate", "slice_errors", "eval: slice errors"),
    ("mmdm.study.vessel_eval", "load_volume", "eval vessels: load predictions"),
    ("mmdm.study.vessel_eval", "reference_volumes", "eval vessels: load target + ground truth"),
    ("mmdm.study.vessel_eval", "evaluate_vessels", "eval vessels: segmentation metrics"),
]


def instrument(timer: PartTimer, phase: Callable[[], str]) -> None:
    """Patch every part of :data:`PARTS` in place (labels with ``{phase}`` name the current phase)."""
    for mod_name, attr, label in PARTS:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:  # an older commit without that module
            continue
        owner, name = (mod, attr) if "." not in attr else (getattr(mod, attr.split(".")[0], None), attr.split(".")[1])
        if owner is None or not hasattr(owner, name):
            continue
        fn = getattr(owner, name)
        if "{phase}" in label:
            fn = _phased(timer, fn, label, phase)
        else:
            fn = timer.wrap(fn, label)
        setattr(owner, name, fn)
    # every method's own ``sample`` (the networks' forward passes of synthesis)
    from mmdm.methods.base import SynthesisMethod

    todo, seen = [SynthesisMethod], set()
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "sample" in vars(cls) and cls not in seen:
            seen.add(cls)
            cls.sample = _phased(timer, vars(cls)["sample"], "{phase}: synthesis (method.sample)", phase)


def _phased(timer: PartTimer, fn: Callable[..., Any], label: str, phase: Callable[[], str]) -> Callable[..., Any]:
    import inspect

    if inspect.isgeneratorfunction(fn):
        def gen(*a: Any, **k: Any) -> Any:
            yield from timer.wrap(fn, label.format(phase=phase()))(*a, **k)
        return gen

    @functools.wraps(fn)
    def run(*a: Any, **k: Any) -> Any:
        with timer.part(label.format(phase=phase())):
            return fn(*a, **k)
    return run


def _in_phase(timer: PartTimer, fn: Callable[..., Any], phase: str, label: str,
              state: dict[str, str]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*a: Any, **k: Any) -> Any:
        before, state["phase"] = state["phase"], phase
        try:
            with timer.part(label):
                return fn(*a, **k)
        finally:
            state["phase"] = before
    return run


def _scaled_config(run: str, steps: int, val_every: int):
    from mmdm.config import replace
    from mmdm.study.api import make_spec, train_config
    from mmdm.study.profiles import get_profile

    profile = get_profile("standard")
    method, variant = RUNS[run]
    spec = make_spec(method, variant, None, profile)
    full = train_config(spec, profile, seed=0, device="cpu")
    return profile, full, replace(full, {"steps": steps, "val_every": val_every})


def profile_run(run: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train and evaluate one short run with every part timed (in this process)."""
    import torch

    from mmdm.data.layout import Layout
    from mmdm.paths import project_path

    torch.set_num_threads(args.threads)
    timer = PartTimer()
    state = {"phase": "startup"}
    instrument(timer, lambda: state["phase"])
    train_mod = importlib.import_module("mmdm.engine.train")
    from mmdm.engine.evaluate import evaluate_run
    from mmdm.study.vessel_eval import cohort_segmentation, vessel_metrics

    # the Trainer's periodic work: each sets the phase its nested parts (synthesis, loading) are named by
    for attr, phase, label in (("validation_volumes", "val volumes", "val volumes: other"),
                               ("validation_vessels", "val windows", "val windows: other"),
                               ("validation_losses", "val losses", "val losses: forward passes"),
                               ("log_images", "train panels", "train: image panels")):
        setattr(train_mod.Trainer, attr, _in_phase(timer, getattr(train_mod.Trainer, attr), phase, label, state))

    # each validation's parts on their own: the first one also builds what later ones reuse
    per_validation: list[dict[str, float]] = []
    orig_validate = train_mod.Trainer.validate

    def validate(self):
        before = dict(timer.own)
        try:
            return orig_validate(self)
        finally:
            per_validation.append({k: v - before.get(k, 0.0) for k, v in timer.own.items()
                                   if v - before.get(k, 0.0) > 0})
    train_mod.Trainer.validate = validate

    profile, full, cfg = _scaled_config(run, args.steps, args.val_every)
    out = work / run
    prof = cProfile.Profile(time.process_time) if args.cprofile else None
    c0 = time.process_time()
    with timer.part("train: other (start-up, logging, loop)"):
        state["phase"] = "train"
        train_mod.train(cfg, out, progress=False, profile="standard")
    train_cpu = time.process_time() - c0
    data = project_path(profile.data_dir)
    subjects = Layout(data).split("test")[: args.eval_subjects]
    state["phase"] = "eval"
    c1 = time.process_time()
    if prof:
        prof.enable()
    with timer.part("eval: other"):
        evaluate_run(out, split="test", steps=profile.eval_sample_steps, subjects=subjects, device="cpu",
                     progress=False)
        seg = cohort_segmentation(data, ROOT / "results" / "standard" / "vessel_segmentation.yaml")
        vessel_metrics(out, data, seg, subjects)
    if prof:
        prof.disable()
    eval_cpu = time.process_time() - c1
    top = []
    if prof:
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("tottime")
        for (file, line, fn), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:25]:
            top.append({"function": f"{Path(file).name}:{line}({fn})", "calls": nc, "own_cpu_s": tt,
                        "cumulative_cpu_s": ct})
    n_val = args.steps // args.val_every
    return {"run": run, "steps": args.steps, "val_every": args.val_every, "validations": n_val,
            "eval_subjects": len(subjects), "train_cpu_s": train_cpu, "eval_cpu_s": eval_cpu,
            "parts": dict(timer.own), "calls": dict(timer.calls), "per_validation": per_validation,
            "full": {"steps": full.steps, "val_every": full.val_every, "checkpoint_every": full.checkpoint_every,
                     "image_every": full.image_every, "test_subjects": len(Layout(data).split("test"))},
            "eval_top_functions": top}


def extrapolate(r: dict[str, Any]) -> dict[str, float]:
    """Each part's CPU seconds in a full `standard` run: its cost per unit (training step, validation,
    checkpoint, image panel, evaluated subject) times the full run's number of units."""
    f = r["full"]
    units = {"train: step": (r["steps"], f["steps"]), "train: batches": (r["steps"], f["steps"]),
             "train: checkpoints": (r["calls"].get("train: checkpoints", 1), f["steps"] // f["checkpoint_every"]),
             "train panels": (max(r["calls"].get("train: image panels", 0), 1),
                              f["steps"] // f["image_every"] if f["image_every"] else 0),
             "train: image panels": (max(r["calls"].get("train: image panels", 0), 1),
                                     f["steps"] // f["image_every"] if f["image_every"] else 0),
             "val": (r["validations"], f["steps"] // f["val_every"]),
             "eval": (r["eval_subjects"], f["test_subjects"])}
    out = {}
    vals = r.get("per_validation") or []
    n_full = f["steps"] // f["val_every"]
    for part in {k for v in vals for k in v}:
        if len(vals) >= 2:  # the first validation once, the mean of the later ones for the rest
            later = sum(v.get(part, 0.0) for v in vals[1:]) / (len(vals) - 1)
            out[part] = vals[0].get(part, 0.0) + (n_full - 1) * later
        else:
            out[part] = sum(v.get(part, 0.0) for v in vals) * n_full / max(len(vals), 1)
    for part, cpu in r["parts"].items():
        if part in out:
            continue
        if part.startswith("train: other"):
            out[part] = cpu  # start-up is paid once; the loop's logging is a small per-step cost
            continue
        key = next((k for k in units if part.startswith(k)), None)
        if key is None:
            key = "eval" if part.startswith("eval") else "val"
        done, full = units[key]
        if part == "eval: load checkpoint" or part == "eval: other":
            out[part] = cpu  # once per evaluation
            continue
        out[part] = cpu * full / max(done, 1)
    return out


def _commit(res: dict[str, Any]) -> str:
    return res.get("commit") or res["machine"]["git"].get("commit", "?")[:7]


def _phase(part: str) -> str:
    return part.split(":")[0]


def markdown(res: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    """The breakdown of ``res`` (one commit's profile); with ``base`` (another commit's) beside it,
    each part's full-run CPU seconds of both and their ratio."""
    m = res["machine"]
    commit = _commit(res)
    head = f"# Where a `standard` run spends its CPU time ({commit}"
    head += f", beside {_commit(base)})" if base else ")"
    lines = [head, "",
             f"CPU {m['device_name']}, capability {m['cpu_capability']}, {res['threads']} thread, torch {m['torch']}; "
             f"load average at start {m['load_average_start']} (a 2-core machine shared with other jobs: CPU "
             "seconds, not wall, are the measure). CPU seconds of one process per run (`time.process_time`), "
             "each part without the timed parts nested in it. Measured on a short run (the `standard` profile's "
             "resolved config, only the steps and the validation interval shortened) and the evaluation of the "
             "first test subjects, then scaled per unit (training step, checkpoint, panel, test subject) to a "
             "full `standard` run; a validation's parts count as the first validation (which also loads what "
             "later ones reuse) plus the mean of the later ones for the rest. Generated by "
             "`benchmarks/profile_standard_run.py` (`--render` with `--base-json` for the side-by-side)."]
    if base:
        lines += ["", "Two processes on this shared machine differ by 10-15 % in CPU seconds for the same work "
                  "(the other jobs' load changes how long each operation waits for memory; a repeated "
                  "side-by-side of the same two commits moves the ratios by as much), so the ratios below are that noise "
                  "around the changes' few per cent; the shares of the run are what this profile is for. The changed parts are measured without it, "
                  "alternating in one process, by `benchmarks/bench_run_parts.py` (`run-parts.md`)."]
    base_runs = {r["run"]: r for r in base["runs"]} if base else {}
    for r in res["runs"]:
        full = r["full_run_estimate"]
        total = sum(full.values())
        b = base_runs.get(r["run"])
        bfull = b["full_run_estimate"] if b else {}
        btotal = sum(bfull.values()) if b else 0.0
        lines += ["", f"## {r['run']}", "",
                  f"Measured: {r['steps']} steps with {r['validations']} validations (train {r['train_cpu_s']:.0f} "
                  f"CPU s), {r['eval_subjects']} test subjects (eval {r['eval_cpu_s']:.0f} CPU s). Full `standard` "
                  f"run ({r['full']['steps']} steps, {r['full']['steps'] // r['full']['val_every']} validations, "
                  f"{r['full']['test_subjects']} test subjects), estimated: **{total:.0f} CPU s**"
                  + (f" against {btotal:.0f} at {_commit(base)} (**{total / btotal:.2f}x**)." if b else "."), ""]
        if b:
            lines += [f"| part | full run CPU s {_commit(base)} | full run CPU s {commit} | {commit} / "
                      f"{_commit(base)} | share of the run at {commit} |", "|---|---|---|---|---|"]
            parts = sorted(set(full) | set(bfull), key=lambda p: -max(full.get(p, 0.0), bfull.get(p, 0.0)))
            for part in parts:
                n, o = full.get(part, 0.0), bfull.get(part, 0.0)
                ratio = f"{n / o:.2f}" if o > 0.5 else "-"
                lines.append(f"| {part} | {o:.0f} | {n:.0f} | {ratio} | {100 * n / total:.1f} % |")
        else:
            lines += ["| part | measured CPU s (calls) | full run CPU s | share of the full run |",
                      "|---|---|---|---|"]
            for part in sorted(full, key=lambda p: -full[p]):
                lines.append(f"| {part} | {r['parts'][part]:.2f} ({r['calls'].get(part, 0)}) | {full[part]:.0f} | "
                             f"{100 * full[part] / total:.1f} % |")
        for label, est, tot in ((commit, full, total), *(((_commit(base), bfull, btotal),) if b else ())):
            groups: dict[str, float] = defaultdict(float)
            for part, v in est.items():
                groups[_phase(part)] += v
            lines += ["", f"By phase at {label}: " + ", ".join(
                f"{g} {100 * v / tot:.1f} %" for g, v in sorted(groups.items(), key=lambda kv: -kv[1])) + "."]
        if r["eval_top_functions"]:
            lines += ["", f"Evaluation at {commit}, functions with the most own CPU time (cProfile):", "",
                      "| function | calls | own CPU s | cumulative CPU s |", "|---|---|---|---|"]
            for t in r["eval_top_functions"][:12]:
                lines.append(f"| `{t['function']}` | {t['calls']} | {t['own_cpu_s']:.2f} | {t['cumulative_cpu_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=["mmdm-full", "pix2pix"], choices=sorted(RUNS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--val-every", type=int, default=20)
    p.add_argument("--eval-subjects", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cprofile", action="store_true", help="also list the evaluation's hottest functions")
    p.add_argument("--worker", help="(internal) profile this run in this process, JSON out")
    p.add_argument("--code", help="checkout whose mmdm is profiled (default: this one), e.g. a worktree of "
                   "another commit; the data and results/ are this checkout's")
    p.add_argument("--out")
    p.add_argument("--render", help="only write the markdown of this profile JSON (with --base-json beside it)")
    p.add_argument("--base-json", help="a profile JSON of another commit to show beside this one")
    p.add_argument("--base-code", help="also profile this checkout (e.g. a worktree of the last landed commit), "
                   "one process per run alternating with this one, and show it beside")
    args = p.parse_args(argv)
    if args.worker:
        with tempfile.TemporaryDirectory(prefix="mmdm-profile-") as work:
            print(json.dumps(profile_run(args.worker, args, Path(work)), default=float))
        return 0
    sys.path.insert(0, str(ROOT))
    import subprocess

    from mmdm.io import write_json, write_text

    base = json.loads(Path(args.base_json).read_text()) if args.base_json else None
    if args.render:
        res = json.loads(Path(args.render).read_text())
        base = base or res.get("base")  # a side-by-side profile keeps its base inside
        out = Path(args.out or ROOT / "benchmarks" / "results" / "cpu" / "standard-run-profile.json")
        if out.resolve() != Path(args.render).resolve():
            write_json(out, {**res, "base": base})
        write_text(out.with_suffix(".md"), markdown(res, base))
        return 0

    from benchmarks.cpu_env import machine

    def commit_of(code: Path) -> str:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True,
                              text=True).stdout.strip()

    code = Path(args.code).resolve() if args.code else ROOT
    res: dict[str, Any] = {"machine": machine(), "threads": args.threads, "runs": [], "code": str(code),
                           "commit": commit_of(code)}
    roots = {"new": code}
    if args.base_code:
        roots["base"] = Path(args.base_code).resolve()
        base = {"machine": res["machine"], "threads": args.threads, "runs": [], "code": str(roots["base"]),
                "commit": commit_of(roots["base"])}
    for i, run in enumerate(args.runs):  # one fresh process per run and commit; the commits alternate
        for which in (list(roots) if i % 2 else list(roots)[::-1]):
            env = {**os.environ, "PYTHONPATH": str(roots[which]), "MMDM_ROOT": str(ROOT)}
            env.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", run, "--steps", str(args.steps),
                   "--val-every", str(args.val_every), "--eval-subjects", str(args.eval_subjects),
                   "--threads", str(args.threads)] + (["--cprofile"] if args.cprofile and which == "new" else [])
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"worker failed ({run}, {roots[which]}):\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["full_run_estimate"] = extrapolate(r)
            r["load_average"] = [round(v, 2) for v in os.getloadavg()]
            (res if which == "new" else base)["runs"].append(r)
            print(f"[{run} {which}] train {r['train_cpu_s']:.0f} CPU s, eval {r['eval_cpu_s']:.0f} CPU s, load "
                  f"{r['load_average']}", flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / "cpu" / "standard-run-profile.json")
    write_json(out, {**res, "base": base})
    write_text(out.with_suffix(".md"), markdown(res, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
