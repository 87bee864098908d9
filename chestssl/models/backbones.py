"""Backbones by name, and the encoder file handed from pretraining to fine-tuning.

Every backbone follows one protocol, so methods and tasks work with any of them:

- ``spatial_dims`` (2 or 3), ``in_channels``;
- ``feature_maps(x)``: multi-scale maps, shallow to deep;
- ``latent(x)``: (B, ``latent_channels``, *S / ``latent_stride``), what classifiers and
  autoencoder decoders read;
- ``representation(x)``: (B, ``representation_dim``), the global feature vector read by
  linear probes (:mod:`chestssl.eval.linear_probe`) and linear classification heads
  (:class:`chestssl.models.classifier.LinearHeadClassifier`); every parameter of the
  backbone takes part in it, so a head on it trains the whole backbone (and DDP need
  not search for unused parameters). Each backbone's docstring says which map it pools.

Backbones (the ``backbone.name`` param):

- ``unet_encoder``: the down path of MONAI's ``BasicUNetPlusPlus``
  (:class:`chestssl.models.unet.UNetEncoder`);
- ``cnn_attention``: seed 000's VQGAN-style encoder, a MONAI ``autoencoderkl.Encoder``
  (:mod:`chestssl.models.cnn_attention`);
- ``swin``: the Swin transformer of MONAI's ``SwinUNETR`` (``SwinUNETR.swinViT``,
  :mod:`chestssl.models.swin`);
- ``resnet18``, ``resnet50``: MONAI's ``ResNet`` without its fc, 1 input channel (seed
  001's backbone; :mod:`chestssl.models.resnet`);
- ``vit``: MONAI's classification ``ViT`` without its head, with a CLS token (seed 004's
  encoder; :mod:`chestssl.models.vit`).

Each one's ``state_dict`` loads with ``strict=True`` into the MONAI module it mirrors.

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


def _cnn_attention(cfg: Mapping[str, Any]) -> nn.Module:
    from chestssl.models.cnn_attention import build_cnn_attention_encoder

    return build_cnn_attention_encoder(cfg)


def _swin(cfg: Mapping[str, Any]) -> nn.Module:
    from chestssl.models.swin import build_swin_encoder

    return build_swin_encoder(cfg)


def _resnet(cfg: Mapping[str, Any]) -> nn.Module:
    from chestssl.models.resnet import build_resnet_encoder

    return build_resnet_encoder(cfg)


def _vit(cfg: Mapping[str, Any]) -> nn.Module:
    from chestssl.models.vit import build_vit_encoder

    return build_vit_encoder(cfg)


#: Backbone builders keyed by the ``backbone.name`` param.
BACKBONES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "unet_encoder": _unet_encoder,
    "cnn_attention": _cnn_attention,
    "swin": _swin,
    "resnet18": _resnet,
    "resnet50": _resnet,
    "vit": _vit,
}


def build_backbone(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the backbone described by a validated ``backbone`` params block.

    ``cfg``: ``{"name": "unet_encoder", "spatial_dims": 2 | 3, "features": [5 ints]}``.
    Weights come from torch's global generator; wrap the call in
    :func:`chestssl.models.seeding.seeded` for a reproducible initialisation.
    """
    name = cfg.get("name")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone name {name!r}; known: {', '.join(map(repr, BACKBONES))}")
    return BACKBONES[name](cfg)


def backbone_name(encoder: nn.Module) -> str:
    """The ``backbone.name`` of an encoder built by :func:`build_backbone`."""
    from chestssl.models.cnn_attention import CNNAttentionEncoder
    from chestssl.models.resnet import ResNetBackbone
    from chestssl.models.swin import SwinEncoder
    from chestssl.models.vit import ViTEncoder

    if isinstance(encoder, ResNetBackbone):
        return encoder.arch

    known = (("unet_encoder", UNetEncoder), ("cnn_attention", CNNAttentionEncoder), ("swin", SwinEncoder),
             ("vit", ViTEncoder))
    for name, cls in known:
        if isinstance(encoder, cls):
            return name
    raise TypeError(f"{type(encoder).__name__} is not a backbone of {', '.join(BACKBONES)}")


def _check_matches(encoder: nn.Module, cfg: Mapping[str, Any]) -> None:
    """Refuse to export weights under params that would rebuild a different network."""
    expected = build_backbone(cfg)
    if type(expected) is not type(encoder):
        raise ValueError(f"backbone config {dict(cfg)} builds a {type(expected).__name__}, not a {type(encoder).__name__}")
    shapes = {key: tuple(value.shape) for key, value in encoder.state_dict().items()}
    expected_shapes = {key: tuple(value.shape) for key, value in expected.state_dict().items()}
    if shapes != expected_shapes:
        differing = sorted(set(shapes.items()) ^ set(expected_shapes.items()))[:3]
        raise ValueError(f"backbone config {dict(cfg)} does not describe this encoder (first differences: {differing})")


def export_encoder(encoder: nn.Module, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The payload handed downstream: format tag, backbone params and CPU weights."""
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
