"""ResNetBackbone is MONAI's ResNet without fc: shapes, strides, strict loads into MONAI."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import FlexibleUNet, ResNet, resnet18, resnet50

from chestssl.models.resnet import FEATURE_MAP_STRIDES, ResNetBackbone, build_resnet_encoder
from chestssl.models.seeding import seeded

SMALL = [4, 8, 8, 16]


def _backbone(name: str = "resnet18", spatial_dims: int = 2, widths=SMALL, seed: int = 0) -> ResNetBackbone:
    with seeded(seed):
        return build_resnet_encoder({"name": name, "spatial_dims": spatial_dims, "block_inplanes": list(widths)})


@pytest.mark.parametrize("name,expansion", [("resnet18", 1), ("resnet50", 4)])
def test_feature_maps_2d_shapes_and_strides(name, expansion):
    backbone = _backbone(name).eval()
    x = torch.rand(2, 1, 64, 64)
    maps = backbone.feature_maps(x)
    assert [tuple(m.shape) for m in maps] == [
        (2, 4, 16, 16),
        (2, 4 * expansion, 16, 16),
        (2, 8 * expansion, 8, 8),
        (2, 8 * expansion, 4, 4),
        (2, 16 * expansion, 2, 2),
    ]
    assert [64 // m.shape[-1] for m in maps] == list(FEATURE_MAP_STRIDES)
    assert [m.shape[1] for m in maps] == list(backbone.feature_channels)
    assert (backbone.latent_channels, backbone.latent_stride) == (16 * expansion, 32)
    assert backbone.representation_dim == 16 * expansion
    torch.testing.assert_close(backbone.latent(x), maps[-1], rtol=0, atol=0)


def test_feature_maps_3d_shapes():
    backbone = _backbone(spatial_dims=3).eval()
    maps = backbone.feature_maps(torch.rand(2, 1, 32, 32, 32))
    assert [tuple(m.shape) for m in maps] == [
        (2, 4, 8, 8, 8), (2, 4, 8, 8, 8), (2, 8, 4, 4, 4), (2, 8, 2, 2, 2), (2, 16, 1, 1, 1),
    ]
    assert tuple(backbone.representation(torch.rand(2, 1, 16, 32, 32)).shape) == (2, 16)


def test_sizes_that_are_not_multiples_of_32_round_up():
    latent = _backbone().eval().latent(torch.rand(1, 1, 48, 80))
    assert tuple(latent.shape) == (1, 16, 2, 3)


def test_representation_is_the_global_average_pool_of_layer4_and_the_forward():
    backbone = _backbone("resnet50").eval()
    x = torch.rand(3, 1, 64, 64)
    representation = backbone.representation(x)
    assert tuple(representation.shape) == (3, backbone.representation_dim)
    torch.testing.assert_close(representation, backbone.latent(x).mean(dim=(2, 3)))
    torch.testing.assert_close(backbone(x), representation, rtol=0, atol=0)


def test_default_widths_give_seed_001s_512_d_representation():
    backbone = build_resnet_encoder({"name": "resnet18", "spatial_dims": 2})
    assert backbone.representation_dim == 512
    assert build_resnet_encoder({"name": "resnet50", "spatial_dims": 2}).representation_dim == 2048


@pytest.mark.parametrize("name,factory", [("resnet18", resnet18), ("resnet50", resnet50)])
def test_state_dict_loads_strict_into_monai_resnet_with_identical_outputs(name, factory):
    backbone = build_resnet_encoder({"name": name, "spatial_dims": 2, "block_inplanes": [64, 128, 256, 512]})
    reference = factory(spatial_dims=2, n_input_channels=1, feed_forward=False, conv1_t_stride=2,
                        shortcut_type="A" if name == "resnet18" else "B", bias_downsample=name == "resnet18")
    reference.load_state_dict(backbone.state_dict(), strict=True)
    assert reference.fc is None
    x = torch.rand(2, 1, 32, 32)
    backbone.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("name,spatial_dims", [("resnet18", 3), ("resnet50", 2)])
def test_small_widths_load_strict_into_monai_resnet_of_the_same_widths(name, spatial_dims):
    backbone = _backbone(name, spatial_dims).eval()
    reference = ResNet(
        "basic" if name == "resnet18" else "bottleneck",
        [2, 2, 2, 2] if name == "resnet18" else [3, 4, 6, 3],
        SMALL,
        **backbone.monai_kwargs(),
    ).eval()
    reference.load_state_dict(backbone.state_dict(), strict=True)
    x = torch.rand(2, 1, *([32] * spatial_dims))
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_state_dict_loads_strict_into_flexible_unet_encoder_with_identical_maps(name):
    backbone = build_resnet_encoder({"name": name, "spatial_dims": 2, "block_inplanes": [64, 128, 256, 512]}).eval()
    network = FlexibleUNet(in_channels=1, out_channels=2, backbone=name, spatial_dims=2, pretrained=False).eval()
    network.encoder.load_state_dict(backbone.state_dict(), strict=True)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        ours, theirs = backbone.feature_maps(x), network.encoder(x)
    # FlexibleUNet's first map is the stem before max-pooling; layer1..layer4 are the same.
    for mine, reference in zip(ours[1:], theirs[1:]):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)


def test_parameter_free_shortcut_keeps_monai_values_and_passes_gradients():
    backbone = _backbone()
    x = torch.rand(2, 4, 8, 8, requires_grad=True)
    ours = backbone._downsample_basic_block(x, planes=8, stride=2, spatial_dims=2)
    monai = ResNet._downsample_basic_block(backbone, x, planes=8, stride=2, spatial_dims=2)
    torch.testing.assert_close(ours, monai, rtol=0, atol=0)
    assert not monai.requires_grad  # MONAI builds it from x.data
    ours.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad[:, :, ::2, ::2], torch.ones(2, 4, 4, 4))
    assert x.grad.sum() == 2 * 4 * 4 * 4


def test_every_parameter_gets_a_gradient():
    backbone = _backbone("resnet18")
    backbone.representation(torch.rand(2, 1, 32, 32)).square().sum().backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_same_seed_same_weights_and_config_round_trip():
    first, second = _backbone(seed=3), _backbone(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.conv1.weight, _backbone(seed=4).conv1.weight)
    rebuilt = build_resnet_encoder(first.config())
    rebuilt.load_state_dict(first.state_dict(), strict=True)
    assert first.config() == {"name": "resnet18", "spatial_dims": 2, "block_inplanes": SMALL}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "resnet34", "spatial_dims": 2}, r"name: got 'resnet34'.*'resnet18', 'resnet50'"),
        ({"name": "resnet18", "spatial_dims": 4}, r"spatial_dims must be 2 or 3, got 4"),
        ({"name": "resnet18", "spatial_dims": 2, "block_inplanes": [8, 8]}, r"block_inplanes: got \[8, 8\]"),
        ({"name": "resnet18", "spatial_dims": 2, "block_inplanes": [8, 0, 8, 8]}, r"block_inplanes\[1\]: got 0"),
        ({"name": "resnet18", "spatial_dims": 2, "block_inplanes": [8, True, 8, 8]}, r"block_inplanes\[1\]: got True"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNetBackbone(**kwargs)


def test_wrong_input_shape_is_refused():
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 1, \*S\) with 2 spatial sizes"):
        _backbone().feature_maps(torch.rand(2, 1, 16, 16, 16))
