"""`mmdm study`: execute the study's notebooks with papermill, in order, and build the book.

    cohort (01_data) -> for each run: 02_train, 03_evaluate -> seed runs (02/03 again) ->
    analyses (uncertainty, frontier, premise, robustness, viewer) -> 04_results, 05_qualitative,
    06_training, 07_claims, 08_uncertainty, 09_frontier, 10_sweeps, 11_premise, 12_robustness,
    13_viewer -> jupyter-book build

A run whose record (``results/<profile>/<run>/summary.json``) is complete is
skipped, so an interrupted study resumes where it stopped; an interrupted
training resumes from its last checkpoint. Executed per-run notebooks are kept
in the run directory; the aggregate ones go to ``book/generated/``.

A failing run (or analysis, or aggregate notebook) never stops the others, on
either backend: the stage finishes the rest, the aggregate notebooks show the
records that exist, and :func:`run_study` then raises :class:`StudyIncomplete`
listing every failure with the executed notebook to read.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

from mmdm.engine.rundir import INVOCATION_ENV
from mmdm.io import write_text
from mmdm.methods import deviations_markdown
from mmdm.paths import project_path, repo_root
from mmdm.study import api
from mmdm.study.backends import (BACKENDS, LocalBackend, Outcome, RayBackend, describe_failure, job_threads, require_ray,
                                 set_job_threads, thread_env, threads_message, user_threads)
from mmdm.study.executed import tidy_notebook
from mmdm.study.footing import budget_markdown, footing_markdown
from mmdm.study.frontier import ensure_frontier
from mmdm.study.premise import ensure_premise
from mmdm.study.profiles import StudyProfile, get_profile, setup_deviations
from mmdm.study.records import load_records, record_complete
from mmdm.study.stale import config_differences, evaluation_only_differences, extension_differences, stored_config
from mmdm.study.robustness import ensure_robustness
from mmdm.study.runs import RunSpec, option_spec, study_runs
from mmdm.study.seeds import resolve_seed_runs, seed_specs, split_seed
from mmdm.study.uncertainty import ensure_uncertainty
from mmdm.study.viewer import ensure_viewer

#: analyses of the trained models, after the runs (names usable with ``--only``)
ANALYSES = ("uncertainty", "frontier", "premise", "robustness", "viewer")
#: seconds a notebook's kernel may take to start (papermill's default, 60 s, is too short on a busy machine)
KERNEL_START_TIMEOUT = 300
AGGREGATE_NOTEBOOKS = ("04_results", "05_qualitative", "06_training", "07_claims", "08_uncertainty", "09_frontier",
                      "10_sweeps", "11_premise", "12_robustness", "13_viewer")


def notebook(name: str) -> Path:
    path = project_path(Path("notebooks") / f"{name}.ipynb")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: notebook not found; run `mmdm study` from the repository checkout "
                                "(or set MMDM_ROOT to it)")
    return path


#: Arguments of every notebook kernel: the kernel's own log is silenced. Every run of it was noise: a
#: local kernel warns that its TCP transport is unencrypted, and jupyter_client interrupts each kernel
#: when shutting it down, which the kernel logs as "KeyboardInterrupt caught in kernel". An error in a
#: notebook still raises papermill's PapermillExecutionError with the cell's traceback, and a kernel
#: that dies raises DeadKernelError.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=CRITICAL"]
#: Lines of a papermill subprocess's stderr that are this kernel noise (left out of error messages).
KERNEL_NOISE = ("Kernel is running over TCP without encryption", "KeyboardInterrupt caught in kernel")


def without_kernel_noise(text: str) -> str:
    """``text`` without the lines of :data:`KERNEL_NOISE`."""
    return "".join(line for line in text.splitlines(keepends=True) if not any(n in line for n in KERNEL_NOISE))


def notebook_invocation(name: str, parameters: dict) -> str:
    """The papermill command that reproduces one notebook execution, and the command that ran it."""
    args = " ".join(f"-p {k} {shlex.quote(str(v))}" for k, v in parameters.items())
    return (f"papermill notebooks/{name}.ipynb OUT.ipynb {args}".rstrip()
            + f" (run by: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])})")


@contextmanager
def _environ(name: str, value: str):
    """``os.environ[name] = value`` for the duration of the block, then as it was."""
    with environ_set({name: value}):
        yield


@contextmanager
def environ_set(values: dict[str, str]):
    """``os.environ`` updated with ``values`` for the duration of the block, then as it was."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(name: str, out: Path, parameters: dict, log: Callable[[str], None] = print,
            env: dict | None = None) -> Path:
    """Execute one notebook with papermill (in a subprocess when ``env`` is given, e.g. to pin a GPU).
    The kernel sees ``MMDM_INVOCATION``, which run provenance records as its command. The executed
    notebook is then tidied for the book (:func:`mmdm.study.executed.tidy_notebook`: parameters
    cells tagged ``remove-cell``, paths relative to the repository root)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    command = notebook_invocation(name, parameters)
    if env is None:
        import papermill as pm

        with _environ(INVOCATION_ENV, command):  # the kernel inherits this process's environment
            pm.execute_notebook(str(notebook(name)), str(out), parameters=parameters, cwd=str(repo_root()),
                                progress_bar=False, kernel_name="python3", start_timeout=KERNEL_START_TIMEOUT,
                                extra_arguments=KERNEL_ARGUMENTS)
        return tidy_notebook(out, repo_root())
    env = {**env, INVOCATION_ENV: command}
    args = [sys.executable, "-m", "papermill", "--cwd", str(repo_root()), "--no-progress-bar", "-k", "python3",
            "--start-timeout", str(KERNEL_START_TIMEOUT),
            str(notebook(name)), str(out)]
    for k, v in parameters.items():
        args += ["-p", k, str(v)]
    proc = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"notebook {name} failed for {parameters}; see {out}\n"
                           f"{without_kernel_noise(proc.stderr)[-3000:]}")
    return tidy_notebook(out, repo_root())


class StudyIncomplete(RuntimeError):
    """Some runs, analyses or notebooks of a study failed (the others finished); the message lists them."""

    def __init__(self, failures: dict[str, Outcome]):
        self.failures = failures
        lines = "\n".join(f"  {n}: {o.error}" + (f" (see {o.log})" if o.log else "") for n, o in failures.items())
        super().__init__(f"{len(failures)} part(s) of the study failed (the rest ran; the book shows the records "
                         f"that exist):\n{lines}\nFix the cause and run the same command again: finished runs are "
                         "skipped.")


def run_job(name: str, params: dict, run_dir: str, env: dict[str, str]) -> dict[str, Any]:
    """Train and evaluate one run (the body of a Ray task, :class:`mmdm.study.backends.RayBackend`);
    returns where and how long it ran."""
    t0 = time.time()
    node = platform.node()
    if "MMDM_ROOT" in env:
        os.environ["MMDM_ROOT"] = env["MMDM_ROOT"]
    threads = set_job_threads(env)  # this worker's own torch too, not only the notebooks' processes
    print(f"[ray] {name}: training on {node}" + (f" with {threads} thread(s)" if threads else ""), flush=True)
    execute("02_train", Path(run_dir) / "02_train.ipynb", params, env=env)
    print(f"[ray] {name}: evaluating on {node}", flush=True)
    execute("03_evaluate", Path(run_dir) / "03_evaluate.ipynb", params, env=env)
    return {"node": node, "seconds": time.time() - t0}


def run_parameters(spec: RunSpec, profile: StudyProfile, seed: int, device: str | None) -> dict:
    return {"profile": profile.name, "method": spec.method, "variant": spec.variant or "",
            "sources": ",".join(spec.sources or ()), "seed": seed, "device": device or profile.device,
            "option": spec.option or ""}


def select_runs(profile: StudyProfile, only: Sequence[str] | None = None) -> list[RunSpec]:
    """The profile's seed-0 runs (all, or those named in ``only``). Names in ``only`` may also be
    seed runs (``mmdm-full-s1``) of the profile's seeds; those are run by the seed stage."""
    runs = study_runs(profile.sources)
    if only:
        names = {r.name for r in runs}
        options = {f"{n}-{o}" for n in names for _, o in profile.option_runs}
        unknown = [o for o in only if o not in names and o not in ANALYSES and o not in options
                   and not (split_seed(o)[0] in names and split_seed(o)[1] in profile.seeds)]
        if unknown:
            extra = f"; the profile's run options: {', '.join(sorted({o for _, o in profile.option_runs}))}" \
                if profile.option_runs else ""
            raise KeyError(f"unknown run(s) {unknown}; the study's runs are: {', '.join(sorted(names))} "
                           f"(and NAME-sN for the profile's seeds {list(profile.seeds)}; the analyses "
                           f"{' and '.join(ANALYSES)}{extra})")
        runs = [r for r in runs if r.name in only]
    return runs


