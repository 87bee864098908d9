"""SwinEncoder is SwinUNETR's swinViT; SwinUNETR and its seg head are built around it."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

from chestssl.models.seeding import seeded
from chestssl.models.swin import (
    CheckedSwinUNETR,
    SwinEncoder,
    SwinUNETRSegHead,
    build_swin_encoder,
    swin_unetr_from_encoder,
    swin_unetr_from_parts,
)

SHALLOW = (1, 1, 1, 1)
HEADS = (3, 6, 12, 24)


def _config(**overrides) -> dict:
    cfg = {
        "name": "swin",
        "spatial_dims": 2,
        "feature_size": 12,
        "patch_size": 2,
        "window_size": 7,
        "depths": [1, 1, 1, 1],
        "num_heads": list(HEADS),
    }
    cfg.update(overrides)
    return cfg


def _encoder(spatial_dims: int = 2, depths=SHALLOW, seed: int = 0, **kwargs) -> SwinEncoder:
    with seeded(seed):
        return SwinEncoder(spatial_dims, feature_size=12, depths=depths, num_heads=HEADS, **kwargs)


def test_feature_map_shapes_2d():
    encoder = _encoder(depths=(2, 2, 2, 2))
    assert (encoder.latent_channels, encoder.latent_stride) == (192, 32)
    x = torch.rand(2, 1, 64, 64)
    maps = encoder.feature_maps(x)
    assert [tuple(m.shape) for m in maps] == [
        (2, 12, 32, 32), (2, 24, 16, 16), (2, 48, 8, 8), (2, 96, 4, 4), (2, 192, 2, 2),
    ]
    torch.testing.assert_close(encoder.latent(x), maps[-1], rtol=0, atol=0)
    assert tuple(encoder.latent(torch.rand(1, 1, 32, 64)).shape) == (1, 192, 1, 2)


def test_feature_map_shapes_3d():
    maps = _encoder(3).feature_maps(torch.rand(1, 1, 32, 32, 32))
    assert [tuple(m.shape) for m in maps] == [
        (1, 12, 16, 16, 16), (1, 24, 8, 8, 8), (1, 48, 4, 4, 4), (1, 96, 2, 2, 2), (1, 192, 1, 1, 1),
    ]


def test_larger_patch_size_changes_the_stride():
    encoder = build_swin_encoder(_config(patch_size=4))
    assert encoder.latent_stride == 64
    maps = encoder.feature_maps(torch.rand(1, 1, 64, 128))
    assert tuple(maps[0].shape) == (1, 12, 16, 32)
    assert tuple(maps[-1].shape) == (1, 192, 1, 2)


@pytest.mark.parametrize(
    "spatial_dims,shape,depths", [(2, (2, 1, 64, 64), (2, 2, 2, 2)), (3, (1, 1, 32, 32, 32), SHALLOW)]
)
def test_state_dict_loads_strict_into_swin_unetr_with_identical_hidden_states(spatial_dims, shape, depths):
    encoder = _encoder(spatial_dims, depths=depths, seed=1)
    # Built independently from the encoder's own kwargs: the defaults must agree with SwinUNETR's.
    reference = SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, depths=depths, num_heads=HEADS, spatial_dims=spatial_dims
    )
    reference.swinViT.load_state_dict(encoder.state_dict(), strict=True)
    assert set(encoder.state_dict()) == set(reference.swinViT.state_dict())
    assert set(encoder.monai_equivalent().swinViT.state_dict()) == set(encoder.state_dict())
    x = torch.rand(shape)
    with torch.no_grad():
        ours, theirs = encoder.feature_maps(x), reference.swinViT(x, True)
    assert len(ours) == 5
    for mine, expected in zip(ours, theirs):
        torch.testing.assert_close(mine, expected, rtol=0, atol=0)


def test_normalize_off_matches_swinvit_without_normalisation():
    encoder = _encoder(seed=2, normalize=False)
    reference = encoder.monai_equivalent()
    assert reference.normalize is False
    reference.swinViT.load_state_dict(encoder.state_dict(), strict=True)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        latent = encoder.latent(x)
        torch.testing.assert_close(latent, reference.swinViT(x, False)[-1], rtol=0, atol=0)
        assert not torch.allclose(latent, reference.swinViT(x, True)[-1])


def test_swin_unetr_from_encoder_copies_encoder_and_seeds_decoder():
    encoder = _encoder(seed=3)
    before = {key: value.clone() for key, value in encoder.state_dict().items()}
    network = swin_unetr_from_encoder(encoder, out_channels=2, seed=7)
    assert isinstance(network, SwinUNETR)
    for key, value in before.items():
        torch.testing.assert_close(network.swinViT.state_dict()[key], value, rtol=0, atol=0)
    decoder_key = "decoder1.transp_conv.conv.weight"
    same = swin_unetr_from_encoder(encoder, seed=7).state_dict()[decoder_key]
    other = swin_unetr_from_encoder(encoder, seed=8).state_dict()[decoder_key]
    assert torch.equal(network.state_dict()[decoder_key], same)
    assert not torch.equal(network.state_dict()[decoder_key], other)

    x = torch.rand(2, 1, 64, 64)
    logits = network(x)
    assert tuple(logits.shape) == (2, 2, 64, 64)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    logits.square().mean().backward()
    optimizer.step()
    moved = network.swinViT.state_dict()["patch_embed.proj.weight"]
    assert not torch.equal(moved, before["patch_embed.proj.weight"])
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_swin_unetr_from_encoder_3d_output_shape():
    network = swin_unetr_from_encoder(_encoder(3), out_channels=3)
    with torch.no_grad():
        assert tuple(network(torch.rand(1, 1, 32, 32, 64)).shape) == (1, 3, 32, 32, 64)


def test_seg_head_equals_swin_unetr_with_the_same_weights():
    encoder = _encoder(depths=(2, 2, 2, 2), seed=4)
    network = swin_unetr_from_encoder(encoder, seed=5)
    head = SwinUNETRSegHead(encoder, out_channels=2)
    decoder_state = {k: v for k, v in network.state_dict().items() if not k.startswith("swinViT.")}
    assert set(head.state_dict()) == set(decoder_state)
    head.load_state_dict(decoder_state, strict=True)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = network(x)
        logits = head(x, encoder.feature_maps(x))
    assert tuple(logits.shape) == (2, 2, 64, 64)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_swin_unetr_from_parts_reproduces_the_shared_model():
    encoder = _encoder(seed=6)
    with seeded(9):
        head = SwinUNETRSegHead(encoder, out_channels=2)
    network = swin_unetr_from_parts(encoder, head)
    x = torch.rand(1, 1, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(network(x), head(x, encoder.feature_maps(x)), rtol=0, atol=0)


def test_input_size_errors_say_which_sizes_work():
    encoder = _encoder()
    with pytest.raises(ValueError, match=r"not divisible by 32 \(patch_size 2"):
        encoder.latent(torch.rand(1, 1, 48, 64))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 1, \*S\)"):
        encoder.latent(torch.rand(1, 1, 32, 32, 32))
    # The encoder runs on 32x32, the SwinUNETR decoder cannot (1x1 map under instance norm).
    assert tuple(encoder.latent(torch.rand(1, 1, 32, 32)).shape) == (1, 192, 1, 1)
    network = swin_unetr_from_encoder(encoder)
    assert isinstance(network, CheckedSwinUNETR)
    with pytest.raises(ValueError, match=r"a size of at least 64"):
        network(torch.rand(1, 1, 32, 32))
    head = SwinUNETRSegHead(encoder)
    x = torch.rand(1, 1, 32, 32)
    with pytest.raises(ValueError, match=r"at least 64"):
        head(x, encoder.feature_maps(x))
    with pytest.raises(ValueError, match="5 hidden states"):
        head(x, encoder.feature_maps(x)[:4])


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"spatial_dims": 1}, r"spatial_dims must be 2 or 3, got 1"),
        ({"feature_size": 16}, r"feature_size: got 16, expected a multiple of 12"),
        ({"feature_size": 0}, r"feature_size: got 0"),
        ({"patch_size": 0}, r"patch_size: got 0"),
        ({"window_size": True}, r"window_size: got True"),
        ({"depths": [2, 2, 2]}, r"depths: got \[2, 2, 2\], expected a list of 4 positive integers"),
        ({"depths": [2, 0, 2, 2]}, r"depths\[1\]: got 0"),
        ({"num_heads": [5, 6, 12, 24]}, r"num_heads\[0\]: got 5, but stage 0 has 12 channels"),
        ({"num_heads": [3, 6, 12]}, r"num_heads: got \[3, 6, 12\]"),
    ],
)
def test_bad_arguments_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_swin_encoder(_config(**overrides))


def test_unusable_patch_size_is_reported():
    encoder = build_swin_encoder(_config(patch_size=4))
    with pytest.raises(ValueError, match=r"SwinUNETR decoder needs an encoder with patch_size 2, got 4"):
        swin_unetr_from_encoder(encoder)
    with pytest.raises(ValueError, match=r"patch_size 2, got 4"):
        SwinUNETRSegHead(encoder)


def test_config_round_trips_through_build_swin_encoder():
    cfg = _config(spatial_dims=3, feature_size=24)
    encoder = build_swin_encoder(cfg)
    assert encoder.config() == cfg
    rebuilt = build_swin_encoder(encoder.config())
    rebuilt.load_state_dict(encoder.state_dict(), strict=True)
    off = build_swin_encoder(_config(normalize=False))
    assert off.normalize is False and off.config()["normalize"] is False
    recomputed = build_swin_encoder(_config(use_checkpoint=True))
    assert recomputed.use_checkpoint is True and recomputed.config()["use_checkpoint"] is True
    assert "use_checkpoint" not in build_swin_encoder(_config()).config()


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    """``use_checkpoint`` recomputes the Swin blocks' activations in the backward pass: the
    SwinUNETR built from the encoder checkpoints too, and loss and gradients are those
    without it, bit for bit (no dropout, so the recomputation is the same arithmetic)."""
    x = torch.rand(1, 1, 32, 32, 64)
    results = []
    for use_checkpoint in (False, True):
        network = swin_unetr_from_encoder(_encoder(3, seed=4, use_checkpoint=use_checkpoint), out_channels=2, seed=5)
        assert network.swinViT.layers1[0].use_checkpoint is use_checkpoint
        loss = network(x).square().mean()
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in network.named_parameters()}))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert torch.equal(loss_off, loss_on)
    assert grads_off.keys() == grads_on.keys()
    for name, grad in grads_off.items():
        assert torch.equal(grad, grads_on[name]), name


@pytest.mark.parametrize("spatial_dims,shape", [(2, (64, 64)), (3, (32, 32, 32))])
def test_representation_is_the_global_average_pool_of_the_deepest_hidden_state(spatial_dims, shape):
    encoder = _encoder(spatial_dims).eval()
    x = torch.rand((2, 1) + shape)
    with torch.no_grad():
        representation = encoder.representation(x)
        assert encoder.representation_dim == encoder.latent_channels == 192
        assert tuple(representation.shape) == (2, 192)
        deepest = encoder.feature_maps(x)[-1]
        torch.testing.assert_close(representation, deepest.mean(dim=tuple(range(2, 2 + spatial_dims))))
        torch.testing.assert_close(encoder.representation(x[1:]), representation[1:])


def test_every_parameter_shapes_the_representation():
    encoder = _encoder()
    encoder.representation(torch.rand(2, 1, 64, 64)).square().sum().backward()
    without_gradient = [name for name, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_gradient == []
