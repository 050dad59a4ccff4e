"""How the book presents what was measured (fast; the whole book in a browser is in test_book.py):
Tables 1-3 side by side with the paper's, Fig. 3's zoomed region and colour limits, executed
notebooks without parameters cells or machine paths on the page, the book's own Sphinx extension."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmdm.study.claims import comparisons_by_claim
from mmdm.study.executed import relative_text, tidy_notebook
from mmdm.study.figures import fig3_view, zoom_box
from mmdm.study.records import METRICS, paper_results
from mmdm.study.tables import (DECIMALS, METRIC_FAMILIES, SUBJECTS_SEEDS, fmt, provenance_table, side_by_side,
                               table_rows)

ROOT = Path(__file__).resolve().parents[1]
BOOK_NOTEBOOKS = ("01_data", "04_results", "05_qualitative", "06_training", "07_claims", "08_uncertainty",
                  "09_frontier", "10_sweeps")


def _per_subject(rng: np.random.Generator, runs: list[str], n: int = 3) -> pd.DataFrame:
    rows = [{"run": r, "subject": f"sub-{i:03d}", **{m: float(rng.uniform(20, 30)) for m in METRICS}}
            for r in runs for i in range(n)]
    return pd.DataFrame(rows)


def test_side_by_side_puts_ours_beside_the_papers_value_for_every_metric():
    runs = [run for _, run in table_rows("table1")]
    ps = _per_subject(np.random.default_rng(0), runs[:-1])  # MMDM full not measured yet
    paper = paper_results().query("table == 'table1'").set_index("run")
    for family, metrics in METRIC_FAMILIES.items():
        t = side_by_side("table1", ps, metrics=metrics)
        assert list(t.index) == [label for label, _ in table_rows("table1")]
        assert t.columns.nlevels == 2
        # leading unlabelled columns (n, seeds), then every metric as (label, ours) beside (label, paper)
        labels = list(dict.fromkeys(c[0] for c in t.columns if c[0]))
        assert len(labels) == len(metrics)
        assert [c for c in t.columns if c[0]] == [(lab, who) for lab in labels for who in ("ours", "paper")]
        for (label, run), (_, row) in zip(table_rows("table1"), t.iterrows()):
            v = ps[ps.run == run]
            for m, lab in zip(metrics, labels):
                assert row[(lab, "paper")] == fmt(paper.at[run, m], m)
                if len(v):
                    assert row[(lab, "ours")] == f"{fmt(v[m].mean(), m)} ± {fmt(v[m].std(ddof=1), m)}"
                else:
                    assert row[(lab, "ours")] == "–"
            assert row[("", SUBJECTS_SEEDS)] == (f"{len(v)} × 1" if len(v) else "–")  # one seed per run here
    assert METRIC_FAMILIES["volume"] + METRIC_FAMILIES["mip"] == METRICS


def test_fewer_digits_psnr_two_ssim_three():
    assert (DECIMALS["psnr"], DECIMALS["mip_psnr"], DECIMALS["ssim"], DECIMALS["mip_ssim"]) == (2, 2, 3, 3)
    assert fmt(0.88321, "ssim") == "0.883" and fmt(33.62371, "psnr") == "33.62" and fmt(float("nan"), "psnr") == "–"


def test_comparisons_by_claim_one_table_per_claim_with_every_comparison():
    from mmdm.study.claims import evaluate_claims, paper_claims

    runs = sorted({r for c in paper_claims() for a, b, _ in c.comparisons for r in (a, b)})
    ps = _per_subject(np.random.default_rng(1), runs, n=4)
    claims, comparisons = evaluate_claims(ps, n_boot=200)
    tables = comparisons_by_claim(comparisons)
    assert [text for text, _ in tables] == [c.text for c in paper_claims()]
    for claim, (_, table) in zip(paper_claims(), tables):
        assert len(table) == len(claim.comparisons)
        assert list(table.index) == [f"{a} vs {b}" for a, b, _ in claim.comparisons]
        measured = all(m in ps for _, _, m in claim.comparisons)  # clDice: not in these records
        pattern = r"-?[\d.]+ \[-?[\d.]+, -?[\d.]+\]" if measured else "–"
        assert all(re.fullmatch(pattern, c) for c in table["A − B (95 % CI)"]), table
    assert all(t.empty for _, t in comparisons_by_claim(pd.DataFrame()))


def test_provenance_table_wall_times_in_minutes():
    runs = pd.DataFrame([{"run": "a", "profile": "smoke", "steps": 3, "n_subjects": 1, "device": "cpu",
                          "commit": "abc", "train_wall_s": 90.0, "eval_wall_s": float("nan")}])
    t = provenance_table(runs)
    assert t.loc["a", "train (min)"] == "1.5" and t.loc["a", "eval (min)"] == "–"
    assert provenance_table(pd.DataFrame()).empty


def test_zoom_box_finds_the_densest_bright_region_and_is_deterministic():
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 0.3, size=(100, 120))
    img[60:75, 10:30] = 1.0  # a dense bright patch ("vessels")
    img[5, 100] = 1.0  # a lone bright pixel elsewhere
    x0, x1, y0, y1 = zoom_box(img, frac=0.4)
    assert (x1 - x0, y1 - y0) == (40, 48)
    assert x0 <= 60 and 75 <= x1 and y0 <= 10 and 30 <= y1
    assert zoom_box(img, frac=0.4) == (x0, x1, y0, y1)
    assert zoom_box(np.zeros((10, 10))) == (0, 4, 0, 4)  # nothing bright: the first window
    with pytest.raises(ValueError, match="2D"):
        zoom_box(np.zeros(10))
    with pytest.raises(ValueError, match="non-finite"):
        zoom_box(np.full((4, 4), np.nan))


def test_fig3_zoom_is_the_same_region_for_every_method_with_its_own_limits():
    rng = np.random.default_rng(3)
    panels = {f"{who}_axial_mip": rng.uniform(0, s, size=(96, 112)).astype(np.float16)
              for who, s in (("target", 1.0), ("pred", 0.4))}
    box = zoom_box(panels["target_axial_mip"].astype(np.float32))
    x0, x1, y0, y1 = box
    for who in ("target", "pred"):
        img, (lo, hi) = fig3_view(panels, who, "zoom", box)
        crop = panels[f"{who}_axial_mip"].astype(np.float32)[x0:x1, y0:y1]
        np.testing.assert_array_equal(img, crop)
        assert (lo, hi) == (float(crop.min()), float(crop.max()))
    whole, (lo, hi) = fig3_view(panels, "pred", "axial_mip")
    assert whole.shape == (96, 112) and hi <= 0.4
    with pytest.raises(ValueError, match="box"):
        fig3_view(panels, "pred", "zoom")


def _notebook(root: str) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"papermill": {"input_path": f"{root}/notebooks/04_results.ipynb",
                                       "output_path": f"{root}/book/generated/04_results.ipynb",
                                       "parameters": {"results": f"{root}/results/smoke"}}},
            "cells": [
                {"cell_type": "code", "id": "a", "metadata": {"tags": ["parameters", "hide-input"]}, "outputs": [],
                 "execution_count": 1, "source": 'profile = "smoke"'},
                {"cell_type": "code", "id": "b", "metadata": {"tags": ["injected-parameters"]}, "outputs": [],
                 "execution_count": 2, "source": f'results = "{root}/results/smoke"'},
                {"cell_type": "code", "id": "c", "metadata": {}, "execution_count": 3, "source": "print(rec_dir)",
                 "outputs": [{"output_type": "stream", "name": "stdout",
                              "text": f"19 run records in {root}/results/smoke\ncwd {root}\nother {root}2/x\n"}]}]}


def test_tidy_notebook_hides_parameters_cells_and_makes_paths_relative(tmp_path):
    root = tmp_path / "repo"
    path = root / "book" / "generated" / "04_results.ipynb"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_notebook(str(root))))
    tidy_notebook(path, root)
    text = path.read_text()
    nb = json.loads(text)
    assert [c["metadata"]["tags"] for c in nb["cells"]] == [["parameters", "hide-input", "remove-cell"],
                                                            ["injected-parameters", "remove-cell"], []]
    assert f"{root}/" not in text and f"{root}\n" not in text
    pm = nb["metadata"]["papermill"]
    assert pm["input_path"] == "notebooks/04_results.ipynb" and pm["parameters"]["results"] == "results/smoke"
    assert nb["cells"][1]["source"] == 'results = "results/smoke"'
    assert nb["cells"][2]["outputs"][0]["text"] == f"19 run records in results/smoke\ncwd .\nother {root}2/x\n"
    tidy_notebook(path, root)  # idempotent
    assert json.loads(path.read_text()) == nb


def test_tidy_notebook_says_what_is_wrong(tmp_path):
    bad = tmp_path / "x.ipynb"
    bad.write_text("{not json")
    with pytest.raises(RuntimeError, match="not a readable notebook"):
        tidy_notebook(bad, tmp_path)
    bad.write_text("{}")
    with pytest.raises(RuntimeError, match="no list of cells"):
        tidy_notebook(bad, tmp_path)


def test_relative_text_leaves_lookalike_paths_alone():
    assert relative_text("/w/repo/a /w/repo2/b /w/repo end", ["/w/repo"]) == "a /w/repo2/b . end"
    assert relative_text("/w/repo.git", ["/w/repo"]) == "/w/repo.git"
    assert relative_text("/w/repo-x", ["/w/repo/"]) == "/w/repo-x"


@pytest.mark.parametrize("name", BOOK_NOTEBOOKS)
def test_book_notebooks_hide_their_parameters_and_write_maths_that_renders(name):
    cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    params = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1 and "remove-cell" in params[0]["metadata"]["tags"]
    for c in cells:
        if c["cell_type"] == "markdown":
            for math in re.findall(r"\$[^$]+\$", "".join(c["source"])):
                assert "\\\\" not in math, f"{name}: doubled backslash in {math!r} (shows as raw text)"


def test_book_extension_drops_repeated_inline_scripts():
    from sphinx.builders.html._assets import _JavaScript

    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    try:
        from book_html import drop_repeated_scripts
    finally:
        sys.path.remove(str(ROOT / "book" / "_ext"))
    thebe = 'const THEBE_JS_URL = "x"'
    scripts = [_JavaScript("_static/a.js"), _JavaScript(None, body=thebe), _JavaScript("_static/b.js"),
               _JavaScript("", body=thebe), _JavaScript("", body="var other = 1")]
    context = {"script_files": scripts}
    drop_repeated_scripts(None, "page", "page.html", context, None)
    assert context["script_files"] == [scripts[0], scripts[1], scripts[2], scripts[4]]


def test_machine_time_sums_the_recorded_wall_times_per_device(tmp_path):
    import json

    import pandas as pd

    from mmdm.study.tables import machine_time

    runs = pd.DataFrame({"run": ["a", "b", "c"], "device": ["cpu X", "cpu X", "GPU Y"],
                         "train_wall_s": [3600.0, 1800.0, None], "eval_wall_s": [1800.0, 1800.0, 360.0]})
    (tmp_path / "frontier").mkdir()
    (tmp_path / "frontier" / "summary.json").write_text(json.dumps({"wall_s": 5400.0}))
    text = machine_time(runs, tmp_path)
    assert "2 run record(s) on cpu X: 1.5 h of training and 1.0 h of evaluation" in text
    assert "1 run record(s) on GPU Y: 0.0 h of training and 0.1 h of evaluation (1 wall time(s) not recorded)" in text
    assert "the analyses frontier 1.5 h" in text
    assert machine_time(runs.iloc[0:0]) == ""