def select_seed_runs(profile: StudyProfile, only: Sequence[str] | None = None,
                     log: Callable[[str], None] = print) -> list[tuple[RunSpec, int]]:
    """The seed runs (seed > 0) of ``profile.seed_runs``, resolved against the seed-0 records."""
    if len(profile.seeds) < 2 or not profile.seed_runs:
        return []
    per_subject, _ = load_records(api.results_dir(profile))
    names, notes = resolve_seed_runs(profile.seed_runs, per_subject, profile.sources)
    for note in notes:
        log(f"[seeds] {note}")
    specs = seed_specs(names, profile.seeds, profile.sources)
    return [(spec, seed) for spec, seed in specs if not only or spec.name in only]


def select_option_runs(profile: StudyProfile, only: Sequence[str] | None = None,
                       log: Callable[[str], None] = print) -> list[tuple[RunSpec, int]]:
    """The extra runs of ``profile.option_runs`` (seed 0), "strongest-baseline" resolved against
    the seed-0 records as for the seed runs."""
    if not profile.option_runs:
        return []
    per_subject, _ = load_records(api.results_dir(profile))
    by_name = {r.name: r for r in study_runs(profile.sources)}
    out: list[tuple[RunSpec, int]] = []
    for run, option in profile.option_runs:
        names, notes = resolve_seed_runs([run], per_subject, profile.sources)
        for note in notes:
            log(f"[options] {note}")
        for name in names:
            spec = option_spec(by_name[name], option)
            if not only or spec.name in only:
                out.append((spec, 0))
    return out


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover
        return 0


