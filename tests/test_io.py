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
