"""Where the study keeps things: paths relative to the repository root.

Notebooks run from ``notebooks/`` when opened interactively and from the
repository root under papermill; :func:`project_path` makes a relative path
mean the same in both cases.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root(start: str | Path | None = None) -> Path:
    """The mmdm-study checkout containing ``start`` (default: cwd), or cwd if none.

    ``MMDM_ROOT`` overrides the search.
    """
    if os.environ.get("MMDM_ROOT"):
        return Path(os.environ["MMDM_ROOT"]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for p in [here, *here.parents]:
        pp = p / "pyproject.toml"
        if pp.is_file() and 'name = "mmdm-study"' in pp.read_text(errors="ignore"):
            return p
    return here


def project_path(path: str | Path) -> Path:
    """Absolute paths unchanged; relative paths resolved against :func:`repo_root`."""
    path = Path(path)
    return path if path.is_absolute() else repo_root() / path
