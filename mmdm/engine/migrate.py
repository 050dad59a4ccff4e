"""Upgrading old run records: the one place that knows what records used to look like.

A run record (a run's ``config.yaml``, a checkpoint's ``config``, an evaluation's
``summary.json``) holds the resolved method config, every field, under ``method_config``;
the run is rebuilt from that alone. Records written before that held only the method's
keyword arguments, e.g. ``method_kwargs: {config: small, variant: full, ...}``, whose
meaning would change whenever the named configuration ``small`` is edited.
:func:`migrate_record` gives such a record its ``method_config`` by expanding the name
through a frozen table (``legacy_configs.yaml`` beside this module: what each name meant
when those records were made), then applying the record's other keyword arguments
(``variant``, ``sources``, overrides) with the method's ``make_config``.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from mmdm.config import ConfigError, to_dict
from mmdm.methods import METHODS

#: The frozen table of legacy named configurations (method -> name -> resolved config dict).
LEGACY_CONFIGS_FILE = Path(__file__).with_name("legacy_configs.yaml")


@lru_cache(maxsize=1)
def legacy_configs() -> dict[str, dict[str, dict[str, Any]]]:
    """The frozen table: ``{method: {config name: resolved config dict}}``."""
    return yaml.safe_load(LEGACY_CONFIGS_FILE.read_text())


def legacy_method_config(method: str, kwargs: dict[str, Any], sources: Any = None) -> dict[str, Any]:
    """The resolved config (plain dict) that ``build_method(method, **kwargs)`` built when the legacy
    record was made: ``kwargs["config"]`` (default ``"paper"``) from the frozen table, then the
    remaining keyword arguments; ``sources`` when ``kwargs`` names none (a run's ``data.sources``)."""
    table = legacy_configs().get(method)
    if table is None:
        raise ConfigError(f"a record of method '{method}' holds no method_config and the legacy table "
                          f"({LEGACY_CONFIGS_FILE.name}) has no entry for that method; rebuild it from its code")
    kw = dict(kwargs)
    name = kw.pop("config", "paper")
    if isinstance(name, str):
        if name not in table:
            raise ConfigError(f"a legacy record of method '{method}' names the configuration {name!r}, which the "
                              f"legacy table does not hold (known: {', '.join(sorted(table))})")
        base: Any = copy.deepcopy(table[name])
    else:
        base = to_dict(name)  # a config given in full (a dict) needs no table
    if sources is not None:
        kw.setdefault("sources", list(sources))
    cls = METHODS.get(method).method_class
    return to_dict(cls.make_config(base, **kw))


def migrate_record(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``record`` (a TrainConfig dict or a summary.json dict: keys ``method``,
    ``method_kwargs`` and, for a TrainConfig, ``data``) with ``method_config`` filled in when it
    is missing and the method is a registered one. A record that holds ``method_config`` or
    names code (``"module:callable"``, rebuilt from its keyword arguments) is returned unchanged."""
    method = record.get("method")
    if record.get("method_config") is not None or not isinstance(method, str) or method not in METHODS:
        return dict(record)
    sources = (record.get("data") or {}).get("sources")
    out = dict(record)
    out["method_config"] = legacy_method_config(method, record.get("method_kwargs") or {}, sources)
    return out


__all__ = ["LEGACY_CONFIGS_FILE", "legacy_configs", "legacy_method_config", "migrate_record"]
