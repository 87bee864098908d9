"""UNetEncoder is BasicUNetPlusPlus's down path; unetpp_from_encoder hands its weights over."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNetPlusPlus

from chestssl.models import ENCODER_BLOCKS, UNetEncoder, seeded, unetpp_from_encoder

FEATURES = (4, 8, 8, 16, 16)


def _encoder(spatial_dims: int = 2, seed: int = 0) -> UNetEncoder:
    with seeded(seed):
        return UNetEncoder(spatial_dims, 1, FEATURES)


def test_feature_shapes_2d():
    maps = _encoder()(torch.rand(2, 1, 64, 64))
    assert [tuple(m.shape) for m in maps] == [
        (2, 4, 64, 64), (2, 8, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4),
    ]


def test_feature_shapes_3d():
    maps = _encoder(3)(torch.rand(2, 1, 32, 32, 32))
    assert tuple(maps[-1].shape) == (2, 16, 2, 2, 2)
    assert tuple(maps[0].shape) == (2, 4, 32, 32, 32)


def test_state_dict_loads_into_basic_unetplusplus_encoder():
    encoder = _encoder()
    unetpp = BasicUNetPlusPlus(spatial_dims=2, in_channels=1, out_channels=2, features=(*FEATURES, 4))
    result = unetpp.load_state_dict(encoder.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(not key.startswith(ENCODER_BLOCKS) for key in result.missing_keys)
    # Same blocks and defaults: the UNet++ encoder path computes the same features.
    encoder.eval(), unetpp.eval()
    x = torch.rand(1, 1, 32, 32)
    expected = encoder(x)
    for name, reference in zip(ENCODER_BLOCKS, expected):
        x = getattr(unetpp, name)(x)
        torch.testing.assert_close(x, reference)


def test_unetpp_from_encoder_copies_encoder_and_seeds_decoder():
    encoder = _encoder(seed=3)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    unetpp = unetpp_from_encoder(encoder, seed=7)
    for key, value in before.items():
        torch.testing.assert_close(unetpp.state_dict()[key], value, rtol=0, atol=0)
    # Decoder: reproducible from its seed, different for another seed.
    same = unetpp_from_encoder(encoder, seed=7).state_dict()
    other = unetpp_from_encoder(encoder, seed=8).state_dict()
    decoder_key = "upcat_0_4.convs.conv_0.conv.weight"
    assert torch.equal(unetpp.state_dict()[decoder_key], same[decoder_key])
    assert not torch.equal(unetpp.state_dict()[decoder_key], other[decoder_key])
    # The UNet++ holds copies: changing it leaves the pretrained encoder untouched.
    with torch.no_grad():
        unetpp.conv_0_0.conv_0.conv.weight.add_(1.0)
    torch.testing.assert_close(encoder.state_dict()["conv_0_0.conv_0.conv.weight"], before["conv_0_0.conv_0.conv.weight"])


@pytest.mark.parametrize("spatial_dims,size", [(2, 64), (3, 32)])
def test_unetpp_output_shape(spatial_dims, size):
    unetpp = unetpp_from_encoder(_encoder(spatial_dims), out_channels=2)
    assert unetpp.deep_supervision is False
    shape = (2, 1) + (size,) * spatial_dims
    out = unetpp(torch.rand(shape))
    assert len(out) == 1 and tuple(out[0].shape) == (2, 2) + (size,) * spatial_dims


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="5 positive integers"):
        UNetEncoder(2, 1, [4, 8, 8, 16])
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        UNetEncoder(1, 1, FEATURES)
    with pytest.raises(ValueError, match=r"input of spatial size \(16, 64\) is too small; every size must be >= 32"):
        _encoder()(torch.rand(2, 1, 16, 64))


@pytest.mark.parametrize("spatial_dims,size", [(2, 64), (3, 32)])
def test_representation_is_the_global_average_pool_of_the_latent(spatial_dims, size):
    encoder = _encoder(spatial_dims).eval()
    x = torch.rand((3, 1) + (size,) * spatial_dims)
    representation = encoder.representation(x)
    assert encoder.representation_dim == FEATURES[-1]
    assert tuple(representation.shape) == (3, encoder.representation_dim)
    torch.testing.assert_close(representation, encoder.latent(x).mean(dim=tuple(range(2, 2 + spatial_dims))))
    # Each image's vector depends on that image alone.
    torch.testing.assert_close(encoder.representation(x[1:2]), representation[1:2])


def test_every_parameter_shapes_the_representation():
    encoder = _encoder()
    encoder.representation(torch.rand(2, 1, 32, 32)).square().sum().backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in encoder.parameters())
