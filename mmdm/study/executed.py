"""Executed notebooks made fit to publish: no parameters cell on the page, no path of the machine.

papermill writes the executed notebook with the parameters it injected (a cell tagged
``injected-parameters``) and with absolute paths: in its metadata (``input_path``,
``output_path``), in the parameters and in whatever the cells printed. :func:`tidy_notebook`
keeps all of it for provenance, but tags both parameters cells ``remove-cell`` (Jupyter Book
then leaves them off the page) and rewrites every path under the repository root relative to it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from mmdm.io import write_text

#: tags of the cells that hold a notebook's parameters (its own cell, and papermill's injected one)
PARAMETER_TAGS = ("parameters", "injected-parameters")
REMOVE_TAG = "remove-cell"


def relative_text(text: str, roots: Iterable[str | Path]) -> str:
    """``text`` with each ``root/…`` path written as ``…`` and a bare ``root`` as ``.``; a longer
    name that merely starts like a root (``/work/repo2`` for ``/work/repo``) is left alone."""
    for root in sorted({str(r).rstrip("/") for r in roots if str(r).rstrip("/")}, key=len, reverse=True):
        text = re.sub(re.escape(root) + r"(/|(?![\w.-]))", lambda m: "" if m.group(1) == "/" else ".", text)
    return text


def _relative(obj: Any, roots: list[str]) -> Any:
    if isinstance(obj, dict):
        return {k: _relative(v, roots) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative(v, roots) for v in obj]
    return relative_text(obj, roots) if isinstance(obj, str) else obj


def tidy_notebook(path: str | Path, root: str | Path) -> Path:
    """Tag the parameters cells of the executed notebook ``path`` ``remove-cell`` and make every
    path under ``root`` in it (sources, outputs, metadata) relative to ``root``; written atomically."""
    path = Path(path)
    try:
        nb = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RuntimeError(f"{path}: not a readable notebook ({err})") from err
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise RuntimeError(f"{path}: not a Jupyter notebook (no list of cells)")
    for cell in nb["cells"]:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if set(PARAMETER_TAGS) & set(tags) and REMOVE_TAG not in tags:
            tags.append(REMOVE_TAG)
    root = Path(root)
    roots = [str(root), str(root.resolve())]
    write_text(path, json.dumps(_relative(nb, roots), indent=1, ensure_ascii=False) + "\n")
    return path
