"""Whether a run record or a run directory was made under the config its profile now gives the run.

A study skips a run whose record is complete. When the profile has changed since (more steps,
another weight-average rule, a new set-up), the record no longer shows what the profile
describes, and skipping it would publish the old numbers under the new description.
:func:`config_differences` compares a stored config (a record's or a run directory's
``config.yaml``; old records are upgraded by :func:`mmdm.engine.migrate.migrate_record`) with the
resolved :class:`~mmdm.engine.spec.TrainConfig` the profile gives the run now, field by field.
Only fields that change what is trained or measured count (:data:`NOT_COMPARED` lists the rest).
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from mmdm.config import from_dict, to_dict
from mmdm.engine.migrate import migrate_record
from mmdm.engine.rundir import run_lock, run_paths, supersede
from mmdm.engine.spec import EVALUATION_ONLY, TrainConfig, extends, resolve_method_config
from mmdm.io import write_text

#: Fields that say where a run ran or how often it wrote files, not what it trained: the data's
#: location, the device, loader workers, checkpoint/log/image intervals, cuDNN determinism, and the
#: method's keyword arguments (compared through ``method_config``, what they resolved to).
NOT_COMPARED = ("data.root", "device", "num_workers", "checkpoint_every", "keep_last", "log_every", "image_every",
                "deterministic", "method_kwargs")
MISSING = "(not recorded)"


def _walk(old: Any, new: Any, prefix: str, out: list[tuple[str, Any, Any]]) -> None:
    """Append ``(field, old, new)`` for every leaf where the two configs differ; a sub-config that is
    ``None`` (or absent) on one side is one difference, not one per field of the other side."""
    if prefix and _under(prefix, NOT_COMPARED):
        return
    if isinstance(old, dict) and isinstance(new, dict) and (old or new):
        for k in sorted(set(old) | set(new), key=str):
            _walk(old.get(k, MISSING), new.get(k, MISSING), f"{prefix}.{k}" if prefix else str(k), out)
    elif old != new:
        out.append((prefix, old, new))


def _under(key: str, names: tuple[str, ...]) -> bool:
    """Whether a dotted field ``key`` is one of ``names`` or lies inside one of them."""
    return any(key == n or key.startswith(n + ".") for n in names)


def _differences(stored: dict[str, Any], current: TrainConfig | dict[str, Any]) -> list[tuple[str, Any, Any]]:
    cur = resolve_method_config(current) if isinstance(current, TrainConfig) else current
    changed: list[tuple[str, Any, Any]] = []
    _walk(migrate_record(stored), migrate_record(to_dict(cur)), "", changed)
    changed.sort(key=lambda c: c[1] is MISSING)  # changed values first, then fields the stored config lacks
    return changed


def config_differences(stored: dict[str, Any], current: TrainConfig | dict[str, Any],
                       limit: int | None = 6, training_only: bool = False) -> list[str]:
    """``"field: stored -> current"`` for every compared field that differs (at most ``limit``, then a
    count of the rest; ``None``: all); empty when the stored config is what ``current`` resolves to.
    ``training_only``: leave out the fields of :data:`EVALUATION_ONLY`."""
    changed = [c for c in _differences(stored, current) if not (training_only and _under(c[0], EVALUATION_ONLY))]
    diffs = [f"{k}: {a} -> {b}" for k, a, b in changed]
    if limit is not None and len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more field(s)"]
    return diffs


def evaluation_only_differences(stored: dict[str, Any], current: TrainConfig | dict[str, Any]) -> list[str]:
    """The differences when every one is in :data:`EVALUATION_ONLY` (the trained model still holds), else []."""
    changed = _differences(stored, current)
    if not changed or not all(_under(k, EVALUATION_ONLY) for k, _, _ in changed):
        return []
    return [f"{k}: {a} -> {b}" for k, a, b in changed]


def extension_differences(stored: dict[str, Any], current: TrainConfig | dict[str, Any]) -> list[str]:
    """The differences when ``current`` is the stored run with a larger total of steps (evaluation settings aside:
    :func:`mmdm.engine.spec.extends`, the test the engine applies when it continues such a run), else []."""
    cfg = current if isinstance(current, TrainConfig) else from_dict(TrainConfig, current)
    if not extends(stored, cfg):
        return []
    return [f"{k}: {a} -> {b}" for k, a, b in _differences(stored, current)]


def stored_config(directory: str | Path) -> dict[str, Any] | None:
    """The ``config.yaml`` of a record or run directory, or None when it has none."""
    path = Path(directory) / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def stale_reasons(directory: str | Path, current: TrainConfig | dict[str, Any], limit: int | None = 6,
                  training_only: bool = False) -> list[str]:
    """Why the record or run in ``directory`` is not what ``current`` trains and evaluates (empty: it is, or
    there is no stored config to compare); ``limit`` and ``training_only`` as :func:`config_differences`."""
    stored = stored_config(directory)
    return [] if stored is None else config_differences(stored, current, limit, training_only)


def prepare_re_evaluation(run_dir: str | Path, current: TrainConfig | dict[str, Any]) -> tuple[list[str], Path | None]:
    """When a run differs from ``current`` only in evaluation settings (:data:`EVALUATION_ONLY`):
    write those settings into its ``config.yaml`` and move its evaluation's files (predictions, metrics,
    region files, summary, vessel metrics), if any, into ``RUN/superseded-eval-<UTC time>/``, so that a
    trained run is trained and not yet evaluated and an interrupted one resumes its training (which those
    settings do not touch). Returns the differences and where the files went (``([], None)``: nothing to
    do; ``(diffs, None)``: no evaluation to move). The checkpoints, validation log and training record stay."""
    stored = stored_config(run_dir)
    p = run_paths(run_dir)
    if stored is None:
        return [], None
    diffs = evaluation_only_differences(stored, current)
    if not diffs:
        return [], None
    cur = to_dict(resolve_method_config(current) if isinstance(current, TrainConfig) else current)
    with run_lock(p.root, "re-evaluation"):
        for key in EVALUATION_ONLY:  # only these fields change; everything else stays as trained
            *parents, leaf = key.split(".")
            src, dst = cur, stored
            for k in parents:
                src, dst = src.get(k, {}), dst.setdefault(k, {})
            if leaf in src:
                dst[leaf] = src[leaf]
        dest = supersede(p.root, p.evaluation_files(), "eval")
        write_text(p.config, yaml.safe_dump(stored, sort_keys=False))  # atomic: temporary file, then rename
    return diffs, dest


def trained_after(record_dir: str | Path, run_dirs: Iterable[str | Path]) -> list[str]:
    """The runs among ``run_dirs`` whose training finished (``train_complete.json``'s ``finished``) after
    the analysis record in ``record_dir`` was started (its ``summary.json``'s ``start``): the record
    was measured with an older model of each. Empty when the record is not complete or says no start."""
    path = Path(record_dir) / "summary.json"
    start = json.loads(path.read_text()).get("start") if path.is_file() else None
    if not isinstance(start, str):
        return []
    start_t = datetime.fromisoformat(start)
    out = []
    for d in run_dirs:
        tc = Path(d) / "train_complete.json"
        finished = json.loads(tc.read_text()).get("finished") if tc.is_file() else None
        if isinstance(finished, str) and datetime.fromisoformat(finished) > start_t:
            out.append(Path(d).name)
    return out


def model_stamp(run_dir: str | Path) -> str | None:
    """Names the trained model in ``run_dir``: when its training finished (``train_complete.json``'s
    ``finished``); None while it is not trained. A run trained again gets a new stamp."""
    tc = Path(run_dir) / "train_complete.json"
    finished = json.loads(tc.read_text()).get("finished") if tc.is_file() else None
    return finished if isinstance(finished, str) else None


def predictions_stamp(run_dir: str | Path) -> str | None:
    """Names the predictions written in ``run_dir``: when its evaluation finished (``summary.json``'s
    ``evaluation.end``); None while they are unfinished. A run evaluated again gets a new stamp."""
    path = Path(run_dir) / "summary.json"
    end = (json.loads(path.read_text()).get("evaluation") or {}).get("end") if path.is_file() else None
    return end if isinstance(end, str) else None


_ABSENT = object()  # a row written before analyses recorded stamps

#: What an analysis reads of a run: its trained model (it samples) or its written predictions (it scores them).
STAMPS: dict[str, Callable[[str | Path], str | None]] = {"models": model_stamp, "predictions": predictions_stamp}


def stamps(runs: Mapping[str, str | Path], kind: str) -> dict[str, str | None]:
    """``{run: stamp}`` of ``kind`` (a key of :data:`STAMPS`) for every run, to be recorded by an analysis."""
    return {name: STAMPS[kind](d) for name, d in runs.items()}


def changed_inputs(recorded: Mapping[str, Any], runs: Mapping[str, str | Path], kind: str) -> list[str]:
    """The runs among ``runs`` that an analysis recorded (``recorded``: its ``{run: stamp}``) whose model or
    predictions (``kind``) here are not the ones it read. A run with none here (not trained or evaluated in
    this checkout) is not counted: the record is all there is of it."""
    now = {n: STAMPS[kind](d) for n, d in runs.items() if n in recorded}
    return [n for n, stamp in now.items() if stamp is not None and stamp != recorded[n]]


def keep_current_rows(rows: list[dict[str, Any]], runs: Mapping[str, str | Path], kind: str,
                      column: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of an unfinished analysis that were measured with what ``runs`` hold now (the row's
    ``column`` equals the run's current stamp), and the runs whose rows were dropped: an analysis that
    resumes after a run was trained or evaluated again measures that run anew instead of mixing models.
    An empty stamp (a table's NaN) stands for None: no finished training or evaluation to name, as now
    or not. Rows of a run not in ``runs`` or without ``column`` (written before stamps) are dropped too."""
    now = stamps(runs, kind)
    keep, dropped = [], []
    for r in rows:
        name = r.get("run")
        stamp = r.get(column, _ABSENT)
        if stamp is not _ABSENT and not isinstance(stamp, str):
            stamp = None
        if name in now and stamp is not _ABSENT and stamp == now[name]:
            keep.append(r)
        elif name not in dropped:
            dropped.append(name)
    return keep, dropped


def retire(record_dir: str | Path, archive: str | Path) -> Path:
    """Move a stale analysis record into ``archive/<name>-<UTC time>/`` (kept, not deleted; outside
    ``results/`` so it is never committed by mistake) and return where it went."""
    src = Path(record_dir)
    dest = Path(archive) / f"{src.name}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dest))
    return dest


__all__ = ["EVALUATION_ONLY", "MISSING", "NOT_COMPARED", "STAMPS", "changed_inputs", "config_differences",
           "evaluation_only_differences", "extension_differences", "keep_current_rows", "model_stamp", "predictions_stamp",
           "prepare_re_evaluation", "retire", "stale_reasons", "stamps", "stored_config", "trained_after"]
