"""Where the study's runs execute: this machine (:class:`LocalBackend`, the default: one run
after the other or ``jobs`` at a time) or the tasks of a Ray cluster (:class:`RayBackend`,
``mmdm study --backend ray``). Both have one ``map(fn, items, log)`` that returns an
:class:`Outcome` per run, so a failing run never stops the others on either.

A Ray task is one run (:func:`mmdm.study.runner.run_job`): its training notebook
(``02_train``) then its evaluation notebook (``03_evaluate``), executed by
papermill in a subprocess on whichever node the task lands on. Every node must see the same repository checkout, data
and ``runs/``/``results/`` folders (shared storage) under the same path: a run
is skipped when its record is complete, and a task that dies with its worker
(a node lost, a process killed) is retried by Ray and resumes from the last
checkpoint in the run directory. A run that fails (its notebook raises) is
reported with the path of its executed notebook and does not stop the others.

Ray is optional: ``pip install -e .[cluster]``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

BACKENDS = ("local", "ray")

#: The environment variables that set a job's CPU threads: OpenMP (torch's intra-op pool, read when
#: torch starts in the job's process), MKL and OpenBLAS (numpy/scipy in the metrics).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def job_threads(n_jobs: int, cores: int | None = None) -> int:
    """CPU threads of each of ``n_jobs`` jobs sharing ``cores`` cores (default: this machine's):
    ``cores // n_jobs``, at least 1. More threads than cores makes OpenMP's threads wait for
    descheduled siblings: on a busy 2-core machine a study process ran about 10x slower."""
    return max(1, int(cores or os.cpu_count() or 1) // max(1, int(n_jobs)))


def thread_env(threads: int) -> dict[str, str]:
    """The environment that gives a job's processes ``threads`` CPU threads (:data:`THREAD_VARS`)."""
    return {v: str(int(threads)) for v in THREAD_VARS}


def user_threads() -> str | None:
    """``OMP_NUM_THREADS`` as the user set it for this process (it then wins over the shared-out count)."""
    return os.environ.get("OMP_NUM_THREADS")


def threads_message(n_jobs: int, threads: int, cores: int | None = None, what: str = "jobs") -> str:
    """The log line that says how the cores are shared out."""
    c = int(cores or os.cpu_count() or 1)
    return (f"{n_jobs} {what} on {c} cores: {threads} thread{'s' if threads != 1 else ''} each "
            f"({', '.join(THREAD_VARS)}; torch.set_num_threads in the job)")


def set_job_threads(env: Mapping[str, str]) -> int | None:
    """In a job's own process (a Ray task): apply ``env``'s thread count to torch and to the
    environment its subprocesses inherit; returns the count (None when ``env`` sets none)."""
    n = env.get("OMP_NUM_THREADS")
    if n is None:
        return None
    os.environ.update({k: v for k, v in env.items() if k in THREAD_VARS})
    import torch  # lazy: the backends module itself needs no torch

    torch.set_num_threads(int(n))
    return int(n)


def require_ray():
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray backend needs the optional dependency ray: pip install -e '.[cluster]' "
                          "(or pip install ray); the default local backend (--backend local) needs nothing") from None
    return ray


@dataclass
class Outcome:
    """What became of one run submitted to a backend."""

    name: str
    ok: bool
    error: str | None = None
    log: str | None = None       # where to look: the run's executed notebooks
    seconds: float | None = None
    node: str | None = None


def describe_failure(e: BaseException) -> str:
    """One line for a failed run: a notebook's error (papermill's ``ename: evalue``) or the exception."""
    if getattr(e, "ename", None):
        return f"{e.ename}: {(str(getattr(e, 'evalue', '')).strip().splitlines() or [''])[0]}"
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


class LocalBackend:
    """Runs on this machine: ``jobs`` at a time (threads, each starting its notebooks' processes)."""

    def __init__(self, jobs: int = 1):
        self.jobs = max(1, int(jobs))

    def map(self, fn: Callable[..., Any], items: Sequence[tuple[str, tuple]],
            log: Callable[[str], None] = print) -> dict[str, Outcome]:
        """Run ``fn(name, *args)`` for every ``(name, args)``; outcomes by name. A run that raises
        is an outcome (its ``log``: the exception's ``notebook`` attribute, where set); the others go on."""
        def one(item: tuple[str, tuple]) -> Outcome:
            name, args = item
            try:
                info = fn(name, *args) or {}
            except Exception as e:  # noqa: BLE001 - a failed run is an outcome; the others go on
                log(f"[{name}] FAILED ({describe_failure(e)}); the other runs go on")
                return Outcome(name, False, error=describe_failure(e), log=getattr(e, "notebook", None))
            return Outcome(name, True, seconds=info.get("seconds") if isinstance(info, dict) else None)

        if self.jobs == 1:
            results = [one(it) for it in items]
        else:
            with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                results = list(pool.map(one, items))
        return {o.name: o for o in results}


