"""The UNet++ encoder, and UNet++ networks built around a pretrained one.

UNet++: Zhou et al., "UNet++: A Nested U-Net Architecture for Medical Image
Segmentation", DLMIA 2018 (arXiv:1807.10165), as implemented by MONAI's
:class:`~monai.networks.nets.BasicUNetPlusPlus`.

:class:`UNetEncoder` is exactly the down path of ``BasicUNetPlusPlus``: the same MONAI
blocks (``TwoConv``, ``Down``), the same submodule names (``conv_0_0`` ... ``conv_4_0``)
and the same defaults, so its ``state_dict`` keys are a subset of the UNet++'s and a
pretrained encoder drops into a segmentation network unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import BasicUNetPlusPlus
from monai.networks.nets.basic_unet import Down, TwoConv
from torch import nn

from chestssl.models.seeding import seeded

#: Names of the encoder blocks, shallow to deep, shared with ``BasicUNetPlusPlus``.
ENCODER_BLOCKS: tuple[str, ...] = ("conv_0_0", "conv_1_0", "conv_2_0", "conv_3_0", "conv_4_0")

# BasicUNetPlusPlus's own defaults; kept identical so weights move between the two.
DEFAULT_ACT: tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
DEFAULT_NORM: tuple = ("instance", {"affine": True})
#: Smallest spatial size: 32 / 16 = 2 elements at the deepest level for instance norm.
MIN_INPUT_SIZE = 32


class UNetEncoder(nn.Module):
    """Down path of MONAI's ``BasicUNetPlusPlus`` (five levels, four 2x max-poolings).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for CT).
        features: the five encoder widths, shallow to deep, e.g. ``(16, 32, 64, 128, 256)``.
        act, norm, bias, dropout: as ``BasicUNetPlusPlus`` (LeakyReLU 0.1, affine
            instance norm, bias, no dropout).

    ``forward(x)`` with ``x`` of shape (B, in_channels, *S) returns the five feature
    maps ``[f0, f1, f2, f3, f4]``, ``fk`` of shape (B, features[k], *S / 2**k); ``f4`` is
    the latent, e.g. (B, features[4], 4, 4) for a 64x64 slice; :meth:`representation`
    is the global average pool of ``f4``, (B, ``representation_dim``) with
    ``representation_dim = features[4]``. Spatial sizes divisible by 16 keep every level
    exact; every spatial size must be >= 32, since instance norm needs more than one
    element at the deepest (1/16) level.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        features: Sequence[int],
        act: str | tuple = DEFAULT_ACT,
        norm: str | tuple = DEFAULT_NORM,
        bias: bool = True,
        dropout: float | tuple = 0.0,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"UNetEncoder: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        features = tuple(int(f) for f in features)
        if len(features) != len(ENCODER_BLOCKS) or min(features) < 1:
            raise ValueError(f"UNetEncoder: features must be 5 positive integers, got {list(features)}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.features = features
        self.act = act
        self.norm = norm
        self.bias = bias
        self.dropout = dropout

        self.conv_0_0 = TwoConv(spatial_dims, in_channels, features[0], act, norm, bias, dropout)
        self.conv_1_0 = Down(spatial_dims, features[0], features[1], act, norm, bias, dropout)
        self.conv_2_0 = Down(spatial_dims, features[1], features[2], act, norm, bias, dropout)
        self.conv_3_0 = Down(spatial_dims, features[2], features[3], act, norm, bias, dropout)
        self.conv_4_0 = Down(spatial_dims, features[3], features[4], act, norm, bias, dropout)

    #: Down-sampling from the input to the latent (four 2x max-poolings).
    latent_stride = 16

    @property
    def latent_channels(self) -> int:
        return self.features[-1]

    @property
    def representation_dim(self) -> int:
        return self.features[-1]

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five maps of :meth:`forward` (the backbone protocol of chestssl.models.backbones)."""
        return self(x)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest map (B, features[4], *S / 16)."""
        return self(x)[-1]

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool of the deepest map ``f4`` (the latent): (B, features[4])."""
        return self.latent(x).flatten(2).mean(dim=2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if min(x.shape[2:]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"UNetEncoder: input of spatial size {tuple(x.shape[2:])} is too small; every size must "
                f"be >= {MIN_INPUT_SIZE} (the 1/16 level must keep more than one element for instance "
                "norm)"
            )
        maps = []
        for name in ENCODER_BLOCKS:
            x = getattr(self, name)(x)
            maps.append(x)
        return maps


def unetpp_from_encoder(
    encoder: UNetEncoder,
    out_channels: int = 2,
    last_features: int | None = None,
    seed: int = 0,
) -> BasicUNetPlusPlus:
    """A MONAI ``BasicUNetPlusPlus`` whose encoder blocks are copies of ``encoder``'s.

    The decoder (``upcat_*``, ``final_conv_*``) is initialised at random from ``seed``;
    ``conv_0_0`` ... ``conv_4_0`` receive the encoder's weights (copied, so training the
    UNet++ never changes ``encoder``). Deep supervision is off: ``forward(x)`` returns
    ``[logits]`` with logits of shape (B, out_channels, *S).

    Args:
        encoder: a (pretrained) :class:`UNetEncoder`.
        out_channels: output channels (2 for background/nodule with softmax).
        last_features: width after the last up-sampling; defaults to ``features[0]``.
        seed: seed of the decoder's initialisation.
    """
    features = (*encoder.features, last_features if last_features is not None else encoder.features[0])
    with seeded(seed):
        network = BasicUNetPlusPlus(
            spatial_dims=encoder.spatial_dims,
            in_channels=encoder.in_channels,
            out_channels=out_channels,
            features=features,
            deep_supervision=False,
            act=encoder.act,
            norm=encoder.norm,
            bias=encoder.bias,
            dropout=encoder.dropout,
        )
    for name in ENCODER_BLOCKS:
        getattr(network, name).load_state_dict(getattr(encoder, name).state_dict(), strict=True)
    return network
