"""Seed 002's alignment STN: the identity at initialisation, resampling to the output size,
gradients into the regression head, and its model file."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chestssl.data.affine import IDENTITY_PARAMS, affine_from_params, warp
from chestssl.io import save_torch
from chestssl.models.losses import AlignmentLoss
from chestssl.models.stn import apply_stn, load_alignment_stn, stn_payload
from tests.alignment_images import chest, feature_net, shift_params, tiny_stn


def test_initial_stn_is_exactly_the_identity():
    stn = tiny_stn().eval()
    x = torch.rand(3, 1, 40, 36)
    aligned, params, theta = stn(x)
    assert torch.equal(params, torch.tensor([IDENTITY_PARAMS] * 3))
    assert torch.equal(theta, torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]] * 3))
    assert aligned.shape == x.shape
    torch.testing.assert_close(aligned, x, rtol=0, atol=1e-5)


def test_initial_stn_resamples_to_the_output_size():
    # Halving with align_corners=False samples between each 2x2 block: exactly their mean.
    x = torch.rand(2, 1, 32, 48)
    aligned, _, _ = tiny_stn(output_size=(16, 24)).eval()(x)
    torch.testing.assert_close(aligned, F.avg_pool2d(x, 2), rtol=0, atol=1e-5)


def test_initial_stn_is_the_identity_in_training_mode_too():
    x = torch.rand(2, 1, 48, 48)
    aligned, params, _ = tiny_stn().train()(x)
    assert torch.equal(params, torch.tensor([IDENTITY_PARAMS] * 2))
    torch.testing.assert_close(aligned, x, rtol=0, atol=1e-5)


def test_gradients_reach_the_stn_head_and_not_the_feature_net():
    image = chest(48)
    moved = warp(image, affine_from_params(shift_params(2.0, 1.0, 48)))
    stn, features = tiny_stn().train(), feature_net()
    loss = AlignmentLoss(features)
    loss(stn(moved).aligned, image[0])["loss"].backward()
    # The last layer starts at zero weights, so the gradient first reaches it (and only it).
    assert stn.regressor.bias.grad[:2].abs().min() > 0
    assert stn.regressor.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in features.parameters())


def test_the_model_file_rebuilds_the_stn_and_apply_runs_in_batches(tmp_path):
    stn = tiny_stn(output_size=(24, 20))
    with torch.no_grad():
        stn.regressor.bias.add_(torch.tensor([0.05, -0.02, 0.0, 0.0, 0.1]))
    canonical = torch.rand(1, 24, 20)
    save_torch(tmp_path / "stn.pt", stn_payload(stn, canonical, {"feature_method": "m"}))
    loaded, loaded_canonical = load_alignment_stn(tmp_path / "stn.pt")
    assert not loaded.training and torch.equal(loaded_canonical, canonical)
    images = torch.rand(5, 1, 32, 32)
    aligned, params = apply_stn(loaded, images, batch_size=2)
    assert aligned.shape == (5, 1, 24, 20) and params.shape == (5, 5)
    stn.eval()
    with torch.no_grad():
        expected = stn(images)
    torch.testing.assert_close(aligned, expected.aligned)
    torch.testing.assert_close(params, expected.params)
