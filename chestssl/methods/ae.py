"""``ae``: convolutional autoencoder pretraining with an L1 + SSIM reconstruction loss.

Autoencoder pretraining as in seed 000 (the multi-task chest CT autoencoder), without
its vector quantiser and adversarial terms: the encoder learns by reconstructing the
slice through a bottleneck (Hinton & Salakhutdinov, Science 2006; Masci et al., ICANN
2011). The loss mixes L1 with the structural-similarity loss 1 - SSIM (Wang et al.,
"Image Quality Assessment: From Error Visibility to Structural Similarity", IEEE TIP
2004), a combination studied by Zhao et al., "Loss Functions for Image Restoration
with Neural Networks", IEEE TCI 2017::

    loss = loss.l1 * |x_hat - x|_1 + loss.ssim * (1 - SSIM(x_hat, x))

Images and reconstructions are in [0, 1], so SSIM and PSNR use one data range (1.0),
unlike seed 000 whose single-task and multihead PSNRs used different ranges.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from pydantic import model_validator
from torch import nn

from chestssl.methods.base import PretrainMethod
from chestssl.params import MethodConfig
from chestssl.schema import Config, Float, problem
from chestssl.models.autoencoder import ConvAutoencoder
from chestssl.models.backbones import build_backbone
from chestssl.models.seeding import seeded


class L1SSIMLoss(Config):
    """Weights of the two reconstruction terms; at least one is positive."""

    l1: Float(ge=0.0)
    ssim: Float(ge=0.0)

    @model_validator(mode="after")
    def _something_to_optimise(self) -> "L1SSIMLoss":
        if self.l1 == 0.0 and self.ssim == 0.0:
            raise problem("l1 and ssim are both 0, so there is nothing to optimise; give at least one a positive weight")
        return self


class AEConfig(MethodConfig):
    """``method: ae``: a backbone with a mirrored convolutional decoder."""

    method: Literal["ae"]
    loss: L1SSIMLoss


class AutoencoderPretraining(PretrainMethod):
    """:class:`~chestssl.models.ConvAutoencoder` trained to reconstruct ``batch["image"]``.

    ``cfg["loss"]``: ``{"l1": weight, "ssim": weight}`` (not both zero).
    The encoder is built first inside the seeded block, so at step 0 it equals the
    ``scratch`` encoder of the same seed and backbone.
    """

    Config = AEConfig
    reconstructs = True

    # Every parameter gets a gradient in every step: DDP need not search for unused ones.
    ddp_find_unused_parameters = False

    def __init__(self, name: str, cfg: Mapping[str, Any], seed: int):
        super().__init__(name, cfg, seed)
        self.l1_weight = float(self.cfg["loss"]["l1"])
        self.ssim_weight = float(self.cfg["loss"]["ssim"])
        spatial_dims = int(self.cfg["backbone"]["spatial_dims"])
        with seeded(self.seed):
            self.autoencoder = ConvAutoencoder(build_backbone(self.cfg["backbone"]))
        self.ssim_loss = SSIMLoss(spatial_dims=spatial_dims, data_range=1.0)
        self.track_reconstruction_quality(spatial_dims)

    def encoder(self) -> nn.Module:
        return self.autoencoder.encoder

    def losses(self, reconstruction: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted loss and its parts for (B, 1, *S) tensors in [0, 1].

        Computed in float32 so mixed precision cannot upset the SSIM statistics.
        """
        reconstruction, image = reconstruction.float(), image.float()
        l1 = F.l1_loss(reconstruction, image)
        ssim_loss = self.ssim_loss(reconstruction, image)
        loss = self.l1_weight * l1 + self.ssim_weight * ssim_loss
        return {"loss": loss, "l1": l1, "ssim_loss": ssim_loss}

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        return self.losses(self.autoencoder(image), image)

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``loss``, ``l1``, ``ssim`` and ``psnr`` (dB) of the batch (means over images).

        SSIM and PSNR are also accumulated for :meth:`validation_epoch_end`.
        """
        image = batch["image"].float()
        reconstruction = self.autoencoder(image).float()
        parts = self.losses(reconstruction, image)
        return {
            "loss": parts["loss"],
            "l1": parts["l1"],
            **self.reconstruction_quality(reconstruction, image),
        }

    def validation_epoch_end(self) -> dict[str, torch.Tensor]:
        """Mean SSIM and PSNR over every image of the current validation pass."""
        return self.reconstruction_quality_of_pass()

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 1, *S) in (0, 1) of ``image`` (B, 1, *S)."""
        return self.autoencoder(image)
