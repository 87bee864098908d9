"""CNNAttentionEncoder is MONAI's autoencoderkl.Encoder with the backbone protocol; its
stages drop into BasicUNetPlusPlus; the decoder mirrors it."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import SpatialAttentionBlock
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from monai.networks.nets.basic_unet import Down

from chestssl.models import build_backbone, export_encoder, load_encoder, seeded
from chestssl.models.cnn_attention import (
    CNNAttentionEncoder,
    build_cnn_attention_decoder,
    build_cnn_attention_encoder,
    unetpp_from_cnn_attention,
)

CFG = {
    "name": "cnn_attention",
    "spatial_dims": 2,
    "channels": 8,
    "channel_multipliers": [1, 2, 4],
    "num_res_blocks": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
}


def _encoder(spatial_dims: int = 2, seed: int = 0, channels: int = 8) -> CNNAttentionEncoder:
    with seeded(seed):
        return CNNAttentionEncoder(
            spatial_dims,
            in_channels=1,
            channels=channels,
            channel_multipliers=(1, 2, 4),
            num_res_blocks=1,
            latent_channels=4,
            norm_num_groups=4,
        )


def test_protocol_attributes_and_shapes_2d():
    encoder = _encoder()
    assert (encoder.spatial_dims, encoder.in_channels, encoder.latent_channels) == (2, 1, 4)
    assert encoder.widths == (8, 16, 32) and encoder.latent_stride == 4
    x = torch.rand(2, 1, 32, 32)
    maps = encoder.feature_maps(x)
    assert [tuple(m.shape) for m in maps] == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8)]
    assert tuple(encoder.latent(x).shape) == (2, 4, 8, 8)


def test_shapes_3d():
    encoder = _encoder(3, channels=4)
    x = torch.rand(1, 1, 16, 16, 16)
    maps = encoder.feature_maps(x)
    assert [tuple(m.shape) for m in maps] == [(1, 4, 16, 16, 16), (1, 8, 8, 8, 8), (1, 16, 4, 4, 4)]
    assert tuple(encoder.latent(x).shape) == (1, 4, 4, 4, 4)


def test_stages_share_blocks_and_chain_to_feature_maps():
    encoder = _encoder().eval()
    stages = encoder.stages()
    assert len(stages) == 3
    # The encoder's own modules, in order, all but the final GroupNorm + latent conv.
    chained = [block for stage in stages for block in stage]
    assert len(chained) == len(encoder.blocks) - 2
    assert all(a is b for a, b in zip(chained, encoder.blocks))
    # Attention at the lowest level only: its residual block's + the non-local middle's.
    attention = [sum(isinstance(m, SpatialAttentionBlock) for m in stage.modules()) for stage in stages]
    assert attention == [0, 0, 2]
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = encoder.feature_maps(x)
        h = x
        for stage, reference in zip(stages, expected):
            h = stage(h)
            torch.testing.assert_close(h, reference, rtol=0, atol=0)
        # Latent = deepest map -> final GroupNorm -> conv.
        latent = encoder.blocks[-1](encoder.blocks[-2](h))
        torch.testing.assert_close(latent, encoder.latent(x), rtol=0, atol=0)


def test_state_dict_loads_strict_into_monai_encoder_both_ways():
    encoder = _encoder(seed=1).eval()
    monai_encoder = encoder.monai_equivalent().eval()
    assert type(monai_encoder) is Encoder
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(monai_encoder(x), encoder.latent(x))
        monai_encoder.load_state_dict(encoder.state_dict(), strict=True)
        torch.testing.assert_close(monai_encoder(x), encoder.latent(x), rtol=0, atol=0)
    other = _encoder(seed=2)
    other.load_state_dict(monai_encoder.state_dict(), strict=True)
    for key, value in encoder.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_builders_and_encoder_payload_round_trip():
    with seeded(0):
        encoder = build_cnn_attention_encoder(CFG)
    assert isinstance(encoder, CNNAttentionEncoder) and encoder.widths == (8, 16, 32)
    assert isinstance(build_backbone({**CFG, "spatial_dims": 3}), CNNAttentionEncoder)
    restored = load_encoder(export_encoder(encoder, CFG))
    for key, value in encoder.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@pytest.mark.parametrize(
    "change,match",
    [
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3, got 1"),
        ({"channels": 0}, "channels: got 0"),
        ({"channel_multipliers": []}, r"channel_multipliers: got \[\] \(0 levels\)"),
        ({"channel_multipliers": [1, 2, 4, 8, 8, 8]}, r"channel_multipliers: got .*, expected 1 to 5"),
        ({"channel_multipliers": [1, 0, 4]}, r"channel_multipliers\[1\]: got 0"),
        ({"num_res_blocks": 0}, "num_res_blocks: got 0"),
        ({"latent_channels": -1}, "latent_channels: got -1"),
        ({"norm_num_groups": 3}, "norm_num_groups: 3 does not divide every level width"),
        ({"channels": 6}, r"norm_num_groups: 4 does not divide every level width \[6, 12, 24\]"),
    ],
)
def test_bad_arguments_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        build_cnn_attention_encoder({**CFG, **change})


def test_bad_input_size_is_reported():
    encoder = _encoder()
    with pytest.raises(ValueError, match="each divisible by latent_stride 4"):
        encoder.feature_maps(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match="divisible by latent_stride 4"):
        encoder.latent(torch.rand(1, 1, 32, 34))


def test_unetpp_hosts_encoder_stages():
    encoder = _encoder(seed=3)
    before = {key: value.clone() for key, value in encoder.state_dict().items()}
    unetpp = unetpp_from_cnn_attention(encoder, out_channels=2, seed=5)
    assert unetpp.deep_supervision is False
    # Levels beyond the encoder's are new BasicUNetPlusPlus Down blocks doubling the width: (8, 16, 32, 64, 128, 8).
    assert isinstance(unetpp.conv_3_0, Down) and isinstance(unetpp.conv_4_0, Down)
    assert unetpp.conv_3_0.convs.conv_0.conv.out_channels == 64
    assert unetpp.conv_4_0.convs.conv_0.conv.out_channels == 128
    assert unetpp.final_conv_0_4.in_channels == 8
    # Pretrained weights are in the network, as copies.
    stages = encoder.stages()
    for level, stage in enumerate(stages):
        hosted = getattr(unetpp, f"conv_{level}_0")
        assert hosted is not stage and hosted[0] is not stage[0]
        for key, value in stage.state_dict().items():
            assert torch.equal(hosted.state_dict()[key], value), (level, key)
    # Decoder reproducible from the seed.
    again = unetpp_from_cnn_attention(encoder, seed=5)
    assert torch.equal(again.upcat_0_4.convs.conv_0.conv.weight, unetpp.upcat_0_4.convs.conv_0.conv.weight)

    x = torch.rand(2, 1, 32, 32)
    target = (torch.rand(2, 32, 32) > 0.8).long()
    out = unetpp(x)
    assert len(out) == 1 and tuple(out[0].shape) == (2, 2, 32, 32)
    loss = torch.nn.functional.cross_entropy(out[0], target)
    loss.backward()
    for level in range(3):
        for name, param in getattr(unetpp, f"conv_{level}_0").named_parameters():
            assert param.grad is not None, (level, name)
        grads = [p.grad.abs().sum() for p in getattr(unetpp, f"conv_{level}_0").parameters()]
        assert torch.stack(grads).sum() > 0, level
    torch.optim.SGD(unetpp.parameters(), lr=0.1).step()

    # The step changed the hosted stages but not the encoder passed in.
    assert not torch.equal(unetpp.conv_0_0[0].conv.weight, before["blocks.0.conv.weight"])
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in encoder.parameters())


def test_unetpp_from_five_level_encoder_3d():
    with seeded(0):
        encoder = CNNAttentionEncoder(
            3, channels=2, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=1, latent_channels=2, norm_num_groups=2
        )
    assert encoder.latent_stride == 16
    unetpp = unetpp_from_cnn_attention(encoder, out_channels=3)
    # All five UNet++ levels come from the encoder; no new Down block.
    assert not any(isinstance(getattr(unetpp, f"conv_{k}_0"), Down) for k in range(5))
    with torch.no_grad():
        out = unetpp(torch.rand(1, 1, 32, 32, 32))
    assert len(out) == 1 and tuple(out[0].shape) == (1, 3, 32, 32, 32)


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 16)])
def test_decoder_mirrors_encoder(spatial_dims, size):
    encoder = _encoder(spatial_dims, channels=4)
    with seeded(0):
        decoder = build_cnn_attention_decoder(
            spatial_dims, latent_channels=4, channels=4, channel_multipliers=[1, 2, 4],
            num_res_blocks=1, norm_num_groups=4,
        )
    assert isinstance(decoder, Decoder)
    attention = [i for i, block in enumerate(decoder.blocks) if isinstance(block, SpatialAttentionBlock)]
    # Non-local middle (block 2), then the lowest-resolution level's one residual + attention (block 5).
    assert attention == [2, 5]
    x = torch.rand((2, 1) + (size,) * spatial_dims)
    with torch.no_grad():
        latent = encoder.latent(x)
        assert tuple(decoder(latent).shape) == tuple(x.shape)
        # Raw output: no squashing, so a large latent gives values outside [0, 1].
        raw = decoder(100 * torch.randn_like(latent))
    assert raw.min() < 0 or raw.max() > 1


def test_decoder_bad_arguments_are_named():
    with pytest.raises(ValueError, match="norm_num_groups: 4 does not divide"):
        build_cnn_attention_decoder(
            2, 4, channels=6, channel_multipliers=[1, 2], num_res_blocks=1, norm_num_groups=4
        )
    with pytest.raises(ValueError, match="latent_channels: got 0"):
        build_cnn_attention_decoder(
            2, 0, channels=8, channel_multipliers=[1, 2], num_res_blocks=1, norm_num_groups=4
        )


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 16)])
def test_representation_is_the_global_average_pool_of_the_latent(spatial_dims, size):
    encoder = _encoder(spatial_dims, channels=4).eval()
    x = torch.rand((3, 1) + (size,) * spatial_dims)
    with torch.no_grad():
        representation = encoder.representation(x)
        assert encoder.representation_dim == encoder.latent_channels == 4
        assert tuple(representation.shape) == (3, 4)
        torch.testing.assert_close(representation, encoder.latent(x).mean(dim=tuple(range(2, 2 + spatial_dims))))
        torch.testing.assert_close(encoder.representation(x[2:]), representation[2:])


def test_every_parameter_shapes_the_representation():
    encoder = _encoder(channels=4)
    encoder.representation(torch.rand(2, 1, 32, 32)).square().sum().backward()
    without_gradient = [name for name, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_gradient == []
