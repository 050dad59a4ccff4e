"""Robustness to acquisition artefacts: torchio's transforms at stated severities, seeded, and the tables."""

import numpy as np
import pandas as pd
import pytest
import torch

from mmdm.study import robustness


def _head(shape=(24, 24, 16)):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    vol = np.where(x ** 2 + y ** 2 + z ** 2 < 0.7, 1.0 + 0.3 * x, 0.0).astype(np.float32)
    return vol, np.diag([2.0, 2.0, 3.0, 1.0])


@pytest.mark.parametrize("artefact", robustness.ARTEFACTS)
def test_same_seed_same_degraded_input_and_the_artefact_changes_it(artefact):
    vol, aff = _head()
    state = torch.random.get_rng_state()
    a = robustness.degrade(vol, aff, artefact, 2, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    b = robustness.degrade(vol, aff, artefact, 2, seed=11)
    assert a.shape == vol.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, vol, atol=1e-4)
    if artefact != "blur":  # a blur has no random part: only its severity matters
        c = robustness.degrade(vol, aff, artefact, 2, seed=12)
        assert not np.array_equal(a, c)


@pytest.mark.parametrize("artefact", ["noise", "blur", "ghosting", "bias"])
def test_a_higher_severity_changes_the_input_more(artefact):
    vol, aff = _head()
    change = [np.abs(robustness.degrade(vol, aff, artefact, s, seed=3) - vol).mean() for s in (1, 2, 3)]
    assert change[0] < change[1] < change[2]


def test_noise_std_is_the_stated_fraction_of_the_scaled_volume():
    vol, aff = _head((40, 40, 40))
    scale = np.percentile(vol, robustness.SCALE_PERCENTILE)
    d = robustness.degrade(vol, aff, "noise", 3, seed=0) - vol
    assert d.std() / scale == pytest.approx(robustness.SEVERITIES["noise"][2]["std"], rel=0.05)


def test_transforms_are_torchios_and_bad_arguments_say_what_to_choose():
    import torchio as tio

    assert isinstance(robustness.transform("motion", 1), tio.RandomMotion)
    assert isinstance(robustness.transform("spike", 3), tio.RandomSpike)
    with pytest.raises(ValueError, match="choose from bias"):
        robustness.transform("zipper", 1)
    with pytest.raises(ValueError, match="severity is 1, 2 or 3"):
        robustness.transform("noise", 4)
    with pytest.raises(ValueError, match="unknown artefact"):
        robustness.RobustnessConfig(artefacts=("zipper",)).validate()


def test_degradation_seed_names_every_part_and_is_stable():
    base = robustness.degradation_seed(0, "noise", 1, "sub-001", "T1w")
    assert base == robustness.degradation_seed(0, "noise", 1, "sub-001", "T1w")
    others = {robustness.degradation_seed(*args) for args in [(1, "noise", 1, "sub-001", "T1w"),
              (0, "blur", 1, "sub-001", "T1w"), (0, "noise", 2, "sub-001", "T1w"), (0, "noise", 1, "sub-002", "T1w"),
              (0, "noise", 1, "sub-001", "T2w")]}
    assert base not in others and len(others) == 5 and 0 <= base < 2 ** 63


def _table():
    rows = []
    for run, drop in (("mmdm-full", 1.0), ("pix2pix", 3.0)):
        for s, clean in (("a", 20.0), ("b", 22.0)):
            rows.append({"run": run, "subject": s, "artefact": "clean", "severity": 0, "input_hash": f"c{s}",
                         "psnr": clean})
            for sev in (1, 2, 3):
                rows.append({"run": run, "subject": s, "artefact": "noise", "severity": sev, "input_hash": f"n{s}{sev}",
                             "psnr": clean - drop * sev})
    return pd.DataFrame(rows)


def test_drop_table_is_the_paired_change_to_the_worst_severity_and_curves_start_clean():
    t = _table()
    d = robustness.drop_table(t)
    assert d.loc["mmdm-full", "noise"] == pytest.approx(-3.0) and d.loc["pix2pix", "noise"] == pytest.approx(-9.0)
    c = robustness.curves(t)
    row = c[(c.run == "pix2pix") & (c.artefact == "noise") & (c.severity == 0)]
    assert row.psnr.iloc[0] == pytest.approx(21.0)
    assert robustness.same_inputs(t)
    t.loc[(t.run == "pix2pix") & (t.severity == 2), "input_hash"] = "other"
    assert not robustness.same_inputs(t)


def test_the_pages_severity_table_is_read_from_the_stated_parameters():
    t = robustness.severity_table()
    assert list(t.index) == list(robustness.ARTEFACTS)
    assert t.loc["motion", "severity 3"] == "10°, 10 mm, 3"
    assert t.loc["noise", "severity 2"] == f"{robustness.SEVERITIES['noise'][1]['std']:g}"
