"""Run directories: paths, status, provenance and the record files (no other engine module is imported).

One directory per run::

    RUN/
      config.yaml              the resolved TrainConfig (written before the first step)
      provenance.json          git commit, versions, device, seeds, sessions (start/end, UTC)
      checkpoints/step-*.pt    the last k checkpoints (mmdm.engine.checkpoint)
      tb/                      TensorBoard logs
      validation.jsonl         one JSON line per validation: step, losses, vessel score (mmdm.engine.validation)
      train_complete.json      written atomically after the last step -- training is done
      predictions/sub-XXX_angio.nii.gz   synthesised test volumes, [0, 1] TOF units
      metrics.csv              one row per subject: the six metrics of the paper's tables, then the
                               threshold-free vessel scores (VESSEL_SCORE_COLUMNS)
      regions.csv              one row per subject: the region breakdown (mmdm.regions.REGION_COLUMNS)
      slice_errors.csv         one row per subject and axial slice: the per-slice error profile
      summary.json             written LAST and atomically: means over the subjects + provenance
      .lock                    held (fcntl.flock) by the one process training or evaluating the run

A directory "looks finished" only when ``summary.json`` exists
(:func:`run_status`), so a run interrupted at any point is never mistaken for
a result. :class:`RecordWriter` keeps that promise for every record the
package writes (a run's evaluation, the uncertainty and frontier analyses):
it deletes ``summary.json`` when it starts and writes it, with provenance, last.

One writer per run directory: training and evaluation hold :func:`run_lock`
(an exclusive ``flock`` on ``RUN/.lock``) while they write, and a second process
is refused with a message naming the holder (pid, host, command, since when).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from mmdm import __version__
from mmdm.io import write_json, write_text
from mmdm.metrics import METRIC_KEYS

#: Packages whose versions go into provenance.json.
KEY_PACKAGES = ("torch", "numpy", "scipy", "nibabel", "torchio", "scikit-image", "pandas", "pyyaml", "tqdm",
                "tensorboard")
RUN_STATES = ("empty", "training", "trained", "evaluating", "finished")


#: File name of a run's validation log (one JSON object per line).
VALIDATION_LOG = "validation.jsonl"
#: File names of a run's region breakdown (per subject) and per-slice error profile (mmdm.regions).
REGIONS_FILE = "regions.csv"
SLICE_ERRORS_FILE = "slice_errors.csv"


@dataclass(frozen=True)
class RunPaths:
    """The files of one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def train_complete(self) -> Path:
        return self.root / "train_complete.json"

    @property
    def validation(self) -> Path:
        return self.root / VALIDATION_LOG

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def regions(self) -> Path:
        return self.root / REGIONS_FILE

    @property
    def slice_errors(self) -> Path:
        return self.root / SLICE_ERRORS_FILE

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def evaluation_progress(self) -> Path:
        """An unfinished evaluation's scores so far and its sampling RNG state (deleted when it finishes)."""
        return self.root / "evaluation_progress.json"

    @property
    def vessel_metrics(self) -> Path:
        """The study's vessel metrics of the evaluated volumes (written after the evaluation)."""
        return self.root / "vessel_metrics.csv"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def evaluation_files(self) -> list[Path]:
        """What an evaluation writes: predictions, metrics, region files, its progress, summary, vessel metrics."""
        return [self.predictions, self.metrics, self.regions, self.slice_errors, self.evaluation_progress,
                self.summary, self.vessel_metrics]

    def run_files(self) -> list[Path]:
        """Every file and folder training and evaluation write (not the lock, not older superseded runs)."""
        return [self.config, self.provenance, self.checkpoints, self.tb, self.validation, self.train_complete,
                *self.evaluation_files()]


def run_paths(run_dir: str | Path) -> RunPaths:
    return RunPaths(Path(run_dir))


def utc_now() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_status(run_dir: str | Path) -> str:
    """One of ``empty``, ``training`` (config but no train_complete.json: running or
    interrupted), ``trained`` (training done, not evaluated), ``evaluating``
    (predictions or metrics but no summary) and ``finished`` (summary.json)."""
    p = run_paths(run_dir)
    if p.summary.is_file():
        return "finished"
    if p.train_complete.is_file():
        if p.metrics.is_file() or (p.predictions.is_dir() and any(p.predictions.iterdir())):
            return "evaluating"
        return "trained"
    if p.config.is_file():
        return "training"
    return "empty"


def is_finished(run_dir: str | Path) -> bool:
    return run_status(run_dir) == "finished"


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's summary.json; an unfinished run raises with its state and what to do."""
    status = run_status(run_dir)
    if status != "finished":
        hint = {"empty": "train it with `mmdm train`", "training": "resume it with `mmdm train --resume`",
                "trained": "evaluate it with `mmdm evaluate-run`",
                "evaluating": "evaluation was interrupted: run `mmdm evaluate-run` again"}[status]
        raise RuntimeError(f"run {run_dir} is unfinished (state '{status}', no summary.json): {hint}")
    return json.loads(run_paths(run_dir).summary.read_text())


