"""LatentResNetClassifier: seed 000's ResNet on the latent."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets.resnet import ResNetBlock

from chestssl.models import LatentResNetClassifier, UNetEncoder

FEATURES = (4, 8, 8, 16, 16)
WIDTHS = (8, 8, 16, 16)


@pytest.mark.parametrize("arch,layers", [("resnet18", [2, 2, 2, 2]), ("resnet50", [3, 4, 6, 3])])
def test_architecture(arch, layers):
    model = LatentResNetClassifier(UNetEncoder(2, 1, FEATURES), arch, num_classes=2, widths=WIDTHS)
    stages = [model.head.layer1, model.head.layer2, model.head.layer3, model.head.layer4]
    assert [len(stage) for stage in stages] == layers
    assert all(isinstance(block, ResNetBlock) for stage in stages for block in stage)
    assert model.head.conv1.in_channels == 16 and model.head.conv1.stride == (1, 1)
    assert model.head.no_max_pool
    assert tuple(model(torch.rand(2, 1, 64, 64)).shape) == (2, 2)


def test_3d_logits():
    model = LatentResNetClassifier(UNetEncoder(3, 1, FEATURES), "resnet18", num_classes=3, widths=WIDTHS)
    assert tuple(model(torch.rand(2, 1, 32, 32, 32)).shape) == (2, 3)


def test_encoder_starts_pretrained_and_is_copied():
    encoder = UNetEncoder(2, 1, FEATURES)
    model = LatentResNetClassifier(encoder, "resnet18", widths=WIDTHS)
    for key, value in encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    assert model.encoder is not encoder
    with torch.no_grad():
        model.encoder.conv_0_0.conv_0.conv.weight.zero_()
    assert encoder.conv_0_0.conv_0.conv.weight.abs().sum() > 0


def test_unknown_arch_names_allowed():
    with pytest.raises(ValueError, match="'resnet18', 'resnet50'"):
        LatentResNetClassifier(UNetEncoder(2, 1, FEATURES), "resnet34")
