"""scratch: a seeded random initialisation, nothing to train."""

from __future__ import annotations

import pytest
import torch

from chestssl.methods import build_method
from chestssl.models import load_encoder

BACKBONE = {"name": "unet_encoder", "spatial_dims": 2, "features": [4, 8, 8, 16, 16]}
CFG = {"method": "scratch", "backbone": BACKBONE}


def _weights(method) -> dict[str, torch.Tensor]:
    return method.encoder().state_dict()


def test_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    first = build_method("scratch", CFG, seed=5)
    after_build = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_build, torch.rand(3))
    same = build_method("scratch", CFG, seed=5)
    other = build_method("scratch", CFG, seed=6)
    key = "conv_2_0.convs.conv_1.conv.weight"
    assert torch.equal(_weights(first)[key], _weights(same)[key])
    assert not torch.equal(_weights(first)[key], _weights(other)[key])


def test_nothing_to_train():
    method = build_method("scratch", CFG, seed=0)
    assert method.trainable is False
    assert method.reconstruct(torch.rand(1, 1, 32, 32)) is None
    batch = {"image": torch.rand(2, 1, 32, 32)}
    with pytest.raises(RuntimeError, match="nothing to train"):
        method.training_step(batch)
    with pytest.raises(RuntimeError, match="nothing to validate"):
        method.validation_step(batch)


def test_export_roundtrip_and_same_start_as_ae():
    method = build_method("scratch", CFG, seed=9)
    loaded = load_encoder(method.export())
    for key, value in _weights(method).items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ae = build_method("ae", {"method": "ae", "backbone": BACKBONE, "loss": {"l1": 1.0, "ssim": 1.0}}, seed=9)
    for key, value in _weights(method).items():
        assert torch.equal(ae.encoder().state_dict()[key], value), key


def test_3d_backbone():
    method = build_method("scratch", {**CFG, "backbone": {**BACKBONE, "spatial_dims": 3}}, seed=0)
    with torch.no_grad():
        latent = method.encoder()(torch.rand(1, 1, 32, 32, 32))[-1]
    assert tuple(latent.shape) == (1, 16, 2, 2, 2)
