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
from typing import Any, Iterable

import yaml

from mmdm.config import to_dict
from mmdm.engine.migrate import migrate_record
from mmdm.engine.spec import TrainConfig, resolve_method_config

#: Fields that say where a run ran or how often it wrote files, not what it trained: the data's
#: location, the device, loader workers, checkpoint/log/image intervals, cuDNN determinism, and the
#: method's keyword arguments (compared through ``method_config``, what they resolved to).
NOT_COMPARED = ("data.root", "device", "num_workers", "checkpoint_every", "keep_last", "log_every", "image_every",
                "deterministic", "method_kwargs")
MISSING = "(not recorded)"


def _walk(old: Any, new: Any, prefix: str, out: list[tuple[str, Any, Any]]) -> None:
    """Append ``(field, old, new)`` for every leaf where the two configs differ; a sub-config that is
    ``None`` (or absent) on one side is one difference, not one per field of the other side."""
    if prefix and _ignored(prefix):
        return
    if isinstance(old, dict) and isinstance(new, dict) and (old or new):
        for k in sorted(set(old) | set(new), key=str):
            _walk(old.get(k, MISSING), new.get(k, MISSING), f"{prefix}.{k}" if prefix else str(k), out)
    elif old != new:
        out.append((prefix, old, new))


def _ignored(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in NOT_COMPARED)


def config_differences(stored: dict[str, Any], current: TrainConfig | dict[str, Any],
                       limit: int | None = 6) -> list[str]:
    """``"field: stored -> current"`` for every compared field that differs (at most ``limit``, then a
    count of the rest; ``None``: all); empty when the stored config is what ``current`` resolves to."""
    cur = resolve_method_config(current) if isinstance(current, TrainConfig) else current
    changed: list[tuple[str, Any, Any]] = []
    _walk(migrate_record(stored), migrate_record(to_dict(cur)), "", changed)
    changed.sort(key=lambda c: c[1] is MISSING)  # changed values first, then fields the stored config lacks
    diffs = [f"{k}: {a} -> {b}" for k, a, b in changed]
    if limit is not None and len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more field(s)"]
    return diffs


def stored_config(directory: str | Path) -> dict[str, Any] | None:
    """The ``config.yaml`` of a record or run directory, or None when it has none."""
    path = Path(directory) / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def stale_reasons(directory: str | Path, current: TrainConfig | dict[str, Any], limit: int | None = 6) -> list[str]:
    """Why the record or run in ``directory`` is not what ``current`` trains (empty: it is, or there
    is no stored config to compare); ``limit`` as :func:`config_differences`."""
    stored = stored_config(directory)
    return [] if stored is None else config_differences(stored, current, limit)


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


def retire(record_dir: str | Path, archive: str | Path) -> Path:
    """Move a stale analysis record into ``archive/<name>-<UTC time>/`` (kept, not deleted; outside
    ``results/`` so it is never committed by mistake) and return where it went."""
    src = Path(record_dir)
    dest = Path(archive) / f"{src.name}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dest))
    return dest


__all__ = ["MISSING", "NOT_COMPARED", "config_differences", "retire", "stale_reasons", "stored_config",
           "trained_after"]
