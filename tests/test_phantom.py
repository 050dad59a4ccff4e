"""The digital phantom: physics, vessel tree, rendering, visibility, layout, determinism."""

from __future__ import annotations

import dataclasses
import json
from collections import deque

import nibabel as nib
import numpy as np
import pytest
from scipy import optimize

from mmdm.config import ConfigError, from_dict, to_dict
from mmdm.data.layout import DatasetError, Layout, make_splits
from mmdm.data.phantom import PROFILES, PhantomConfig, build_cohort, generate_subject, vessel_visibility
from mmdm.data.phantom import physics
from mmdm.data.phantom.anatomy import Grid, make_grid
from mmdm.data.phantom.vessels import Tube, branching_angles, murray_split, render_tubes

TINY = PROFILES["tiny"]
MODS = ("T1w", "T2w", "FLAIR", "angio")


@pytest.fixture(scope="module")
def subjects():
    return [generate_subject(i, TINY) for i in range(3)]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "tiny"
    build_cohort(root, TINY, progress=False)
    return root


# --------------------------------------------------------------------------- physics

T = physics.default_tissues()
SEQ = physics.SequenceParams()


def test_flair_nulls_csf_at_the_computed_ti():
    csf = T["CSF"]
    # independent: root of the longitudinal magnetisation 1 - 2 exp(-TI/T1) + exp(-TR/T1)
    ti_root = optimize.brentq(lambda ti: 1 - 2 * np.exp(-ti / csf.t1) + np.exp(-SEQ.flair_tr / csf.t1), 1, 8000)
    assert physics.null_ti(csf.t1, SEQ.flair_tr) == pytest.approx(ti_root, rel=1e-9)
    s = physics.tissue_signals(T, SEQ)["FLAIR"]
    assert s["CSF"] < 1e-9
    assert s["CSF"] < 0.01 * s["WM"] and s["lesion"] > s["WM"]  # fluid dark, WMH bright


def _bloch_spgr(m0, t1, tr, flip_deg, n):
    """Independent RF-pulse recursion of the longitudinal magnetisation (before each pulse)."""
    a = np.deg2rad(flip_deg)
    mz, out = m0, []
    for _ in range(n):
        out.append(mz)
        mz = m0 + (mz * np.cos(a) - m0) * np.exp(-tr / t1)  # flip, then T1 recovery for TR
    return np.array(out)


def test_tof_static_tissue_reaches_the_steady_state_formula():
    for name in ("WM", "GM", "blood"):
        t = T[name]
        mz = _bloch_spgr(t.pd, t.t1, SEQ.tof_tr, SEQ.tof_flip, 3000)
        sig = np.sin(np.deg2rad(SEQ.tof_flip)) * mz[-1] * np.exp(-SEQ.tof_te / t.t2)
        ss = physics.spgr_signal(t.pd, t.t1, t.t2, SEQ.tof_tr, SEQ.tof_te, SEQ.tof_flip)
        assert ss == pytest.approx(sig, rel=1e-6)
        # the inflow formula is the same recursion started from fresh blood
        n = np.arange(50)
        np.testing.assert_allclose(physics.inflow_mz(n, t.pd, t.t1, SEQ.tof_tr, SEQ.tof_flip), mz[:50], rtol=1e-10)


def test_inflow_enhancement_fades_with_depth_and_slow_flow():
    blood = T["blood"]
    depth_mm = np.linspace(0, 80, 41)
    for v in (5.0, 20.0, 40.0):  # cm/s
        n = depth_mm / (v * 10.0) * 1000.0 / SEQ.tof_tr
        s = physics.tof_blood_signal(n, blood, SEQ)
        assert np.all(np.diff(s) < 0)
    n_slow = 40.0 / (5 * 10.0) * 1000 / SEQ.tof_tr
    n_fast = 40.0 / (40 * 10.0) * 1000 / SEQ.tof_tr
    assert physics.tof_blood_signal(n_fast, blood, SEQ) > physics.tof_blood_signal(n_slow, blood, SEQ)
    static = physics.tissue_signals(T, SEQ)["angio"]
    assert physics.tof_blood_signal(0, blood, SEQ) > 2.5 * max(static["GM"], static["WM"])  # fresh blood bright


