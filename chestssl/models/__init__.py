"""Backbones and heads composed from MONAI classes, 2D or 3D (``spatial_dims``)."""

from chestssl.models.autoencoder import ConvAutoencoder
from chestssl.models.backbones import BACKBONES, ENCODER_FORMAT, build_backbone, export_encoder, load_encoder
from chestssl.models.classifier import RESNET_LAYERS, LatentResNetClassifier
from chestssl.models.seeding import seeded
from chestssl.models.stepped import SteppedModule
from chestssl.models.unet import ENCODER_BLOCKS, UNetEncoder, unetpp_from_encoder

__all__ = [
    "BACKBONES",
    "ENCODER_BLOCKS",
    "ENCODER_FORMAT",
    "RESNET_LAYERS",
    "ConvAutoencoder",
    "LatentResNetClassifier",
    "SteppedModule",
    "UNetEncoder",
    "build_backbone",
    "export_encoder",
    "load_encoder",
    "seeded",
    "unetpp_from_encoder",
]
