"""Test-only phantom subjects: a 16+ subject test split without changing existing subjects."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mmdm.config import ConfigError, from_dict, to_dict
from mmdm.data.layout import DatasetError, Layout, make_splits, subject_id
from mmdm.data.phantom import PROFILES, PhantomConfig, build_cohort
from mmdm.data.phantom.cohort import _config_record, _same_record, _streams, cohort_splits
from mmdm.data.volumes import load_volume
from mmdm.paths import repo_root

QUICK, STANDARD = PROFILES["quick"], PROFILES["standard"]


def test_quick_split_is_the_pre_existing_rule():
    """Without extra subjects the split is make_splits of all subjects, as every cohort built so far."""
    ids = [subject_id(i + 1) for i in range(QUICK.n_subjects)]
    split = cohort_splits(QUICK)
    assert split == make_splits(ids, seed=QUICK.split_seed)
    assert [len(split[k]) for k in ("train", "val", "test")] == [28, 4, 8]


def test_standard_cohort_keeps_train_val_and_the_quick_test_subjects_and_has_16_test():
    q, s = cohort_splits(QUICK), cohort_splits(STANDARD)
    assert s["train"] == q["train"] and s["val"] == q["val"]
    assert set(q["test"]) < set(s["test"])
    assert len(s["test"]) >= 16
    added = sorted(set(s["test"]) - set(q["test"]))
    assert added == [subject_id(i + 1) for i in range(QUICK.n_subjects, STANDARD.total_subjects)]
    every = s["train"] + s["val"] + s["test"]
    assert len(every) == len(set(every)) == STANDARD.total_subjects


def test_the_first_40_subjects_have_identical_generation_inputs():
    """generate_subject(i, cfg) reads cfg and the streams of (seed, i): both agree for every old index."""
    assert dataclasses.replace(STANDARD, name=QUICK.name, extra_test_subjects=0) == QUICK
    for i in range(QUICK.n_subjects):
        a, b = _streams(QUICK, i), _streams(STANDARD, i)
        assert a.keys() == b.keys()
        for name in a:
            assert np.array_equal(a[name].random(4), b[name].random(4)), (i, name)


def test_a_cohort_built_before_the_field_existed_is_still_recognised():
    """A quick cohort's record written before extra_test_subjects existed describes the same config."""
    new = json.loads(json.dumps(_config_record(QUICK)))
    old = {**new, "config": {k: v for k, v in new["config"].items() if k != "extra_test_subjects"}}
    assert _same_record(old, new)
    assert not _same_record(old, json.loads(json.dumps(_config_record(STANDARD))))
    changed = {**old, "config": {**old["config"], "seed": 5}}
    assert not _same_record(changed, new)
    assert _config_record(STANDARD)["config"]["extra_test_subjects"] == STANDARD.extra_test_subjects
    assert from_dict(PhantomConfig, to_dict(STANDARD)) == STANDARD


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_extra_subject_counts_raise(bad):
    with pytest.raises(ConfigError, match="extra_test_subjects must be an integer >= 0"):
        dataclasses.replace(QUICK, extra_test_subjects=bad)


def test_committed_standard_records_agree_with_the_split():
    """The committed standard records were made on the quick cohort: their validation subjects (the fitted
    vessel segmentation) and test subjects must be the quick split's, and lie inside the standard cohort's."""
    res = repo_root() / "results" / "standard"
    summary, seg = res / "mmdm-full" / "summary.json", res / "vessel_segmentation.yaml"
    if not summary.is_file() or not seg.is_file():
        pytest.skip("no committed standard records")
    import yaml

    tested = set(json.loads(summary.read_text())["subjects"])
    fitted = set(yaml.safe_load(seg.read_text())["fitted_on"])
    q, s = cohort_splits(QUICK), cohort_splits(STANDARD)
    assert fitted == set(q["val"]) == set(s["val"])
    assert set(q["test"]) <= tested <= set(s["test"])


def test_build_cohort_writes_test_only_subjects_identical_to_the_same_index(tiny_cohort, tmp_path):
    cfg = dataclasses.replace(PROFILES["tiny"], n_subjects=1, extra_test_subjects=1)
    root = build_cohort(tmp_path / "extra", cfg, progress=False)
    assert Layout(root).splits() == {"train": ["sub-001"], "val": [], "test": ["sub-002"]}
    rows = (root / "participants.tsv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2
    for sub in ("sub-001", "sub-002"):  # the same (seed, index) as the 3-subject tiny cohort -> the same data
        for mod in ("angio", "T2w"):
            a = load_volume(root / sub / "anat" / f"{sub}_{mod}.nii.gz")
            b = load_volume(tiny_cohort / sub / "anat" / f"{sub}_{mod}.nii.gz")
            assert np.array_equal(a.data, b.data) and np.array_equal(a.affine, b.affine), (sub, mod)
    # a rebuild with the same config is recognised and skipped; the record carries the field
    desc_path = root / "dataset_description.json"
    desc = json.loads(desc_path.read_text())
    assert desc["GeneratedBy"][0]["Parameters"]["config"]["extra_test_subjects"] == 1
    stamp = desc_path.stat().st_mtime_ns
    assert build_cohort(root, cfg, progress=False) == root and desc_path.stat().st_mtime_ns == stamp
    with pytest.raises(DatasetError, match="different configuration"):
        build_cohort(root, dataclasses.replace(cfg, extra_test_subjects=2), progress=False)
