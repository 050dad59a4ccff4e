"""IXI importer: pairing, safe extraction, resumable download, registration to the MRA, the layout.

No network: the tests build tiny IXI-like archives from a phantom subject (the
sources moved by known rigid transforms, the MRA a flipped partial slab) and
serve them from a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import statistics
import tarfile
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")

from mmdm.data.ixi import (DownloadError, SizeMismatchError, UnsafeArchiveError, add_ixi_parser,  # noqa: E402
                           download_file, extract_members, flag_outliers, output_grid, pair_scans, parse_name,
                           prepare_archives, read_demographics)
from mmdm.data.ixi.registration import FLIP, from_sitk, ras_to_transform, to_sitk, transform_to_ras  # noqa: E402
from mmdm.data.layout import DatasetError  # noqa: E402

Z0, SLAB = 12, 20  # the MRA slab: axial slices Z0 .. Z0 + SLAB of the phantom grid
# (ixi number, site, rotation of T1 (deg), translation of T1 (mm), rotation/translation of T2 and PD)
GOOD = [
    (12, "Guys", (6, -4, 5), (5, -6, 4), (-5, 3, -6), (-4, 5, 3)),
    (13, "Guys", (-7, 2, 4), (-3, 4, -5), (4, 6, -3), (6, -2, -4)),
    (14, "Guys", (3, 7, -5), (4, 3, 6), (-6, -3, 4), (-5, -4, 2)),
    (20, "HH", (5, 5, -4), (-6, -2, 3), (3, -7, 5), (3, 6, -5)),
    (21, "HH", (-4, -6, 6), (2, -5, -4), (7, 2, -3), (-2, -3, 6)),
    (22, "HH", (8, -3, 2), (-4, 6, 2), (-3, 5, 6), (5, 2, -4)),
]
MISSING_MRA = 30  # IOP subject without an MRA
TRUNCATED_T2 = 31  # IOP subject whose T2 file is cut in half
TEST_REGISTRATION = {"shrink_factors": [2, 1], "smoothing_sigmas": [1.0, 0.0], "histogram_bins": 32,
                     "max_samples": 20000, "eval_samples": 20000, "threads": 1}


# --------------------------------------------------------------------------- helpers


def _name(num: int, site: str, mod: str) -> str:
    return f"IXI{num:03d}-{site}-{1000 + num:04d}-{mod}.nii.gz"


def _moved(arr: np.ndarray, affine: np.ndarray, tmp: Path, rot_deg, trans_mm):
    """Write ``arr`` with nibabel, read it with SimpleITK and resample it through a rigid transform T
    (about the volume centre): moved(q) = original(T(q)). Returns (moved image, T)."""
    src = tmp / "orig.nii.gz"
    nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(src))
    orig = sitk.ReadImage(str(src), sitk.sitkFloat32)
    t = sitk.Euler3DTransform()
    t.SetCenter(orig.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in orig.GetSize()]))
    t.SetRotation(*np.radians(rot_deg))
    t.SetTranslation([float(v) for v in trans_mm])
    return sitk.Resample(orig, orig, t, sitk.sitkLinear, 0.0), t


def _slab(affine: np.ndarray) -> np.ndarray:
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ [0, 0, Z0] + affine[:3, 3]
    return out


def _tar(path: Path, files: dict[str, Path | bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, content in files.items():
            data = content if isinstance(content, bytes) else Path(content).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.cuts: dict[str, list[int]] = {}  # file -> bytes to send before cutting, one entry per request
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        self.hook = None  # called with (name, request number) after each response

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/ixi/"


class _Handler(BaseHTTPRequestHandler):
    """Serves files with HTTP Range support; can cut a connection after a given number of bytes."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv: _Server = self.server  # type: ignore[assignment]
        name = self.path.rsplit("/", 1)[-1]
        rng = self.headers.get("Range")
        srv.requests.append((name, rng))
        path = srv.root / name
        if not path.is_file():
            self.send_error(404, "not found")
            return
        data = path.read_bytes()
        start = 0
        if rng and not srv.ignore_range:
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        cuts = srv.cuts.get(name)
        if cuts:
            body = body[:cuts.pop(0)]
            self.close_connection = True
        self.wfile.write(body)
        self.wfile.flush()
        if srv.hook:
            srv.hook(name, len(srv.requests))


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    srv = _Server(root)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdm")
    sub = p.add_subparsers(dest="command")
    data = sub.add_parser("data").add_subparsers(dest="data_command")
    add_ixi_parser(data)
    return p


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def phantom():
    from mmdm.data.phantom import generate_subject

    subj = generate_subject(0, "tiny")
    return subj.images, subj.affine, subj.brain_mask