def test_contrast_orders():
    s = physics.tissue_signals(T, SEQ)
    assert s["T1w"]["WM"] > s["T1w"]["GM"] > s["T1w"]["CSF"]
    assert s["T2w"]["CSF"] > s["T2w"]["GM"] > s["T2w"]["WM"]


def test_washout_and_rician_moment():
    assert physics.washout(0.0, 100, 4.0) == 1.0
    v_void = 4.0 / (0.050) / 10.0  # mm / s -> cm/s: moves a slice thickness in TE/2
    assert physics.washout(v_void, 100, 4.0) == pytest.approx(0.0, abs=1e-12)
    assert physics.washout(v_void / 2, 100, 4.0) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    x = physics.rician(np.zeros(200_000, np.float32), 3.0, rng)
    assert x.mean() == pytest.approx(3.0 * np.sqrt(np.pi / 2), rel=0.01)  # Rayleigh mean
    y = physics.rician(np.full(200_000, 10.0, np.float32), 1.0, rng)
    assert (y.astype(np.float64) ** 2).mean() == pytest.approx(100 + 2 * 1.0, rel=0.01)  # E|S+n|^2 = S^2 + 2 s^2


def test_bias_field_is_smooth_and_has_the_requested_strength():
    b = physics.bias_field((40, 48, 36), 4.0, 0.2, np.random.default_rng(1))
    lb = np.log(b)
    assert abs(lb.mean()) < 1e-4 and lb.std() == pytest.approx(0.2, rel=1e-3)
    assert np.abs(np.diff(lb, axis=0)).max() < 0.1 * (lb.max() - lb.min())


# --------------------------------------------------------------------------- vessels


def test_murray_split_and_angles():
    r1, r2 = murray_split(1.0, 0.6, 3.0)
    assert r1**3 + r2**3 == pytest.approx(1.0) and r2 / r1 == pytest.approx(0.6)
    t1, t2 = branching_angles(1.0, 2 ** (-1 / 3), 2 ** (-1 / 3))  # symmetric: 37.5 degrees each (Murray)
    assert np.rad2deg(t1) == pytest.approx(37.47, abs=0.05) and t1 == pytest.approx(t2)


@pytest.mark.parametrize("h,r", [(1.0, 0.25), (1.0, 1.0), (1.0, 2.5), (2.0, 0.4), (2.0, 3.0)])
def test_partial_volume_of_a_straight_cylinder_has_the_analytic_area(h, r):
    rng = np.random.default_rng(int(10 * r + h))
    n = int(np.ceil(2 * (r + 4 * h) / h)) + 4
    grid = Grid(shape=(n, n, 12), affine=np.diag([h, h, h, 1.0]))
    c = (n - 1) * h / 2 + rng.uniform(-0.5, 0.5, 2) * h
    pts = np.array([[c[0], c[1], -20.0], [c[0], c[1], 40.0]])
    ren = render_tubes([Tube(points=pts, radius=r, label=7)], grid, chunk=1000)
    per_slice = ren.fraction.sum((0, 1))
    np.testing.assert_allclose(per_slice, np.pi * r**2 / h**2, rtol=0.03)
    assert ren.fraction.max() <= 1.0 and set(np.unique(ren.labels)) == {0, 7}


def _edges_by_id(cl):
    return {e["id"]: e for e in cl["edges"]}


def test_centreline_graph_is_a_tree_obeying_murray(subjects):
    for s in subjects:
        cl = s.centerlines
        json.dumps(cl)  # serialisable
        n_nodes, edges = len(cl["nodes"]), cl["edges"]
        assert len(edges) == n_nodes - 1
        incoming = {}
        adj = {i: [] for i in range(n_nodes)}
        for e in edges:
            assert e["end"] not in incoming, "a node with two parents"
            incoming[e["end"]] = e["id"]
            adj[e["start"]].append(e["end"])
        seen, q = {cl["root"]}, deque([cl["root"]])
        while q:
            for m in adj[q.popleft()]:
                assert m not in seen
                seen.add(m)
                q.append(m)
        assert len(seen) == n_nodes  # connected, no cycles
        g = cl["murray_exponent"]
        byid = _edges_by_id(cl)
        n_checked = 0
        for e in edges:
            if e["children"]:
                assert all(byid[c]["parent"] == e["id"] for c in e["children"])
                lhs = e["radius_mm"] ** g
                rhs = sum(byid[c]["radius_mm"] ** g for c in e["children"])
                assert rhs == pytest.approx(lhs, rel=2e-3)  # radii are rounded to 1e-4 mm in the JSON
                n_checked += 1
                for c in e["children"]:
                    assert byid[c]["generation"] == e["generation"] + 1
        assert n_checked > 50
        # anastomoses touch another node instead of closing a cycle
        pos = {nd["id"]: np.array(nd["position_mm"]) for nd in cl["nodes"]}
        for a in cl["anastomoses"]:
            assert np.linalg.norm(pos[a["node"]] - pos[a["touches"]]) < 1e-6


