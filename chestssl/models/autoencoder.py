"""A convolutional autoencoder around the UNet++ encoder.

The classic undercomplete autoencoder (Hinton & Salakhutdinov, "Reducing the
Dimensionality of Data with Neural Networks", Science 2006), in the convolutional form
used for representation learning (Masci et al., "Stacked Convolutional Auto-Encoders for
Hierarchical Feature Extraction", ICANN 2011). The decoder has no skip connections, so
everything the reconstruction needs has to pass through the latent.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import UpSample
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import TwoConv
from torch import nn

from chestssl.models.unet import UNetEncoder

#: Total down-sampling of :class:`UNetEncoder` (four 2x max-poolings).
ENCODER_STRIDE = 16


class ConvAutoencoder(nn.Module):
    """``UNetEncoder`` + a mirrored decoder of MONAI blocks -> sigmoid reconstruction.

    Decoder: four stages of (2x transposed-conv ``UpSample`` to the next shallower width,
    ``TwoConv`` with the encoder's norm/act), widths ``features[3], ..., features[0]``,
    then a 1x1 convolution to ``out_channels`` and a sigmoid.

    Args:
        encoder: the :class:`UNetEncoder` to train (used as is, not copied).
        out_channels: reconstruction channels (1 for CT).

    ``forward(x)``: x (B, C, *S) in [0, 1], each spatial size divisible by 16 ->
    reconstruction (B, out_channels, *S) in (0, 1).
    """

    def __init__(self, encoder: UNetEncoder, out_channels: int = 1):
        super().__init__()
        self.encoder = encoder
        dims, features = encoder.spatial_dims, encoder.features
        stages = []
        for deep, shallow in zip(features[:0:-1], features[-2::-1]):
            stages.append(
                nn.Sequential(
                    UpSample(dims, deep, shallow, scale_factor=2, mode="deconv"),
                    TwoConv(dims, shallow, shallow, encoder.act, encoder.norm, encoder.bias, encoder.dropout),
                )
            )
        self.decoder = nn.Sequential(*stages)
        self.head = Conv["conv", dims](features[0], out_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent (B, features[4], *S / 16)."""
        self._check_size(x)
        return self.encoder(x)[-1]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, features[4], *L) -> reconstruction (B, out_channels, *L * 16)."""
        return torch.sigmoid(self.head(self.decoder(latent)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @staticmethod
    def _check_size(x: torch.Tensor) -> None:
        spatial = tuple(x.shape[2:])
        if any(size % ENCODER_STRIDE for size in spatial):
            raise ValueError(
                f"ConvAutoencoder: spatial size {spatial} must be divisible by {ENCODER_STRIDE} "
                "(four 2x poolings)"
            )
