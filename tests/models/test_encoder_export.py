"""The encoder payload: build by name, export, save, load strictly."""

from __future__ import annotations

import pytest
import torch

from chestssl.io import save_torch
from chestssl.models import ENCODER_FORMAT, UNetEncoder, build_backbone, export_encoder, load_encoder, seeded

CFG = {"name": "unet_encoder", "spatial_dims": 2, "features": [4, 8, 8, 16, 16]}


def test_build_backbone_by_name():
    encoder = build_backbone(CFG)
    assert isinstance(encoder, UNetEncoder) and encoder.features == (4, 8, 8, 16, 16)
    with pytest.raises(ValueError, match=r"unknown backbone name 'densenet121'; known: 'unet_encoder'"):
        build_backbone({**CFG, "name": "densenet121"})


def test_export_save_load_roundtrip(tmp_path):
    with seeded(0):
        encoder = build_backbone(CFG)
    payload = export_encoder(encoder, CFG)
    assert payload["format"] == ENCODER_FORMAT and payload["backbone"] == CFG
    assert all(t.device.type == "cpu" for t in payload["state_dict"].values())
    save_torch(tmp_path / "encoder.pt", payload)
    loaded = load_encoder(torch.load(tmp_path / "encoder.pt", weights_only=True))
    fresh = UNetEncoder(2, 1, CFG["features"])
    fresh.load_state_dict(payload["state_dict"], strict=True)
    for module in (loaded, fresh):
        for key, value in encoder.state_dict().items():
            assert torch.equal(module.state_dict()[key], value), key
    x = torch.rand(1, 1, 32, 32)
    encoder.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x)[-1], encoder(x)[-1])


def test_payload_is_a_copy():
    encoder = build_backbone(CFG)
    payload = export_encoder(encoder, CFG)
    with torch.no_grad():
        encoder.conv_0_0.conv_0.conv.weight.zero_()
    assert payload["state_dict"]["conv_0_0.conv_0.conv.weight"].abs().sum() > 0


def test_load_errors_name_the_source():
    payload = export_encoder(build_backbone(CFG), CFG)
    with pytest.raises(ValueError, match=r"models/x\.pt: not a ChestSSL encoder"):
        load_encoder({**payload, "format": "other/1"}, source="models/x.pt")
    with pytest.raises(ValueError, match="missing key 'state_dict'"):
        load_encoder({"format": ENCODER_FORMAT, "backbone": CFG})
    wrong = {**payload, "backbone": {**CFG, "features": [4, 8, 8, 16, 32]}}
    with pytest.raises(ValueError, match="weights do not fit backbone"):
        load_encoder(wrong)


def test_export_refuses_params_that_do_not_match():
    with pytest.raises(ValueError, match="does not describe this encoder"):
        export_encoder(build_backbone(CFG), {**CFG, "features": [8, 8, 8, 16, 16]})