def job_env(i: int, jobs: int, n_gpu: int, root: Path) -> dict[str, str]:
    """Environment of the ``i``-th of ``jobs`` jobs: the GPUs dealt out in turn where there are
    GPUs (more jobs than GPUs share them: small networks leave a GPU mostly idle in one process),
    and on every machine the CPU cores shared out (:func:`~mmdm.study.backends.job_threads`:
    cores // jobs threads, :func:`~mmdm.study.backends.thread_env`: data loading and metrics run
    on the CPU beside a GPU too) unless the user has set ``OMP_NUM_THREADS``."""
    env = {"MMDM_ROOT": str(root)}
    if n_gpu:
        env["CUDA_VISIBLE_DEVICES"] = str(i % n_gpu)
    if user_threads() is None:
        env.update(thread_env(job_threads(jobs)))
    return env


def jobs_message(jobs: int, n_gpu: int) -> str:
    """The log line that says what each job gets (GPUs, or threads on the CPU)."""
    threads = (f"OMP_NUM_THREADS={user_threads()} set by the user: kept for every job" if user_threads() is not None
               else threads_message(jobs, job_threads(jobs)))
    if n_gpu:
        share = "one GPU each" if jobs <= n_gpu else f"up to {-(-jobs // n_gpu)} per GPU"
        return f"[jobs] {jobs} job(s) on {n_gpu} GPU(s): {share}; {threads}"
    if user_threads() is not None:
        return f"[jobs] {jobs} job(s); OMP_NUM_THREADS={user_threads()} set by the user: kept for every job"
    return f"[jobs] {threads_message(jobs, job_threads(jobs))}"


