"""ViTEncoder is MONAI's classification ViT without its head: shapes, strict loads, CLS, masking."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViT

from chestssl.models.seeding import seeded
from chestssl.models.vit import ViTEncoder, build_vit_encoder, gather_tokens, patchify, unpatchify
from tests.tiny_configs import VIT

VIT_2D = VIT
VIT_3D = {**VIT_2D, "spatial_dims": 3, "img_size": 16, "patch_size": 4, "hidden_size": 24, "num_layers": 1}


def _encoder(cfg=VIT_2D, seed: int = 0) -> ViTEncoder:
    with seeded(seed):
        return build_vit_encoder(cfg).eval()


def test_2d_shapes_and_protocol_attributes():
    encoder = _encoder()
    x = torch.rand(2, 1, 32, 32)
    maps = encoder.feature_maps(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4)] * VIT_2D["num_layers"]
    assert tuple(encoder.latent(x).shape) == (2, 32, 4, 4)
    assert tuple(encoder.representation(x).shape) == (2, 32)
    assert (encoder.spatial_dims, encoder.in_channels) == (2, 1)
    assert (encoder.latent_channels, encoder.latent_stride, encoder.representation_dim) == (32, 8, 32)
    assert (encoder.grid_size, encoder.num_patches, encoder.patch_dim) == ((4, 4), 16, 64)


def test_3d_shapes():
    encoder = _encoder(VIT_3D)
    x = torch.rand(2, 1, 16, 16, 16)
    assert [tuple(m.shape) for m in encoder.feature_maps(x)] == [(2, 24, 4, 4, 4)]
    assert tuple(encoder.latent(x).shape) == (2, 24, 4, 4, 4)
    assert tuple(encoder.representation(x).shape) == (2, 24)
    tokens, hidden_states = encoder(x)
    assert tuple(tokens.shape) == (2, 1 + 64, 24) and len(hidden_states) == 1


def test_maps_are_the_token_grids_of_monai_vit_outputs():
    encoder = _encoder()
    x = torch.rand(2, 1, 32, 32)
    tokens, hidden_states = encoder(x)
    for feature_map, state in zip(encoder.feature_maps(x), hidden_states):
        # Token n of the row-major grid sits at map position (n // 4, n % 4).
        assert torch.equal(feature_map[:, :, 1, 2], state[:, 1 + 1 * 4 + 2])
    assert torch.equal(encoder.latent(x).flatten(2).transpose(1, 2), tokens[:, 1:])
    torch.testing.assert_close(tokens, encoder.norm(hidden_states[-1]))


@pytest.mark.parametrize("cfg", [VIT_2D, VIT_3D], ids=["2d", "3d"])
def test_state_dict_loads_strictly_into_monai_vit_without_head(cfg):
    encoder = _encoder(cfg, seed=1)
    x = torch.rand(2, 1, *(cfg["img_size"],) * cfg["spatial_dims"])
    # Built from MONAI's own arguments, independently of ViTEncoder.
    with seeded(5):
        monai_vit = ViT(
            in_channels=1,
            img_size=cfg["img_size"],
            patch_size=cfg["patch_size"],
            hidden_size=cfg["hidden_size"],
            mlp_dim=cfg["mlp_dim"],
            num_layers=cfg["num_layers"],
            num_heads=cfg["num_heads"],
            pos_embed_type="sincos",
            classification=True,
            spatial_dims=cfg["spatial_dims"],
            qkv_bias=True,
        ).eval()
    del monai_vit.classification_head
    assert set(monai_vit.state_dict()) == set(encoder.state_dict())
    monai_vit.load_state_dict(encoder.state_dict(), strict=True)
    torch.testing.assert_close(monai_vit(x)[0], encoder(x)[0], rtol=0, atol=0)
    encoder.monai_equivalent().load_state_dict(encoder.state_dict(), strict=True)


def test_a_monai_classifier_misses_only_its_head():
    encoder = _encoder()
    classifier = ViT(**encoder.vit_kwargs(num_classes=3))
    missing, unexpected = classifier.load_state_dict(encoder.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == ["classification_head.0.bias", "classification_head.0.weight"]


def test_representation_is_the_final_norm_cls_token_that_monai_classifies():
    encoder = _encoder(seed=2)
    hidden = VIT_2D["hidden_size"]
    # A MONAI classifier whose linear head is the identity outputs exactly the CLS feature it reads.
    classifier = ViT(**{**encoder.vit_kwargs(num_classes=hidden), "post_activation": None}).eval()
    classifier.load_state_dict(encoder.state_dict(), strict=False)
    with torch.no_grad():
        classifier.classification_head.weight.copy_(torch.eye(hidden))
        classifier.classification_head.bias.zero_()
    x = torch.rand(3, 1, 32, 32)
    representation = encoder.representation(x)
    torch.testing.assert_close(representation, classifier(x)[0])
    torch.testing.assert_close(representation, encoder(x)[0][:, 0], rtol=0, atol=0)
    assert not torch.allclose(representation, encoder(x)[0][:, 1:].mean(dim=1))


def test_encode_visible_reads_only_the_visible_patches():
    encoder = _encoder(seed=3)
    x = torch.rand(2, 1, 32, 32)
    every_patch = torch.arange(16).expand(2, -1)
    torch.testing.assert_close(encoder.encode_visible(x, every_patch), encoder(x)[0], rtol=1e-5, atol=1e-6)
    visible = torch.tensor([[0, 3, 5, 6, 9, 15], [1, 2, 4, 8, 10, 11]])
    tokens = encoder.encode_visible(x, visible)
    assert tuple(tokens.shape) == (2, 1 + 6, 32)
    # Changing every hidden patch leaves the encoding unchanged; changing a visible one does not.
    hidden_changed = patchify(x, 8)
    keep = torch.zeros(2, 16, dtype=torch.bool).scatter(1, visible, True)
    hidden_changed[~keep] = torch.rand(int((~keep).sum()), 64)
    torch.testing.assert_close(encoder.encode_visible(unpatchify(hidden_changed, 8, (4, 4)), visible), tokens)
    visible_changed = patchify(x, 8)
    visible_changed[0, 3] += 0.5
    assert not torch.allclose(encoder.encode_visible(unpatchify(visible_changed, 8, (4, 4)), visible), tokens)


def test_patchify_follows_the_token_order_of_the_patch_convolution():
    encoder = _encoder()
    x = torch.rand(2, 1, 32, 32)
    conv = encoder.patch_embedding.patch_embeddings
    tokens = conv(x).flatten(2).transpose(1, 2)
    linear = patchify(x, 8) @ conv.weight.reshape(conv.weight.shape[0], -1).T + conv.bias
    torch.testing.assert_close(linear, tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,patch,grid", [((2, 1, 32, 24), 8, (4, 3)), ((2, 2, 8, 12, 16), 4, (2, 3, 4))])
def test_unpatchify_inverts_patchify(shape, patch, grid):
    x = torch.rand(shape)
    patches = patchify(x, patch)
    assert tuple(patches.shape) == (shape[0], torch.Size(grid).numel(), patch ** len(grid) * shape[1])
    assert torch.equal(unpatchify(patches, patch, grid, channels=shape[1]), x)
    assert torch.equal(gather_tokens(patches, torch.tensor([[2], [0]]))[:, 0], patches[[0, 1], [2, 0]])


def test_every_trainable_parameter_gets_a_gradient_and_the_unused_norms_are_frozen():
    encoder = _encoder().train()
    x = torch.rand(2, 1, 32, 32)
    (encoder.latent(x).square().mean() + encoder.representation(x).sum()).backward()
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert {name for name, p in encoder.named_parameters() if p.grad is not None} == trainable
    frozen = {name for name, p in encoder.named_parameters() if not p.requires_grad}
    assert frozen == {
        "patch_embedding.position_embeddings",
        *(f"blocks.{i}.norm_cross_attn.{w}" for i in range(2) for w in ("weight", "bias")),
    }


def test_seeded_builds_match_and_config_rebuilds():
    a, b = _encoder(seed=7), _encoder(seed=7)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a.config() == VIT_2D
    assert not torch.equal(_encoder(seed=8).blocks[0].attn.qkv.weight, a.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"patch_size": 6}, r"patch_size: got 6, which does not divide img_size 32"),
        ({"hidden_size": 30, "num_heads": 3}, r"hidden_size: got 30, expected a multiple of 4"),
        ({"hidden_size": 36, "num_heads": 8}, r"hidden_size: got 36, which is not divisible by num_heads 8"),
        ({"spatial_dims": 3, "hidden_size": 32}, r"hidden_size: got 32, expected a multiple of 6"),
        ({"spatial_dims": 4}, r"spatial_dims must be 2 or 3, got 4"),
        ({"num_layers": 0}, r"num_layers: got 0"),
    ],
)
def test_bad_arguments_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        build_vit_encoder({**VIT_2D, **change})


def test_wrong_input_size_is_explained():
    with pytest.raises(ValueError, match=r"input size \(64, 64\) differs from img_size 32"):
        _encoder().latent(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        _encoder().latent(torch.rand(1, 2, 32, 32))
