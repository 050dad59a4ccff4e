"""The dataset layout, volume validation, normalisation and 2.5D windows."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from mmdm.cli import main as cli
from mmdm.data.check import check_dataset
from mmdm.data.dataset import DataConfig, WindowDataset, load_subject_volumes, load_torchio_subject, window_starts
from mmdm.data.layout import DatasetError, Layout, make_splits
from mmdm.data.volumes import NormConfig, denormalise, load_volume, normalise
from tests.helpers import affine, make_dataset, write_subject


def test_make_splits_paper_ratio_and_disjoint():
    subjects = [f"sub-{i:03d}" for i in range(1, 141)]
    sp = make_splits(subjects, seed=3)
    assert [len(sp[k]) for k in ("train", "val", "test")] == [98, 14, 28]
    assert set(sp["train"]) | set(sp["val"]) | set(sp["test"]) == set(subjects)
    assert not (set(sp["train"]) & set(sp["test"]))
    assert make_splits(subjects, seed=3) == sp and make_splits(subjects, seed=4) != sp


def test_make_splits_stratified_every_group_in_every_split():
    subjects = [f"sub-{i:03d}" for i in range(1, 31)]
    strata = {s: ("A" if i % 3 == 0 else "B" if i % 3 == 1 else "C") for i, s in enumerate(subjects)}
    sp = make_splits(subjects, seed=0, strata=strata)
    for split in ("train", "val", "test"):
        assert {strata[s] for s in sp[split]} == {"A", "B", "C"}


def test_windows_match_volume_slices(tmp_path):
    data = make_dataset(tmp_path, n=4, shape=(16, 8, 11))
    cfg = DataConfig(root=str(tmp_path), window=5, train_stride=2)
    ds = WindowDataset(cfg, "train")
    assert window_starts(11, 5, 2) == [0, 2, 4, 6]
    assert len(ds) == 2 * 4  # two train subjects, 4 windows each
    item = ds[5]
    s, z0 = item["subject"], item["z0"]
    assert set(item["sources"]) == {"T1w", "T2w", "FLAIR"}
    assert item["target"].shape == (5, 16, 8)
    raw = data[s]["angio"]
    expected = 2 * raw / raw.max() - 1  # authors' per-volume max normalisation
    np.testing.assert_allclose(item["target"].numpy(), np.moveaxis(expected[:, :, z0:z0 + 5], 2, 0), rtol=1e-6)
    assert float(item["target"].max()) == pytest.approx(1.0, abs=1e-6) or ds.volumes[s]["angio"].max() == 1
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["sources"]["T1w"].shape == (2, 5, 16, 8)


def test_window_starts_cover_last_slice():
    starts = window_starts(12, 5, 2)
    assert starts[-1] == 7 and starts[0] == 0
    with pytest.raises(DatasetError, match="fewer than the window"):
        window_starts(3, 5, 1)


@pytest.mark.parametrize("method", ["max", "minmax", "percentile"])
def test_normalise_range_and_inverse(method):
    x = np.random.default_rng(0).gamma(2.0, 50.0, size=(10, 10, 10)).astype(np.float32)
    y, params = normalise(x, NormConfig(method=method))
    assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    if method != "percentile":
        np.testing.assert_allclose(denormalise(y, params), x, rtol=1e-4, atol=1e-3)


def test_torchio_subject(tmp_path):
    make_dataset(tmp_path, n=3)
    subj = load_torchio_subject(tmp_path, "sub-001", ["T1w", "angio"])
    assert subj["T1w"].shape == (1, 16, 16, 12)
    np.testing.assert_allclose(subj["angio"].affine, affine())


# ---- bad input: every case gets a clear error naming the file -------------------------------

def test_missing_modality(tmp_path):
    make_dataset(tmp_path, n=3)
    (tmp_path / "sub-002" / "anat" / "sub-002_FLAIR.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"sub-002: missing modality \['FLAIR'\]"):
        load_subject_volumes(tmp_path, "sub-002", ["T1w", "FLAIR", "angio"])


def test_shape_mismatch(tmp_path):
    write_subject(tmp_path, "sub-001", shape=(16, 16, 12))
    write_subject(tmp_path, "sub-001", shape=(16, 16, 10), mods=("T2w",))
    with pytest.raises(DatasetError, match=r"T2w has shape \(16, 16, 10\).*registered and resampled"):
        load_subject_volumes(tmp_path, "sub-001", ["angio", "T2w"])


def test_affine_mismatch(tmp_path):
    write_subject(tmp_path, "sub-001")
    write_subject(tmp_path, "sub-001", mods=("T1w",), aff=affine((1.0, 2.0, 2.0)))
    with pytest.raises(DatasetError, match="affine of T1w"):
        load_subject_volumes(tmp_path, "sub-001", ["angio", "T1w"])


@pytest.mark.parametrize("shape,msg", [((8, 8), "2D image"), ((8, 8, 4, 3), "4D image")])
def test_wrong_dimensionality(tmp_path, shape, msg):
    p = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), str(p))
    with pytest.raises(DatasetError, match=msg):
        load_volume(p)


def test_4d_singleton_is_accepted(tmp_path):
    p = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.float32), np.eye(4)), str(p))
    assert load_volume(p).data.shape == (4, 5, 6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite(tmp_path, bad):
    a = np.ones((6, 6, 6), np.float32)
    a[1, 2, 3] = bad
    p = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(p))
    with pytest.raises(DatasetError, match=r"x.nii.gz: 1 NaN or infinite"):
        load_volume(p)


def test_all_zero(tmp_path):
    p = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), np.eye(4)), str(p))
    with pytest.raises(DatasetError, match="all zeros"):
        load_volume(p)


def test_truncated_and_unreadable(tmp_path):
    p = tmp_path / "t.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(30, 30, 30).astype(np.float32), np.eye(4)), str(p))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match=r"t.nii.gz: unreadable or truncated"):
        load_volume(p)
    q = tmp_path / "g.nii.gz"
    q.write_bytes(gzip.compress(b"this is not a nifti file at all" * 10))
    with pytest.raises(DatasetError, match=r"g.nii.gz: unreadable or truncated"):
        load_volume(q)
    with pytest.raises(DatasetError, match="file not found"):
        load_volume(tmp_path / "missing.nii.gz")


def test_split_names_missing_subject(tmp_path):
    make_dataset(tmp_path, n=3)
    sp = json.loads((tmp_path / "splits.json").read_text())
    sp["test"].append("sub-099")
    (tmp_path / "splits.json").write_text(json.dumps(sp))
    with pytest.raises(DatasetError, match=r"split 'test' lists subject\(s\) \['sub-099'\] that do not exist"):
        Layout(tmp_path).splits()


def test_split_file_missing_and_overlapping(tmp_path):
    make_dataset(tmp_path, n=3)
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["sub-001"], "val": ["sub-001"], "test": []}))
    with pytest.raises(DatasetError, match="both 'train' and 'val'"):
        Layout(tmp_path).splits()
    (tmp_path / "splits.json").unlink()
    with pytest.raises(DatasetError, match="splits.json: missing"):
        Layout(tmp_path).splits()


def test_target_also_source_rejected(tmp_path):
    make_dataset(tmp_path, n=3)
    with pytest.raises(DatasetError, match="also listed as a source"):
        WindowDataset(DataConfig(root=str(tmp_path), sources=("T1w", "angio")), "train")


def test_check_dataset_collects_all_errors(tmp_path, capsys):
    make_dataset(tmp_path, n=4)
    ok = check_dataset(tmp_path)
    assert ok.ok and len(ok.rows) == 4 and ok.split_sizes == {"train": 2, "val": 1, "test": 1}
    assert cli(["data", "check", str(tmp_path)]) == 0
    assert "sub-004" in capsys.readouterr().out
    # break two subjects in two different ways
    (tmp_path / "sub-001" / "anat" / "sub-001_T2w.nii.gz").unlink()
    a = np.ones((16, 16, 12), np.float32)
    a[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(a, affine()), str(tmp_path / "sub-003" / "anat" / "sub-003_FLAIR.nii.gz"))
    bad = check_dataset(tmp_path)
    assert not bad.ok and len(bad.errors) == 2 and len(bad.rows) == 2
    assert cli(["data", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "ERRORS (2)" in out and "sub-001: missing modality ['T2w']" in out and "NaN" in out
