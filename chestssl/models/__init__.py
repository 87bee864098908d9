"""Backbones and heads composed from MONAI classes, 2D or 3D (``spatial_dims``)."""

from chestssl.models.adversarial import PatchAdversarialTerm
from chestssl.models.autoencoder import ConvAutoencoder
from chestssl.models.backbones import (
    BACKBONES,
    ENCODER_FORMAT,
    backbone_name,
    build_backbone,
    export_encoder,
    load_encoder,
)
from chestssl.models.classifier import RESNET_LAYERS, LatentResNetClassifier, latent_resnet
from chestssl.models.cnn_attention import CNNAttentionEncoder, build_cnn_attention_decoder, unetpp_from_cnn_attention
from chestssl.models.perceptual import LocalPerceptualLoss, save_feature_network
from chestssl.models.quantizer import QuantizerOutput, VectorQuantizer
from chestssl.models.seeding import seeded
from chestssl.models.stepped import SteppedModule
from chestssl.models.swin import SwinEncoder, SwinUNETRSegHead, swin_unetr_from_encoder
from chestssl.models.unet import ENCODER_BLOCKS, UNetEncoder, unetpp_from_encoder
from chestssl.models.vqgan import AutoencoderOutput, LatentAutoencoder

__all__ = [
    "BACKBONES",
    "ENCODER_BLOCKS",
    "ENCODER_FORMAT",
    "RESNET_LAYERS",
    "AutoencoderOutput",
    "CNNAttentionEncoder",
    "ConvAutoencoder",
    "LatentAutoencoder",
    "LatentResNetClassifier",
    "LocalPerceptualLoss",
    "PatchAdversarialTerm",
    "QuantizerOutput",
    "SteppedModule",
    "SwinEncoder",
    "SwinUNETRSegHead",
    "UNetEncoder",
    "VectorQuantizer",
    "backbone_name",
    "build_backbone",
    "build_cnn_attention_decoder",
    "export_encoder",
    "latent_resnet",
    "load_encoder",
    "save_feature_network",
    "seeded",
    "swin_unetr_from_encoder",
    "unetpp_from_cnn_attention",
]