# ----------------------------------------------------------------------------
# one writer per run directory


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


def _lock_holder(fd: int) -> dict[str, Any]:
    for _ in range(20):  # the holder writes its details right after taking the lock
        raw = os.pread(fd, 65536, 0)
        if raw:
            try:
                return json.loads(raw.decode("utf-8", "replace"))
            except json.JSONDecodeError:
                pass
        time.sleep(0.05)
    return {}


@contextlib.contextmanager
def run_lock(run_dir: str | Path, purpose: str) -> Iterator[dict[str, Any]]:
    """Hold the run directory's lock (``RUN/.lock``, an exclusive ``flock``) for the block.

    The lock file names the holder (pid, host, command, purpose, since); a second process
    gets :class:`RunLockedError` with those details at once instead of waiting. The lock goes
    with the process: a killed holder leaves nothing to clean up.
    """
    p = run_paths(run_dir)
    p.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(p.lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = _lock_holder(fd)
            who = (f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')} ({h.get('purpose')}: "
                   f"{h.get('command')})") if h else "a process that has not yet said who it is"
            raise RunLockedError(f"{p.root} is in use by {who}. Wait until it finishes (or stop it if it hangs: "
                                 f"kill {h.get('pid', 'PID')} on {h.get('host', 'its host')}), or use another "
                                 "run directory.") from None
        info = {"pid": os.getpid(), "host": platform.node(), "purpose": purpose, "command": run_invocation(),
                "since": utc_now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield info
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def supersede(run_dir: str | Path, files: list[Path] | None = None, label: str | None = None) -> Path | None:
    """Move a run's files (``files``; default :meth:`RunPaths.run_files`, so that a new run can start there)
    into ``RUN/superseded-[<label>-]<UTC time>/``; returns that folder (None when there was nothing to move)."""
    p = run_paths(run_dir)
    present = [f for f in (p.run_files() if files is None else files) if f.exists()]
    if not present:
        return None
    stamp = datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')
    dest = p.root / (f"superseded-{label}-{stamp}" if label else f"superseded-{stamp}")
    dest.mkdir()
    for f in present:
        os.replace(f, dest / f.name)
    return dest


def truncate_validation_log(run_dir: str | Path, step: int) -> int:
    """Drop the ``validation.jsonl`` entries after ``step`` (a resumed run repeats those steps);
    returns how many were dropped."""
    path = run_paths(run_dir).validation
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if int(json.loads(ln)["step"]) <= step:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut off by a kill
    if len(keep) != len(lines):
        write_text(path, "".join(k + "\n" for k in keep))
    return len(lines) - len(keep)


# ----------------------------------------------------------------------------
# provenance


def git_info(cwd: str | Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the source tree (``None`` values when git is unavailable)."""
    cwd = Path(cwd) if cwd is not None else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": (bool(status) if status is not None else None)}


def package_versions(names: Sequence[str] = KEY_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None where it is not installed)."""
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def device_name(device: torch.device | str | None = None) -> str:
    """Human-readable device name: the CUDA device's name or the CPU model."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment_info(device: Any = None) -> dict[str, Any]:
    """Device name, Python/torch/CUDA/numpy versions, platform and key package versions."""
    return {
        "mmdm_version": __version__,
        "device": str(device) if device is not None else "cpu",
        "device_name": device_name(device),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
    }


#: environment variable through which a driver (the study runner) names the command behind a run
INVOCATION_ENV = "MMDM_INVOCATION"


def run_invocation() -> str:
    """What started this run: the driver's description (``MMDM_INVOCATION``) if one set it, else the
    process's command line (inside a notebook kernel that is only the kernel launcher)."""
    return os.environ.get(INVOCATION_ENV) or " ".join(sys.argv)


def start_session(run_dir: str | Path, *, profile: str | None, seed: int, device: Any, world_size: int = 1,
                  resumed_from_step: int = 0, precision: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create or extend ``provenance.json`` with a new training session (rank 0 only).
    ``precision``: how the session computed (e.g. ``{"amp": "bf16", "channels_last": False}``)."""
    p = run_paths(run_dir)
    prov: dict[str, Any] = json.loads(p.provenance.read_text()) if p.provenance.is_file() else {}
    if not prov:
        prov = {"created": utc_now(), "git": git_info(), "profile": profile, "seeds": {"train": seed},
                "command": run_invocation(), "sessions": []}
    for old in prov["sessions"]:
        if old.get("end") is None:  # killed: its wall time is the one of its last heartbeat
            old["interrupted"] = True
    session = {"start": utc_now(), "end": None, "wall_s": None, "resumed_from_step": resumed_from_step,
               "world_size": world_size, "git": git_info(), **(precision or {}), **environment_info(device)}
    if profile is not None:
        prov["profile"] = profile
    prov["sessions"].append(session)
    prov.update({k: session[k] for k in ("device", "device_name", "python", "torch", "cuda", "numpy",
                                         *(precision or {}))})
    prov["_t0"] = time.time()
    write_json(p.provenance, prov)
    return prov


def heartbeat(run_dir: str | Path, **extra: Any) -> dict[str, Any]:
    """Record that the latest session is alive (``last_seen``) and its wall time so far, so that
    a session killed later still counts, up to its last heartbeat, in ``train_wall_s``. The
    trainer calls this at every checkpoint."""
    p = run_paths(run_dir)
    if not p.provenance.is_file():
        return {}
    prov = json.loads(p.provenance.read_text())
    if not prov.get("sessions"):
        return prov
    s = prov["sessions"][-1]
    s["last_seen"] = utc_now()
    s["wall_s"] = round(time.time() - prov.get("_t0", time.time()), 3)
    s.update(extra)
    prov["train_wall_s"] = round(sum(x.get("wall_s") or 0.0 for x in prov["sessions"]), 3)
    write_json(p.provenance, prov)
    return prov


def end_session(run_dir: str | Path, **extra: Any) -> dict[str, Any]:
    """Close the latest session: end time, wall time; total wall time over sessions (a killed
    session counts with the wall time of its last :func:`heartbeat`)."""
    p = run_paths(run_dir)
    prov = json.loads(p.provenance.read_text())
    s = prov["sessions"][-1]
    s["end"] = utc_now()
    s["last_seen"] = s["end"]
    s["wall_s"] = round(time.time() - prov.pop("_t0", time.time()), 3)
    s.update(extra)
    prov["train_wall_s"] = round(sum(x.get("wall_s") or 0.0 for x in prov["sessions"]), 3)
    prov["start"] = prov["sessions"][0]["start"]
    prov["end"] = s["end"]
    write_json(p.provenance, prov)
    return prov


# ----------------------------------------------------------------------------
# record files

#: Columns of metrics.csv after the six metrics: the threshold-free vessel score of each subject
#: (:mod:`mmdm.vessel_contrast`: contrast recovery, PSNR inside the dilated vessel mask). Records
#: written before they existed lack them.
VESSEL_SCORE_COLUMNS = ("vessel_recovery", "vessel_psnr")


def write_metrics_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Atomically write per-subject metrics: subject, the six metrics, then those of
    :data:`VESSEL_SCORE_COLUMNS` that the rows carry (every row must carry the same ones)."""
    extra = [k for k in VESSEL_SCORE_COLUMNS if rows and k in rows[0]]
    if any(k not in r for r in rows for k in extra) or any(k in r for r in rows for k in VESSEL_SCORE_COLUMNS
                                                          if k not in extra):
        raise ValueError(f"rows disagree on the vessel score columns {VESSEL_SCORE_COLUMNS}: give every "
                         "subject the same columns (NaN where a score could not be computed)")
    cols = ["subject", *METRIC_KEYS, *extra]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(r[k])) if k != "subject" else r[k]) for k in cols})
    return write_text(path, buf.getvalue())


