"""A denoising diffusion model on the quantised latents of a trained autoencoder (seed 000).

Latent diffusion (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
Models", CVPR 2022): the autoencoder of a ``vqgan`` entry
(:class:`~chestssl.models.vqgan.LatentAutoencoder`, frozen) maps a slice (B, 1, H, W) to its
quantised latent z (B, C, H / s, W / s); an epsilon-prediction DDPM (Ho et al., "Denoising
Diffusion Probabilistic Models", NeurIPS 2020) learns those latents, scaled by
``scale_factor`` to unit standard deviation; samples are denoised from Gaussian noise and
decoded to slices. Seed 000 trained MONAI's ``DiffusionModelUNet`` (channels 192 x [1, 2, 4],
attention at every level) with ``DDPMScheduler`` (1000 steps, linear betas 1e-4 .. 2e-2)
through ``LatentDiffusionInferer``, and sampled with all 1000 steps; a faster DDIM sampler
(Song et al., "Denoising Diffusion Implicit Models", ICLR 2021) may replace the latter.

:class:`LatentDiffusion` is what the training loop fits (``training_step`` /
``validation_step``: the noise-prediction MSE) and what samples (:meth:`LatentDiffusion.sample`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from monai.inferers import LatentDiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from chestssl.models.seeding import seeded
from chestssl.models.stepped import SteppedModule
from chestssl.models.vqgan import LatentAutoencoder

#: Samplers of :meth:`LatentDiffusion.sample`: ``ddpm`` runs every training step backwards
#: (seed 000), ``ddim`` a subset of them (deterministic, eta 0).
SAMPLERS = ("ddpm", "ddim")
#: Seed of the noise and timesteps of every validation pass, so that validation losses
#: compare across epochs.
VALIDATION_SEED = 12345


class QuantisedLatents(nn.Module):
    """The autoencoder seen by MONAI's ``LatentDiffusionInferer``: ``encode_stage_2_inputs``
    gives the quantised latent (B, C, *L) of images (B, 1, *S), ``decode_stage_2_outputs``
    the images in (0, 1) of latents."""

    def __init__(self, autoencoder: LatentAutoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def encode_stage_2_inputs(self, images: torch.Tensor) -> torch.Tensor:
        latent, _ = self.autoencoder.quantize(self.autoencoder.encode(images))
        return latent

    def decode_stage_2_outputs(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)


class LatentDiffusion(SteppedModule):
    """Epsilon-prediction DDPM on the latents of a frozen autoencoder.

    Args:
        autoencoder: the trained :class:`~chestssl.models.vqgan.LatentAutoencoder`; frozen
            (no gradients, always in eval mode) and saved with the model.
        cfg: a ``latent_diffusion`` entry: ``channels``, ``attention_levels``,
            ``num_res_blocks``, ``num_head_channels``, ``norm_num_groups`` (the UNet),
            ``timesteps``, ``beta_start``, ``beta_end`` (the linear-beta schedule).
        scale_factor: multiplies the latents before diffusion (1 / their standard
            deviation on training data, :func:`latent_scale_factor`).
        seed: seeds the UNet's initial weights.

    ``training_step(batch)`` / ``validation_step(batch)``: ``{"loss": MSE}`` between the
    predicted and the true noise of ``batch["image"]`` (B, 1, *S)'s latents at random timesteps.
    """

    def __init__(self, autoencoder: LatentAutoencoder, cfg: Mapping[str, Any], scale_factor: float, seed: int):
        super().__init__()
        self.cfg = dict(cfg)
        self.autoencoder = QuantisedLatents(autoencoder)
        self.autoencoder.requires_grad_(False)
        self.latent_channels = int(autoencoder.latent_channels)
        self.spatial_dims = int(autoencoder.spatial_dims)
        with seeded(seed):
            self.unet = DiffusionModelUNet(
                spatial_dims=self.spatial_dims,
                in_channels=self.latent_channels,
                out_channels=self.latent_channels,
                channels=tuple(self.cfg["channels"]),
                attention_levels=tuple(self.cfg["attention_levels"]),
                num_res_blocks=int(self.cfg["num_res_blocks"]),
                num_head_channels=int(self.cfg["num_head_channels"]),
                norm_num_groups=int(self.cfg["norm_num_groups"]),
            )
        self.scheduler = self._scheduler("ddpm")
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self._validation_generator: torch.Generator | None = None

    def train(self, mode: bool = True) -> "LatentDiffusion":
        super().train(mode)
        self.autoencoder.eval()  # frozen: its normalisation and quantiser never switch to training
        if not mode:
            self._validation_generator = None  # every validation pass draws the same noise
        return self

    def _scheduler(self, sampler: str) -> DDPMScheduler | DDIMScheduler:
        """A fresh scheduler of kind ``sampler`` (:data:`SAMPLERS`) on the entry's noise
        schedule: ``timesteps`` steps, linear betas ``beta_start`` .. ``beta_end``."""
        kind = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[sampler]
        return kind(num_train_timesteps=int(self.cfg["timesteps"]), schedule="linear_beta",
                    beta_start=float(self.cfg["beta_start"]), beta_end=float(self.cfg["beta_end"]), clip_sample=False)

    def _inferer(self) -> LatentDiffusionInferer:
        return LatentDiffusionInferer(self.scheduler, scale_factor=float(self.scale_factor))

    def _noise_loss(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        with torch.no_grad():
            latent_shape = self.autoencoder.encode_stage_2_inputs(images[:1]).shape[1:]
        shape = (images.shape[0], *latent_shape)
        noise = torch.randn(shape, generator=generator, device="cpu").to(images.device)
        timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (images.shape[0],), generator=generator,
                                  device="cpu").to(images.device)
        prediction = self._inferer()(inputs=images, autoencoder_model=self.autoencoder, diffusion_model=self.unet,
                                     noise=noise, timesteps=timesteps)
        return F.mse_loss(prediction.float(), noise.float())

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": self._noise_loss(batch["image"], None)}

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self._validation_generator is None:
            self._validation_generator = torch.Generator().manual_seed(VALIDATION_SEED)
        return {"loss": self._noise_loss(batch["image"], self._validation_generator)}

    @torch.no_grad()
    def sample(self, count: int, latent_shape: tuple[int, ...], sampler: str, steps: int, seed: int,
               batch_size: int = 64) -> torch.Tensor:
        """``count`` generated images (count, 1, *S) in [0, 1], decoded from latents of
        ``latent_shape`` (C, *L) denoised by ``sampler`` (:data:`SAMPLERS`) in ``steps``
        steps (``ddpm``: the training timesteps, ``steps`` ignored); seeded by ``seed``."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: got {sampler!r}, expected one of {', '.join(SAMPLERS)}")
        if count < 1 or batch_size < 1:
            raise ValueError(f"count and batch_size: got {count} and {batch_size}, expected positive numbers")
        self.eval()
        device = self.scale_factor.device
        if sampler == "ddim":
            scheduler = self._scheduler("ddim")
            scheduler.set_timesteps(num_inference_steps=int(steps), device=device)
        else:
            scheduler = self.scheduler  # DDPM samples every training timestep (its default)
        inferer = self._inferer()
        generator = torch.Generator().manual_seed(int(seed))
        images = []
        with torch.random.fork_rng(devices=[]):  # DDPM's step draws its noise from the global generator
            torch.manual_seed(int(seed))
            for start in range(0, count, batch_size):
                size = min(batch_size, count - start)
                noise = torch.randn((size, *latent_shape), generator=generator).to(device)
                out = inferer.sample(input_noise=noise, autoencoder_model=self.autoencoder, diffusion_model=self.unet,
                                     scheduler=scheduler, verbose=False)
                images.append(out.float().clamp(0.0, 1.0).cpu())
        return torch.cat(images)

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        """(C, *L): the latent shape of (1, image_size, ...) images."""
        probe = torch.zeros((1, 1, *([image_size] * self.spatial_dims)), device=self.scale_factor.device)
        with torch.no_grad():
            return tuple(self.autoencoder.encode_stage_2_inputs(probe).shape[1:])


@torch.no_grad()
def latent_scale_factor(autoencoder: LatentAutoencoder, images: torch.Tensor, batch_size: int = 16) -> float:
    """1 / standard deviation of the quantised latents of ``images`` (N, 1, *S), so the
    diffused latents have unit variance (Rombach et al., 2022, section 4.3.2).

    The images are encoded ``batch_size`` at a time (the encoder's attention at its lowest
    resolution grows with the batch) and the spread is taken over all their latents at once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size}, expected a positive number")
    if images.shape[0] < 1:
        raise ValueError("latent_scale_factor needs at least one image; got an empty batch")
    was_training = autoencoder.training
    autoencoder.eval()
    try:
        encoder = QuantisedLatents(autoencoder)
        latents = torch.cat([encoder.encode_stage_2_inputs(images[start:start + batch_size]).float().cpu()
                             for start in range(0, images.shape[0], batch_size)])
    finally:
        autoencoder.train(was_training)
    std = float(latents.std())
    if not std > 0.0:
        raise ValueError("the autoencoder maps every image to one latent (standard deviation 0); retrain it")
    return 1.0 / std
