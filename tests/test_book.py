"""The study end to end: a smoke study through papermill, resumed after an interruption,
and the book built from it with numbers equal to the run records, opened in a real browser.

Every test that needs a whole study is marked slow (``make test-slow``): the smoke study of the
module fixture takes about 3.5 minutes on 2 idle cores, and the fixture runs inside whichever of
these tests comes first, so each carries :data:`STUDY_TIMEOUT`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from html import unescape
from pathlib import Path

import pandas as pd
import papermill as pm
import pytest
from helpers import study_copy

ROOT = Path(__file__).resolve().parents[1]
#: the smoke study (~3.5 min idle, several times that on a busy machine) plus what the test itself does
STUDY_TIMEOUT = 2400
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
RUN_PARAMS = {"profile", "method", "variant", "sources", "seed", "device", "option"}
AGG_PARAMS = {"profile", "results"}
DOCUMENTED = {"01_data.ipynb": {"profile", "data_dir", "build_if_missing", "subject", "seed"},
              "02_train.ipynb": RUN_PARAMS, "03_evaluate.ipynb": RUN_PARAMS, "04_results.ipynb": AGG_PARAMS,
              "05_qualitative.ipynb": AGG_PARAMS, "06_training.ipynb": AGG_PARAMS, "07_claims.ipynb": AGG_PARAMS,
              "08_uncertainty.ipynb": AGG_PARAMS, "09_frontier.ipynb": AGG_PARAMS, "10_sweeps.ipynb": AGG_PARAMS,
              "11_premise.ipynb": AGG_PARAMS, "12_robustness.ipynb": AGG_PARAMS,
              "13_viewer.ipynb": AGG_PARAMS}


def test_every_notebook_is_tested():
    assert {p.name for p in NOTEBOOKS} == set(DOCUMENTED)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_is_documented(nb):
    params = pm.inspect_notebook(str(nb))
    assert set(params) == DOCUMENTED[nb.name]
    assert all(p["help"] for p in params.values()), "every parameter needs a comment saying what it does"


def _glued(nb_path: Path) -> dict:
    """Values glued with myst_nb.glue, read back from an executed notebook."""
    out = {}
    for cell in json.loads(nb_path.read_text())["cells"]:
        for o in cell.get("outputs", []):
            meta = o.get("metadata", {}).get("scrapbook", {})
            mime = meta.get("mime_prefix", "") + "text/plain"
            if meta.get("name") and mime in o.get("data", {}):
                out[meta["name"]] = "".join(o["data"][mime])
    return out


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory, tiny_cohort):
    """A copy of the repository's study sources with a smoke study run in it: first two runs
    only (an 'interrupted' study), then the whole study."""
    from mmdm.study.runner import run_study

    work = tmp_path_factory.mktemp("study")
    with study_copy(work, ROOT, {"phantom-tiny": tiny_cohort}):
        # two runs in parallel (the --jobs path: papermill in subprocesses), then "interrupted"
        first = run_study("smoke", only=["mmdm-full", "pix2pix"], jobs=2, book=False, log=lambda s: None)
        ckpt = sorted((work / "runs" / "smoke" / "mmdm-full" / "checkpoints").glob("*.pt"))[-1]
        stamp = ckpt.stat().st_mtime_ns
        second = run_study("smoke", log=lambda s: None)
    return work, first, second, ckpt, stamp


@pytest.mark.slow
@pytest.mark.timeout(STUDY_TIMEOUT)
def test_interrupted_study_resumes_without_retraining(smoke_study):
    work, first, second, ckpt, stamp = smoke_study
    assert first == {"mmdm-full": "done", "pix2pix": "done"}
    assert second["mmdm-full"] == second["pix2pix"] == "skipped"
    # the 11 other runs, the smoke profile's seed repeat of MMDM full and its two runs without the emphasis
    assert sum(v == "done" for v in second.values()) == 14 and len(second) == 16
    assert second["mmdm-full-s1"] == "done" and second["mmdm-full-no-emphasis"] == "done"
    assert ckpt.stat().st_mtime_ns == stamp  # the completed run was not touched
    for run in second:
        assert (work / "results" / "smoke" / run / "summary.json").is_file()
        assert not list((work / "results" / "smoke" / run).glob("*.pt")), "records hold no checkpoints"
        for name in ("config.yaml", "summary.json"):  # portable: no path of the machine that ran it
            text = (work / "results" / "smoke" / run / name).read_text()
            assert str(work) not in text
        config = (work / "results" / "smoke" / run / "config.yaml").read_text()
        assert "root: data/phantom-tiny" in config


def _html_rows(page: str) -> dict[str, list[str]]:
    """Table rows of an HTML page: first cell (row label) -> the other cells' text."""
    rows = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", page, flags=re.S):
        cells = [unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", tr, re.S)]
        if cells:
            rows.setdefault(cells[0], []).append(cells[1:])
    return rows


@pytest.mark.slow
@pytest.mark.timeout(STUDY_TIMEOUT)
def test_results_page_has_every_row_with_the_records_numbers(smoke_study):
    """Each of Tables 1-3 as two tables (whole volume, axial MIP): every row holds our mean of every
    metric (the smoke profile has one test subject: no ± sd; a row with several seeds: the seed mean ±
    the seed sd) beside the paper's value."""
    from mmdm.study.records import paper_results
    from mmdm.study.tables import METRIC_FAMILIES, fmt, table_rows

    work = smoke_study[0]
    page = (work / "_build" / "html" / "book" / "generated" / "04_results.html").read_text()
    rows = _html_rows(page)
    paper = paper_results()
    n_rows = 0
    for table in ("table1", "table2", "table3"):
        for label, run in table_rows(table):
            assert label in rows, f"{table}: no row '{label}' on the results page"
            seeds = sorted(p.name for p in (work / "results" / "smoke").iterdir()
                           if p.name == run or re.fullmatch(re.escape(run) + r"-s[1-9]", p.name))
            means = {m: [pd.read_csv(work / "results" / "smoke" / r / "metrics.csv")[m].mean() for r in seeds]
                     for family in METRIC_FAMILIES.values() for m in family}
            theirs = paper[(paper.table == table) & (paper.run == run)].iloc[0]

            def ours(m):  # one seed: the mean (one test subject, no sd); several: the seed mean ± the seed sd
                v = pd.Series(means[m])
                return fmt(v.mean(), m) + (f" ± {fmt(v.std(ddof=1), m)}" if len(v) > 1 else "")

            for family in METRIC_FAMILIES.values():
                # n × seeds, then ours and the paper's for each metric of the family, side by side
                expected = [f"1 × {len(seeds)}"] + [v for m in family for v in (ours(m), fmt(theirs[m], m))]
                assert expected in rows[label], (label, expected, rows[label])
            n_rows += 1
    assert n_rows == 7 + 4 + 4


@pytest.mark.slow
@pytest.mark.timeout(STUDY_TIMEOUT)
def test_book_renders_every_page(smoke_study):
    work = smoke_study[0]
    html = work / "_build" / "html"
    assert "simulat" in (html / "data_cards" / "phantom.html").read_text().lower()
    for page in ("01_data", "04_results", "05_qualitative", "06_training", "07_claims", "08_uncertainty",
                 "09_frontier", "10_sweeps", "11_premise", "12_robustness", "13_viewer", "deviations"):
        assert (html / "book" / "generated" / f"{page}.html").is_file(), page
    data_page = (html / "book" / "generated" / "01_data.html").read_text()
    glued = _glued(work / "book" / "generated" / "01_data.ipynb")
    n_subjects = len([p for p in (work / "data" / "phantom-tiny").glob("sub-*") if p.is_dir()])
    assert int(glued["n_subjects"]) == n_subjects
    assert f"The cohort has {n_subjects}" in re.sub(r"<[^>]+>", "", " ".join(data_page.split()))
    assert data_page.count("<img") >= 3
    assert (html / "book" / "generated" / "05_qualitative.html").read_text().count("<img") >= 5  # one per view
    from mmdm.methods import METHODS, display_name

    deviations = (html / "book" / "generated" / "deviations.html").read_text()
    for name in METHODS.names():
        assert display_name(name).split(" (")[0] in deviations


@pytest.mark.slow
@pytest.mark.timeout(STUDY_TIMEOUT)
def test_vessel_metrics_use_a_segmentation_fitted_on_validation_subjects_only(smoke_study):
    import yaml

    work = smoke_study[0]
    seg = yaml.safe_load((work / "results" / "smoke" / "vessel_segmentation.yaml").read_text())
    splits = json.loads((work / "data" / "phantom-tiny" / "splits.json").read_text())
    assert seg["fitted_on"] and set(seg["fitted_on"]) <= set(splits["val"])
    for run in ("mmdm-full", "mmdm-base", "bbdm"):
        v = pd.read_csv(work / "results" / "smoke" / run / "vessel_metrics.csv")
        assert set(v.subject) <= set(splits["test"]) and v.cldice.between(0, 1).all()
    page = (work / "_build" / "html" / "book" / "generated" / "04_results.html").read_text()
    assert "clDice" in page and "Betti-0 error" in page


def _text(page: Path) -> str:
    return unescape(re.sub(r"<[^>]+>", " ", " ".join(page.read_text().split())))


@pytest.mark.slow
@pytest.mark.timeout(STUDY_TIMEOUT)
def test_seed_repeat_is_trained_with_its_seed_and_shown_beside_seed_zero(smoke_study):
    work = smoke_study[0]
    rec = work / "results" / "smoke"
    s0 = json.loads((rec / "mmdm-full" / "summary.json").read_text())
    s1 = json.loads((rec / "mmdm-full-s1" / "summary.json").read_text())
    assert s0["provenance"]["seeds"]["train"] == 0 and s1["provenance"]["seeds"]["train"] == 1
    assert s1["provenance"]["command"].startswith("papermill notebooks/02_train.ipynb")  # not the kernel launcher
    assert "-p seed 1" in s1["provenance"]["command"]
    assert s1["subjects"] == s0["subjects"] and s1["sampling"] == s0["sampling"]  # evaluated identically
    rows = _html_rows((work / "_build" / "html" / "book" / "generated" / "04_results.html").read_text())
    from mmdm.study.tables import fmt

    psnr = [pd.read_csv(rec / r / "metrics.csv").psnr.mean() for r in ("mmdm-full", "mmdm-full-s1")]
    cell = f"{fmt(sum(psnr) / 2, 'psnr')} ± {fmt(pd.Series(psnr).std(ddof=1), 'psnr')}"
    assert any("0,1" in cells and cell in cells for cells in rows["mmdm-full"]), rows["mmdm-full"]


@pytest.mark.slow
@pytest.mark.timeout(STUDY_TIMEOUT)
def test_runs_without_the_emphasis_are_trained_without_it_and_shown_beside_their_rows(smoke_study):
    import yaml

    from mmdm.study.records import load_records
    from mmdm.study.seeds import strongest_baseline
    from mmdm.study.tables import fmt

    work = smoke_study[0]
    rec = work / "results" / "smoke"
    per_subject, _ = load_records(rec)
    best = strongest_baseline(per_subject)
    for run in ("mmdm-full", best):
        plain = yaml.safe_load((rec / run / "config.yaml").read_text())
        other = yaml.safe_load((rec / f"{run}-no-emphasis" / "config.yaml").read_text())
        assert plain["emphasis"]["kind"] == "top_fraction" and other["emphasis"]["kind"] == "none"
        assert {k for k in plain if plain[k] != other[k]} == {"emphasis"}
    rows = _html_rows((work / "_build" / "html" / "book" / "generated" / "04_results.html").read_text())
    psnr = pd.read_csv(rec / "mmdm-full-no-emphasis" / "metrics.csv").psnr.mean()
    # one test subject: no sd, so the cell is "mean ± –"
    assert any(f"{fmt(psnr, 'psnr')} ± –" in cells for cells in rows["mmdm-full"]), rows["mmdm-full"]


@pytest.mark.slow
@pytest.mark.timeout(STUDY_TIMEOUT)
def test_uncertainty_record_and_page(smoke_study):
    from mmdm.study.uncertainty import load_uncertainty

    work = smoke_study[0]
    unc = load_uncertainty(work / "results" / "smoke" / "analysis" / "uncertainty")
    assert unc is not None and unc["summary"]["sampling"]["n_samples"] == 2
    t = unc["subjects"]
    assert len(t) == 1 and (t.mean_std > 0).all()  # the bridge sampler is stochastic: draws differ
    assert t.top_decile_error_share.between(0, 1).all() and len(unc["bins"]) == 10
    assert unc["panels"]["std_axial"].shape == unc["panels"]["target_axial"].shape
    page = _text(work / "_build" / "html" / "book" / "generated" / "08_uncertainty.html")
    assert f"Median Spearman correlation between uncertainty and error: {t.spearman_rho.median():.2f}" in page
    assert (work / "_build" / "html" / "book" / "generated" / "08_uncertainty.html").read_text().count("<img") >= 2


@pytest.mark.slow
@pytest.mark.timeout(STUDY_TIMEOUT)
def test_frontier_record_and_recommendation_on_the_page(smoke_study):
    from mmdm.study.frontier import load_frontier, recommend

    work = smoke_study[0]
    fr = load_frontier(work / "results" / "smoke" / "analysis" / "frontier")
    assert fr is not None
    t = fr["table"]
    assert len(t) == 2 * 2 * 2  # steps (2, 3) x strides (2, 5) x coupled/independent, one subject
    assert set(t["mode"]) == {"coupled", "independent"} and (t.wall_s > 0).all()
    assert set(fr["summary"]["warmup_s"]) == {"coupled", "independent"}  # one untimed warm-up per mode
    assert all(w > 0 for w in fr["summary"]["warmup_s"].values())
    windows = t.groupby("stride").windows.first()
    assert windows[2] > windows[5]  # a smaller stride synthesises more windows
    rec = recommend(t)
    assert rec["reference"]["steps"] == 3 and rec["reference"]["stride"] == 2 and rec["reference"]["mode"] == "coupled"
    page = _text(work / "_build" / "html" / "book" / "generated" / "09_frontier.html")
    ch = rec["choice"]
    assert f"Recommended: {ch['steps']} steps, stride {ch['stride']}, {ch['mode']}" in page


@pytest.mark.slow
@pytest.mark.timeout(STUDY_TIMEOUT)
def test_premise_robustness_and_viewer_records_and_pages(smoke_study):
    from mmdm.study import premise, robustness, viewer
    from mmdm.study.runs import study_runs

    work = smoke_study[0]
    rec = work / "results" / "smoke" / "analysis"
    pr = premise.load_premise(rec / "premise")
    assert pr is not None and set(pr["summary"]["runs"]) == {r.name for r in study_runs()}  # every Table 1-3 run
    assert set(pr["segments"].visibility) <= set(premise.CLASSES) and pr["segments"].tof_visible.any()
    page = _text(work / "_build" / "html" / "book" / "generated" / "11_premise.html")
    assert premise.findings(pr["table"], ("T1w", "T2w", "FLAIR"))[-2] in page  # the invisible-segment check
    rb = robustness.load_robustness(rec / "robustness")
    assert rb is not None and robustness.same_inputs(rb["table"])
    t = rb["table"]
    assert len(t) == 7 * (1 + 6 * 3)  # the Table 1 runs x (clean + six artefacts x three severities), one subject
    assert t[t.artefact != "clean"].input_hash.nunique() == 6 * 3  # each degraded input differs from the others
    vw = viewer.load_viewer(rec / "viewer")
    assert vw is not None and len(vw["subjects"]) == 1
    panels = next(iter(vw["subjects"].values()))
    assert list(panels)[0] == viewer.TRUTH and len(panels) == 8  # the ground truth and the seven Table 1 runs


def _forbidden_paths(work: Path, cohort: Path) -> list[str]:
    """Absolute paths of the machine that built the smoke book: none may reach a page."""
    return sorted({str(work), str(work.resolve()), str(ROOT), str(Path(cohort).resolve()), str(Path.home()) + "/"})


@pytest.mark.slow
@pytest.mark.timeout(STUDY_TIMEOUT)
def test_executed_notebooks_keep_parameters_but_pages_do_not_show_them(smoke_study, tiny_cohort):
    work = smoke_study[0]
    html = work / "_build" / "html"
    forbidden = _forbidden_paths(work, tiny_cohort)
    sources = sorted((html / "_sources" / "book" / "generated").glob("*.ipynb"))
    assert {p.stem for p in sources} >= {"01_data", "04_results", "05_qualitative", "06_training", "07_claims"}
    for nb_path in sources:
        text = nb_path.read_text()
        assert not [f for f in forbidden if f in text], f"{nb_path.name} carries a path of the building machine"
        cells = json.loads(text)["cells"]
        params = [c for c in cells if {"parameters", "injected-parameters"} & set(c["metadata"].get("tags", []))]
        assert len(params) == 2, nb_path.name  # the notebook's own and papermill's: kept for provenance
        assert all("remove-cell" in c["metadata"]["tags"] for c in params), nb_path.name
        page = (html / "book" / "generated" / f"{nb_path.stem}.html").read_text()
        assert "# Parameters" not in page and "injected-parameters" not in page, nb_path.stem
        assert 'profile = "smoke"' not in _text(html / "book" / "generated" / f"{nb_path.stem}.html")


@pytest.mark.slow
@pytest.mark.timeout(STUDY_TIMEOUT)
def test_smoke_book_in_a_real_browser(smoke_study, tiny_cohort):
    """Every page of the smoke book in headless Chromium at 1280 px (tests/book_browser.py): nothing
    sticks out of the text column, every image loaded, no console error, the maths typeset, no
    path of the building machine; a screenshot of each page under the build folder."""
    from book_browser import book_pages, check_book, find_chromium

    if find_chromium() is None:
        message = "headless Chromium missing: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it (.ci/run): its absence there is an error
        pytest.skip(message)
    work = smoke_study[0]
    html = work / "_build" / "html"
    reports = check_book(html, _forbidden_paths(work, tiny_cohort))
    assert len(reports) == len(book_pages(html)) >= 20
    problems = [p for r in reports for p in r.problems()]
    assert not problems, "\n".join(problems)
    by_page = {r.page: r for r in reports}
    for r in reports:
        assert r.viewport_width == 1280 and 600 < r.column_width < 1280, (r.page, r.viewport_width, r.column_width)
        assert r.screenshot.is_file() and r.screenshot.stat().st_size > 10_000
        assert r.screenshot.parent == html.parent / "browser-check"
    # Fig. 3: one figure per view, then the error (prediction − target) on the sagittal and coronal slices
    assert by_page["book/generated/05_qualitative.html"].n_images == 5 + 2
    # the slice viewer: one per shown test subject, every panel moved by its slider (checked in check_book)
    assert by_page["book/generated/13_viewer.html"].n_viewers == 1
    assert by_page["book/generated/06_training.html"].n_math >= 2  # the NAWS weights, typeset by MathJax
    assert by_page["book/methods.html"].n_math >= 5
    # Tables 1-3 (ours beside the paper's) fit the column: no sideways scrolling needed
    results = by_page["book/generated/04_results.html"]
    assert not [t for t in results.scrolled_tables if "paper" in t], results.scrolled_tables


@pytest.mark.slow
@pytest.mark.timeout(STUDY_TIMEOUT)
def test_published_book_from_the_committed_records_in_a_real_browser(tmp_path):
    """The standard-profile book (`make book PROFILE=standard`: the committed records, nothing
    trained) built in a copy of the repository and checked like the smoke book. Its phantom cohort
    is the repository's own when built, else built here (a few minutes)."""
    from book_browser import check_book, find_chromium

    from mmdm.study.runner import run_study

    if find_chromium() is None:
        message = "headless Chromium missing: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path / "repo"
    work.mkdir()
    cohort = ROOT / "data" / "phantom-standard"
    with study_copy(work, ROOT, {"phantom-standard": cohort} if (cohort / "splits.json").is_file() else {}):
        shutil.copytree(ROOT / "results" / "standard", work / "results" / "standard")
        shutil.copytree(ROOT / "results" / "sweeps", work / "results" / "sweeps")
        status = run_study("standard", records_only=True, log=lambda s: None)
    assert status == {}  # nothing trained
    html = work / "_build" / "html"
    reports = check_book(html, sorted({str(work), str(ROOT), str(cohort.resolve()), str(Path.home()) + "/"}))
    problems = [p for r in reports for p in r.problems()]
    assert not problems, "\n".join(problems)
    by_page = {r.page: r for r in reports}
    assert by_page["book/generated/05_qualitative.html"].n_images == 5 + 2
    assert not [t for t in by_page["book/generated/04_results.html"].scrolled_tables if "paper" in t]
    # the sweeps page: one figure per recorded sweep, plus the fp32/bf16 comparison
    from mmdm.study.sweep import recorded_sweeps

    assert by_page["book/generated/10_sweeps.html"].n_images == len(recorded_sweeps(ROOT / "results" / "sweeps")) + 1
