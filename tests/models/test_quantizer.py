"""VectorQuantizer: nearest codes, straight-through gradients, loss split, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chestssl.models.quantizer import VectorQuantizer


def _hand_built(beta: float = 0.25) -> VectorQuantizer:
    """Four 2-d codes at the corners of a square; no projections (in_channels == dim)."""
    quantizer = VectorQuantizer(in_channels=2, codebook_size=4, dim=2, beta=beta)
    with torch.no_grad():
        quantizer.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    return quantizer


def test_codebook_initialisation_and_projections():
    quantizer = VectorQuantizer(in_channels=6, codebook_size=10, dim=3)
    assert quantizer.codebook.weight.shape == (10, 3)
    assert float(quantizer.codebook.weight.detach().abs().max()) <= 1.0 / 10
    assert isinstance(quantizer.project_in, torch.nn.Conv2d) and quantizer.project_in.kernel_size == (1, 1)
    assert isinstance(quantizer.project_out, torch.nn.Conv2d) and quantizer.project_out.out_channels == 6
    identity = VectorQuantizer(in_channels=3, codebook_size=10, dim=3)
    assert isinstance(identity.project_in, torch.nn.Identity) and isinstance(identity.project_out, torch.nn.Identity)


def test_indices_are_the_nearest_codes():
    quantizer = _hand_built()
    # Vectors (B=1, C=2, 2x2) close to codes 3, 0, 1, 2.
    vectors = torch.tensor([[0.9, 1.2], [-0.1, 0.2], [0.8, -0.3], [0.1, 0.7]])
    z = vectors.t().reshape(1, 2, 2, 2)
    out = quantizer(z)
    assert out.indices.dtype == torch.int64
    assert out.indices.tolist() == [[[3, 0], [1, 2]]]
    expected = quantizer.codebook.weight[out.indices].movedim(-1, 1)
    torch.testing.assert_close(out.quantized, expected)
    # All four codes used once each: perplexity 4.
    torch.testing.assert_close(out.perplexity, torch.tensor(4.0))


def test_straight_through_gradient_is_identity():
    quantizer = _hand_built()
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    quantizer(z).quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_codebook_and_encoder_gradients_come_from_their_own_terms():
    beta = 0.25
    quantizer = _hand_built(beta)
    z = (0.5 * torch.randn(2, 2, 3, 3)).requires_grad_()
    out = quantizer(z)
    out.loss.backward()
    codebook_grad, z_grad = quantizer.codebook.weight.grad.clone(), z.grad.clone()

    # Recompute both terms by hand from the chosen codes.
    z_q_ref = quantizer.codebook.weight[out.indices].movedim(-1, 1)
    quantizer.codebook.weight.grad = None
    z.grad = None
    F.mse_loss(z_q_ref, z.detach()).backward()
    torch.testing.assert_close(codebook_grad, quantizer.codebook.weight.grad)
    assert z.grad is None  # the codebook loss never reaches the encoder

    quantizer.codebook.weight.grad = None
    (beta * F.mse_loss(z, z_q_ref.detach())).backward()
    torch.testing.assert_close(z_grad, z.grad)
    assert quantizer.codebook.weight.grad is None  # the commitment loss never reaches the codebook
    assert float(z_grad.abs().sum()) > 0 and float(codebook_grad.abs().sum()) > 0


def test_beta_scales_only_the_commitment_part():
    z = torch.randn(2, 2, 4, 4)
    low, high = _hand_built(beta=0.25)(z), _hand_built(beta=1.0)(z)
    torch.testing.assert_close(low.codebook_loss, high.codebook_loss)
    torch.testing.assert_close(low.commitment_loss, high.commitment_loss)
    torch.testing.assert_close(low.loss, low.codebook_loss + 0.25 * low.commitment_loss)
    torch.testing.assert_close(high.loss - low.loss, 0.75 * low.commitment_loss)
    # Forward values of the two losses are equal (both are the mean squared distance).
    torch.testing.assert_close(low.codebook_loss, low.commitment_loss)


def test_3d_with_projections_keeps_shape_and_trains():
    quantizer = VectorQuantizer(in_channels=5, codebook_size=8, dim=3, spatial_dims=3)
    z = torch.randn(2, 5, 2, 3, 4, requires_grad=True)
    out = quantizer(z)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == (2, 2, 3, 4)
    assert out.loss.dim() == 0 and out.perplexity.dim() == 0
    assert 1.0 <= float(out.perplexity) <= 8.0
    (out.quantized.sum() + out.loss).backward()
    for parameter in quantizer.parameters():
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0
    assert float(z.grad.abs().sum()) > 0


def test_distances_stay_float32_under_autocast():
    quantizer = _hand_built()
    z = torch.tensor([[0.9, 1.2], [-0.1, 0.2]]).t().reshape(1, 2, 1, 2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = quantizer(z)
    assert out.indices.tolist() == [[[3, 0]]]
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"in_channels": 2, "codebook_size": 0, "dim": 2}, "codebook_size: got 0"),
        ({"in_channels": 2, "codebook_size": 4, "dim": 2.5}, "dim: got 2.5"),
        ({"in_channels": 2, "codebook_size": 4, "dim": 2, "beta": -1.0}, "beta: got -1.0, expected a float >= 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorQuantizer(**kwargs)


def test_wrong_channels_are_reported():
    with pytest.raises(ValueError, match=r"\(B, 2, \*S\)"):
        _hand_built()(torch.randn(1, 3, 2, 2))
