"""Classifiers on a backbone: a MONAI ResNet on its latent, or a linear head on its representation.

ResNet: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, as
implemented by MONAI's :class:`~monai.networks.nets.ResNet`. Seed 000 classified nodule
vs clean slices from the autoencoder's latent with a ResNet whose "ResNet18" has basic
blocks [2, 2, 2, 2] and whose "ResNet50" has *basic* blocks [3, 4, 6, 3] (not
bottlenecks); we keep both definitions (:class:`LatentResNetClassifier`).

Seed 001 (Barlow Twins for chest X-ray; Zbontar et al., "Barlow Twins: Self-Supervised
Learning via Redundancy Reduction", ICML 2021) fine-tuned the whole network with one
linear layer on the backbone's global average pool (:class:`LinearHeadClassifier`).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from monai.networks.nets import ResNet
from torch import nn


#: Blocks per stage of the latent ResNets (all basic blocks, as seed 000).
RESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (2, 2, 2, 2),
    "resnet50": (3, 4, 6, 3),
}
#: Stage widths of the standard ResNet.
RESNET_WIDTHS: tuple[int, int, int, int] = (64, 128, 256, 512)


def latent_resnet(
    spatial_dims: int,
    latent_channels: int,
    arch: str = "resnet18",
    num_classes: int = 2,
    widths: Sequence[int] = RESNET_WIDTHS,
) -> ResNet:
    """The MONAI ResNet that classifies a latent map (B, latent_channels, *L) -> (B, num_classes).

    Basic blocks per :data:`RESNET_LAYERS`; a 3x3 stride-1 stem without max-pool, since
    latents are small.
    """
    if arch not in RESNET_LAYERS:
        raise ValueError(f"arch: got {arch!r}, expected one of {', '.join(map(repr, RESNET_LAYERS))}")
    return ResNet(
        block="basic",
        layers=list(RESNET_LAYERS[arch]),
        block_inplanes=list(widths),
        spatial_dims=spatial_dims,
        n_input_channels=latent_channels,
        conv1_t_size=3,
        conv1_t_stride=1,
        no_max_pool=True,
        num_classes=num_classes,
    )


class LatentResNetClassifier(nn.Module):
    """Image -> encoder latent -> MONAI ``ResNet`` -> logits.

    Any backbone of :mod:`chestssl.models.backbones` works: the ResNet reads
    ``encoder.latent(x)`` (B, ``encoder.latent_channels``, *S / ``encoder.latent_stride``).
    The latent is small (e.g. 4x4 for a 64x64 slice), so the ResNet stem keeps its resolution:
    a 3x3 stride-1 first convolution and no max-pool (a 7x7 kernel on a 4x4 map would be
    mostly padding).

    Args:
        encoder: a (pretrained) backbone; it is copied, so training the
            classifier never changes the module passed in.
        arch: ``"resnet18"`` or ``"resnet50"`` (see :data:`RESNET_LAYERS`).
        num_classes: logits per image.
        widths: the four ResNet stage widths.

    ``forward(x)``: x (B, 1, *S) -> logits (B, num_classes). With batch norm in the
    ResNet, training needs at least 2 images per batch once the map is 1 pixel wide.
    """

    def __init__(
        self,
        encoder: nn.Module,
        arch: str = "resnet18",
        num_classes: int = 2,
        widths: Sequence[int] = RESNET_WIDTHS,
    ):
        super().__init__()
        if arch not in RESNET_LAYERS:
            raise ValueError(f"arch: got {arch!r}, expected one of {', '.join(map(repr, RESNET_LAYERS))}")
        self.arch = arch
        self.encoder = copy.deepcopy(encoder)
        self.head = latent_resnet(encoder.spatial_dims, encoder.latent_channels, arch, num_classes, widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.latent(x))


class LinearHeadClassifier(nn.Module):
    """Image -> ``encoder.representation`` -> ``nn.Linear`` -> logits (seed 001's downstream head).

    Any backbone of :mod:`chestssl.models.backbones` works: the head reads the global
    feature vector ``encoder.representation(x)`` (B, ``encoder.representation_dim``).
    Both the encoder and the head are trained when fine-tuning.

    Args:
        encoder: a (pretrained) backbone; it is copied, so training the classifier never
            changes the module passed in.
        num_classes: logits per image.

    ``forward(x)``: x (B, 1, *S) -> logits (B, num_classes).
    """

    def __init__(self, encoder: nn.Module, num_classes: int = 2):
        super().__init__()
        if not hasattr(encoder, "representation") or not hasattr(encoder, "representation_dim"):
            raise ValueError(
                f"LinearHeadClassifier: {type(encoder).__name__} has no representation() / representation_dim; "
                "a linear head needs a backbone with a global feature vector"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: got {num_classes!r}, expected a positive integer")
        self.encoder = copy.deepcopy(encoder)
        self.head = nn.Linear(int(encoder.representation_dim), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.representation(x))
