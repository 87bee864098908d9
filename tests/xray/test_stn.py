"""Seed 002's alignment STN: identity start, affine convention, misalignment, canonical chest, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chestssl.models.seeding import seeded
from chestssl.xray.stn import (
    IDENTITY_PARAMS,
    AlignmentAugmentation,
    AlignmentLoss,
    AlignmentSTN,
    affine_from_params,
    alignment_parameter_error,
    canonical_chest,
    chain_affines,
    invert_affine,
    jitter_intensity,
    misalign,
    train_alignment,
    warp,
)

SMALL = (4, 8, 8, 16)


def _chest(size: int) -> torch.Tensor:
    """A smooth chest-like (1, 1, size, size) image: bright body, two dark lungs, a bright spot; ~0 at the border."""
    centres = (torch.arange(size) * 2 + 1) / size - 1
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")

    def ellipse(cy: float, cx: float, ry: float, rx: float) -> torch.Tensor:
        return torch.sigmoid((1 - torch.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)) / 0.08)

    body = 0.9 * ellipse(0.05, 0.0, 0.62, 0.55)
    lungs = 0.55 * ellipse(0.05, -0.25, 0.42, 0.17) + 0.5 * ellipse(0.1, 0.24, 0.38, 0.19)
    return (body - lungs + 0.3 * ellipse(-0.45, 0.05, 0.12, 0.1))[None, None]


def _smooth(size: int, batch: int = 1) -> torch.Tensor:
    """Smooth (batch, 1, size, size) images, sums of wide Gaussians, for resampling round trips."""
    centres = (torch.arange(size) * 2 + 1) / size - 1
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    images = []
    for index in range(batch):
        shift = 0.1 * index
        image = torch.exp(-((yy - 0.2 + shift) ** 2 + (xx + 0.3) ** 2) / 0.18)
        image = image + 0.6 * torch.exp(-((yy + 0.3) ** 2 + (xx - 0.25 - shift) ** 2) / 0.12)
        images.append(image)
    return torch.stack(images)[:, None]


def _stn(output_size=None, seed: int = 0) -> AlignmentSTN:
    with seeded(seed):
        return AlignmentSTN(output_size=output_size, block_inplanes=SMALL, hidden_dim=16)


def _feature_net(seed: int = 1) -> nn.Module:
    """A small random conv net with batch norm (whose running statistics must not move)."""
    with seeded(seed):
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1)
        )


def _shift_params(dx_pixels: float, dy_pixels: float, size: int) -> torch.Tensor:
    """Params that move the content of a size x size image right by dx and down by dy pixels."""
    return torch.tensor([[-2 * dx_pixels / size, -2 * dy_pixels / size, 1.0, 1.0, 0.0]])


# ---------------------------------------------------------------- identity at initialisation


def test_initial_stn_is_exactly_the_identity():
    stn = _stn().eval()
    x = torch.rand(3, 1, 40, 36)
    aligned, params, theta = stn(x)
    assert torch.equal(params, torch.tensor([IDENTITY_PARAMS] * 3))
    assert torch.equal(theta, torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]] * 3))
    assert aligned.shape == x.shape
    torch.testing.assert_close(aligned, x, rtol=0, atol=1e-5)


def test_initial_stn_resamples_to_the_output_size():
    # Halving with align_corners=False samples between each 2x2 block: exactly their mean.
    x = torch.rand(2, 1, 32, 48)
    aligned, _, _ = _stn(output_size=(16, 24)).eval()(x)
    torch.testing.assert_close(aligned, F.avg_pool2d(x, 2), rtol=0, atol=1e-5)


def test_initial_stn_is_the_identity_in_training_mode_too():
    x = torch.rand(2, 1, 48, 48)
    aligned, params, _ = _stn().train()(x)
    assert torch.equal(params, torch.tensor([IDENTITY_PARAMS] * 2))
    torch.testing.assert_close(aligned, x, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- the affine convention


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
    x = _smooth(40, batch=2)
    first = affine_from_params(torch.tensor([[0.05, 0.0, 1.0, 1.0, 0.1], [0.0, -0.05, 1.02, 1.02, 0.0]]))
    second = affine_from_params(torch.tensor([[0.0, 0.08, 0.97, 0.97, 0.0], [-0.06, 0.0, 1.0, 1.0, -0.15]]))
    twice = warp(warp(x, first), second)
    once = warp(x, chain_affines(first, second))
    torch.testing.assert_close(twice[..., 8:32, 8:32], once[..., 8:32, 8:32], rtol=0, atol=0.01)


# ---------------------------------------------------------------- misalignment and its error


def test_misalign_stays_within_bounds_and_its_inverse_returns_the_image():
    image = _smooth(48, batch=6)
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


def test_parameter_error_of_a_shift_in_pixels():
    applied = _shift_params(3.0, -4.0, 32)
    exact_inverse = _shift_params(-3.0, 4.0, 32)
    error = alignment_parameter_error(exact_inverse, applied, image_size=(32, 32))
    torch.testing.assert_close(error.before, torch.tensor([5.0]))  # every corner moves by (3, -4)
    assert float(error.after) < 1e-5 and error.fraction_undone == pytest.approx(1.0, abs=1e-6)
    nothing = alignment_parameter_error(torch.tensor([IDENTITY_PARAMS]), applied, image_size=(32, 32))
    torch.testing.assert_close(nothing.after, nothing.before)
    assert nothing.fraction_undone == pytest.approx(0.0, abs=1e-6)
    half = alignment_parameter_error(_shift_params(-1.5, 2.0, 32), applied, image_size=(32, 32))
    assert half.fraction_undone == pytest.approx(0.5, abs=1e-5)


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


# ---------------------------------------------------------------- canonical chest


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


# ---------------------------------------------------------------- loss and training


def test_alignment_loss_is_the_seeds_sum_and_its_feature_net_stays_frozen():
    features = _feature_net().train()
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


def test_gradients_reach_the_stn_head_and_not_the_feature_net():
    image = _chest(48)
    moved = warp(image, affine_from_params(_shift_params(2.0, 1.0, 48)))
    stn, features = _stn().train(), _feature_net()
    loss = AlignmentLoss(features)
    loss(stn(moved).aligned, image[0])["loss"].backward()
    # The last layer starts at zero weights, so the gradient first reaches it (and only it).
    assert stn.regressor.bias.grad[:2].abs().min() > 0
    assert stn.regressor.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in features.parameters())


def test_training_recovers_a_known_shift_and_never_updates_the_feature_net():
    size = 48
    image = _chest(size)
    applied = _shift_params(3.0, -2.0, size)  # content 3 pixels right, 2 up
    moved = warp(image, affine_from_params(applied))
    stn, features = _stn(), _feature_net()
    frozen = {key: value.clone() for key, value in features.state_dict().items()}
    loss = AlignmentLoss(features)
    losses = train_alignment(
        stn, moved, image[0], loss, steps=100, lr=3e-3, generator=torch.Generator().manual_seed(0), augmentation=None
    )
    assert len(losses) == 100 and losses[-1] < 1e-3 * losses[0]
    assert all(torch.equal(features.state_dict()[key], value) for key, value in frozen.items())
    assert all(p.grad is None for p in features.parameters())
    # Predict as trained: with one 48x48 image, layer4's batch norm sees 2x2 values per
    # channel, where running (unbiased) variances differ from batch ones by 4/3.
    stn.train()
    with torch.no_grad():
        aligned, params, _ = stn(moved)
    torch.testing.assert_close(params[0, :2], -applied[0, :2], rtol=0, atol=0.01)  # within 0.25 pixel
    error = alignment_parameter_error(params, applied, image_size=(size, size))
    assert float(error.before) == pytest.approx(math.hypot(3.0, 2.0), abs=1e-4)
    assert float(error.after) < 0.1 * float(error.before)
    assert error.fraction_undone > 0.9
    assert F.mse_loss(aligned, image) < 0.01 * F.mse_loss(moved, image)


def test_training_with_the_seeds_augmentation_runs_and_leaves_the_mode():
    images = torch.cat([_chest(48), _chest(48).flip(-1)])
    stn = _stn().eval()
    losses = train_alignment(
        stn,
        images,
        _chest(48)[0],
        AlignmentLoss(_feature_net()),
        steps=3,
        lr=1e-3,
        generator=torch.Generator().manual_seed(0),
        batch_size=2,
        augmentation=AlignmentAugmentation(),
    )
    assert len(losses) == 3 and all(math.isfinite(value) and value > 0 for value in losses)
    assert not stn.training
    assert not torch.equal(stn.regressor.bias, torch.tensor(IDENTITY_PARAMS))
    with pytest.raises(ValueError, match="augmentation.max_rotation_deg"):
        AlignmentAugmentation(max_rotation_deg=270.0)
    with pytest.raises(ValueError, match="batch_size.*at most the 2 images"):
        train_alignment(stn, images, _chest(48)[0], AlignmentLoss(_feature_net()), steps=1, batch_size=3)
