"""The vessel set-up in the trainer: the vessel emphasis in every method's loss, crops, the validation
vessel score, the MIP noise scale, NAWS's own learning rate and the recorded sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import make_dataset
from mmdm.config import ConfigError
from mmdm.data.crops import CropConfig
from mmdm.data.dataset import DataConfig, WindowDataset
from mmdm.engine.checkpoint import CheckpointManager, load_checkpoint
from mmdm.engine.spec import TrainConfig
from mmdm.engine.train import Trainer, train
from mmdm.engine.validation import ValidationVessels, central_windows, spread_indices
from mmdm.losses.emphasis import EmphasisConfig, PixelLoss, emphasis_weights
from mmdm.losses.mip import mip_loss
from mmdm.methods import build_method
from mmdm.methods.base import SynthesisMethod
from mmdm.study import sweep as sweep_mod

SOURCES = ("T1w", "T2w", "FLAIR")
K = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vessel-data")
    make_dataset(root, n=5, shape=(16, 16, 12))
    return root


class Copy(SynthesisMethod):
    """A 1x1 conv regression; ``sample`` returns source ``echo`` unchanged (an oracle when that
    source is the target)."""

    name = "copy-stub"

    def __init__(self, sources=("T1w", "T2w"), window: int = K, spatial_multiple: int = 1, echo: str = "T1w"):
        super().__init__()
        self.sources, self.window, self.spatial_multiple, self.echo = tuple(sources), window, spatial_multiple, echo
        self.conv = torch.nn.Conv2d(len(self.sources) * window, window, 1)
        self.seen: list[dict] = []

    def training_losses(self, batch, generator=None, group="main"):
        x0, ys = self.check_batch(batch)
        px = self.pixel_loss.bind(x0)
        self.seen.append({"shape": tuple(x0.shape), "weights": px.weights})
        pred = self.conv(torch.cat(ys, 1))
        noise = torch.rand(x0.shape[0], 1, 1, 1, generator=generator)
        return {"loss": px(pred, x0 + 0.01 * noise)}

    @torch.no_grad()
    def sample(self, sources, steps=None, eta=None, generator=None, progress=False):
        return sources[self.echo].clone()


def build_copy(**kw) -> Copy:
    return Copy(**kw)


def cfg_for(root: Path, **kw) -> TrainConfig:
    base = dict(method="test_vessel_training:build_copy", method_kwargs={},
                data=DataConfig(root=str(root), sources=("T1w", "T2w")), steps=6, epochs=None, batch_size=2,
                seed=5, device="cpu", checkpoint_every=2, keep_last=2, log_every=1, image_every=0, val_every=0)
    base.update(kw)
    return TrainConfig(**base)


# -- crops and emphasis in the trainer ---------------------------------------------------------


def test_trainer_feeds_crops_and_a_pixel_loss_weighted_by_the_targets_map(tmp_path, dataset):
    cfg = cfg_for(dataset, crops=CropConfig(size=(8, 8), multiple=4, vessel_share=0.5),
                  emphasis=EmphasisConfig(kind="top_fraction", fraction=0.05, weight=7.0))
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    batch = next(tr.batches(0))
    assert batch["target"].shape == (2, K, 8, 8)
    tr.train_step(batch)
    w = tr.method.seen[-1]["weights"]
    assert torch.equal(w, emphasis_weights(batch["target"], cfg.emphasis))
    # the map comes from the target alone: 5 % of 320 voxels = 16 per sample at weight 7
    assert ((w == 7.0).flatten(1).sum(1) == 16).all() and ((w == 1.0) | (w == 7.0)).all()
    # the crops of a step are a pure function of (seed, step): a second trainer draws the same ones
    again = next(Trainer(cfg, tmp_path / "run2", progress=False).batches(0))
    assert torch.equal(again["target"], batch["target"])


def test_no_emphasis_is_the_published_unweighted_loss(tmp_path, dataset):
    tr = Trainer(cfg_for(dataset), tmp_path / "run", progress=False)
    assert not tr.method.pixel_loss.active
    tr.train_step(next(tr.batches(0)))
    assert tr.method.seen[-1]["weights"] is None
    pred, ref = torch.randn(2, K, 4, 4), torch.randn(2, K, 4, 4)
    px = tr.method.pixel_loss.bind(ref)
    assert torch.equal(px(pred, ref), torch.nn.functional.mse_loss(pred, ref))
    assert torch.equal(px(pred, ref, "l1"), torch.nn.functional.l1_loss(pred, ref))
    assert px.image_term(pred, ref) is None


@pytest.mark.parametrize("crop, multiple, message", [((8, 8), 16, "not a multiple of the network's spatial multiple 16"),
                                                      ((32, 32), 1, "larger than the image")])
def test_crop_settings_that_cannot_work_fail_before_training(tmp_path, dataset, crop, multiple, message):
    cfg = cfg_for(dataset, crops=CropConfig(size=crop, multiple=1), method_kwargs={"spatial_multiple": multiple})
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_negative_emphasis_weight_is_refused():
    with pytest.raises(ConfigError, match="weight must be a finite number >= 0"):
        EmphasisConfig(kind="top_fraction", weight=-1.0)


def test_crop_run_resumes_bit_identically(tmp_path, dataset, monkeypatch):
    cfg = cfg_for(dataset, steps=5, crops=CropConfig(size=(8, 8), multiple=4),
                  emphasis=EmphasisConfig(kind="smooth", weight=5.0))
    train(cfg, tmp_path / "whole", progress=False)
    real, calls = Trainer.train_step, []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 4:  # after the step-2 checkpoint and one more step
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "split", progress=False)
    monkeypatch.setattr(Trainer, "train_step", real)
    train(cfg, tmp_path / "split", resume=True, progress=False)
    a, b = (load_checkpoint(CheckpointManager(tmp_path / r / "checkpoints").latest())["model"] for r in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    done = json.loads((tmp_path / "split" / "train_complete.json").read_text())
    assert done["emphasis"]["kind"] == "smooth" and done["emphasis"]["applied"] and done["crops"]["size"] == [8, 8]


# -- every method's objective ------------------------------------------------------------------

METHODS = [("mmdm", {"variant": "full"}), ("mmdm", {"variant": "base"}), ("ddpm", {}), ("bbdm", {}), ("rddm", {}),
           ("pix2pix", {}), ("resvit", {}), ("unest", {"variant": "paired"})]


def _batch(seed=0, h=32, w=32) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.rand(2, K, h, w, generator=g) * 2 - 1  # noqa: E731
    return {"sources": {m: x() for m in SOURCES}, "target": x()}


def _loss(method: SynthesisMethod, batch: dict, emphasis: EmphasisConfig) -> float:
    method.pixel_loss = PixelLoss(emphasis)
    method.eval()  # no dropout: the GANs' losses are deterministic then
    torch.manual_seed(0)
    group = "generator" if "generator" in method.optimizer_groups() else "main"
    return float(method.training_losses(dict(batch), torch.Generator().manual_seed(1), group=group)["loss"].detach())


@pytest.mark.parametrize("name, kw", METHODS, ids=[f"{n}-{k.get('variant', '')}" for n, k in METHODS])
def test_the_emphasis_weights_every_methods_per_pixel_term(name, kw):
    torch.manual_seed(0)
    method = build_method(name, config="small", sources=SOURCES, **kw)
    assert method.uses_pixel_loss
    batch = _batch()
    plain = _loss(method, batch, EmphasisConfig())
    # weight 1 is every weight 1: the published loss exactly (through the weighted code path)
    assert _loss(method, batch, EmphasisConfig(kind="top_fraction", weight=1.0)) == pytest.approx(plain, rel=1e-6)
    heavy = _loss(method, batch, EmphasisConfig(kind="top_fraction", weight=50.0))
    assert heavy > plain * 1.05  # 1 % of the voxels at x50 weigh about half as much again


def test_unpaired_unest_has_no_term_to_emphasise():
    method = build_method("unest", config="small", sources=SOURCES)
    assert not method.uses_pixel_loss
    batch = _batch()
    assert _loss(method, batch, EmphasisConfig(kind="top_fraction", weight=50.0)) == \
        pytest.approx(_loss(method, batch, EmphasisConfig()), rel=1e-6)


# -- the paper's devices: MIP noise scale, NAWS learning rate --------------------------------------


def test_mip_noise_scale_zero_is_the_noise_free_relaxation_and_one_the_paper():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, K, 6, 6, generator=g), torch.rand(2, K, 6, 6, generator=g)
    free = mip_loss(pred, target, gumbel=False)
    assert torch.equal(mip_loss(pred, target, noise_scale=0.0), free)
    paper = mip_loss(pred, target, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mip_loss(pred, target, noise_scale=1.0, generator=torch.Generator().manual_seed(3)), paper)
    half = mip_loss(pred, target, noise_scale=0.5, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(half, paper) and not torch.equal(half, free)
    with pytest.raises(ValueError, match="noise_scale must be >= 0"):
        mip_loss(pred, target, noise_scale=-1.0)


def test_naws_gets_its_own_learning_rate(tmp_path, dataset):
    cfg = cfg_for(dataset, method="mmdm", steps=1, data=DataConfig(root=str(dataset), sources=SOURCES),
                  method_kwargs={"config": "small", "variant": "full", "naws_lr": 1e-2})
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    groups = tr.optimizers["main"].param_groups
    assert [g["lr"] for g in groups] == [1e-4, 1e-2]
    naws = {id(p) for p in tr.method.naws.parameters()}
    assert {id(p) for p in groups[1]["params"]} == naws and not naws & {id(p) for p in groups[0]["params"]}
    p0 = float(tr.method.naws.p0)
    tr.train_step(next(tr.batches(0)))
    assert abs(float(tr.method.naws.p0) - p0) == pytest.approx(1e-2, rel=1e-3)  # Adam's first step: lr x sign
    assert "NAWS lr 0.01" in tr.method.objective()


# -- the validation vessel score -------------------------------------------------------------------


def test_spread_and_central_windows():
    assert spread_indices(10, 3) == [2, 4, 7] and spread_indices(3, 8) == [0, 1, 2] and spread_indices(0, 2) == []


def test_validation_vessel_score_of_an_oracle_and_a_flat_prediction(tmp_path, dataset):
    data = DataConfig(root=str(dataset), sources=("T1w", "T2w"))
    ds = WindowDataset(data, "val")
    for s in ds.subjects:  # make the target a copy of T1w, so echoing T1w is an oracle
        ds.volumes[s]["angio"] = ds.volumes[s]["T1w"].clone()
    central = central_windows(ds)
    depth = ds.volumes[ds.subjects[0]]["angio"].shape[2]
    assert all(depth / 4 <= ds.index[i][1] and ds.index[i][1] + K <= depth * 3 / 4 for i in central)
    vv = ValidationVessels(ds, 2)
    assert vv.mask_source == "bright_target" and vv.indices == [central[i] for i in spread_indices(len(central), 2)]
    oracle = vv.score(Copy(echo="T1w"), torch.device("cpu"), 1, 0, 2)
    assert oracle["recovery"] == pytest.approx(1.0) and oracle["n_windows"] == len(vv)

    class Flat(Copy):
        def sample(self, sources, steps=None, eta=None, generator=None, progress=False):
            return torch.zeros_like(sources["T1w"])

    assert vv.score(Flat(), torch.device("cpu"), 1, 0, 2)["recovery"] == pytest.approx(0.0)


def test_validation_writes_one_log_line_per_validation(tmp_path, dataset):
    cfg = cfg_for(dataset, steps=4, val_every=2, val_windows=2, val_batches=1)
    train(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    n = len(ValidationVessels(WindowDataset(cfg.data, "val"), 2))
    assert n >= 1 and all("loss" in x["losses"] and x["vessel"]["n_windows"] == n for x in lines)
    assert lines[0]["vessel"]["recovery"] == lines[1]["vessel"]["recovery"]  # Copy echoes T1w: no learning shows


# -- sweeps -------------------------------------------------------------------------------------------


def test_sweep_points_layer_their_settings_on_the_profiles_run():
    sw = sweep_mod.get_sweep("vessel")
    pts = {p.name: p for p in sw.points}
    top = sweep_mod.point_config(sw, pts["top1-w20"])
    assert top.emphasis.kind == "top_fraction" and top.emphasis.weight == 20 and top.crops.size == (48, 48)
    assert top.method_kwargs["optim"] == {"lr": 3e-4} and top.steps == sw.steps and top.val_every == sw.val_every
    assert sweep_mod.point_config(sw, pts["slices-top1-w20"]).crops is None
    assert sweep_mod.point_config(sw, pts["none"]).emphasis.kind == "none"
    assert "optim" not in sweep_mod.point_config(sw, pts["top1-w20-lr1e-4"]).method_kwargs
    with pytest.raises(ConfigError, match="unknown sweep"):
        sweep_mod.get_sweep("nope")


def test_a_profiles_own_training_set_up_does_not_leak_into_its_sweeps(monkeypatch):
    import dataclasses

    from mmdm.study import api, profiles

    std = dataclasses.replace(profiles.PROFILES["standard"], train={"emphasis": {"kind": "smooth"}},
                              method_overrides={"mmdm": {"optim": {"lr": 1e-3}}})
    monkeypatch.setitem(profiles.PROFILES, "standard", std)
    run = api.train_config(api.make_spec("mmdm", "full", None, std), std)
    assert run.emphasis.kind == "smooth" and run.method_kwargs["optim"] == {"lr": 1e-3}  # the profile's runs
    sw = sweep_mod.get_sweep("vessel")
    pt = next(p for p in sw.points if p.name == "top1-w20-lr1e-4")
    cfg = sweep_mod.point_config(sw, pt)
    assert cfg.emphasis.kind == "top_fraction" and "optim" not in cfg.method_kwargs


def test_collect_and_rank_a_sweep_on_validation_only(tmp_path, monkeypatch):
    pts = tuple(sweep_mod.SweepPoint(n) for n in "abcd")
    monkeypatch.setitem(sweep_mod.SWEEPS, "t", sweep_mod.Sweep("t", "test", pts, rule=sweep_mod.VESSEL_ONLY))
    curves = {"a": [0.1, 0.5, 0.4], "b": [0.0, 0.3, 0.5], "c": [0.2], "d": [0.0, 0.46, 0.44]}
    for name, rec in curves.items():
        run = tmp_path / "runs" / "t" / name
        run.mkdir(parents=True)
        lines = [json.dumps({"step": 100 * (i + 1), "losses": {"loss": 1.0 - r}, "vessel": {"recovery": r, "psnr": 20}})
                 for i, r in enumerate(rec)]
        (run / "validation.jsonl").write_text("\n".join(lines) + "\n{\"step\": 9")  # a cut-off last line
        (run / "config.yaml").write_text("method: mmdm\n")
    sweep_mod.collect_sweep("t", tmp_path / "runs", tmp_path / "res")
    table = sweep_mod.sweep_summary("t", tmp_path / "res")
    # a and d tie at 0.45 (to 0.01): d's lower last validation loss wins; then b (0.40), then c (0.2)
    assert list(table["point"]) == ["d", "a", "b", "c"]
    assert table.set_index("point").loc["c", "recovery"] == pytest.approx(0.2)
    assert (tmp_path / "res" / "t" / "a" / "config.yaml").is_file()


def test_fidelity_rule_keeps_only_points_near_the_best_whole_volume_psnr(tmp_path, monkeypatch):
    pts = tuple(sweep_mod.SweepPoint(n) for n in "abc")
    monkeypatch.setitem(sweep_mod.SWEEPS, "f", sweep_mod.Sweep("f", "test", pts))
    assert sweep_mod.SWEEPS["f"].rule == sweep_mod.FIDELITY_AND_VESSELS  # new sweeps use both scores
    # (whole-volume PSNR, whole-volume recovery, window recovery) of the last two validations
    scores = {"a": [(24.0, 0.6, 0.1), (24.2, 0.6, 0.1)],   # best vessels, 1 dB below the best PSNR
              "b": [(25.0, 0.3, 0.9), (25.2, 0.3, 0.9)],   # best PSNR; its windows look good, its volumes less so
              "c": [(24.8, 0.4, 0.0), (24.9, 0.4, 0.0)]}   # within 0.5 dB of b
    for name, vals in scores.items():
        run = tmp_path / "runs" / "f" / name
        run.mkdir(parents=True)
        lines = [json.dumps({"step": 100 * (i + 1), "losses": {"loss": 1.0}, "vessel": {"recovery": w, "psnr": 20},
                             "volume": {"psnr": p, "ssim": 0.5, "mip_psnr": 20, "vessel_recovery": r}})
                 for i, (p, r, w) in enumerate(vals)]
        (run / "validation.jsonl").write_text("\n".join(lines) + "\n")
    sweep_mod.collect_sweep("f", tmp_path / "runs", tmp_path / "res")
    table = sweep_mod.sweep_summary("f", tmp_path / "res").set_index("point")
    # c (eligible, recovery 0.4) before b (eligible, 0.3) before a (not eligible despite 0.6)
    assert list(table.index) == ["c", "b", "a"] and list(table.eligible) == [True, True, False]
    assert table.loc["b", "volume_psnr"] == pytest.approx(25.1) and table.loc["b", "recovery"] == pytest.approx(0.3)
    assert "0.5 dB" in sweep_mod.FIDELITY_AND_VESSELS.text
    # a sweep recorded without whole-volume scores cannot be ranked by a rule that needs them
    with pytest.raises(ValueError, match="val_volumes"):
        sweep_mod.rank_points(table.reset_index().assign(volume_psnr=float("nan")), sweep_mod.FIDELITY_AND_VESSELS)


def test_precision_comparison_agrees_within_the_seed_spread(tmp_path, monkeypatch):
    import pandas as pd

    rows = []
    finals = {"fp32": ([0.30, 0.40, 0.50], [2.0, 2.2, 2.1]), "bf16": ([0.35, 0.45, 0.42], [2.05, 2.15, 2.4])}
    for amp, (rec, loss) in finals.items():
        for seed, (r, v) in enumerate(zip(rec, loss)):
            rows += [{"point": f"{amp}-s{seed}", "step": 100, "recovery": 0.0, "val_loss": 9.0, "complete": True},
                     {"point": f"{amp}-s{seed}", "step": 200, "recovery": r, "val_loss": v, "complete": True}]
    (tmp_path / "p").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "p" / "summary.csv", index=False)
    out = sweep_mod.compare_precision("p", tmp_path)
    rec = out["agree"]["recovery"]
    assert rec["difference"] == pytest.approx(abs((0.35 + 0.45 + 0.42) / 3 - 0.4))
    assert rec["spread"] == pytest.approx(0.2) and rec["agree"]  # fp32's spread 0.5 - 0.3
    loss = out["agree"]["val_loss"]
    assert loss["spread"] == pytest.approx(0.35) and loss["agree"] and out["steps"] == 200
    # a shift larger than both spreads disagrees
    shifted = pd.DataFrame(rows).assign(recovery=lambda d: d.recovery + d.point.str.startswith("bf16") * 0.5)
    shifted.to_csv(tmp_path / "p" / "summary.csv", index=False)
    assert not sweep_mod.compare_precision("p", tmp_path)["agree"]["recovery"]["agree"]
    assert sweep_mod.compare_precision("missing", tmp_path) is None


def test_every_recorded_sweep_is_ranked_by_its_declared_rule():
    """The sweeps page ranks every recorded sweep: a sweep recorded before whole-volume validation
    must declare a rule that its records can satisfy (the vessel score alone)."""
    from mmdm.study.sweep import recorded_sweeps, sweep_summary

    recorded = recorded_sweeps()
    assert recorded, "results/sweeps holds the recorded sweeps"
    for sw in recorded:
        table = sweep_summary(sw.name)
        assert len(table) == len({p.name for p in sw.points} & set(table["point"])) > 0, sw.name
