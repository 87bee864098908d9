"""LatentDiffusion: the frozen autoencoder, the noise-prediction loss, learning, seeded sampling."""

from __future__ import annotations

import pytest
import torch

from chestssl.models.latent_diffusion import LatentDiffusion, latent_scale_factor
from chestssl.models.vqgan import LatentAutoencoder
from tests.models.test_vqgan import StridedEncoder, _decoder
from tests.tiny_configs import TINY_LATENT_DIFFUSION

QUANTIZER = {"enabled": True, "codebook_size": 16, "dim": 4, "beta": 0.25}


def _model(seed: int = 0, scale: float = 1.0) -> LatentDiffusion:
    torch.manual_seed(0)
    autoencoder = LatentAutoencoder(StridedEncoder(2, 8, 2), _decoder(), QUANTIZER)
    entry = {**TINY_LATENT_DIFFUSION, "beta_start": 1e-4, "beta_end": 0.02}
    return LatentDiffusion(autoencoder, entry, scale, seed)


def test_only_the_unet_trains_and_the_autoencoder_stays_in_eval_mode():
    model = _model()
    model.train()
    assert not model.autoencoder.training and model.unet.training
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"unet"}
    loss = model.training_step({"image": torch.rand(4, 1, 16, 16)})["loss"]
    loss.backward()
    assert loss.ndim == 0 and loss.item() > 0
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())


def test_validation_draws_the_same_noise_in_every_pass():
    model, images = _model(), torch.rand(4, 1, 16, 16)
    model.eval()
    first = model.validation_step({"image": images})["loss"]
    model.train()
    model.eval()
    assert torch.equal(model.validation_step({"image": images})["loss"], first)


def test_a_few_steps_lower_the_noise_prediction_loss_on_fixed_latents():
    model = _model()
    images = torch.rand(8, 1, 16, 16)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.eval()
    before = model.validation_step({"image": images})["loss"].item()
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        model.training_step({"image": images})["loss"].backward()
        optimizer.step()
    model.eval()
    assert model.validation_step({"image": images})["loss"].item() < before


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samples_are_images_in_range_and_follow_the_seed(sampler):
    model = _model()
    shape = model.latent_shape(16)
    assert shape == (4, 8, 8)
    first = model.sample(3, shape, sampler, steps=2, seed=7, batch_size=2)
    assert first.shape == (3, 1, 16, 16) and 0.0 <= first.min() and first.max() <= 1.0
    assert torch.equal(model.sample(3, shape, sampler, steps=2, seed=7, batch_size=2), first)
    if sampler == "ddim":  # deterministic after the first noise, which does not depend on the batches
        torch.testing.assert_close(model.sample(3, shape, sampler, steps=2, seed=7, batch_size=3), first,
                                   atol=1e-4, rtol=0)
    assert not torch.equal(model.sample(3, shape, sampler, steps=2, seed=8), first)
    with pytest.raises(ValueError, match="sampler: got 'euler'"):
        model.sample(1, shape, "euler", steps=2, seed=0)


def test_the_scale_factor_brings_the_latents_to_unit_spread():
    model = _model()
    images = torch.rand(16, 1, 16, 16)
    scale = latent_scale_factor(model.autoencoder.autoencoder, images)
    latents = model.autoencoder.encode_stage_2_inputs(images) * scale
    assert latents.std().item() == pytest.approx(1.0, rel=1e-4)
    assert "scale_factor" in model.state_dict()


def test_the_scale_factor_does_not_depend_on_the_encoding_batch():
    model = _model()
    images = torch.rand(10, 1, 16, 16)
    whole = latent_scale_factor(model.autoencoder.autoencoder, images, batch_size=10)
    assert latent_scale_factor(model.autoencoder.autoencoder, images, batch_size=3) == pytest.approx(whole, rel=1e-5)
    with pytest.raises(ValueError, match="batch_size: got 0"):
        latent_scale_factor(model.autoencoder.autoencoder, images, batch_size=0)
    with pytest.raises(ValueError, match="at least one image"):
        latent_scale_factor(model.autoencoder.autoencoder, images[:0])


def test_ddpm_sampling_uses_the_training_schedule():
    model = _model()
    assert model._scheduler("ddim").alphas_cumprod.equal(model.scheduler.alphas_cumprod)
    assert len(model.scheduler.timesteps) == model.scheduler.num_train_timesteps
