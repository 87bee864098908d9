"""PatchAdversarialTerm: separated gradients, start step, adaptive weight, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chestssl.models.adversarial import PatchAdversarialTerm, patch_logits_size


def _generator(spatial_dims: int) -> nn.Module:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.Sequential(conv(1, 4, 3, padding=1), nn.SiLU(), conv(4, 1, 3, padding=1), nn.Sigmoid())


def _setup(spatial_dims: int = 2, size: int = 16, **kwargs):
    torch.manual_seed(0)
    generator = _generator(spatial_dims)
    term = PatchAdversarialTerm(spatial_dims, num_layers=2, channels=4, **kwargs)
    real = torch.rand((2, 1) + (size,) * spatial_dims)
    return generator, term, real


def test_gradients_do_not_cross_in_one_backward():
    generator, term, real = _setup()
    fake = generator(real)
    rec = F.l1_loss(fake, real)
    parts = term.losses(real, fake, rec, generator[2].weight, step=0)
    (rec + parts["generator"] + parts["discriminator"]).backward()
    combined_g = [p.grad.clone() for p in generator.parameters()]
    combined_d = [p.grad.clone() for p in term.discriminator.parameters()]
    assert all(float(g.abs().sum()) > 0 for g in combined_g + combined_d)

    # The same losses, each differentiated alone (train-mode batch norm gives the same logits).
    fake = generator(real)
    rec = F.l1_loss(fake, real)
    lam = parts["adaptive_weight"]
    alone_g = torch.autograd.grad(rec + lam * term.generator_loss(fake), list(generator.parameters()))
    alone_d = torch.autograd.grad(term.discriminator_loss(real, fake), list(term.discriminator.parameters()))
    for combined, alone in zip(combined_g + combined_d, list(alone_g) + list(alone_d)):
        torch.testing.assert_close(combined, alone)


def test_each_loss_reaches_only_its_own_network():
    generator, term, real = _setup()
    fake = generator(real)
    d_params, g_params = list(term.discriminator.parameters()), list(generator.parameters())
    gen_loss = term.generator_loss(fake)
    assert all(g is None for g in torch.autograd.grad(gen_loss, d_params, allow_unused=True, retain_graph=True))
    assert all(g is not None for g in torch.autograd.grad(gen_loss, g_params, allow_unused=True))
    d_loss = term.discriminator_loss(real, fake)
    assert all(g is None for g in torch.autograd.grad(d_loss, g_params, allow_unused=True, retain_graph=True))
    assert all(g is not None for g in torch.autograd.grad(d_loss, d_params, allow_unused=True))


def test_hinge_values_follow_monai_tanh_hinge():
    generator, term, real = _setup()
    fake = generator(real).detach()
    d_real, d_fake = torch.tanh(term.logits(real)), torch.tanh(term.logits(fake))
    torch.testing.assert_close(term.generator_loss(fake), 1 - d_fake.mean())
    expected_d = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
    torch.testing.assert_close(term.discriminator_loss(real, fake), expected_d)


def test_inactive_before_start_step():
    generator, term, real = _setup(start_step=5)
    assert not term.active(4) and term.active(5) and term.active(6)
    fake = generator(real)
    parts = term.losses(real, fake, F.l1_loss(fake, real), generator[2].weight, step=4)
    assert set(parts) == {"generator", "discriminator", "adaptive_weight"}
    assert all(float(value) == 0.0 and value.dim() == 0 for value in parts.values())
    later = term.losses(real, fake, F.l1_loss(fake, real), generator[2].weight, step=5)
    assert float(later["discriminator"].detach()) > 0 and float(later["adaptive_weight"]) > 0


def test_adaptive_weight_matches_hand_computation():
    generator, term, real = _setup(weight=0.6)
    fake = generator(real)
    rec = F.l1_loss(fake, real)
    gen = term.generator_loss(fake)
    last = generator[2].weight
    lam = term.adaptive_weight(rec, gen, last)
    rec_grad = torch.autograd.grad(rec, last, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(gen, last, retain_graph=True)[0]
    expected = 0.6 * torch.clamp(rec_grad.norm() / (gen_grad.norm() + 1e-4), 0.0, 1e4)
    torch.testing.assert_close(lam, expected)
    assert not lam.requires_grad and lam.dtype == torch.float32
    parts = term.losses(real, fake, rec, last, step=0)
    torch.testing.assert_close(parts["adaptive_weight"], expected)
    torch.testing.assert_close(parts["generator"], expected * gen)
    # The graph survives the weight's own differentiation.
    (rec + parts["generator"]).backward()


def test_fixed_weight_and_validation_without_graph():
    generator, term, real = _setup(weight=0.3, adaptive=False)
    fake = generator(real)
    lam = term.adaptive_weight(F.l1_loss(fake, real), term.generator_loss(fake), generator[2].weight)
    assert float(lam) == pytest.approx(0.3)
    _, adaptive_term, _ = _setup()
    with torch.no_grad():
        fake = generator(real)
        parts = adaptive_term.losses(real, fake, F.l1_loss(fake, real), generator[2].weight, step=0)
    assert float(parts["adaptive_weight"]) == 0.0 and float(parts["discriminator"]) > 0


@pytest.mark.parametrize("spatial_dims,size", [(2, 16), (3, 12)])
def test_logits_shapes(spatial_dims, size):
    generator, term, real = _setup(spatial_dims, size)
    side = patch_logits_size(size, 2)
    assert side >= 1
    assert term.logits(real).shape == (2, 1) + (side,) * spatial_dims
    fake = generator(real)
    parts = term.losses(real, fake, F.l1_loss(fake, real), generator[2].weight, step=0)
    assert all(value.dim() == 0 for value in parts.values())


def test_too_small_images_and_bad_arguments_are_reported():
    _, term, _ = _setup()
    with pytest.raises(ValueError, match="too small for num_layers=2.*>= 12"):
        term.logits(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="num_layers: got 0"):
        PatchAdversarialTerm(2, num_layers=0)
    with pytest.raises(ValueError, match="start_step: got -1, expected an integer >= 0"):
        PatchAdversarialTerm(2, start_step=-1)