def write_table_csv(path: str | Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Atomically write ``rows`` as CSV with ``columns`` (``subject`` as text, the rest as floats at
    full precision; NaN as ``nan``), e.g. a record's regions.csv and slice_errors.csv."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (r[k] if k == "subject" else repr(float(r[k]))) for k in columns})
    return write_text(path, buf.getvalue())


def read_metrics_csv(path: str | Path) -> list[dict[str, Any]]:
    with open(path, newline="") as fh:
        return [{k: (v if k == "subject" else float(v)) for k, v in row.items()} for row in csv.DictReader(fh)]


class RecordWriter:
    """One record directory (a run's evaluation, an analysis): ``summary.json`` is deleted on
    entry and written last, atomically, so an interrupted record never looks finished.

    ``session(device)`` gives the wall-clock and environment fields of the work done since
    the writer was created; :meth:`finish` writes the summary.
    """

    def __init__(self, out_dir: str | Path, summary_name: str = "summary.json"):
        self.root = Path(out_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.summary_path = self.root / summary_name
        self.summary_path.unlink(missing_ok=True)
        self.start_clock()

    def start_clock(self) -> None:
        """(Re)start the session's clock (``start``, ``wall_s``); the writer starts it when created."""
        self.t0 = time.time()
        self.started = utc_now()

    def session(self, device: Any, git_root: str | Path | None = None) -> dict[str, Any]:
        """``start``, ``end``, ``wall_s`` (then ``git`` of ``git_root`` if given) and :func:`environment_info`."""
        out: dict[str, Any] = {"start": self.started, "end": utc_now(), "wall_s": round(time.time() - self.t0, 3)}
        if git_root is not None:
            out["git"] = git_info(git_root)
        return {**out, **environment_info(device)}

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write ``summary`` (the record is now complete) and return it."""
        write_json(self.summary_path, summary)
        return summary


def run_provenance(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``provenance.json`` without the in-session timer (``{}`` if there is none)."""
    p = run_paths(run_dir)
    prov = json.loads(p.provenance.read_text()) if p.provenance.is_file() else {}
    prov.pop("_t0", None)
    return prov
