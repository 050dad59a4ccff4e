"""Tests of whole-volume synthesis (mmdm.engine.infer), run evaluation and records (mmdm.engine.evaluate,
mmdm.engine.rundir) and the engine CLI."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from helpers import make_dataset
from mmdm.config import ConfigError
from mmdm.data.dataset import DataConfig
from mmdm.data.layout import DatasetError
from mmdm.data.volumes import NormConfig, normalise
from mmdm.engine import cli as engine_cli
from mmdm.engine.infer import std_path, synthesize_files, synthesize_volume
from mmdm.engine.evaluate import evaluate_run
from mmdm.engine.rundir import load_summary, run_status
from mmdm.engine.spec import TrainConfig
from mmdm.engine.train import train
from mmdm.methods.base import OptimConfig, SynthesisMethod
from mmdm.metrics import METRIC_KEYS, evaluate_files
from mmdm.regions import region_errors, slice_errors


class WindowStub(SynthesisMethod):
    """``sample`` = 0.5 * first source + 0.1 * k / K on channel k (+ optional noise):
    a known function of the window that also depends on the slice's position in it."""

    name = "window-stub"

    def __init__(self, sources=("T1w", "T2w"), window=5, noise=0.0, multiple=1):
        super().__init__()
        self.sources = tuple(sources)
        self.window = window
        self.noise = noise
        self.spatial_multiple = multiple
        self.w = nn.Parameter(torch.zeros(()))

    def sample(self, sources, steps=None, eta=None, generator=None, progress=False):
        self.check_sources(sources)  # enforces spatial_multiple
        y = sources[self.sources[0]]
        k = torch.arange(y.shape[1], dtype=y.dtype).view(1, -1, 1, 1) / y.shape[1]
        out = 0.5 * y + 0.1 * k
        if self.noise:
            out = out + self.noise * torch.randn(y.shape, generator=generator)
        return out


