"""Seed 002's canonical chest: the mean of lung crops resized to one size."""

from __future__ import annotations

import pytest
import torch

from chestssl.data.canonical_chest import canonical_chest


def test_canonical_chest_is_the_mean_of_lung_crops_resized():
    ramp = torch.linspace(0, 1, 6).expand(8, 6)
    first, second = torch.full((20, 20), 100.0), torch.full((30, 24), -50.0)
    first[3:11, 5:11] = ramp  # an 8x6 box
    second[10:26, 4:16] = 3.0  # a 16x12 box, constant
    first_mask, second_mask = torch.zeros(20, 20), torch.zeros(30, 24)
    first_mask[3:11, 5:11] = 1
    second_mask[10:26, 4:16] = 1
    canonical = canonical_chest([first, second[None]], [first_mask, second_mask[None]], size=(8, 6))
    assert canonical.shape == (1, 8, 6) and canonical.dtype == torch.float32
    torch.testing.assert_close(canonical[0], (ramp + 3.0) / 2, rtol=0, atol=1e-5)


def test_canonical_chest_without_masks_uses_the_whole_radiographs():
    images = torch.rand(3, 1, 12, 10)
    torch.testing.assert_close(canonical_chest(images, size=(12, 10)), images.mean(dim=0), rtol=0, atol=1e-6)
    halved = canonical_chest(torch.ones(2, 24, 20), size=(12, 10))
    torch.testing.assert_close(halved, torch.ones(1, 12, 10), rtol=0, atol=1e-5)


def test_canonical_chest_errors_name_the_radiograph():
    images = torch.rand(2, 1, 8, 8)
    masks = torch.ones(2, 1, 8, 8)
    masks[1] = 0
    with pytest.raises(ValueError, match=r"lung_masks\[1\].*all zeros"):
        canonical_chest(images, masks, size=8)
    with pytest.raises(ValueError, match="1 masks for 2 radiographs"):
        canonical_chest(images, masks[:1], size=8)
    with pytest.raises(ValueError, match="canonical size"):
        canonical_chest(images, size=(8, 0))
