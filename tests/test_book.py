"""Notebooks run under papermill with small parameters, and the book builds from them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DOCUMENTED = {"01_data.ipynb": {"profile", "data_dir", "build_if_missing", "subject", "seed"}}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_is_documented(nb):
    params = pm.inspect_notebook(str(nb))
    assert set(params) == DOCUMENTED[nb.name]
    assert all(p["help"] for p in params.values()), "every parameter needs a comment saying what it does"


def _glued(nb_path: Path) -> dict:
    """Values glued with myst_nb.glue, read back from the executed notebook."""
    out = {}
    for cell in json.loads(nb_path.read_text())["cells"]:
        for o in cell.get("outputs", []):
            meta = o.get("metadata", {}).get("scrapbook", {})
            mime = meta.get("mime_prefix", "") + "text/plain"
            if meta.get("name") and mime in o.get("data", {}):
                out[meta["name"]] = "".join(o["data"][mime])
    return out


@pytest.fixture(scope="module")
def built_book(tmp_path_factory, tiny_cohort):
    work = tmp_path_factory.mktemp("book")
    for name in ("_config.yml", "_toc.yml", "book", "data_cards"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    shutil.rmtree(work / "book" / "generated", ignore_errors=True)
    (work / "book" / "generated").mkdir()
    data = tiny_cohort
    from mmdm.cli import main as cli

    assert cli(["methods", "--deviations", "--out", str(work / "book" / "generated" / "deviations.md")]) == 0
    pm.execute_notebook(str(ROOT / "notebooks" / "01_data.ipynb"), str(work / "book" / "generated" / "01_data.ipynb"),
                        parameters={"profile": "tiny", "data_dir": str(data)}, cwd=str(work), progress_bar=False)
    proc = subprocess.run([str(Path(sys.executable).with_name("jupyter-book")), "build", str(work),
                           "--warningiserror", "--nitpick", "--keep-going"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work, data


def test_book_renders_data_card_and_notebook(built_book):
    work, data = built_book
    html = work / "_build" / "html"
    card = (html / "data_cards" / "phantom.html").read_text()
    assert "simulat" in card.lower()
    page = (html / "book" / "generated" / "01_data.html").read_text()
    glued = _glued(work / "book" / "generated" / "01_data.ipynb")
    n_subjects = len([p for p in data.glob("sub-*") if p.is_dir()])
    assert int(glued["n_subjects"]) == n_subjects
    splits = json.loads((data / "splits.json").read_text())
    assert int(glued["n_test"]) == len(splits["test"])
    # the glued numbers reach the rendered page, and the figures are embedded
    assert f"The cohort has {n_subjects}" in " ".join(page.split()).replace("<span class=\"pasted-text\">", "").replace("</span>", "")
    assert page.count("<img") >= 3


def test_deviations_page_lists_every_method(built_book):
    from mmdm.methods import DISPLAY_NAMES, METHODS, method_deviations

    work, _ = built_book
    page = (work / "_build" / "html" / "book" / "generated" / "deviations.html").read_text()
    devs = method_deviations()
    assert set(devs) == set(METHODS.names()) and all(devs.values()), "every method must list its deviations"
    for name in METHODS.names():
        assert DISPLAY_NAMES[name].split(" (")[0] in page
