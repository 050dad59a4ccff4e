"""Typed configs, atomic writes, NIfTI affines and the registry."""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import pytest

from mmdm.config import ConfigError, dump_yaml, from_dict, load_yaml, replace, save_yaml, to_dict
from mmdm.io import atomic_path, save_nifti, write_json
from mmdm.registry import Registry


@dataclass
class Inner:
    dim: int = 8
    mult: tuple[int, ...] = (1, 2)


@dataclass
class Outer:
    name: str = "x"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    clip: float | None = None
    inner: Inner = field(default_factory=Inner)


def test_yaml_round_trip(tmp_path):
    cfg = Outer(name="y", lr=3e-4, inner=Inner(dim=16, mult=(1, 4, 8)))
    save_yaml(cfg, tmp_path / "c.yaml")
    back = load_yaml(Outer, tmp_path / "c.yaml")
    assert back == cfg and isinstance(back.inner.mult, tuple)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"Outer.inner: unknown key\(s\) \['dims'\]; valid keys are \['dim', 'mult'\]"):
        from_dict(Outer, {"inner": {"dims": 3}})


def test_type_errors_and_int_to_float():
    assert from_dict(Outer, {"lr": 1}).lr == 1.0 and isinstance(from_dict(Outer, {"lr": 1}).lr, float)
    with pytest.raises(ConfigError, match="Outer.name: expected str"):
        from_dict(Outer, {"name": 3})
    with pytest.raises(ConfigError, match="expected 2 values"):
        from_dict(Outer, {"betas": [0.1, 0.2, 0.3]})


def test_replace_nested_override():
    cfg = replace(Outer(), {"inner": {"dim": 32}})
    assert cfg.inner.dim == 32 and cfg.inner.mult == (1, 2) and "dim: 32" in dump_yaml(cfg)
    assert to_dict(cfg)["inner"] == {"dim": 32, "mult": [1, 2]}


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_get_the_users_umask(tmp_path, umask):
    """Not mkstemp's private 0600: a new file's usual permissions (0666 less the umask)."""
    import os
    import stat

    old = os.umask(umask)
    try:
        paths = [write_json(tmp_path / "a.json", {"a": 1}),
                 save_nifti(tmp_path / "v.nii.gz", np.zeros((2, 2, 2)), np.eye(4))]
    finally:
        os.umask(old)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, (p, oct(p.stat().st_mode))


def test_os_errors_become_one_line_that_says_what_to_do(tmp_path):
    import errno
    import os

    from mmdm.io import check_output_path, os_error_message

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.pt"))
    assert os_error_message(full).startswith(f"no space left on the device writing {tmp_path / 'x.pt'}: free")
    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro")
    assert "read-only file system: /mnt/ro: write to a directory on a writable disk" == os_error_message(ro)
    ours = OSError(errno.ENOSPC, "only 1 MiB free on the file system of /x; free some space or write elsewhere")
    assert os_error_message(ours) == ours.strerror  # the package's own message is kept as it is
    assert check_output_path(tmp_path / "new" / "tof.nii") == tmp_path / "new" / "tof.nii"
    with pytest.raises(OSError, match="MiB needed"):
        check_output_path(tmp_path / "tof.nii.gz", nbytes=2**62)


def test_save_nifti_affine_and_codes(tmp_path):
    aff = np.array([[2.0, 0, 0, -90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
    data = np.random.rand(4, 5, 6).astype(np.float32)
    p = save_nifti(tmp_path / "v.nii.gz", data, aff)
    img = nib.load(str(p))
    np.testing.assert_allclose(img.affine, aff)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    assert img.header.get_zooms() == (2.0, 2.0, 2.0)


def test_registry_unknown_name_lists_known():
    reg: Registry = Registry("method")
    reg.register("b")(lambda: 2)
    reg.register("a")(lambda: 1)
    assert reg.get("a")() == 1 and reg.names() == ["a", "b"] and "a" in reg
    with pytest.raises(KeyError, match="unknown method 'c'; known: a, b"):
        reg.get("c")
    with pytest.raises(KeyError, match="already registered"):
        reg.register("a")(lambda: 3)
