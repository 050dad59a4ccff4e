"""`mmdm study`: execute the study's notebooks with papermill, in order, and build the book.

    cohort (01_data) -> for each run: 02_train, 03_evaluate -> 04_results, 05_qualitative,
    06_training, 07_claims -> jupyter-book build

A run whose record (``results/<profile>/<run>/summary.json``) is complete is
skipped, so an interrupted study resumes where it stopped; an interrupted
training resumes from its last checkpoint. Executed per-run notebooks are kept
in the run directory; the aggregate ones go to ``book/generated/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from mmdm.paths import project_path, repo_root
from mmdm.study.profiles import StudyProfile, get_profile
from mmdm.study.records import record_complete
from mmdm.study.runs import RunSpec, study_runs

AGGREGATE_NOTEBOOKS = ("04_results", "05_qualitative", "06_training", "07_claims")


def notebook(name: str) -> Path:
    path = project_path(Path("notebooks") / f"{name}.ipynb")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: notebook not found; run `mmdm study` from the repository checkout "
                                "(or set MMDM_ROOT to it)")
    return path


def execute(name: str, out: Path, parameters: dict, log: Callable[[str], None] = print,
            env: dict | None = None) -> Path:
    """Execute one notebook with papermill (in a subprocess when ``env`` is given, e.g. to pin a GPU)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if env is None:
        import papermill as pm

        pm.execute_notebook(str(notebook(name)), str(out), parameters=parameters, cwd=str(repo_root()),
                            progress_bar=False, kernel_name="python3")
        return out
    args = [sys.executable, "-m", "papermill", "--cwd", str(repo_root()), "--no-progress-bar", "-k", "python3",
            str(notebook(name)), str(out)]
    for k, v in parameters.items():
        args += ["-p", k, str(v)]
    proc = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"notebook {name} failed for {parameters}; see {out}\n{proc.stderr[-3000:]}")
    return out


def run_parameters(spec: RunSpec, profile: StudyProfile, seed: int, device: str | None) -> dict:
    return {"profile": profile.name, "method": spec.method, "variant": spec.variant or "",
            "sources": ",".join(spec.sources or ()), "seed": seed, "device": device or profile.device}


def select_runs(profile: StudyProfile, only: Sequence[str] | None = None) -> list[RunSpec]:
    runs = study_runs(profile.sources)
    if only:
        names = {r.name for r in runs}
        unknown = [o for o in only if o not in names]
        if unknown:
            raise KeyError(f"unknown run(s) {unknown}; the study's runs are: {', '.join(sorted(names))}")
        runs = [r for r in runs if r.name in only]
    return runs


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover
        return 0


def job_env(i: int, jobs: int, n_gpu: int, root: Path) -> dict[str, str]:
    """Environment of the ``i``-th parallel job: one GPU each where there are GPUs; on a CPU
    machine the cores shared out (``OMP_NUM_THREADS``) unless the user has set it."""
    env = {"MMDM_ROOT": str(root)}
    if n_gpu:
        env["CUDA_VISIBLE_DEVICES"] = str(i % n_gpu)
    elif "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_study(profile: str | StudyProfile = "quick", only: Sequence[str] | None = None, device: str | None = None,
              jobs: int = 1, book: bool = True, log: Callable[[str], None] = print, **profile_overrides) -> dict:
    """Run (or resume) the whole study for ``profile``; returns ``{run: "done"|"skipped"}``."""
    from mmdm.study.api import ensure_data, results_dir, runs_dir

    profile = get_profile(profile, **profile_overrides)
    root = repo_root()
    os.environ["MMDM_ROOT"] = str(root)  # notebooks resolve paths against the same root
    generated = root / "book" / "generated"
    t0 = time.time()
    log(f"study '{profile.name}' in {root}: {profile.description}")
    log("[data] building or checking the cohort")
    ensure_data(profile)
    execute("01_data", generated / "01_data.ipynb",
            {"profile": profile.cohort, "data_dir": profile.data_dir, "build_if_missing": profile.dataset == "phantom"},
            log)
    runs = select_runs(profile, only)
    todo = [r for r in runs if not record_complete(results_dir(profile) / r.name)]
    status = {r.name: "skipped" for r in runs if r not in todo}
    for name in status:
        log(f"[skip] {name}: record complete")
    n_gpu = _gpu_count() if jobs > 1 else 0

    def one(i_spec: tuple[int, RunSpec]) -> str:
        i, spec = i_spec
        params = run_parameters(spec, profile, 0, device)
        env = job_env(i, jobs, n_gpu, root) if jobs > 1 else None
        run_dir = runs_dir(profile) / spec.name
        log(f"[{i + 1}/{len(todo)}] {spec.name}: training")
        execute("02_train", run_dir / "02_train.ipynb", params, log, env)
        log(f"[{i + 1}/{len(todo)}] {spec.name}: evaluating")
        execute("03_evaluate", run_dir / "03_evaluate.ipynb", params, log, env)
        log(f"[{i + 1}/{len(todo)}] {spec.name}: done")
        return spec.name

    if jobs > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for name in pool.map(one, enumerate(todo)):
                status[name] = "done"
    else:
        for item in enumerate(todo):
            status[one(item)] = "done"
    for name in AGGREGATE_NOTEBOOKS:
        log(f"[book] {name}")
        execute(name, generated / f"{name}.ipynb", {"profile": profile.name}, log)
    if book:
        build_book(root, log)
    log(f"study '{profile.name}' finished in {time.time() - t0:.0f} s")
    return status


def build_book(root: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The deviations page, then `jupyter-book build` (warnings are errors)."""
    from mmdm.io import write_text
    from mmdm.methods import deviations_markdown

    root = root or repo_root()
    write_text(root / "book" / "generated" / "deviations.md", deviations_markdown())
    log("[book] jupyter-book build")
    exe = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run([str(exe if exe.exists() else "jupyter-book"), "build", str(root), "--warningiserror",
                           "--nitpick", "--keep-going"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("jupyter-book build failed:\n" + proc.stdout[-5000:] + proc.stderr[-3000:])
    html = root / "_build" / "html" / "index.html"
    log(f"[book] {html}")
    return html
