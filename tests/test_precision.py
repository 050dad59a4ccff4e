"""Precision that follows the hardware: ``amp: auto`` resolves per device, an explicit bf16 on a CPU
without native bf16 is refused before training, and the run records what was chosen and why.
The CPU's bf16 features are faked (monkeypatch), so every case runs on any test machine."""

from __future__ import annotations

import json

import pytest
import torch

import mmdm.engine.precision as precision
from mmdm.config import ConfigError
from mmdm.data.dataset import DataConfig
from mmdm.engine.infer import check_amp
from mmdm.engine.precision import PrecisionError, resolve_amp
from mmdm.engine.spec import TrainConfig, config_differences
from mmdm.engine.train import train
from mmdm.study.profiles import PROFILES
from helpers import make_dataset


@pytest.fixture()
def avx2_cpu(monkeypatch):
    """A CPU without AVX512_BF16 or AMX, whatever this machine has."""
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AVX2")


@pytest.fixture()
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["AVX512_BF16"])
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AVX512")


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_bf16_with_it(avx2_cpu, monkeypatch):
    amp, why = resolve_amp("auto", "cpu")
    assert amp == "none" and "AVX2" in why and "fp32" in why
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["AMX"])
    amp, why = resolve_amp("auto", "cpu")
    assert amp == "bf16" and "AMX" in why


def test_explicit_bf16_on_an_avx2_cpu_is_refused_with_what_to_use(avx2_cpu):
    with pytest.raises(PrecisionError) as e:
        resolve_amp("bf16", torch.device("cpu"))
    msg = str(e.value)
    assert "no native bf16" in msg and "AVX2" in msg and "'auto'" in msg and "'none'" in msg
    with pytest.raises(ValueError, match="no native bf16"):  # sampling (--amp bf16) refuses the same way
        check_amp("bf16", torch.device("cpu"))


def test_fp32_and_unknown_values(avx2_cpu):
    assert resolve_amp("none", "cpu")[0] == "none" and resolve_amp("fp32", "cpu")[0] == "none"
    with pytest.raises(PrecisionError, match="unknown amp"):
        resolve_amp("fp16", "cpu")
    assert resolve_amp("auto", "meta")[0] == "none"  # another device type: fp32
    with pytest.raises(PrecisionError, match="CUDA or the CPU"):
        resolve_amp("bf16", "meta")


def test_cuda_follows_is_bf16_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Old GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", "cuda:0")[0] == "none"
    with pytest.raises(PrecisionError, match="Old GPU"):
        resolve_amp("bf16", "cuda:0")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", "cuda:0")[0] == "bf16"


def test_auto_is_the_default_of_train_config_and_every_profile():
    assert TrainConfig().amp == "auto"
    for name, prof in PROFILES.items():
        assert prof.train.get("amp", TrainConfig().amp) == "auto", name


def _cfg(root, **kw) -> TrainConfig:
    return TrainConfig(method="test_engine_train:build_conv_stub", method_kwargs={},
                       data=DataConfig(root=str(root), sources=("T1w", "T2w")), steps=1, epochs=None, batch_size=2,
                       device="cpu", checkpoint_every=0, image_every=0, val_every=0, **kw)


def test_training_refuses_bf16_before_any_work_and_records_the_choice(tmp_path, avx2_cpu, one_thread):
    make_dataset(tmp_path / "data", n=5, shape=(16, 16, 8))
    with pytest.raises(ConfigError, match="no native bf16"):
        train(_cfg(tmp_path / "data", amp="bf16"), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused" / "checkpoints").exists()  # nothing was trained
    run = train(_cfg(tmp_path / "data"), tmp_path / "run", progress=False)
    prov = json.loads((run / "provenance.json").read_text())
    assert (prov["amp"], prov["amp_requested"], prov["cpu_capability"]) == ("none", "auto", "AVX2")
    assert "bf16 would be emulated" in prov["amp_reason"]
    assert prov["sessions"][-1]["amp_reason"] == prov["amp_reason"]


def test_a_run_stored_as_fp32_continues_under_auto_where_auto_is_fp32(avx2_cpu):
    stored = {"amp": "none"}
    assert config_differences({**_stored(), **stored}, TrainConfig(device="cpu")) == []
    assert config_differences({**_stored(), "amp": "bf16"}, TrainConfig(device="cpu"))  # a real difference


def test_auto_differs_from_a_stored_fp32_run_where_auto_is_bf16(bf16_cpu):
    assert config_differences({**_stored(), "amp": "none"}, TrainConfig(device="cpu"))


def _stored() -> dict:
    from mmdm.config import to_dict

    return to_dict(TrainConfig(device="cpu"))