def expected_volume(src: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Independent reference: average, per slice, the stub's value from every window holding it."""
    y = normalise(src, NormConfig())[0].astype(np.float64)
    depth = src.shape[2]
    starts = sorted(set(range(0, depth - window + 1, stride)) | {depth - window})
    out = np.zeros_like(y)
    for z in range(depth):
        vals = [0.5 * y[:, :, z] + 0.1 * (z - s) / window for s in starts if s <= z < s + window]
        assert vals, f"slice {z} not covered"
        out[:, :, z] = np.mean(vals, axis=0)
    return (out + 1) / 2


@pytest.mark.parametrize("stride,depth", [(1, 12), (2, 12), (2, 13), (3, 11), (5, 5)])
def test_sliding_window_reconstructs_overlap_average(stride, depth):
    rng = np.random.default_rng(depth)
    src = {"T1w": rng.random((6, 7, depth)).astype(np.float32) * 50,
           "T2w": rng.random((6, 7, depth)).astype(np.float32)}
    res = synthesize_volume(WindowStub(), src, window=5, stride=stride, batch_size=3, progress=False)
    assert res["mean"].shape == (6, 7, depth) and res["mean"].dtype == np.float32 and "std" not in res
    np.testing.assert_allclose(res["mean"], expected_volume(src["T1w"], 5, stride), rtol=0, atol=1e-6)
    assert res["windows"] == len(set(range(0, depth - 4, stride)) | {depth - 5})


def test_padding_to_the_network_multiple_is_cropped_back():
    rng = np.random.default_rng(0)
    src = {m: rng.random((10, 13, 7)).astype(np.float32) for m in ("T1w", "T2w")}
    with pytest.raises(ValueError, match="multiples of 8"):
        WindowStub(multiple=8).sample({m: torch.zeros(1, 5, 10, 13) for m in src})
    res = synthesize_volume(WindowStub(multiple=8), src, window=5, stride=1, progress=False)
    np.testing.assert_allclose(res["mean"], expected_volume(src["T1w"], 5, 1), atol=1e-6)


def test_samples_give_zero_std_for_a_deterministic_method_and_the_noise_std_otherwise():
    rng = np.random.default_rng(1)
    src = {m: rng.random((8, 8, 10)).astype(np.float32) for m in ("T1w", "T2w")}
    det = synthesize_volume(WindowStub(), src, window=5, stride=5, n_samples=3, progress=False)
    assert np.array_equal(det["std"], np.zeros_like(det["std"]))
    n = 400
    noisy = synthesize_volume(WindowStub(noise=0.1), src, window=5, stride=5, n_samples=n, progress=False)
    # stride = window: each slice comes from one window; noise sd 0.1 in [-1, 1] -> 0.05 in [0, 1]
    assert noisy["std"].min() > 0
    assert float(np.mean(noisy["std"])) == pytest.approx(0.05 * np.sqrt((n - 1) / n), rel=0.03)
    np.testing.assert_allclose(noisy["mean"], det["mean"], atol=0.05 * 5 / np.sqrt(n))


def test_missing_modality_and_short_volume_are_clear_errors():
    vol = np.ones((4, 4, 8), np.float32)
    with pytest.raises(ValueError, match=r"missing source modality\(ies\) \['T2w'\].*needs \['T1w', 'T2w'\]"):
        synthesize_volume(WindowStub(), {"T1w": vol}, progress=False)
    with pytest.raises(DatasetError, match="fewer than the window"):
        synthesize_volume(WindowStub(), {"T1w": vol[..., :3], "T2w": vol[..., :3]}, progress=False)


# ----------------------------------------------------------------------------
# trained runs: files, evaluation, CLI


class TinyConv(SynthesisMethod):
    """Trainable 1x1-conv regression used to make small real runs."""

    name = "tiny-conv"

    def __init__(self, sources=("T1w", "T2w"), window=5):
        super().__init__()
        self.sources = tuple(sources)
        self.window = window
        self.conv = nn.Conv2d(len(self.sources) * window, window, 1)
        self.lr = 1e-2

    def objective(self):
        return "MSE of a 1x1 convolution of the sources"

    def training_losses(self, batch, generator=None, group="main"):
        x0, ys = self.check_batch(batch)
        return {"loss": (self.conv(torch.cat(ys, 1)) - x0).pow(2).mean()}

    def optim_configs(self):
        return {g: OptimConfig(lr=self.lr) for g in self.optimizer_groups()}

    @torch.no_grad()
    def sample(self, sources, steps=None, eta=None, generator=None, progress=False):
        return self.conv(torch.cat(self.source_list(sources), 1)).clamp(-1, 1)


def build_tiny_conv(**kw) -> TinyConv:
    return TinyConv(**kw)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    make_dataset(root / "data", n=5, shape=(16, 16, 12))
    cfg = TrainConfig(method="test_engine_infer:build_tiny_conv", method_kwargs={},
                      data=DataConfig(root=str(root / "data"), sources=("T1w", "T2w")), steps=3, epochs=None,
                      batch_size=2, device="cpu", checkpoint_every=0, image_every=0)
    run = train(cfg, root / "run", progress=False)
    return run


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return path


def test_synthesize_files_keeps_the_source_affine(trained_run, tmp_path):
    rng = np.random.default_rng(2)
    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.array([[0.9 * c, -0.9 * s, 0, 10.0], [0.9 * s, 0.9 * c, 0, -20.0], [0, 0, 1.5, 33.0], [0, 0, 0, 1]])
    vols = {m: rng.random((16, 16, 9)).astype(np.float32) * 100 for m in ("T1w", "T2w")}
    inputs = {m: _write(tmp_path / f"{m}.nii.gz", v, aff) for m, v in vols.items()}
    out = synthesize_files(trained_run, inputs, tmp_path / "tof.nii.gz", n_samples=2, scale=2.0, device="cpu",
                           progress=False, allow_code=True)
    img = nib.load(str(out["mean"]))
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    assert img.shape == (16, 16, 9) and int(img.header["qform_code"]) == 1
    from mmdm.engine.infer import load_run_method

    method, cfg, _ = load_run_method(trained_run, allow_code=True)
    ref = synthesize_volume(method, vols, window=5, stride=cfg.data.eval_stride, progress=False)
    np.testing.assert_allclose(np.asarray(img.dataobj), 2.0 * ref["mean"], atol=1e-6)
    assert out["std"] == std_path(tmp_path / "tof.nii.gz") and out["std"].name == "tof_std.nii.gz"
    with pytest.raises(ValueError, match=r"missing input modality\(ies\) \['T2w'\].*--t1w PATH, --t2w PATH"):
        synthesize_files(trained_run, {"T1w": inputs["T1w"]}, tmp_path / "x.nii.gz", progress=False, allow_code=True)


def test_evaluate_run_writes_metrics_then_summary(trained_run, tmp_path, monkeypatch):
    assert run_status(trained_run) == "trained"
    with pytest.raises(RuntimeError, match="unfinished.*evaluate-run"):
        load_summary(trained_run)
    summary = evaluate_run(trained_run, split="train", device="cpu", progress=False, allow_code=True)
    assert run_status(trained_run) == "finished" and load_summary(trained_run) == json.loads(json.dumps(summary))
    with open(trained_run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["subject"] for r in rows] == ["sub-001", "sub-002", "sub-003"] == summary["subjects"]
    for k in METRIC_KEYS:
        assert summary["metrics"][k] == pytest.approx(np.mean([float(r[k]) for r in rows]), rel=1e-12)
    # each row equals an independent evaluation of the written files
    data_root = trained_run.parent / "data"
    pred = trained_run / "predictions" / "sub-002_angio.nii.gz"
    target = data_root / "sub-002" / "anat" / "sub-002_angio.nii.gz"
    np.testing.assert_allclose(nib.load(str(pred)).affine, nib.load(str(target)).affine)
    timg = nib.load(str(target))
    t = np.asarray(timg.dataobj, dtype=np.float64)
    scaled = _write(tmp_path / "target01.nii.gz", t / t.max(), timg.affine)  # the [0, 1] convention
    ref = evaluate_files(pred, scaled)
    for k in METRIC_KEYS:
        assert float(rows[1][k]) == pytest.approx(ref[k], rel=1e-5, abs=1e-6)
    # the region breakdown and slice profile of the same subject, recomputed from the written files
    pvol = nib.load(str(pred)).get_fdata()
    regions = {r["subject"]: r for r in csv.DictReader(open(trained_run / "regions.csv", newline=""))}
    for k, v in region_errors(pvol, t / t.max()).items():
        assert float(regions["sub-002"][k]) == pytest.approx(v, rel=1e-5, abs=1e-6)
    slices = [r for r in csv.DictReader(open(trained_run / "slice_errors.csv", newline="")) if r["subject"] == "sub-002"]
    assert [float(r["mse"]) for r in slices] == pytest.approx([r["mse"] for r in slice_errors(pvol, t / t.max())],
                                                               rel=1e-5)
    assert summary["regions"]["background_bias"] == pytest.approx(
        np.mean([float(r["background_bias"]) for r in regions.values()]), rel=1e-9)
    assert summary["training"]["checkpoint_step"] == summary["checkpoint"]["step"]
    assert summary["training"]["ema_evaluated"] is False and summary["training"]["batch_size"] >= 1
    assert summary["provenance"]["sessions"][0]["device"] == "cpu"
    assert {"commit", "dirty"} <= set(summary["provenance"]["git"])
    assert summary["objective"] == "MSE of a 1x1 convolution of the sources"  # the record names its objective

    # an interrupted re-evaluation never leaves the old summary behind
    import mmdm.engine.infer as infer_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(infer_mod, "synthesize_volume", boom)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(trained_run, split="train", device="cpu", progress=False, allow_code=True)
    assert run_status(trained_run) == "evaluating" and not (trained_run / "summary.json").exists()


def test_evaluate_run_refuses_an_unfinished_training(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("steps: 3\n")
    assert run_status(run) == "training"
    with pytest.raises(RuntimeError, match="has not finished training.*--resume"):
        evaluate_run(run, progress=False)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdm")
    sub = p.add_subparsers(dest="command")
    engine_cli.add_train_parser(sub)
    engine_cli.add_synthesize_parser(sub)
    engine_cli.add_evaluate_run_parser(sub)
    return p


def test_cli_train_flags_build_the_config(tmp_path):
    args = _parser().parse_args(["train", "--run-dir", str(tmp_path / "r"), "--method", "mmdm", "--variant", "mip",
                                 "--method-config", "small", "--data", "d", "--sources", "T1w", "T2w",
                                 "--steps", "50", "--set", "data.window=3", "--set", "ema={decay: 0.9}"])
    cfg = engine_cli.config_from_args(args)
    assert cfg.method == "mmdm" and cfg.method_kwargs == {"variant": "mip", "config": "small"}
    assert cfg.data.root == "d" and cfg.data.sources == ("T1w", "T2w") and cfg.data.window == 3
    assert cfg.steps == 50 and cfg.epochs is None and cfg.ema.decay == 0.9 and cfg.ema.start_step == 30000
    bad = _parser().parse_args(["train", "--run-dir", "r", "--set", "steps"])
    with pytest.raises(ConfigError, match="expected key=value"):
        engine_cli.config_from_args(bad)


def test_cli_synthesize_and_evaluate_run(trained_run, tmp_path, capsys):
    rng = np.random.default_rng(3)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = {m: _write(tmp_path / f"{m}.nii.gz", rng.random((16, 16, 7)), aff) for m in ("T1w", "T2w")}
    p = _parser()
    args = p.parse_args(["synthesize", "--run", str(trained_run), "--t1w", str(paths["T1w"]), "--out",
                         str(tmp_path / "o.nii.gz"), "--quiet", "--allow-code"])
    assert args.func(args) == 2
    assert "--t2w PATH" in capsys.readouterr().err
    args = p.parse_args(["synthesize", "--run", str(trained_run), "--t1w", str(paths["T1w"]), "--source",
                         f"T2w={paths['T2w']}", "--out", str(tmp_path / "o.nii.gz"), "--quiet", "--device", "cpu",
                         "--allow-code"])
    assert args.func(args) == 0 and (tmp_path / "o.nii.gz").is_file()
    args = p.parse_args(["evaluate-run", str(trained_run), "--split", "test", "--quiet", "--device", "cpu",
                          "--allow-code"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "axial MIP" in out and "1 subject(s), split 'test'" in out
    assert "vessel score (1 subject(s), lumen: bright_target): contrast recovery" in out


def test_synthesize_then_evaluate_matches_evaluate_runs_row(trained_run, tmp_path, capsys):
    """The README's two commands: `mmdm synthesize` on a subject's sources, then `mmdm evaluate` against
    the subject's raw TOF (max ~400 here), give evaluate-run's row for that subject, at any --scale;
    so does `mmdm evaluate` on evaluate-run's own prediction file."""
    from mmdm.cli import main as mmdm_main
    from mmdm.engine.rundir import read_metrics_csv

    summary = evaluate_run(trained_run, split="test", device="cpu", progress=False, allow_code=True)
    sub = summary["subjects"][0]
    row = read_metrics_csv(trained_run / "metrics.csv")[0]
    anat = trained_run.parent / "data" / sub / "anat"
    target = anat / f"{sub}_angio.nii.gz"
    assert float(np.asarray(nib.load(str(target)).dataobj).max()) > 100  # a raw TOF, not a [0, 1] one
    preds = [trained_run / "predictions" / f"{sub}_angio.nii.gz"]
    for scale in ("1", "250"):
        out = tmp_path / f"tof-x{scale}.nii.gz"
        assert mmdm_main(["synthesize", "--run", str(trained_run), "--t1w", str(anat / f"{sub}_T1w.nii.gz"),
                          "--t2w", str(anat / f"{sub}_T2w.nii.gz"), "--out", str(out), "--scale", scale,
                          "--quiet", "--device", "cpu", "--allow-code"]) == 0
        preds.append(out)
    capsys.readouterr()
    for pred in preds:
        assert mmdm_main(["evaluate", "--pred", str(pred), "--target", str(target), "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        for k in METRIC_KEYS:
            assert got[k] == pytest.approx(row[k], rel=1e-5), (pred.name, k)  # float32 files
    # the same values without the declaration are read in the target's units (the metrics' convention):
    # a [0, 1] volume against a raw TOF, the mismatch the declaration removes
    plain = _write(tmp_path / "plain.nii.gz", np.asarray(nib.load(str(preds[1])).dataobj),
                   nib.load(str(target)).affine)
    assert evaluate_files(plain, target)["psnr"] < row["psnr"] - 3


def test_real_mmdm_small_trains_and_evaluates(tmp_path):
    """Integration: the registered MMDM ('small', full variant) through train + evaluate_run."""
    make_dataset(tmp_path / "data", n=5, shape=(16, 16, 8))  # few windows: keeps it fast (SSIM needs 7 slices)
    cfg = TrainConfig(method="mmdm", method_kwargs={"variant": "full", "config": "small"},
                      data=DataConfig(root=str(tmp_path / "data"), sources=("T1w", "T2w", "FLAIR")), steps=2,
                      epochs=None, batch_size=2, device="cpu", checkpoint_every=1, keep_last=1, image_every=0,
                      log_every=1)
    run = train(cfg, tmp_path / "run", progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002.pt"]
    summary = evaluate_run(run, steps=2, batch_size=8, device="cpu", progress=False)
    assert summary["n_subjects"] == 1 and all(np.isfinite(summary["metrics"][k]) for k in ("psnr", "ssim"))
    pred = nib.load(str(run / "predictions" / "sub-005_angio.nii.gz"))
    assert pred.shape == (16, 16, 8)
    v = np.asarray(pred.dataobj)
    assert v.min() >= 0.0 and v.max() <= 1.0


@pytest.mark.slow
def test_mmdm_small_on_the_tiny_phantom(tmp_path):
    """Integration on the phantom cohort: train a few steps, evaluate every test subject."""
    from mmdm.data.layout import Layout
    from mmdm.data.phantom import build_cohort
    from mmdm.engine.rundir import read_metrics_csv

    data = build_cohort(tmp_path / "phantom", "tiny", progress=False)
    cfg = TrainConfig(method="mmdm", method_kwargs={"variant": "full", "config": "small"},
                      data=DataConfig(root=str(data)), steps=4, epochs=None, batch_size=2, device="cpu",
                      checkpoint_every=2, image_every=4, image_steps=2)
    run = train(cfg, tmp_path / "run", progress=False)
    summary = evaluate_run(run, steps=2, progress=False)
    test = Layout(data).split("test")
    rows = read_metrics_csv(run / "metrics.csv")
    assert [r["subject"] for r in rows] == test == summary["subjects"]
    for k in METRIC_KEYS:
        assert summary["metrics"][k] == pytest.approx(np.mean([r[k] for r in rows]), rel=1e-12)
    for s in test:
        pred = nib.load(str(run / "predictions" / f"{s}_angio.nii.gz"))
        target = nib.load(str(Path(data) / s / "anat" / f"{s}_angio.nii.gz"))
        assert pred.shape == target.shape
        np.testing.assert_allclose(pred.affine, target.affine, atol=1e-5)


# ----------------------------------------------------------------------------
# run directories: no foreign code, inputs never overwritten, records never lost


def _copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


HUBCONF = """from pathlib import Path
Path(__file__).with_name("MARKER").write_text("foreign code ran")
dependencies = []


def m(**kwargs):
    return None
"""


def test_a_stored_run_cannot_run_foreign_code_without_allow_code(trained_run, tmp_path, capsys):
    """config.yaml naming `torch.hub:load` with a hubconf.py in the run directory: refused by
    synthesize and evaluate-run (the hubconf's marker is never written) unless --allow-code."""
    import yaml

    from mmdm.cli import main as mmdm_main

    run = _copy_run(trained_run, tmp_path / "evil")
    (run / "hubconf.py").write_text(HUBCONF)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["method"] = "torch.hub:load"
    cfg["method_kwargs"] = {"repo_or_dir": str(run), "model": "m", "source": "local"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "summary.json").write_text('{"finished": true}')
    anat = trained_run.parent / "data" / "sub-005" / "anat"
    synth = ["synthesize", "--run", str(run), "--t1w", str(anat / "sub-005_T1w.nii.gz"), "--t2w",
             str(anat / "sub-005_T2w.nii.gz"), "--out", str(tmp_path / "o.nii.gz"), "--quiet", "--device", "cpu"]
    for argv in (synth, ["evaluate-run", str(run), "--quiet", "--device", "cpu"]):
        assert mmdm_main(argv) == 2
        err = capsys.readouterr().err
        assert "torch.hub:load" in err and "--allow-code" in err and len(err.strip().splitlines()) == 1
        assert not (run / "MARKER").exists()
    assert (run / "summary.json").read_text() == '{"finished": true}'  # the refusal touched no record
    with pytest.raises(ConfigError, match="registered method"):
        from mmdm.engine.infer import load_run_method

        load_run_method(run)
    assert not (run / "MARKER").exists()
    # the opt-in really runs it (the test's attack is real), and says so in --help
    assert mmdm_main([*synth, "--allow-code"]) == 2
    assert (run / "MARKER").read_text() == "foreign code ran"
    for cmd in ("synthesize", "evaluate-run"):
        with pytest.raises(SystemExit):
            mmdm_main([cmd, "--help"])
        assert "EXECUTED" in " ".join(capsys.readouterr().out.split())


def _two_sources(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(4)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    return {m: _write(tmp_path / f"{m}.nii.gz", rng.random((16, 16, 7)) * 100, aff) for m in ("T1w", "T2w")}


def test_synthesize_never_overwrites_an_input_and_checks_the_output_first(trained_run, tmp_path, capsys,
                                                                           monkeypatch):
    import os

    import mmdm.engine.infer as infer_mod
    import mmdm.io as io_mod
    from mmdm.cli import main as mmdm_main

    src = _two_sources(tmp_path)
    before = {m: p.read_bytes() for m, p in src.items()}
    (tmp_path / "link.nii.gz").symlink_to(src["T2w"])
    os.link(src["T1w"], tmp_path / "hard.nii.gz")
    (tmp_path / "afile").write_text("x")

    def never(*a, **k):
        raise AssertionError("synthesis ran although the output was refused")

    monkeypatch.setattr(infer_mod, "synthesize_volume", never)

    def synth(out: Path, *extra: str) -> tuple[int, str]:
        code = mmdm_main(["synthesize", "--run", str(trained_run), "--t1w", str(src["T1w"]), "--t2w",
                          str(src["T2w"]), "--out", str(out), "--quiet", "--device", "cpu", "--allow-code", *extra])
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
        return code, err

    for out, msg in ((src["T1w"], "input file"), (tmp_path / "link.nii.gz", "input file"),
                     (tmp_path / "hard.nii.gz", "input file"),
                     (trained_run / "checkpoints" / "step-00000003.pt", "must end in"),
                     (tmp_path / "tof.txt", "must end in"), (tmp_path, "is a directory"),
                     (tmp_path / "afile" / "tof.nii.gz", "not a directory")):
        code, err = synth(out)
        assert code == 2 and msg in err, (out, err)
    # the std map of --samples 2 is checked too: <out>_std.nii.gz is the T2w input here
    (tmp_path / "x_std.nii.gz").symlink_to(src["T2w"])
    code, err = synth(tmp_path / "x.nii.gz", "--samples", "2")
    assert code == 2 and "x_std.nii.gz is the input file" in err
    for scale in ("0", "-1", "nan", "inf"):
        code, err = synth(tmp_path / "tof.nii.gz", "--scale", scale)
        assert code == 2 and "scale must be a positive finite number" in err
    # a read-only folder and a full disk: refused before the synthesis runs
    monkeypatch.setattr(io_mod.os, "access", lambda *a, **k: False)
    code, err = synth(tmp_path / "ro" / "tof.nii.gz")
    assert code == 2 and "cannot write in" in err
    monkeypatch.undo()
    monkeypatch.setattr(infer_mod, "synthesize_volume", never)
    monkeypatch.setattr(io_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    code, err = synth(tmp_path / "tof.nii.gz")
    assert code == 2 and "MiB free" in err
    assert {m: p.read_bytes() for m, p in src.items()} == before
    assert not (tmp_path / "tof.nii.gz").exists()


def test_a_failing_evaluate_run_never_removes_a_finished_record(trained_run, tmp_path, capsys, monkeypatch):
    """Every bad argument (and a missing opt-in, a read-only or full disk) is refused before the record
    writer touches the directory."""
    import mmdm.io as io_mod
    from mmdm.cli import main as mmdm_main

    run = _copy_run(trained_run, tmp_path / "run")
    assert mmdm_main(["evaluate-run", str(run), "--quiet", "--device", "cpu", "--allow-code"]) == 0
    record = {n: (run / n).read_bytes() for n in ("summary.json", "metrics.csv")}
    preds = sorted(p.name for p in (run / "predictions").iterdir())
    capsys.readouterr()
    for bad, msg in ((["--split", "tset"], "unknown split 'tset'"), (["--checkpoint", "99"], "step-00000099"),
                     (["--steps", "0"], "steps must be"), (["--batch-size", "0"], "batch size must be"),
                     (["--samples", "0"], "samples must be"), (["--eta", "nan"], "eta must be"),
                     (["--checkpoint", str(tmp_path / "nope.pt")], "does not exist"), ([], "--allow-code")):
        code = mmdm_main(["evaluate-run", str(run), "--quiet", "--device", "cpu",
                          *([] if not bad else ["--allow-code"]), *bad])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (bad, err)
        assert {n: (run / n).read_bytes() for n in record} == record, bad
        assert sorted(p.name for p in (run / "predictions").iterdir()) == preds
    for patch, msg in ((lambda: monkeypatch.setattr(io_mod.os, "access", lambda *a, **k: False), "cannot write in"),
                       (lambda: monkeypatch.setattr(io_mod.shutil, "disk_usage",
                                                    lambda p: type("U", (), {"free": 1000})()), "MiB free")):
        patch()
        code = mmdm_main(["evaluate-run", str(run), "--quiet", "--device", "cpu", "--allow-code"])
        monkeypatch.undo()
        err = capsys.readouterr().err
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
        assert {n: (run / n).read_bytes() for n in record} == record
    assert run_status(run) == "finished"


def test_unreadable_latest_checkpoint_falls_back_with_a_warning_everywhere(trained_run, tmp_path, capsys):
    from mmdm.cli import main as mmdm_main
    from mmdm.engine.infer import load_run_method

    run = _copy_run(trained_run, tmp_path / "run")
    (run / "checkpoints" / "step-00000009.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match=r"using checkpoint step-00000003\.pt.*step-00000009\.pt cannot be read"):
        _, _, info = load_run_method(run, allow_code=True)
    assert info["step"] == 3
    with pytest.warns(UserWarning, match="using checkpoint step-00000003.pt"):
        summary = evaluate_run(run, device="cpu", progress=False, allow_code=True)
    assert summary["checkpoint"]["step"] == 3
    src = _two_sources(tmp_path)
    argv = ["synthesize", "--run", str(run), "--t1w", str(src["T1w"]), "--t2w", str(src["T2w"]), "--out",
            str(tmp_path / "o.nii.gz"), "--quiet", "--device", "cpu", "--allow-code"]
    assert mmdm_main(argv) == 0
    assert "warning: using checkpoint step-00000003.pt" in capsys.readouterr().err
    # asked for by step, or none readable: one line that says what to do
    assert mmdm_main([*argv, "--checkpoint", "9"]) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and len(err.strip().splitlines()) == 1
    (run / "checkpoints" / "step-00000003.pt").write_bytes(b"also damaged")
    assert mmdm_main(argv) == 2
    err = capsys.readouterr().err
    assert "no readable checkpoint" in err and len(err.strip().splitlines()) == 1


def test_an_interrupted_evaluation_resumes_after_its_last_subject_and_writes_the_same_record(tmp_path, monkeypatch):
    """The sampler's generator state is saved with each subject's scores: a resumed evaluation continues the
    same random stream, so its record equals an uninterrupted one; progress made under other settings is
    discarded."""
    import shutil

    import mmdm.engine.evaluate as ev

    make_dataset(tmp_path / "data", n=5, shape=(16, 16, 8))
    cfg = TrainConfig(method="mmdm", method_kwargs={"variant": "full", "config": "small"},
                      data=DataConfig(root=str(tmp_path / "data"), sources=("T1w", "T2w", "FLAIR")), steps=1,
                      epochs=None, batch_size=2, device="cpu", checkpoint_every=1, keep_last=1, image_every=0,
                      log_every=1)
    trained = train(cfg, tmp_path / "trained", progress=False)
    subjects = ["sub-001", "sub-002", "sub-003"]
    runs = {k: Path(shutil.copytree(trained, tmp_path / k)) for k in ("whole", "cut", "other")}
    whole = evaluate_run(runs["whole"], steps=3, subjects=subjects, device="cpu", progress=False)

    real, calls = ev.slice_errors, []

    def stop_at_the_second_subject(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped")
        return real(*a, **k)

    for name in ("cut", "other"):
        calls.clear()
        monkeypatch.setattr(ev, "slice_errors", stop_at_the_second_subject)
        with pytest.raises(KeyboardInterrupt):
            evaluate_run(runs[name], steps=3, subjects=subjects, device="cpu", progress=False)
        monkeypatch.setattr(ev, "slice_errors", real)
        saved = json.loads((runs[name] / "evaluation_progress.json").read_text())
        assert [r["subject"] for r in saved["rows"]] == ["sub-001"] and not (runs[name] / "summary.json").exists()
        assert run_status(runs[name]) == "evaluating"  # never looks finished

    resumed = evaluate_run(runs["cut"], steps=3, subjects=subjects, device="cpu", progress=False)
    assert resumed["evaluation"]["resumed_after_subjects"] == 1 and "resumed_after_subjects" not in whole["evaluation"]
    assert not (runs["cut"] / "evaluation_progress.json").exists()
    for f in ("metrics.csv", "regions.csv", "slice_errors.csv"):
        assert (runs["cut"] / f).read_text() == (runs["whole"] / f).read_text(), f
    for s in subjects:
        a, b = (np.asarray(nib.load(str(runs[k] / "predictions" / f"{s}_angio.nii.gz")).dataobj) for k in ("whole", "cut"))
        np.testing.assert_array_equal(a, b)
    assert resumed["metrics"] == whole["metrics"]
    # other sampling settings: the saved progress does not apply, the evaluation starts over
    other = evaluate_run(runs["other"], steps=2, subjects=subjects, device="cpu", progress=False)
    assert "resumed_after_subjects" not in other["evaluation"] and other["n_subjects"] == 3
    assert other["metrics"] != whole["metrics"]
