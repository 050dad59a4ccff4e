"""The slice viewer: 8-bit head crops on one scale, a self-contained page, and a slider that moves every panel."""

import base64
import json
import re
import zlib

import numpy as np
import pytest

from mmdm.study import viewer


def _volumes(shape=(20, 24, 16)):
    rng = np.random.default_rng(0)
    target = np.zeros(shape)
    target[4:16, 5:19, 2:14] = rng.uniform(0.2, 1.0, (12, 14, 12))
    return target, {"A": target / target.max() * 0.5, "B": np.clip(target / target.max() + 0.2, 0, 1)}


def test_head_box_holds_the_head_plus_margin_and_ignores_a_lone_bright_air_voxel():
    target = np.zeros((40, 40, 30))
    target[10:30, 12:28, 5:25] = 1.0
    target[2, 37, 28] = 0.5  # one noisy air voxel far from the head
    box = viewer.head_box(target, margin=2)
    for b, (lo, hi) in zip(box, [(10, 30), (12, 28), (5, 25)]):
        assert b.start <= lo - 2 and b.stop >= hi + 2  # the whole head and the margin
        assert b.start >= lo - 2 - 4 and b.stop <= hi + 2 + 4  # not stretched to the air voxel
    assert viewer.head_box(target, margin=40) == (slice(0, 40), slice(0, 40), slice(0, 30))  # clipped
    with pytest.raises(ValueError, match="nothing to show"):
        viewer.head_box(np.zeros((4, 4, 4)))


def test_one_intensity_scale_and_axial_orientation():
    assert viewer.to_uint8(np.array([0.0, 0.5, 1.0, 2.0, -1.0]), 1.0).tolist() == [0, 128, 255, 255, 0]
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    st = viewer.axial_stack(vol)
    assert st.shape == (4, 3, 2)
    for x, y, z in [(0, 0, 0), (1, 2, 3), (1, 0, 2)]:
        assert st[z, 2 - y, x] == vol[x, y, z]  # row 0 is the largest y (anterior up), as Fig. 3
    target, preds = _volumes()
    vols = viewer.subject_volumes(target * 7.0, preds)  # target in any units; predictions in its fractions
    assert list(vols) == [viewer.TRUTH, "A", "B"]
    box = viewer.head_box(target)
    assert {v.shape for v in vols.values()} == {tuple(b.stop - b.start for b in box[::-1])}  # (Z, Y, X) of the crop
    assert vols[viewer.TRUTH].max() == 255 and vols["A"].max() == 128  # half the target's max on the same scale
    with pytest.raises(ValueError, match="shape"):
        viewer.subject_volumes(target, {"C": np.zeros((3, 3, 3))})


def test_the_page_embeds_every_volume_losslessly_and_loads_nothing(tmp_path):
    target, preds = _volumes()
    vols = viewer.subject_volumes(target, preds)
    page = viewer.viewer_html(vols, "sub-001", title="sub-001")
    data = json.loads(re.search(r"const encoded = (\[.*?\]);", page).group(1))
    assert len(data) == 3
    for enc, v in zip(data, vols.values()):
        raw = np.frombuffer(zlib.decompress(base64.b64decode(enc)), np.uint8).reshape(v.shape)
        np.testing.assert_array_equal(raw, v)
    assert not re.search(r"(src|href)=|https?:|import\(", page)  # no network, no library
    assert page.count('class="mmdm-viewer-panel"') == 3
    with pytest.raises(ValueError, match="one shape"):
        viewer.viewer_html({"a": vols["A"], "b": vols["A"][:-1]}, "x")
    path = viewer.write_subject(tmp_path / "s.npz", vols)
    back = viewer.read_subject(path)
    assert list(back) == list(vols) and all(np.array_equal(back[k], vols[k]) for k in vols)


