"""Reading the phantom's ground truth back from a written cohort."""

import numpy as np
import pytest

from mmdm.data.layout import DatasetError
from mmdm.data.phantom import generate_subject, load_ground_truth, resolve_config, subject_visibility


def test_ground_truth_round_trip(tiny_cohort):
    gt = load_ground_truth(tiny_cohort, "sub-002")
    subj = generate_subject(1, resolve_config("tiny", n_subjects=3))
    np.testing.assert_array_equal(gt["vessel_labels"], subj.vessel_labels)
    np.testing.assert_allclose(gt["vessel_fraction"], subj.vessel_fraction)
    np.testing.assert_array_equal(gt["brain_mask"], subj.brain_mask > 0)
    assert gt["params"]["participant_id"] == "sub-002"
    assert gt["centerlines"] and gt["centerlines"] == _as_json(subj.centerlines)  # every node, radius, edge


def _as_json(obj):
    """``obj`` as JSON reads it back: tuples become lists, numpy scalars and arrays plain values."""
    if isinstance(obj, dict):
        return {str(k): _as_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_as_json(v) for v in obj]
    return obj.item() if isinstance(obj, np.generic) else obj


def test_visibility_fractions_show_complementarity(tiny_cohort):
    vis = subject_visibility(tiny_cohort, "sub-001")
    f = vis["fraction"]
    singles = [f["T1w"], f["T2w"], f["FLAIR"]]
    assert all(0 < v < 1 for v in singles)
    assert f["union"] > max(singles)


def test_missing_ground_truth_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no phantom ground truth for sub-001"):
        load_ground_truth(tmp_path, "sub-001")
