"""ConvAutoencoder: shapes, bottleneck, range."""

from __future__ import annotations

import pytest
import torch

from chestssl.models import ConvAutoencoder, UNetEncoder

FEATURES = (4, 8, 8, 16, 16)


@pytest.mark.parametrize("spatial_dims,size", [(2, 64), (3, 32)])
def test_reconstruction_shape_and_range(spatial_dims, size):
    encoder = UNetEncoder(spatial_dims, 1, FEATURES)
    autoencoder = ConvAutoencoder(encoder)
    assert autoencoder.encoder is encoder
    x = torch.rand((2, 1) + (size,) * spatial_dims)
    with torch.no_grad():
        out = autoencoder(x)
        latent = autoencoder.encode(x)
    assert out.shape == x.shape
    assert float(out.min()) > 0.0 and float(out.max()) < 1.0
    assert tuple(latent.shape) == (2, 16) + (size // 16,) * spatial_dims


def test_reconstruction_depends_only_on_the_latent():
    autoencoder = ConvAutoencoder(UNetEncoder(2, 1, FEATURES)).eval()
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(autoencoder.decode(autoencoder.encode(x)), autoencoder(x))
    # No skip connections: the decoder's only input is the 1/16 latent.
    assert tuple(autoencoder.decode(torch.zeros(1, 16, 2, 2)).shape) == (1, 1, 32, 32)


def test_size_not_divisible_by_16_is_reported():
    with pytest.raises(ValueError, match="divisible by 16"):
        ConvAutoencoder(UNetEncoder(2, 1, FEATURES))(torch.rand(1, 1, 40, 40))
