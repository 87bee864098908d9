"""Seed 002's affine geometry: the parameterisation's directions, inverse and chain, random
misalignment and intensity jitter."""

from __future__ import annotations

import math

import pytest
import torch

from chestssl.data.affine import (
    IDENTITY_PARAMS,
    AlignmentAugmentation,
    affine_from_params,
    chain_affines,
    invert_affine,
    jitter_intensity,
    misalign,
    warp,
)
from tests.alignment_images import smooth


def test_positive_tx_moves_content_left_and_positive_ty_moves_it_up():
    image = torch.zeros(1, 1, 16, 16)
    image[0, 0, 5, 6] = 1.0
    # tx = 2 * 2 / 16: two pixels left; ty = -2 * 3 / 16: three pixels down.
    moved = warp(image, affine_from_params(torch.tensor([[4 / 16, -6 / 16, 1.0, 1.0, 0.0]])))
    expected = torch.zeros_like(image)
    expected[0, 0, 8, 4] = 1.0
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-5)


def test_rotation_by_90_degrees_is_counter_clockwise_as_displayed():
    x = torch.rand(2, 1, 12, 12)
    rotated = warp(x, affine_from_params(torch.tensor([[0.0, 0.0, 1.0, 1.0, math.pi / 2]] * 2)))
    torch.testing.assert_close(rotated, torch.rot90(x, 1, dims=(-2, -1)), rtol=0, atol=1e-5)
    # A dot right of the centre ends above it.
    dot = torch.zeros(1, 1, 12, 12)
    dot[0, 0, 5, 9] = 1.0
    moved = warp(dot, affine_from_params(torch.tensor([[0.0, 0.0, 1.0, 1.0, math.pi / 2]])))
    assert divmod(int(moved.flatten().argmax()), 12) == (2, 5)


def test_scale_above_one_shrinks_the_content_about_the_centre():
    image = torch.zeros(1, 1, 16, 16)
    image[0, 0, 4:12, 4:12] = 1.0  # an 8x8 square in the centre
    shrunk = warp(image, affine_from_params(torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.0]])))
    expected = torch.zeros_like(image)
    expected[0, 0, 6:10, 6:10] = 1.0  # a 4x4 square, same centre (2x2 block means of 0/1 squares)
    torch.testing.assert_close(shrunk, expected, rtol=0, atol=1e-5)


def test_affine_matches_the_seeds_formula_and_inverse_and_chain_agree():
    params = torch.tensor([[0.1, -0.2, 1.1, 0.9, 0.3], [0.0, 0.05, 0.95, 1.05, -0.2]])
    theta = affine_from_params(params)
    tx, ty, sx, sy, a = params[0].tolist()
    expected = torch.tensor([[sx * math.cos(a), -sy * math.sin(a), tx], [sx * math.sin(a), sy * math.cos(a), ty]])
    torch.testing.assert_close(theta[0], expected)
    identity = affine_from_params(torch.tensor([IDENTITY_PARAMS] * 2))
    torch.testing.assert_close(chain_affines(theta, invert_affine(theta)), identity, rtol=0, atol=1e-6)
    # Two warps equal one warp with the chained affine (away from the padded border).
    x = smooth(40, batch=2)
    first = affine_from_params(torch.tensor([[0.05, 0.0, 1.0, 1.0, 0.1], [0.0, -0.05, 1.02, 1.02, 0.0]]))
    second = affine_from_params(torch.tensor([[0.0, 0.08, 0.97, 0.97, 0.0], [-0.06, 0.0, 1.0, 1.0, -0.15]]))
    twice = warp(warp(x, first), second)
    once = warp(x, chain_affines(first, second))
    torch.testing.assert_close(twice[..., 8:32, 8:32], once[..., 8:32, 8:32], rtol=0, atol=0.01)


def test_misalign_stays_within_bounds_and_its_inverse_returns_the_image():
    image = smooth(48, batch=6)
    generator = torch.Generator().manual_seed(3)
    moved, params = misalign(image, max_shift=0.05, max_scale=0.05, max_rotation_deg=10.0, generator=generator)
    assert params.shape == (6, 5)
    assert params[:, :2].abs().max() <= 0.1 and (params[:, 2:4] - 1).abs().max() <= 0.05
    assert params[:, 4].abs().max() <= math.radians(10.0)
    assert torch.equal(params[:, 2], params[:, 3])  # isotropic scale
    assert (moved - image).abs().amax(dim=(1, 2, 3)).min() > 0.05  # every image really moved
    theta = affine_from_params(params)
    restored = warp(moved, invert_affine(theta))
    valid = warp(warp(torch.ones_like(image), theta), invert_affine(theta)) > 0.999
    assert valid.float().mean() > 0.7
    # Two bilinear resamplings of a smooth image: small next to what the misalignment changed.
    assert (restored - image).abs()[valid].max() < 0.02
    assert (restored - image).abs()[valid].mean() < 0.05 * (moved - image).abs()[valid].mean()


def test_misalign_is_reproducible_from_the_generator():
    image = torch.rand(3, 1, 20, 20)
    first = misalign(image, generator=torch.Generator().manual_seed(7))
    second = misalign(image, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_misalign_rejects_out_of_range_values_naming_the_key():
    with pytest.raises(ValueError, match="max_shift.*1.5"):
        misalign(torch.rand(1, 1, 8, 8), max_shift=1.5)
    with pytest.raises(ValueError, match="max_rotation_deg"):
        misalign(torch.rand(1, 1, 8, 8), max_rotation_deg=-1.0)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        misalign(torch.rand(1, 3, 8, 8))


def test_jitter_intensity_scales_brightness_and_keeps_the_mean_under_contrast():
    images = torch.rand(4, 1, 10, 10)
    torch.testing.assert_close(jitter_intensity(images, 0.0, 0.0), images)
    contrasted = jitter_intensity(images, 0.0, 0.5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(contrasted.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)))
    assert not torch.allclose(contrasted, images)
    brightened = jitter_intensity(images, 0.3, 0.0, torch.Generator().manual_seed(0))
    ratio = brightened / images
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio))  # one factor per image
    assert (ratio[:, 0, 0, 0] - 1).abs().max() <= 0.3


def test_the_augmentation_checks_its_ranges_and_draws_from_the_global_generator_by_default():
    with pytest.raises(ValueError, match=r"^max_rotation_deg: got 270.0"):
        AlignmentAugmentation(max_rotation_deg=270.0)
    images = smooth(32, batch=2)
    torch.manual_seed(5)
    first = AlignmentAugmentation()(images)
    torch.manual_seed(5)
    again = AlignmentAugmentation()(images)
    with_generator = AlignmentAugmentation()(images, torch.Generator().manual_seed(5))
    assert torch.equal(first, again) and torch.equal(first, with_generator)
    assert not torch.equal(first, images)
