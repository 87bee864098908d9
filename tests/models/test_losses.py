"""The shared losses: class weights, the segmentation losses' choices, and seed 002's alignment loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chestssl.models.losses import (
    SEG_LOSSES,
    AlignmentLoss,
    EncoderFeatures,
    class_weight_tensor,
    make_seg_loss,
)
from chestssl.models.resnet import ResNetBackbone
from chestssl.models.seeding import seeded
from tests.alignment_images import feature_net


def test_class_weights_are_checked():
    torch.testing.assert_close(class_weight_tensor([1, 50]), torch.tensor([1.0, 50.0]))
    with pytest.raises(ValueError, match=r"class weights: got \[0.0, 0.0\], expected 2 non-negative weights"):
        class_weight_tensor([0.0, 0.0])
    with pytest.raises(ValueError, match=r"class weights: got \[1.0\]"):
        class_weight_tensor([1.0])


def test_every_segmentation_loss_takes_two_channel_logits_and_a_mask():
    logits, mask = torch.randn(2, 2, 8, 8), (torch.rand(2, 1, 8, 8) > 0.7).float()
    for kind in SEG_LOSSES:
        value = make_seg_loss(kind, [1.0, 5.0], 2.0, 0.25)(logits, mask)
        assert value.ndim == 0 and torch.isfinite(value)
    with pytest.raises(ValueError, match="unknown segmentation loss 'l2'; known: 'ce', 'dice', 'focal'"):
        make_seg_loss("l2", [1.0, 1.0], 2.0, 0.25)


def test_alignment_loss_is_the_seeds_sum_and_its_feature_net_stays_frozen():
    features = feature_net().train()
    loss = AlignmentLoss(features, pixel_weight=15.0)
    assert not features.training and not any(p.requires_grad for p in features.parameters())
    loss.train()
    assert loss.training and not features.training
    canonical = torch.rand(1, 16, 16)
    aligned = torch.rand(2, 1, 16, 16)
    terms = loss(aligned, canonical)
    with torch.no_grad():
        target = canonical[None].expand(2, 1, 16, 16)
        expected_feature = F.mse_loss(features(aligned), features(target))
    expected_pixel = F.mse_loss(aligned, target)
    torch.testing.assert_close(terms["pixel"], expected_pixel)
    torch.testing.assert_close(terms["feature"], expected_feature)
    torch.testing.assert_close(terms["loss"], 15.0 * expected_pixel + expected_feature)
    same = loss(canonical[None].expand(3, 1, 16, 16), canonical)
    assert float(same["pixel"]) == 0.0 and float(same["loss"]) < 1e-10
    with pytest.raises(ValueError, match=r"expected \(1, 16, 16\)"):
        loss(aligned, torch.rand(1, 8, 8))


def test_the_encoder_features_are_the_maps_and_the_loss_freezes_them_but_passes_gradients():
    with seeded(0):
        encoder = ResNetBackbone("resnet18", 2, [4, 8, 8, 16]).train()
    features = EncoderFeatures(encoder)
    AlignmentLoss(features).train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    image = torch.rand(2, 1, 32, 32, requires_grad=True)
    maps = features(image)
    assert [tuple(m.shape[1:]) for m in maps] == [(4, 8, 8), (4, 8, 8), (8, 4, 4), (8, 2, 2), (16, 1, 1)]
    sum(m.sum() for m in maps).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="neither feature_maps"):
        EncoderFeatures(torch.nn.Identity())