def test_moving_the_slider_changes_every_panel_in_headless_chromium(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from book_browser import _driver, check_viewers, find_chromium, serve

    found = find_chromium()
    if found is None:
        pytest.skip("headless Chromium missing: apt-get install chromium chromium-driver")
    target, preds = _volumes()
    vols = viewer.subject_volumes(target, preds)
    # a panel whose slices are all alike (an untrained model's flat output) keeps its pixels but follows the slider
    flat = dict(vols, C=np.repeat(vols["A"][:1], len(vols["A"]), axis=0))
    # a viewer whose script skips its last panel, and one where every panel is flat: both must be caught
    broken = viewer.viewer_html(vols, "broken").replace("vols.forEach((v, i) =>", "vols.slice(0, -1).forEach((v, i) =>")
    assert broken != viewer.viewer_html(vols, "broken")
    still = {k: np.repeat(v[:1], len(v), axis=0) for k, v in vols.items()}
    html = "<!doctype html><html><body>" + viewer.viewer_html(vols, "ok") + viewer.viewer_html(flat, "flat") \
        + broken + viewer.viewer_html(still, "still") + "</body></html>"
    (tmp_path / "index.html").write_text(html)
    with serve(tmp_path) as url:
        drv = _driver(*found)
        try:
            drv.set_script_timeout(30)
            drv.get(f"{url}/index.html")
            n, problems = check_viewers(drv)
            errors = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE" and "favicon" not in e["message"]]
        finally:
            drv.quit()
    assert n == 4 and not errors
    assert problems == ['broken: panel "B" did not follow the slider', 'broken: panel "B" did not follow the slab MIP',
                        'still: no panel changed with the slider', 'still: no panel changed with the slab MIP']


def test_the_record_is_cut_from_the_predictions_here_and_again_when_another_run_has_some(tiny_cohort, tmp_path,
                                                                                       monkeypatch):
    from mmdm.data.layout import TARGET_MODALITY, Layout
    from mmdm.io import save_nifti
    from mmdm.study.vessel_eval import reference_volumes

    monkeypatch.setenv("MMDM_ROOT", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "phantom-tiny").symlink_to(tiny_cohort)
    said = []
    assert viewer.ensure_viewer("smoke", log=said.append) is None and "no Table 1 run" in said[-1]
    s = Layout(tiny_cohort).split("test")[0]
    target, *_, affine = reference_volumes(tiny_cohort, s)

    def predict(run):
        save_nifti(tmp_path / "runs" / "smoke" / run / "predictions" / f"{s}_{TARGET_MODALITY}.nii.gz", target, affine)

    predict("mmdm-full")
    out = viewer.ensure_viewer("smoke", log=said.append)
    assert list(viewer.load_viewer(out)["subjects"][s]) == [viewer.TRUTH, "MMDM full"]
    assert viewer.ensure_viewer("smoke", log=said.append) == out and "record complete" in said[-1]
    predict("pix2pix")
    viewer.ensure_viewer("smoke", log=said.append)
    panels = viewer.load_viewer(out)["subjects"][s]
    assert list(panels) == [viewer.TRUTH, "MMDM full", "Pix2Pix"]
    np.testing.assert_array_equal(panels["Pix2Pix"], panels[viewer.TRUTH])  # the target as a prediction


def test_the_browser_check_skips_the_redirect_page_and_keeps_every_real_page(tmp_path):
    """The book's root index.html only forwards to the first page (a meta refresh); inspecting it races
    with that navigation, so the check leaves it out, and only it."""
    from book_browser import book_pages

    (tmp_path / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=book/intro.html" />\n')
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.html").write_text("<html><body><article>intro</article></body></html>")
    (tmp_path / "book" / "notes.html").write_text('<html><head><meta http-equiv="refresh" content="30"></head>'
                                                 "<body><article>a page that also refreshes</article></body></html>")
    assert [p.relative_to(tmp_path).as_posix() for p in book_pages(tmp_path)] == ["book/intro.html", "book/notes.html"]