def test_labels_and_fractions_match_the_graph(subjects):
    s = subjects[0]
    ids = {e["id"] for e in s.centerlines["edges"] if e["kind"] != "virtual"}
    labs = set(np.unique(s.vessel_labels).tolist()) - {0}
    assert labs and labs <= ids
    assert s.vessel_fraction.min() >= 0 and s.vessel_fraction.max() <= 1
    assert np.all(s.vessel_fraction[s.vessel_labels > 0] > 0)
    assert set(np.unique(s.tissue_labels).tolist()) <= {0, 1, 2, 3, 4, 5}
    # the trunks are big enough to win the hard segmentation somewhere
    assert (s.tissue_labels == 5).sum() > 0


# --------------------------------------------------------------------------- complementarity


def test_source_modalities_show_different_partial_subsets_of_the_vessels(subjects):
    for s in subjects:
        vis = vessel_visibility(s.images, s.vessel_fraction, s.tissue_labels, s.vessel_labels, s.noise_sigma)
        tof = vis["visible"]["angio"]
        assert len(tof) >= 10
        sets = {m: vis["visible"][m] & tof for m in ("T1w", "T2w", "FLAIR")}
        for m, v in sets.items():
            assert tof - v, f"{m} shows every vessel that TOF shows"
        union = set().union(*sets.values())
        assert len(union) > max(len(v) for v in sets.values())


def test_visibility_estimates_the_noise_from_air(subjects):
    s = subjects[0]
    vis = vessel_visibility(s.images, s.vessel_fraction, s.tissue_labels, s.vessel_labels)
    for m in MODS:
        assert vis["noise_sigma"][m] == pytest.approx(s.noise_sigma[m], rel=0.25)
    with pytest.raises(ValueError, match="same grid"):
        vessel_visibility({"T1w": s.images["T1w"][:-1]}, s.vessel_fraction, s.tissue_labels, s.vessel_labels)


# --------------------------------------------------------------------------- layout


def test_layout_files_shapes_affines(cohort):
    lay = Layout(cohort)
    subs = lay.subjects()
    assert subs == [f"sub-{i:03d}" for i in range(1, TINY.n_subjects + 1)]
    for sub in subs:
        imgs = [nib.load(str(lay.image(sub, m))) for m in MODS]
        d = cohort / "derivatives" / "phantom" / sub
        gts = [nib.load(str(d / f"{sub}_{k}.nii.gz")) for k in ("vessels", "vesselfraction", "dseg", "brainmask")]
        assert (d / f"{sub}_centerlines.json").exists()
        for im in imgs + gts:
            assert im.shape == imgs[0].shape
            np.testing.assert_array_equal(im.affine, imgs[0].affine)
        assert all(im.get_data_dtype() == np.float32 for im in imgs)
        a = imgs[0].affine
        np.testing.assert_allclose(np.sqrt((a[:3, :3] ** 2).sum(0)), [TINY.resolution] * 3)
        assert nib.aff2axcodes(a) == ("R", "A", "S")
        assert imgs[0].shape[0] % 16 == 0 and imgs[0].shape[1] % 16 == 0
        assert int(imgs[0].header["sform_code"]) == 1 and int(imgs[0].header["qform_code"]) == 1


