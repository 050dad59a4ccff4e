import os

# Keep the 2 CPU cores for the test processes themselves.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """A 3-subject phantom cohort of the `tiny` profile, built once per test session."""
    from mmdm.data.phantom import build_cohort

    return build_cohort(tmp_path_factory.mktemp("tiny-cohort") / "phantom", "tiny", n_subjects=3, progress=False)


@pytest.fixture()
def native_bf16_cpu(monkeypatch):
    """Pretend this CPU computes bf16 natively (AMX), so bf16 code paths run on any test machine
    (numerically the same as on such a CPU; only slower where bf16 is emulated)."""
    import mmdm.engine.precision as precision

    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["AMX"])


@pytest.fixture()
def one_thread():
    """Single-threaded torch for the test: small models gain nothing from threads, and thread
    oversubscription makes them many times slower when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
