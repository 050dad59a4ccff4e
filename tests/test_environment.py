"""environment.yml must name every runtime dependency of pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names that differ from PyPI names
CONDA_ALIASES = {"torch": {"pytorch", "pytorch-gpu", "pytorch-cpu"}, "ray": {"ray-core", "ray-default"}}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_names_every_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)}
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert pip and "-e ." in pip[0]["pip"], "environment.yml must install the repo itself with pip"
    conda |= {_name(d) for d in pip[0]["pip"] if d != "-e ."}  # packages that only PyPI has
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    missing = [d for d in wanted if not ({_name(d)} | CONDA_ALIASES.get(_name(d), set())) & conda]
    assert not missing, f"environment.yml lacks {missing}"
    assert "conda-forge" in env["channels"]
    assert "pytorch-gpu" in conda


def test_jupyter_book_pinned_to_1x():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    jb = [d for d in deps if _name(d) == "jupyter-book"]
    assert jb and "<2" in jb[0] and ">=1.0.4.post1" in jb[0]