@pytest.fixture(scope="module")
def archives(phantom, tmp_path_factory):
    """IXI-like tarballs + a CSV export of the demographics sheet; returns (folder, transforms)."""
    images, affine, _ = phantom
    tmp = tmp_path_factory.mktemp("ixi-src")
    files: dict[str, dict[str, Path | bytes]] = {t: {} for t in ("T1", "T2", "PD", "MRA")}
    transforms = {}
    # the MRA: a partial axial slab, stored left-right flipped (LAS) to exercise the reorientation
    slab = images["angio"][:, :, Z0:Z0 + SLAB]
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = slab.shape[0] - 1
    mra_path = tmp / "mra.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(slab[::-1]), _slab(affine) @ flip), str(mra_path))
    for num, site, r1, t1, r2, t2 in GOOD + [(MISSING_MRA, "IOP", (3, 3, 3), (2, 2, 2), (3, 3, 3), (2, 2, 2)),
                                             (TRUNCATED_T2, "IOP", (3, 3, 3), (2, 2, 2), (3, 3, 3), (2, 2, 2))]:
        moved_t1, tx1 = _moved(images["T1w"], affine, tmp, r1, t1)
        moved_t2, tx2 = _moved(images["T2w"], affine, tmp, r2, t2)
        moved_pd, _ = _moved(images["FLAIR"], affine, tmp, r2, t2)  # T2 and PD: one dual-echo acquisition
        transforms[f"sub-IXI{num:03d}"] = {"T1w": tx1, "T2w": tx2, "PDw": tx2}
        for tag, img in (("T1", moved_t1), ("T2", moved_t2), ("PD", moved_pd)):
            p = tmp / _name(num, site, tag)
            sitk.WriteImage(img, str(p))
            files[tag][p.name] = p
        if num != MISSING_MRA:
            files["MRA"][_name(num, site, "MRA")] = mra_path
    t2 = files["T2"][_name(TRUNCATED_T2, "IOP", "T2")]
    files["T2"][t2.name] = t2.read_bytes()[: t2.stat().st_size // 2]
    files["MRA"]["README.txt"] = b"not an image\n"
    out = tmp_path_factory.mktemp("ixi-archives")
    for tag, members in files.items():
        _tar(out / f"IXI-{tag}.tar", members)
    (out / "IXI.xls").write_bytes(b"stand-in for the real sheet")
    with open(out / "IXI.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["IXI_ID", "SEX_ID", "HEIGHT", "AGE"])
        for i, (num, *_rest) in enumerate(GOOD):
            w.writerow([num, 1 + i % 2, 170, 20.5 + num])
        w.writerow([GOOD[0][0], 2, 180, ""])  # a duplicate row without an age: the first row wins
    return out, transforms


@pytest.fixture(scope="module")
def imported(archives, tmp_path_factory):
    """The whole command: download from a local server (one connection cut), extract, register, write."""
    src, transforms = archives
    tmp = tmp_path_factory.mktemp("ixi-import")
    srv = _Server(src)
    srv.cuts["IXI-MRA.tar"] = [5000]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    cfg = tmp / "ixi.yaml"
    cfg.write_text(json.dumps({"registration": TEST_REGISTRATION}))  # JSON is YAML
    try:
        rc = _run(["data", "ixi", "--download", str(tmp / "dl"), "--out", str(tmp / "ixi"), "--base-url", srv.url,
                   "--demographics", str(src / "IXI.csv"), "--config", str(cfg), "--quiet"])
    finally:
        srv.shutdown()
        srv.server_close()
    return {"rc": rc, "out": tmp / "ixi", "dl": tmp / "dl", "transforms": transforms, "requests": srv.requests,
            "cfg": cfg}


# --------------------------------------------------------------------------- names and pairing


def test_parse_name_reads_id_site_series_and_modality():
    s = parse_name("some/dir/IXI002-Guys-0828-T1.nii.gz")
    assert (s.ixi_id, s.site, s.series, s.modality) == ("IXI002", "Guys", "0828", "T1")
    assert parse_name("IXI002-Guys-0828-T1.txt") is None and parse_name("README") is None


def test_pairing_keeps_complete_subjects_and_says_why_others_are_dropped():
    names = [_name(1, "HH", m) for m in ("T1", "T2", "PD", "MRA")]
    names += [_name(2, "Guys", m) for m in ("T1", "T2", "MRA")]  # no PD
    names += [_name(3, "IOP", m) for m in ("T1", "T2", "PD", "MRA")] + ["IXI003-IOP-9999-T1.nii.gz"]
    names += [_name(4, "HH", m) for m in ("T1", "T2", "PD")] + [_name(4, "Guys", "MRA")]
    names += [_name(5, "HH", "DTI"), "notes.txt"]
    subjects, dropped, ignored = pair_scans(names)
    assert [s.ixi_id for s in subjects] == ["IXI001"]
    assert subjects[0].site == "HH" and set(subjects[0].files) == {"T1", "T2", "PD", "MRA"}
    reasons = {d.ixi_id: d.reason for d in dropped}
    assert reasons["IXI002"] == "missing modality PD"
    assert "more than one file" in reasons["IXI003"]
    assert "different sites" in reasons["IXI004"]
    assert set(ignored) == {_name(5, "HH", "DTI"), "notes.txt"}


# --------------------------------------------------------------------------- geometry


def _random_affine(rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    a = np.eye(4)
    a[:3, :3] = q * rng.uniform(0.5, 2.0, 3)
    a[:3, 3] = rng.uniform(-100, 100, 3)
    return a


def test_to_sitk_places_every_voxel_at_its_nibabel_world_position():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    affine = _random_affine(rng)
    img = to_sitk(data, affine)
    for ijk in [(0, 0, 0), (4, 5, 6), (2, 1, 3)]:
        ras = affine[:3, :3] @ ijk + affine[:3, 3]
        assert np.allclose(img.TransformIndexToPhysicalPoint(ijk), FLIP @ ras, atol=1e-6)  # ITK is LPS
        assert img.GetPixel(ijk) == pytest.approx(float(data[ijk]))
    back, aff = from_sitk(img)
    assert np.array_equal(back, data) and np.allclose(aff, affine, atol=1e-6)


def test_ras_matrix_round_trips_through_an_itk_transform():
    rng = np.random.default_rng(1)
    m = _random_affine(rng)
    tx = ras_to_transform(m)
    assert np.allclose(transform_to_ras(tx), m, atol=1e-9)
    p = rng.normal(size=3) * 50
    assert np.allclose(FLIP @ np.asarray(tx.TransformPoint((FLIP @ p).tolist())), m[:3, :3] @ p + m[:3, 3])


def test_output_grid_keeps_the_mra_grid_or_covers_its_field_of_view_at_a_new_spacing():
    affine = _random_affine(np.random.default_rng(2))
    shape = (100, 90, 40)
    same_shape, same = output_grid(shape, affine)
    assert same_shape == shape and np.array_equal(same, affine)
    new_shape, new = output_grid(shape, affine, spacing=(1.5, 1.5, 2.0), in_plane_multiple=16)
    assert np.allclose(np.linalg.norm(new[:3, :3], axis=0), [1.5, 1.5, 2.0])
    assert new_shape[0] % 16 == 0 and new_shape[1] % 16 == 0
    old_sp = np.linalg.norm(affine[:3, :3], axis=0)
    assert np.all(np.asarray(new_shape) * [1.5, 1.5, 2.0] >= np.asarray(shape) * old_sp - 1e-6)
    centre = lambda a, s: a[:3, :3] @ ((np.asarray(s) - 1) / 2) + a[:3, 3]  # noqa: E731
    assert np.allclose(centre(new, new_shape), centre(affine, shape))
    assert np.allclose(new[:3, :3] / [1.5, 1.5, 2.0], affine[:3, :3] / old_sp)  # same axes


def test_flag_outliers_uses_median_plus_k_scaled_mad():
    values = {f"s{i}": v for i, v in enumerate([-0.80, -0.82, -0.79, -0.81, -0.80, -0.30])}
    flags, threshold = flag_outliers(values, k=3.0)
    v = list(values.values())
    med = statistics.median(v)
    expected = med + 3 * 1.4826 * statistics.median([abs(x - med) for x in v])
    assert threshold == pytest.approx(expected)
    assert [s for s, f in flags.items() if f] == ["s5"]


# --------------------------------------------------------------------------- extraction safety


def _evil_tar(path: Path, kind: str) -> None:
    with tarfile.open(path, "w") as tf:
        good = tarfile.TarInfo("IXI001-HH-0001-T1.nii.gz")
        good.size = 3
        tf.addfile(good, io.BytesIO(b"abc"))
        info = tarfile.TarInfo({"dotdot": "../escaped.txt", "nested-dotdot": "a/../../escaped.txt",
                                "absolute": "/tmp/escaped-ixi-test.txt"}.get(kind, "link"))
        data = b"pwned"
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "IXI001-HH-0001-T1.nii.gz"
        elif kind == "device":
            info.type = tarfile.CHRTYPE
        if info.type == tarfile.REGTYPE:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        else:
            tf.addfile(info)


@pytest.mark.parametrize("kind", ["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unsafe_members_refuse_the_archive_before_anything_is_written(tmp_path, kind):
    tar = tmp_path / "evil.tar"
    _evil_tar(tar, kind)
    target = tmp_path / "out" / "extracted"
    with pytest.raises(UnsafeArchiveError, match="Refusing to extract") as err:
        extract_members(tar, target)
    assert ("'..'" in str(err.value)) == ("dotdot" in kind)
    assert ("absolute" in str(err.value)) == (kind == "absolute")
    assert not (tmp_path / "out" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/escaped-ixi-test.txt").exists()
    assert list(target.iterdir()) == []  # not even the safe member


def test_extraction_refuses_a_symlink_already_in_the_target_that_points_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "sub").symlink_to(outside, target_is_directory=True)
    tar = tmp_path / "a.tar"
    _tar(tar, {"sub/IXI001-HH-0001-T1.nii.gz": b"abc"})
    with pytest.raises(UnsafeArchiveError, match="outside"):
        extract_members(tar, target)
    assert list(outside.iterdir()) == []


def test_extraction_writes_member_bytes_and_resumes(tmp_path):
    tar = tmp_path / "a.tar"
    payload = {"IXI001-HH-0001-T1.nii.gz": b"x" * 5000, "d/IXI002-HH-0002-T1.nii.gz": b"y" * 10}
    _tar(tar, payload)
    target = tmp_path / "t"
    written = extract_members(tar, target, select=lambda m: m.name.startswith("IXI"))
    assert [p.name for p in written] == ["IXI001-HH-0001-T1.nii.gz"]
    assert (target / "IXI001-HH-0001-T1.nii.gz").read_bytes() == payload["IXI001-HH-0001-T1.nii.gz"]
    before = (target / "IXI001-HH-0001-T1.nii.gz").stat().st_mtime_ns
    extract_members(tar, target)
    assert (target / "IXI001-HH-0001-T1.nii.gz").stat().st_mtime_ns == before  # complete file kept
    assert (target / "d" / "IXI002-HH-0002-T1.nii.gz").read_bytes() == b"y" * 10


def test_subject_limit_extracts_only_the_chosen_subjects(archives, tmp_path):
    src, _ = archives
    subjects, dropped, ignored = prepare_archives(src, extract_dir=tmp_path / "x", n_subjects=2, progress=False)
    assert [s.ixi_id for s in subjects] == ["IXI012", "IXI013"]
    on_disk = sorted(p.name for p in (tmp_path / "x").glob("IXI*"))
    assert on_disk == sorted(Path(f).name for s in subjects for f in s.files.values())
    assert any(d.ixi_id == f"IXI{MISSING_MRA:03d}" and d.reason == "missing modality MRA" for d in dropped)
    assert ignored == ["README.txt"]
    assert all(s.files["MRA"].startswith(str(tmp_path / "x")) for s in subjects)


# --------------------------------------------------------------------------- downloads


def test_download_resumes_after_a_cut_connection(server, tmp_path):
    payload = np.random.default_rng(3).bytes(300_000)
    (server.root / "IXI-T1.tar").write_bytes(payload)
    server.cuts["IXI-T1.tar"] = [100_000, 50_000]  # two cut transfers, then a complete one
    dest = download_file(server.url + "IXI-T1.tar", tmp_path / "IXI-T1.tar", backoff=0, progress=False)
    assert dest.read_bytes() == payload
    assert not (tmp_path / "IXI-T1.tar.part").exists()
    assert [r for _, r in server.requests] == [None, "bytes=100000-", "bytes=150000-"]


def test_download_finishes_a_part_file_that_is_already_complete(server, tmp_path):
    payload = b"m" * 7000
    (server.root / "IXI-MRA.tar").write_bytes(payload)
    (tmp_path / "IXI-MRA.tar.part").write_bytes(payload)  # e.g. killed just before the rename
    dest = download_file(server.url + "IXI-MRA.tar", tmp_path / "IXI-MRA.tar", backoff=0, progress=False)
    assert dest.read_bytes() == payload and server.requests == [("IXI-MRA.tar", "bytes=7000-")]


def test_download_restarts_when_the_server_ignores_ranges(server, tmp_path):
    payload = np.random.default_rng(4).bytes(50_000)
    (server.root / "f.bin").write_bytes(payload)
    server.cuts["f.bin"] = [20_000]
    server.ignore_range = True
    dest = download_file(server.url + "f.bin", tmp_path / "f.bin", backoff=0, progress=False)
    assert dest.read_bytes() == payload


def test_download_detects_a_size_mismatch_with_the_known_size(server, tmp_path):
    (server.root / "IXI-PD.tar").write_bytes(b"z" * 1000)
    with pytest.raises(SizeMismatchError, match="announces 1000 bytes but 1234 are expected"):
        download_file(server.url + "IXI-PD.tar", tmp_path / "IXI-PD.tar", expected_size=1234, backoff=0,
                      progress=False)
    assert not (tmp_path / "IXI-PD.tar").exists()


def test_download_detects_a_file_that_changes_size_between_attempts(server, tmp_path):
    (server.root / "IXI-T2.tar").write_bytes(b"a" * 10_000)
    server.cuts["IXI-T2.tar"] = [4000]

    def grow(name, n):
        if n == 1:
            (server.root / name).write_bytes(b"a" * 12_000)

    server.hook = grow
    with pytest.raises(SizeMismatchError, match="size changed between attempts"):
        download_file(server.url + "IXI-T2.tar", tmp_path / "IXI-T2.tar", backoff=0, progress=False)
    assert not (tmp_path / "IXI-T2.tar").exists()
    assert (tmp_path / "IXI-T2.tar.part").stat().st_size == 4000  # kept for a later resume


def test_download_gives_up_after_the_retries_and_keeps_the_partial_file(server, tmp_path):
    (server.root / "f.bin").write_bytes(b"q" * 10_000)
    server.cuts["f.bin"] = [1000] + [0] * 10  # some progress, then the connection dies at once every time
    with pytest.raises(DownloadError, match="resumes"):
        download_file(server.url + "f.bin", tmp_path / "f.bin", retries=2, backoff=0, progress=False)
    assert (tmp_path / "f.bin.part").stat().st_size == 1000
    server.cuts["f.bin"] = []
    assert download_file(server.url + "f.bin", tmp_path / "f.bin", backoff=0, progress=False).read_bytes() \
        == b"q" * 10_000


def test_download_reports_a_missing_file(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(server.url + "nope.tar", tmp_path / "nope.tar", backoff=0, progress=False)


# --------------------------------------------------------------------------- demographics


def test_demographics_from_a_csv_export(archives):
    src, _ = archives
    demo = read_demographics(src / "IXI.csv")
    first = f"IXI{GOOD[0][0]:03d}"
    assert demo[first] == {"age": 20.5 + GOOD[0][0], "sex": "M"}  # duplicate row without age ignored
    assert demo[f"IXI{GOOD[1][0]:03d}"]["sex"] == "F"


def test_reading_xls_without_xlrd_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xlrd", None)  # as if xlrd were not installed: `import xlrd` fails
    (tmp_path / "IXI.xls").write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + bytes(504))  # an OLE2 header
    with pytest.raises(DatasetError, match="xlrd.*CSV"):
        read_demographics(tmp_path / "IXI.xls")


# --------------------------------------------------------------------------- the whole import


def test_import_command_writes_a_dataset_that_passes_the_check(imported):
    from mmdm.data.check import check_dataset

    assert imported["rc"] == 0
    report = check_dataset(imported["out"], modalities=["T1w", "T2w", "PDw", "angio"])
    assert report.ok, report.summary()
    assert not report.warnings, report.warnings  # axial axis last, every subject in a split
    assert [r["subject"] for r in report.rows] == [f"sub-IXI{g[0]:03d}" for g in GOOD]
    desc = json.loads((imported["out"] / "dataset_description.json").read_text())
    assert desc["License"] == "CC BY-SA 3.0" and desc["SourceModalities"] == ["T1w", "T2w", "PDw"]


def test_download_resumed_the_cut_archive_and_removed_the_extracted_archives(imported):
    mra = [r for name, r in imported["requests"] if name == "IXI-MRA.tar"]
    assert mra == [None, "bytes=5000-"]
    assert not list(imported["dl"].glob("*.tar")) and not list(imported["dl"].glob("*.part"))
    assert (imported["dl"] / "IXI.xls").exists()


def test_dropped_subjects_are_reported_with_the_reason(imported):
    rep = json.loads((imported["out"] / "derivatives" / "ixi-import" / "import_report.json").read_text())
    dropped = {d["ixi_id"]: d for d in rep["dropped"]}
    assert set(dropped) == {f"IXI{MISSING_MRA:03d}", f"IXI{TRUNCATED_T2:03d}"}
    assert dropped[f"IXI{MISSING_MRA:03d}"]["reason"] == "missing modality MRA"
    trunc = dropped[f"IXI{TRUNCATED_T2:03d}"]
    assert trunc["reason"] == "unreadable or truncated T2 file"
    assert _name(TRUNCATED_T2, "IOP", "T2") in trunc["details"]
    assert rep["ignored_files"] == ["README.txt"]
    assert not (imported["out"] / f"sub-IXI{TRUNCATED_T2:03d}").exists()


def test_participants_carry_site_and_demographics_and_the_split_is_stratified_by_site(imported):
    out = imported["out"]
    with open(out / "participants.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    by_id = {r["participant_id"]: r for r in rows}
    for i, (num, site, *_rest) in enumerate(GOOD):
        r = by_id[f"sub-IXI{num:03d}"]
        assert (r["ixi_id"], r["site"], r["sex"]) == (f"IXI{num:03d}", site, "M" if i % 2 == 0 else "F")
        assert float(r["age"]) == pytest.approx(20.5 + num)
        assert float(r["reg_metric_T1w"]) < 0 and r["reg_outlier"] in ("true", "false")
    assert by_id["sub-IXI020"]["field_strength_T"] == "3" and by_id["sub-IXI012"]["scanner"] == "Philips"
    splits = json.loads((out / "splits.json").read_text())
    for site in ("Guys", "HH"):
        in_split = {k: [s for s in v if by_id[s]["site"] == site] for k, v in splits.items()}
        assert all(len(v) == 1 for v in in_split.values()), in_split  # 3 per site -> 1/1/1


def test_angio_is_the_mra_slab_reoriented_to_ras_with_the_axial_axis_last(imported, phantom):
    images, affine, _ = phantom
    img = nib.load(str(imported["out"] / "sub-IXI012" / "anat" / "sub-IXI012_angio.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(img.affine, _slab(affine), atol=1e-4)
    assert np.allclose(np.asarray(img.dataobj), images["angio"][:, :, Z0:Z0 + SLAB], atol=1e-4)
    t1 = nib.load(str(imported["out"] / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"))
    assert t1.shape == img.shape and np.allclose(t1.affine, img.affine)


@pytest.mark.parametrize("mod", ["T1w", "T2w", "PDw"])
def test_registered_sources_align_with_the_mra_within_one_voxel(imported, phantom, mod):
    """The transform found maps every brain voxel of the slab to where the known misalignment put it."""
    _, affine, brain = phantom
    aff = _slab(affine)
    ijk = np.argwhere(brain[:, :, Z0:Z0 + SLAB] > 0.5)
    ras = ijk @ aff[:3, :3].T + aff[:3, 3]
    voxel = float(np.linalg.norm(affine[:3, :3], axis=0).max())
    for num, *_ in GOOD:  # every complete subject is kept, so each has its registration record
        sub = f"sub-IXI{num:03d}"
        txs = imported["transforms"][sub]
        rpath = imported["out"] / "derivatives" / "ixi-import" / sub / f"{sub}_registration.json"
        assert rpath.is_file(), f"{sub}: the import wrote no registration record ({rpath})"
        m = np.asarray(json.loads(rpath.read_text())["registration"][mod]["matrix_ras"])
        got = ras @ m[:3, :3].T + m[:3, 3]
        inv = txs[mod].GetInverse()  # the source was moved by T: source(q) = original(T(q))
        want = np.array([FLIP @ np.asarray(inv.TransformPoint((FLIP @ p).tolist())) for p in ras])
        before = np.linalg.norm(ras - want, axis=1)
        err = np.linalg.norm(got - want, axis=1)
        assert before.max() > voxel, "the test misalignment should exceed a voxel"
        assert err.max() < voxel, f"{sub} {mod}: max error {err.max():.2f} mm (voxel {voxel} mm)"
        assert err.mean() < voxel / 2, f"{sub} {mod}: mean error {err.mean():.2f} mm (voxel {voxel} mm)"


def test_registered_t1_matches_the_unmoved_original_better_than_the_raw_file(imported, phantom):
    images, affine, brain = phantom
    ref = images["T1w"][:, :, Z0:Z0 + SLAB]
    mask = brain[:, :, Z0:Z0 + SLAB] > 0.5
    out = np.asarray(nib.load(str(imported["out"] / "sub-IXI013" / "anat" / "sub-IXI013_T1w.nii.gz")).dataobj)
    raw = np.asarray(nib.load(str(imported["dl"] / "extracted" / _name(13, "Guys", "T1"))).dataobj)
    raw = raw[:, :, Z0:Z0 + SLAB]  # the moved file, same grid as the phantom: no correction
    corr = lambda a, b: np.corrcoef(a[mask], b[mask])[0, 1]  # noqa: E731
    assert corr(out, ref) > 0.95 > corr(raw, ref)


def test_rerun_from_the_extracted_files_resumes_without_redoing_subjects(imported):
    out = imported["out"]
    t1 = out / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"
    before = t1.stat().st_mtime_ns
    rc = _run(["data", "ixi", "--from-tars", str(imported["dl"]), "--out", str(out), "--quiet",
               "--config", str(imported["cfg"]), "--demographics", str(imported["dl"] / "missing.csv")])
    assert rc == 0
    assert t1.stat().st_mtime_ns == before
    rep = json.loads((out / "derivatives" / "ixi-import" / "import_report.json").read_text())
    assert len(rep["kept"]) == len(GOOD)
    assert any("demographics" in w for w in rep["warnings"])


def test_import_from_extracted_nifti_files_resumes_the_same_dataset(imported, capsys):
    out = imported["out"]
    t1 = out / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"
    before = t1.stat().st_mtime_ns
    rc = _run(["data", "ixi", "--from-nifti", str(imported["dl"] / "extracted"), "--out", str(out), "--quiet",
               "--config", str(imported["cfg"]), "--demographics", str(imported["dl"] / "missing.csv")])
    assert rc == 0 and t1.stat().st_mtime_ns == before  # same files found, same subjects, nothing redone
    rep = json.loads((out / "derivatives" / "ixi-import" / "import_report.json").read_text())
    assert len(rep["kept"]) == len(GOOD)
    capsys.readouterr()
    assert _run(["data", "ixi", "--from-nifti", str(out / "nowhere"), "--out", str(out)]) == 1
    assert "no such folder of IXI NIfTI files" in capsys.readouterr().err


def test_cli_rejects_bad_options_with_exit_codes(tmp_path, capsys):
    assert _run(["data", "ixi", "--from-tars", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--spacing", "1", "2"]) == 2
    assert "1 or 3 numbers" in capsys.readouterr().err
    assert _run(["data", "ixi", "--from-tars", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 1
    assert "IXI-T1.tar: archive not found" in capsys.readouterr().err


def test_spacing_option_resamples_all_four_volumes_onto_one_padded_grid(imported, tmp_path):
    from mmdm.config import from_dict
    from mmdm.data.ixi import IXIConfig, IXISubject, process_subject

    ext = imported["dl"] / "extracted"
    subj = IXISubject("IXI020", "HH", {t: str(ext / _name(20, "HH", t)) for t in ("T1", "T2", "PD", "MRA")})
    cfg = from_dict(IXIConfig, {"spacing": [6.0, 6.0, 6.0], "registration": TEST_REGISTRATION})
    res = process_subject(subj, tmp_path, cfg)
    assert res["status"] == "ok"
    imgs = {m: nib.load(str(tmp_path / "sub-IXI020" / "anat" / f"sub-IXI020_{m}.nii.gz"))
            for m in ("T1w", "T2w", "PDw", "angio")}
    shapes = {img.shape for img in imgs.values()}
    assert len(shapes) == 1
    shape = shapes.pop()
    assert shape[0] % 16 == 0 and shape[1] % 16 == 0 and shape[2] == int(np.ceil(SLAB * 4 / 6))
    for img in imgs.values():
        assert np.allclose(np.linalg.norm(img.affine[:3, :3], axis=0), 6.0)
        assert np.allclose(img.affine, imgs["angio"].affine)
    assert all(r["coverage"] > 0.9 for r in res["report"]["registration"].values())


def test_registration_repeats_exactly_with_the_default_seed(phantom, tmp_path):
    """Seed 0 must be a fixed seed: SimpleITK itself reads a sampling seed of 0 as the wall clock."""
    from mmdm.config import ConfigError, from_dict
    from mmdm.data.ixi.registration import RegistrationConfig, register, to_sitk

    images, affine, _ = phantom
    fixed = to_sitk(images["angio"].astype(np.float32), affine)
    moving, _ = _moved(images["T1w"], affine, tmp_path, (3, 0, 2), (2, -1, 1))
    cfg = from_dict(RegistrationConfig, {**TEST_REGISTRATION, "stages": ["rigid"], "iterations": 30})
    assert cfg.seed == 0
    a, b = register(fixed, moving, cfg), register(fixed, moving, cfg)
    assert np.array_equal(a.matrix_ras, b.matrix_ras) and a.metric_final == b.metric_final
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        RegistrationConfig(seed=-1)
