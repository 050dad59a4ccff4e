"""Whole-volume validation (mmdm.engine.volume_validation): every slice of the validation subjects,
scored as the tables score a test subject, logged beside the vessel score."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import make_dataset
from mmdm.config import ConfigError
from mmdm.data.dataset import DataConfig
from mmdm.data.layout import Layout
from mmdm.engine.train import train
from mmdm.engine.volume_validation import VOLUME_SCORES, ValidationVolumes
from mmdm.metrics import evaluate_volumes
from test_vessel_training import Copy, cfg_for


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("volume-val-data")
    make_dataset(root, n=5, shape=(16, 16, 12))
    return root


def _vol(root: Path, subject: str, mod: str) -> np.ndarray:
    return nib.load(str(root / subject / "anat" / f"{subject}_{mod}.nii.gz")).get_fdata()


@pytest.mark.parametrize("stride", [1, 5])
def test_scores_equal_the_tables_metrics_of_the_whole_volume(dataset, stride, one_thread):
    vv = ValidationVolumes(DataConfig(root=str(dataset), sources=("T1w", "T2w")), n=3, stride=stride, steps=2)
    assert list(vv.subjects) == Layout(dataset).split("val")  # only one validation subject exists
    out = vv.score(Copy(echo="T1w"), torch.device("cpu"), seed=0, batch_size=4)
    s = vv.subjects[0]
    t1, angio = _vol(dataset, s, "T1w"), _vol(dataset, s, "angio")
    # Copy echoes T1w; max-normalised and mapped back, the prediction is T1w / max(T1w) on every slice
    ref = evaluate_volumes(t1 / t1.max(), angio / angio.max())
    for k in ("psnr", "ssim", "mip_psnr", "mip_ssim"):
        assert out[k] == pytest.approx(ref[k], rel=1e-5), k
    assert math.isnan(out["vessel_recovery"])  # no phantom ground truth here
    assert (out["n_subjects"], out["stride"], out["steps"], out["subjects"]) == (1, stride, 2, [s])


class NoisyCopy(Copy):
    """``sample`` echoes a source plus noise from the sampling generator, so the scores depend on the
    order in which the windows draw from it."""

    @torch.no_grad()
    def sample(self, sources, steps=None, eta=None, generator=None, progress=False):
        x = sources[self.echo]
        return x + 0.2 * torch.randn(x.shape, generator=generator)


def test_volumes_read_once_score_as_the_subject_loop_that_reads_them_each_time(tmp_path, one_thread, monkeypatch):
    import mmdm.engine.infer as infer

    root = tmp_path / "data"
    subjects = sorted(make_dataset(root, n=6, shape=(16, 16, 12)))
    (root / "splits.json").write_text(json.dumps({"train": subjects[:3], "val": subjects[3:5], "test": subjects[5:]}))
    data = DataConfig(root=str(root), sources=("T1w", "T2w"))
    vv = ValidationVolumes(data, n=2, stride=3, steps=2)
    assert len(vv.subjects) == 2
    method = NoisyCopy(echo="T2w")
    reads = []
    real = infer.load_subject_volumes
    monkeypatch.setattr(infer, "load_subject_volumes", lambda *a, **k: reads.append(a[1]) or real(*a, **k))
    first = vv.score(method, torch.device("cpu"), seed=4, batch_size=2)
    second = vv.score(method, torch.device("cpu"), seed=4, batch_size=2)
    assert reads == list(vv.subjects)  # read at the first validation only
    same = [first[k] == second[k] or (math.isnan(first[k]) and math.isnan(second[k])) for k in VOLUME_SCORES]
    assert first.keys() == second.keys() and all(same)
    # the reference: every subject loaded and synthesised by the subject loop, one generator through them
    gen = torch.Generator().manual_seed(4)
    rows = [evaluate_volumes(it.result["mean"], it.target.data / float(it.target.data.max()))
            for it in infer.synthesize_subjects(method, data, vv.subjects, lambda i, s: gen, with_target=True,
                                                stride=3, steps=2, batch_size=2, progress=False)]
    for k in ("psnr", "ssim", "mip_psnr", "mip_ssim"):
        assert first[k] == float(np.mean([r[k] for r in rows])), k


def test_trainer_logs_the_whole_volume_scores_with_each_validation(tmp_path, dataset, one_thread):
    cfg = cfg_for(dataset, steps=4, val_every=2, val_windows=0, val_batches=1, val_volumes=1, val_volume_stride=3,
                  val_volume_steps=1)
    train(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    assert all(x["volume"]["stride"] == 3 and x["volume"]["steps"] == 1 and x["volume"]["n_subjects"] == 1
               for x in lines)
    assert all(math.isfinite(x["volume"]["psnr"]) for x in lines)
    # without val_volumes the entry has no volume scores
    train(cfg_for(dataset, steps=2, val_every=2, val_windows=0, val_batches=1), tmp_path / "run0", progress=False)
    assert "volume" not in json.loads((tmp_path / "run0" / "validation.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("field,value,msg", [("val_volumes", -1, "val_volumes"),
                                             ("val_volume_stride", 0, "val_volume_stride"),
                                             ("val_volume_steps", 0, "val_volume_steps")])
def test_bad_settings_are_refused(dataset, field, value, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg_for(dataset, **{field: value}).validate()


def test_volume_curves_read_the_whole_volume_entries_of_complete_records(tmp_path):
    from mmdm.study.records import volume_curves

    for name, complete in (("a", True), ("b", False)):
        rec = tmp_path / name
        rec.mkdir()
        lines = [{"step": 2, "losses": {}, "vessel": {}},  # an entry written before whole-volume validation
                 {"step": 4, "losses": {}, "vessel": {}, "volume": {"psnr": 20.5, "ssim": 0.4, "mip_psnr": 18.0,
                                                                    "mip_ssim": 0.3, "vessel_recovery": 0.2,
                                                                    "stride": 5, "steps": 5}},
                 {"step": 4, "volume": {"psnr": 21.0}}]  # a resumed run validated step 4 again: the last counts
        (rec / "validation.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        if complete:
            (rec / "summary.json").write_text(json.dumps({"method": "m"}))
    c = volume_curves(tmp_path)
    assert list(c.run) == ["a"] and list(c.step) == [4] and c.psnr.iloc[0] == 21.0 and math.isnan(c.ssim.iloc[0])
