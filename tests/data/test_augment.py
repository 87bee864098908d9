"""TwoViewAugment and its batched steps: shapes, ranges, reproducibility, MONAI equivalence."""

from __future__ import annotations

import pytest
import torch
from monai.networks.layers import GaussianFilter
from monai.transforms import HistogramNormalize

from chestssl.data.augment import (
    TwoViewAugment,
    equalize_histogram,
    gaussian_blur,
    perspective_warp,
    random_homographies,
    random_resized_crop_theta,
)

SETTINGS = {"p": 0.5, "crop_scale": [0.5, 1.0], "blur_sigma": [0.1, 2.0], "perspective": 0.15, "noise_std": 0.05}


def _phantoms(batch: int, size: int = 32, spatial_dims: int = 2, seed: int = 0) -> torch.Tensor:
    """Bright balls of random centres and radii on a dim gradient, in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * spatial_dims, indexing="ij")
    images = []
    for _ in range(batch):
        centre = torch.rand(spatial_dims, generator=generator) * size * 0.6 + size * 0.2
        radius = float(torch.rand(1, generator=generator)) * size * 0.2 + size * 0.1
        distance = sum((axis - c) ** 2 for axis, c in zip(axes, centre))
        images.append(0.7 * (distance < radius**2).float() + 0.2 * axes[0] / size)
    return torch.stack(images)[:, None]


def _augmenter(spatial_dims: int = 2, seed: int = 0, **overrides) -> TwoViewAugment:
    return TwoViewAugment.from_config({**SETTINGS, **overrides}, spatial_dims, seed=seed)


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 16)])
def test_views_keep_shape_dtype_and_range_and_change_the_image(spatial_dims, size):
    images = _phantoms(4, size, spatial_dims)
    view1, view2 = _augmenter(spatial_dims, p=1.0)(images)
    for view in (view1, view2):
        assert view.shape == images.shape and view.dtype == images.dtype
        assert view.min() >= 0.0 and view.max() <= 1.0
        assert (view - images).abs().amax(dim=tuple(range(1, images.ndim))).min() > 0.05
    assert not torch.allclose(view1, view2)


def test_same_seed_same_views_other_seed_other_views():
    images = _phantoms(8)
    first = _augmenter(seed=7)(images)
    again = _augmenter(seed=7)(images)
    other = _augmenter(seed=8)(images)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first[0], other[0])
    # An explicit generator replaces the augmenter's own.
    explicit = _augmenter(seed=0)(images, torch.Generator().manual_seed(7))
    torch.testing.assert_close(explicit, first, rtol=0, atol=0)


def test_each_image_is_augmented_independently():
    images = _phantoms(1).repeat(6, 1, 1, 1)
    view = _augmenter(p=1.0).view(images)
    assert all(not torch.allclose(view[0], view[i]) for i in range(1, 6))


def test_probability_zero_is_the_identity():
    images = _phantoms(16)
    view1, view2 = _augmenter(p=0.0)(images)
    torch.testing.assert_close(view1, images, rtol=0, atol=0)
    torch.testing.assert_close(view2, images, rtol=0, atol=0)


def test_equalization_matches_monai_histogram_normalize_in_2d_and_3d():
    for images in (torch.rand(3, 1, 32, 32) ** 2, torch.rand(2, 1, 12, 12, 12) ** 3):
        reference = torch.stack([torch.as_tensor(HistogramNormalize(min=0, max=1)(image)) for image in images])
        torch.testing.assert_close(equalize_histogram(images), reference.as_subclass(torch.Tensor), rtol=0, atol=1e-5)


def test_equalization_leaves_a_constant_image_unchanged():
    images = torch.stack([torch.full((1, 8, 8), 0.3), torch.rand(1, 8, 8)])
    out = equalize_histogram(images)
    torch.testing.assert_close(out[0], images[0], rtol=0, atol=0)
    assert out[1].min() == 0.0 and out[1].max() == 1.0


def test_blur_matches_monai_gaussian_filter_away_from_the_border_and_keeps_constants():
    images = torch.rand(2, 1, 32, 32)
    sigmas = torch.tensor([0.7, 1.5])
    out = gaussian_blur(images, sigmas)
    for i, sigma in enumerate(sigmas):
        reference = GaussianFilter(2, float(sigma))(images[i : i + 1])
        inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
        torch.testing.assert_close(out[i : i + 1][inner], reference[inner], rtol=0, atol=1e-4)
    constant = torch.full((2, 1, 8, 8, 8), 0.4)
    torch.testing.assert_close(gaussian_blur(constant, torch.tensor([2.0, 0.1])), constant)


def test_homographies_send_the_moved_corners_back_to_the_image_corners():
    homographies = random_homographies(5, 0.3, torch.Generator().manual_seed(0))
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]], dtype=torch.float64)
    # Inverse map: image corners -> where they land in the output, inside [-1, 1] by at most 0.3.
    landed = corners @ torch.linalg.inv(homographies).transpose(1, 2)
    landed = landed[..., :2] / landed[..., 2:]
    inward = corners[:, :2].sign() * (corners[:, :2] - landed)
    assert (inward >= -1e-9).all() and (inward <= 0.3 + 1e-9).all()
    identity = random_homographies(2, 0.0, torch.Generator())
    images = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(perspective_warp(images, identity), images, rtol=0, atol=1e-5)


def test_crop_boxes_stay_inside_with_the_requested_area():
    theta = random_resized_crop_theta(200, 2, (0.3, 0.6), torch.Generator().manual_seed(0))
    sides, centres = torch.diagonal(theta[:, :, :2], dim1=1, dim2=2), theta[:, :, 2]
    assert (sides <= 1).all() and ((centres.abs() + sides) <= 1 + 1e-12).all()
    area = sides.prod(dim=1)
    assert area.min() >= 0.3 * (3 / 4) - 1e-9 and area.max() <= 0.6 + 1e-9
    unclipped = (sides < 1).all(dim=1)
    assert ((area[unclipped] >= 0.3 - 1e-9) & (area[unclipped] <= 0.6 + 1e-9)).all()
    ratio = sides[:, 0] / sides[:, 1]
    assert (ratio[unclipped] >= 3 / 4 - 1e-9).all() and (ratio[unclipped] <= 4 / 3 + 1e-9).all()


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"p": 1.5}, r"^p: got 1\.5, expected a number in \[0, 1\]"),
        ({"crop_scale": [0.0, 1.0]}, r"^crop_scale: got \[0\.0, 1\.0\], expected \[min, max\] with 0 < min"),
        ({"crop_scale": [0.9, 0.5]}, r"^crop_scale: got \[0\.9, 0\.5\]"),
        ({"blur_sigma": [2.0]}, r"^blur_sigma: got \[2\.0\]"),
        ({"perspective": 0.8}, r"^perspective: got 0\.8, expected a number in \[0, 0\.5\]"),
        ({"noise_std": -0.1}, r"^noise_std: got -0\.1"),
    ],
)
def test_bad_settings_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        _augmenter(**overrides)


def test_wrong_image_rank_is_refused():
    with pytest.raises(ValueError, match=r"2 spatial sizes, got \(2, 1, 8, 8, 8\)"):
        _augmenter()(torch.rand(2, 1, 8, 8, 8))