def test_affine_places_the_brain_in_mni_space(cohort):
    m = nib.load(str(cohort / "derivatives/phantom/sub-001/sub-001_brainmask.nii.gz"))
    ijk = np.argwhere(m.get_fdata() > 0.5)
    world = ijk @ m.affine[:3, :3].T + m.affine[:3, 3]
    centre = world.mean(0)
    # the MNI brain's centroid is near (0, -18, 10) mm; subjects are only mildly deformed
    assert abs(centre[0]) < 8 and abs(centre[1] + 18) < 12 and abs(centre[2] - 10) < 14
    assert np.ptp(world[:, 0]) == pytest.approx(140, abs=25)  # left-right extent of a brain


def test_splits_participants_description(cohort):
    lay = Layout(cohort)
    splits = lay.splits()
    subs = lay.subjects()
    assert sorted(sum(splits.values(), [])) == subs
    expected = make_splits(subs, seed=TINY.split_seed)
    assert {k: len(v) for k, v in splits.items()} == {k: len(v) for k, v in expected.items()}
    paper = make_splits([f"sub-{i:03d}" for i in range(1, 141)])
    assert [len(paper[k]) for k in ("train", "val", "test")] == [98, 14, 28]
    rows = (cohort / "participants.tsv").read_text().strip().split("\n")
    header = rows[0].split("\t")
    assert header[0] == "participant_id" and len(rows) == 1 + TINY.n_subjects
    table = [dict(zip(header, r.split("\t"))) for r in rows[1:]]
    assert [r["participant_id"] for r in table] == subs
    for col in ("age", "lesion_count", "vessel_length_mm", "noise_sigma_angio", "bias_strength",
                "deformation_mm", "mean_velocity_cm_s"):
        assert len({r[col] for r in table}) > 1, f"all subjects share {col}"
    desc = json.loads((cohort / "dataset_description.json").read_text())
    assert desc["Simulation"] is True and "SIMULATED" in desc["Description"]
    assert desc["GeneratedBy"][0]["Parameters"]["config"] == json.loads(json.dumps(to_dict(TINY)))


def test_complete_cohort_is_skipped_and_a_different_config_refused(cohort, capsys):
    before = (cohort / "participants.tsv").stat().st_mtime_ns
    build_cohort(cohort, TINY, progress=False)
    assert "already exists" in capsys.readouterr().out
    assert (cohort / "participants.tsv").stat().st_mtime_ns == before
    with pytest.raises(DatasetError, match="overwrite"):
        build_cohort(cohort, TINY, seed=TINY.seed + 1, progress=False)


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_bit_identical_files_and_arrays(cohort, subjects, tmp_path):
    one = build_cohort(tmp_path / "one", dataclasses.replace(TINY, n_subjects=1), progress=False)
    for rel in ["sub-001/anat/sub-001_angio.nii.gz", "sub-001/anat/sub-001_FLAIR.nii.gz",
                "derivatives/phantom/sub-001/sub-001_vessels.nii.gz",
                "derivatives/phantom/sub-001/sub-001_centerlines.json"]:
        assert (one / rel).read_bytes() == (cohort / rel).read_bytes(), rel
    s0 = subjects[0]
    for m in MODS:
        np.testing.assert_array_equal(nib.load(str(cohort / f"sub-001/anat/sub-001_{m}.nii.gz")).get_fdata(
            dtype=np.float32), s0.images[m])


def test_different_subjects_differ(subjects):
    a, b = subjects[0], subjects[1]
    assert not np.array_equal(a.images["angio"], b.images["angio"])
    assert not np.array_equal(a.vessel_fraction, b.vessel_fraction)
    assert a.params["age"] != b.params["age"] and a.params["vessel_length_mm"] != b.params["vessel_length_mm"]


def test_config_profiles_and_errors():
    assert PROFILES["paper"].n_subjects == 140 and PROFILES["paper"].resolution == 1.0
    assert PROFILES["quick"].n_subjects == 40 and PROFILES["quick"].resolution == 2.0
    for cfg in PROFILES.values():
        assert from_dict(PhantomConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="valid keys"):
        from_dict(PhantomConfig, {"n_subject": 3})
    with pytest.raises(ConfigError, match="resolution"):
        dataclasses.replace(TINY, resolution=0.0)
    with pytest.raises(ConfigError, match="unknown phantom profile"):
        build_cohort("/nonexistent/never", "huge")
    g = make_grid(2.0)
    assert g.shape[:2] == (96, 112)