def serialized(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` behind a lock: the jobs of ``--jobs N`` log from threads, and ``print`` writes a line and its
    newline separately, so two unguarded lines can run together on one line."""
    lock = threading.Lock()

    def locked(msg: str) -> None:
        with lock:
            log(msg)

    return locked


def run_study(profile: str | StudyProfile = "quick", only: Sequence[str] | None = None, device: str | None = None,
              jobs: int = 1, book: bool = True, log: Callable[[str], None] = print, records_only: bool = False,
              backend: str = "local", address: str | None = None, keep_stale: bool = False,
              **profile_overrides) -> dict:
    """Run (or resume) the whole study for ``profile``; returns ``{run: "done"|"skipped"}``, or raises
    :class:`StudyIncomplete` (after finishing everything else) when a run, analysis or notebook failed.

    ``records_only``: train, evaluate and analyse nothing; the aggregate notebooks and the book
    show the records already under ``results/<profile>`` (missing ones as not yet measured).
    ``backend``: ``"local"`` (processes on this machine, ``jobs`` at a time) or ``"ray"`` (each
    run a task of the Ray cluster at ``address``; see :mod:`mmdm.study.backends`).
    A complete record is skipped unless it was made under another config than the profile now
    gives its run (:func:`mmdm.study.stale.stale_reasons`): such a run is trained and evaluated
    again and its record replaced, unless ``keep_stale``."""
    if backend not in BACKENDS:
        raise KeyError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "ray":
        require_ray()  # before any work: say how to install it
    log = serialized(log)
    profile = get_profile(profile, **profile_overrides)
    first_runs = [] if records_only else select_runs(profile, only)  # an unknown --only name: before any work
    root = repo_root()
    os.environ["MMDM_ROOT"] = str(root)  # notebooks resolve paths against the same root
    generated = root / "book" / "generated"
    t0 = time.time()
    log(f"study '{profile.name}' in {root}: {profile.description}")
    log("[data] building or checking the cohort")
    api.ensure_data(profile)
    try:  # every later step needs the cohort: a failure here ends the study, in one message
        execute("01_data", generated / "01_data.ipynb",
                {"profile": profile.cohort, "data_dir": profile.data_dir,
                 "build_if_missing": profile.dataset == "phantom"}, log)
    except Exception as e:  # noqa: BLE001 - reported with the executed notebook to read
        raise StudyIncomplete({"01_data": Outcome("01_data", False, describe_failure(e),
                                                  str(generated / "01_data.ipynb"))}) from e
    n_gpu = _gpu_count() if jobs > 1 else 0
    if backend == "local":
        log(jobs_message(jobs, n_gpu))
    status: dict[str, str] = {}

    failures: dict[str, Outcome] = {}

    def one(name: str, i: int, n: int, spec: RunSpec, seed: int) -> dict[str, Any]:
        params = run_parameters(spec, profile, seed, device)
        env = job_env(i, jobs, n_gpu, root)
        run_dir = api.runs_dir(profile) / spec.name
        for nb, what in (("02_train", "training"), ("03_evaluate", "evaluating")):
            log(f"[{i + 1}/{n}] {spec.name}: {what}")
            try:
                if jobs > 1:  # a papermill subprocess with the job's environment
                    execute(nb, run_dir / f"{nb}.ipynb", params, log, env)
                else:  # in this process; the notebook's kernel inherits the environment set here
                    with environ_set(env):
                        execute(nb, run_dir / f"{nb}.ipynb", params, log)
            except Exception as e:
                e.notebook = str(run_dir / f"{nb}.ipynb")  # the executed notebook shows the failing cell
                raise
        log(f"[{i + 1}/{n}] {spec.name}: done")
        return {}

    def stage(items: list[tuple[RunSpec, int]]) -> None:
        todo = []
        for spec, seed in items:
            record = api.results_dir(profile) / spec.name
            if not record_complete(record):
                todo.append((spec, seed))
                continue
            cfg = api.train_config(spec, profile, seed, device)
            stored = stored_config(record)  # read once for both questions
            why = config_differences(stored, cfg) if stored is not None else []
            if why and not keep_stale:
                redo = ("evaluating it again with the trained model kept" if evaluation_only_differences(stored, cfg)
                        else f"continuing its training to {cfg.steps} steps" if extension_differences(stored, cfg)
                        else "re-making it")
                log(f"[stale] {spec.name}: its record was made under another config ({'; '.join(why)}); "
                    f"{redo} (the old record stays until the new one is complete; --keep-stale keeps it)")
                todo.append((spec, seed))
            else:
                status[spec.name] = "skipped"
                log(f"[skip] {spec.name}: record complete" + (f", kept (--keep-stale) although made under another "
                                                              f"config: {'; '.join(why)}" if why else ""))
        if not todo:
            return
        if backend == "ray":
            outcomes = RayBackend(address).map(run_job, [
                (spec.name, (run_parameters(spec, profile, seed, device), str(api.runs_dir(profile) / spec.name),
                             {"MMDM_ROOT": str(root)})) for spec, seed in todo], log)
        else:
            outcomes = LocalBackend(jobs).map(one, [(spec.name, (i, len(todo), spec, seed))
                                                    for i, (spec, seed) in enumerate(todo)], log)
        for name, o in outcomes.items():
            status[name] = "done" if o.ok else "failed"
            if not o.ok:
                failures[name] = o if o.log else Outcome(name, False, o.error, str(api.runs_dir(profile) / name))

    def attempt(name: str, fn: Callable[[], Any], where: Path) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded; the rest of the study goes on
            failures[name] = Outcome(name, False, describe_failure(e), str(where))
            status[name] = "failed"
            log(f"[{name}] FAILED ({describe_failure(e)}); the rest of the study goes on")

    if records_only:
        log(f"[records] the book shows the records in {api.results_dir(profile)}; nothing is trained")
    else:
        stage([(r, 0) for r in first_runs])
        seed_items = select_seed_runs(profile, only, log)
        if seed_items:
            log(f"[seeds] {len(seed_items)} seed run(s): {', '.join(r.name for r, _ in seed_items)}")
        stage(seed_items)
        option_items = select_option_runs(profile, only, log)
        if option_items:
            log(f"[options] {len(option_items)} run(s) with a changed set-up: "
                f"{', '.join(r.name for r, _ in option_items)}")
        stage(option_items)

        for name, ensure in (("uncertainty", ensure_uncertainty), ("frontier", ensure_frontier),
                             ("premise", ensure_premise), ("robustness", ensure_robustness),
                             ("viewer", ensure_viewer)):
            if not only or name in only:
                attempt(name, lambda ensure=ensure: ensure(profile, device, log), api.results_dir(profile) / name)
    if failures:
        log(f"[book] {len(failures)} part(s) failed ({', '.join(failures)}); the pages show the records that exist "
            "and list the missing ones as not yet measured")
    for name in AGGREGATE_NOTEBOOKS:
        log(f"[book] {name}")
        out = generated / f"{name}.ipynb"
        attempt(name, lambda name=name, out=out: execute(name, out, {"profile": profile.name}, log), out)
    if book:
        attempt("book", lambda: build_book(root, log, profile), root / "_build")
    log(f"study '{profile.name}' finished in {time.time() - t0:.0f} s")
    if failures:
        raise StudyIncomplete(failures)
    return status


def write_generated_markdown(root: Path, profile: StudyProfile) -> None:
    """``book/generated/``: deviations.md, footing.md (:func:`mmdm.study.footing.footing_markdown` of the
    profile's records) and budgets.md (:func:`mmdm.study.footing.budget_markdown` of the profile)."""
    gen = root / "book" / "generated"
    write_text(gen / "deviations.md", deviations_markdown(setup_deviations()))
    write_text(gen / "footing.md", footing_markdown(api.results_dir(profile), profile))
    write_text(gen / "budgets.md", budget_markdown(profile))


def build_book(root: Path | None = None, log: Callable[[str], None] = print,
               profile: StudyProfile | str = "standard") -> Path:
    """The generated Markdown (the deviations page; the methods page's footing table and the limitations
    page's budget sentences, from ``profile`` and its records), then `jupyter-book build` (warnings are
    errors)."""
    root = root or repo_root()
    profile = get_profile(profile)
    write_generated_markdown(root, profile)
    log("[book] jupyter-book build")
    exe = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run([str(exe if exe.exists() else "jupyter-book"), "build", str(root), "--warningiserror",
                           "--nitpick", "--keep-going"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("jupyter-book build failed:\n" + proc.stdout[-5000:] + proc.stderr[-3000:])
    html = root / "_build" / "html" / "index.html"
    log(f"[book] {html}")
    return html
