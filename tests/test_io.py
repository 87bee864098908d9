"""Atomic writes: nothing half-written is left behind, and identical objects give identical bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chestssl.io import atomic_path, save_torch, write_json, write_npz


def test_torch_files_are_byte_identical_for_identical_weights(tmp_path):
    weights = {"w": torch.arange(6.0).reshape(2, 3), "config": {"features": [4, 8]}}
    save_torch(tmp_path / "a.pt", weights)
    save_torch(tmp_path / "b.pt", weights)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt")["w"], weights["w"])


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"dice": 0.5})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("killed")
    assert target.read_text().strip().endswith("}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_npz_round_trip(tmp_path):
    write_npz(tmp_path / "x.npz", image=np.ones((2, 3), np.float16))
    with np.load(tmp_path / "x.npz") as z:
        assert z["image"].dtype == np.float16 and z["image"].shape == (2, 3)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_umask_mode_not_0600(tmp_path, umask):
    """A team's shared folders and DVC cache need group-readable outputs."""
    import os
    import stat

    from chestssl.io import make_temp_dir

    previous = os.umask(umask)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        write_npz(tmp_path / "x.npz", a=np.zeros(2))
        save_torch(tmp_path / "w.pt", {"w": torch.zeros(1)})
        folder = make_temp_dir(tmp_path, prefix="series.")
    finally:
        os.umask(previous)
    for name in ("m.json", "x.npz", "w.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("code, advice", [(28, "free space"), (30, "writable"), (13, "writable")])
def test_a_full_or_read_only_output_folder_names_the_path(tmp_path, monkeypatch, code, advice):
    """Root ignores permissions, so the folder's refusal is simulated at the write."""
    import errno
    import os

    from chestssl.errors import UserError

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    target = tmp_path / "reports" / "metrics.json"
    monkeypatch.setattr("chestssl.io.os.replace", refuse)
    with pytest.raises(UserError) as error:
        write_json(target, {"dice": 0.5})
    message = str(error.value)
    assert str(target) in message and advice in message and "\n" not in message
    assert error.value.errno == code and code in (errno.ENOSPC, errno.EROFS, errno.EACCES)
    assert list(target.parent.iterdir()) == [], "the temporary file is removed"
    monkeypatch.undo()

    monkeypatch.setattr("chestssl.io.tempfile.mkstemp", refuse)
    with pytest.raises(UserError, match=f"cannot write {target}"):
        write_json(target, {"dice": 0.5})


def test_other_write_errors_keep_their_type(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("chestssl.io.os.replace", broken)
    with pytest.raises(OSError) as error:
        write_json(tmp_path / "m.json", {})
    assert type(error.value) is OSError