class RayBackend:
    """Submit runs as Ray tasks and gather their outcomes.

    ``address``: ``None`` starts a local Ray instance (``num_cpus`` cores), ``"auto"``
    joins the cluster this machine belongs to, ``"HOST:PORT"`` a given head node.
    Resources per run: ``gpus_per_run`` (default 1 where the cluster has GPUs) and
    ``cpus_per_run`` (default: on a CPU-only cluster its cores shared out over the
    runs submitted at once, which also sets the run's thread count, :meth:`task_env`).
    ``max_retries``: how often a task whose worker died is restarted.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, gpus_per_run: float | None = None,
                 cpus_per_run: int | None = None, max_retries: int = 3):
        self.address, self.num_cpus = address, num_cpus
        self.gpus_per_run, self.cpus_per_run, self.max_retries = gpus_per_run, cpus_per_run, max_retries

    def resources(self, ray, n_runs: int) -> dict[str, float]:
        """Ray task options for each of ``n_runs`` runs submitted together."""
        total = ray.cluster_resources()
        gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 1.0)
        if gpus:
            return {"num_gpus": self.gpus_per_run or 1.0, "num_cpus": self.cpus_per_run or 1}
        share = self.cpus_per_run or max(1, int(cpus // max(1, min(n_runs, cpus))))
        return {"num_gpus": 0, "num_cpus": share}

    @staticmethod
    def task_env(env: Mapping[str, str], opts: Mapping[str, float]) -> dict[str, str]:
        """A task's environment: ``env`` and, on a CPU-only cluster, one thread per CPU the task
        holds (:func:`thread_env`) unless ``env`` sets ``OMP_NUM_THREADS`` itself."""
        out = dict(env)
        if not opts["num_gpus"] and "OMP_NUM_THREADS" not in out:
            out.update(thread_env(int(opts["num_cpus"])))
        return out

    def map(self, fn: Callable[..., Any], items: Sequence[tuple[str, tuple]],
            log: Callable[[str], None] = print) -> dict[str, Outcome]:
        """Run ``fn(*args)`` for every ``(name, args)`` as a Ray task; outcomes by name, in finishing order.

        ``args[-1]`` must be the task's environment dict; on a CPU-only cluster its thread
        variables are set to the task's cores (:meth:`task_env`).
        """
        ray = require_ray()
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, num_cpus=self.num_cpus if self.address is None else None,
                     include_dashboard=False, log_to_driver=True, configure_logging=False)
        try:
            opts = self.resources(ray, len(items))
            task = ray.remote(max_retries=self.max_retries)(fn).options(**opts)
            refs = {}
            for name, args in items:
                refs[task.remote(name, *args[:-1], self.task_env(args[-1], opts))] = name
            log(f"[ray] {len(refs)} run(s) submitted, each with {opts['num_cpus']} CPU(s) and "
                f"{opts['num_gpus']} GPU(s)" + ("" if opts["num_gpus"] else
                                               f"; {int(opts['num_cpus'])} thread(s) each ({', '.join(THREAD_VARS)})"))
            outcomes: dict[str, Outcome] = {}
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                name = refs[done[0]]
                try:
                    info = ray.get(done[0])
                    outcomes[name] = Outcome(name, True, seconds=info.get("seconds"), node=info.get("node"))
                    log(f"[ray] {name}: done on {info.get('node')} in {info.get('seconds', 0):.0f} s")
                except Exception as e:  # noqa: BLE001 - a failed run is an outcome; the others go on
                    cause = getattr(e, "cause", None) or e
                    outcomes[name] = Outcome(name, False, error=f"{type(cause).__name__}: {cause}",
                                             log=getattr(cause, "notebook", None))
                    log(f"[ray] {name}: FAILED ({type(cause).__name__}); the other runs go on")
            return outcomes
        finally:
            if started:
                ray.shutdown()
