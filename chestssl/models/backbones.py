"""Backbones by name, and the encoder file handed from pretraining to fine-tuning.

The encoder payload written by every ``pretrain@<method>`` stage is::

    {"format": "chestssl-encoder/1", "backbone": <validated backbone block>,
     "state_dict": <the encoder's weights, on CPU>}

so a downstream stage rebuilds the exact backbone from the payload alone and loads the
weights with ``strict=True``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch
from torch import nn

from chestssl.models.unet import UNetEncoder

ENCODER_FORMAT = "chestssl-encoder/1"


def _unet_encoder(cfg: Mapping[str, Any]) -> nn.Module:
    return UNetEncoder(spatial_dims=int(cfg["spatial_dims"]), in_channels=1, features=cfg["features"])


#: Backbone builders keyed by the ``backbone.name`` param.
BACKBONES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {"unet_encoder": _unet_encoder}


def build_backbone(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the backbone described by a validated ``backbone`` params block.

    ``cfg``: ``{"name": "unet_encoder", "spatial_dims": 2 | 3, "features": [5 ints]}``.
    Weights come from torch's global generator; wrap the call in
    :func:`chestssl.models.seeding.seeded` for a reproducible initialisation.
    """
    name = cfg.get("name")
    if name not in BACKBONES:
        raise ValueError(f"backbone.name: got {name!r}, expected one of {', '.join(map(repr, BACKBONES))}")
    return BACKBONES[name](cfg)


def _check_matches(encoder: nn.Module, cfg: Mapping[str, Any]) -> None:
    if isinstance(encoder, UNetEncoder):
        if tuple(cfg.get("features", ())) != encoder.features or cfg.get("spatial_dims") != encoder.spatial_dims:
            raise ValueError(
                f"backbone params {dict(cfg)} do not describe this encoder "
                f"(spatial_dims={encoder.spatial_dims}, features={list(encoder.features)})"
            )


def export_encoder(encoder: nn.Module, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The payload handed downstream: format tag, backbone params and CPU weights."""
    if cfg.get("name") not in BACKBONES:
        raise ValueError(f"backbone.name: got {cfg.get('name')!r}, expected one of {', '.join(map(repr, BACKBONES))}")
    _check_matches(encoder, cfg)
    return {"format": ENCODER_FORMAT, "backbone": dict(cfg), "state_dict": cpu_state_dict(encoder.state_dict())}


def load_encoder(payload: Mapping[str, Any], source: str = "encoder payload") -> nn.Module:
    """Rebuild the encoder from a payload made by :func:`export_encoder` (strict load).

    ``source`` names the file in error messages, e.g. ``models/pretrain/ae/encoder.pt``.
    """
    if not isinstance(payload, Mapping) or payload.get("format") != ENCODER_FORMAT:
        found = payload.get("format") if isinstance(payload, Mapping) else type(payload).__name__
        raise ValueError(
            f"{source}: not a ChestSSL encoder (format {found!r}, expected {ENCODER_FORMAT!r}); "
            "rerun the pretrain stage that writes it (dvc repro)"
        )
    for key in ("backbone", "state_dict"):
        if key not in payload:
            raise ValueError(f"{source}: missing key {key!r}; rerun the pretrain stage that writes it")
    encoder = build_backbone(payload["backbone"])
    try:
        encoder.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{source}: weights do not fit backbone {payload['backbone']}: {error}; "
            "rerun the pretrain stage that writes it"
        ) from error
    return encoder


def cpu_state_dict(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """A detached CPU copy of a state dict, as written to files."""
    return OrderedDict((key, value.detach().cpu().clone()) for key, value in state.items())
