"""``vqgan``: seed 000's autoencoders (CNN-attention or Swin encoder) as a pretext task.

The encoder learns by reconstructing the slice through a (vector-quantised) latent, with
the objective of VQGAN (Esser et al., "Taming Transformers for High-Resolution Image
Synthesis", CVPR 2021), which seed 000 used::

    rec  = loss.l1 * |x_hat - x|_1 + loss.ssim * (1 - SSIM) + loss.perceptual * P(x_hat, x)
    loss = rec + loss.codebook * (codebook + beta * commitment)          (VQ-VAE, van den Oord 2017)
             + lambda * loss.adversarial * hinge_G(D(x_hat))              (after disc_start steps)
    disc = hinge_D(D(x), D(x_hat))                                        (PatchGAN, Isola 2017)

``lambda`` is VQGAN's adaptive weight (the ratio of the gradient norms of ``rec`` and of
the generator loss at the decoder's last layer) when ``loss.adaptive_weight`` is true,
else 1. The discriminator is a MONAI ``PatchDiscriminator``; its loss and the
autoencoder's are summed into one ``loss`` whose gradients do not cross (see
:class:`chestssl.models.adversarial.PatchAdversarialTerm`), so the training loop's single
optimiser updates both. The perceptual term reads a local TorchScript feature network
(``loss.perceptual_weights``, checked against ``loss.perceptual_sha256``); nothing is downloaded.

Images and reconstructions are in [0, 1]; SSIM and PSNR use data_range 1.0 for every
model (seed 000 used 2.0 for single-task AEs and 1.0 for multihead models). The best
epoch is the one with the highest validation SSIM, as in seed 000.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from pydantic import model_validator
from torch import nn

from chestssl.methods.base import PretrainMethod
from chestssl.params import MethodConfig, check_levels
from chestssl.schema import Bool, Config, Float, Int, List, Str, problem
from chestssl.models.adversarial import PatchAdversarialTerm
from chestssl.models.backbones import build_backbone
from chestssl.models.perceptual import LocalPerceptualLoss
from chestssl.models.seeding import seeded
from chestssl.models.vqgan import LatentAutoencoder


class DecoderConfig(Config):
    """The decoder of seed 000's autoencoders (:class:`chestssl.models.vqgan.LatentAutoencoder`)."""

    channels: Int(ge=1, doc="width of the full-resolution level")
    channel_multipliers: List(Int(ge=1), doc="one per level")
    num_res_blocks: Int(ge=1)
    norm_num_groups: Int(ge=1, doc="must divide every level width")
    latent_channels: Int(ge=1, doc="channels of the (quantised) latent the decoder reads")

    @model_validator(mode="after")
    def _levels(self) -> "DecoderConfig":
        check_levels(self.channels, self.channel_multipliers, self.norm_num_groups)
        return self


class QuantizerConfig(Config):
    """The vector quantiser between encoder and decoder (van den Oord et al., NeurIPS 2017)."""

    enabled: Bool()
    codebook_size: Int(ge=2)
    dim: Int(ge=1)
    beta: Float(ge=0.0, doc="commitment weight")


class AutoencoderLossConfig(Config):
    """The weights of :class:`AutoencoderObjective`'s terms."""

    l1: Float(ge=0.0)
    ssim: Float(ge=0.0)
    perceptual: Float(ge=0.0, doc="needs perceptual_weights")
    perceptual_weights: Str(doc="a local TorchScript feature network; empty: none")
    perceptual_sha256: Str(pattern=r"([0-9a-fA-F]{64})?",
                           doc="the SHA-256 of perceptual_weights (sha256sum <file>)") = ""
    codebook: Float(ge=0.0, doc="weight of codebook + beta * commitment")
    adversarial: Float(ge=0.0, doc="factor of the (adaptive) generator loss; 0: no discriminator")
    adaptive_weight: Bool()
    disc_start: Int(ge=0, doc="step at which the discriminator starts")
    disc_layers: Int(ge=1)
    disc_channels: Int(ge=1)

    @model_validator(mode="after")
    def _faithful_and_complete(self) -> "AutoencoderLossConfig":
        if self.l1 == 0.0 and self.ssim == 0.0 and self.perceptual == 0.0:
            raise problem("l1, ssim and perceptual are all 0, so nothing asks for a faithful reconstruction; "
                          "give at least one a positive weight")
        if self.perceptual > 0.0 and not self.perceptual_weights:
            raise problem(f"perceptual is {self.perceptual:g}, but perceptual_weights is empty; point it to a "
                          "local TorchScript feature network, or set perceptual to 0")
        if self.perceptual_weights and not self.perceptual_sha256:
            raise problem(f"perceptual_weights is {self.perceptual_weights!r}, but perceptual_sha256 is empty; give the "
                          "file's SHA-256 (sha256sum), so that the stage reruns when the file changes and refuses "
                          "another", key="perceptual_sha256")
        return self


class VQGANConfig(MethodConfig):
    """``method: vqgan``: seed 000's (vector-quantised) autoencoder."""

    method: Literal["vqgan"]
    decoder: DecoderConfig
    quantizer: QuantizerConfig
    loss: AutoencoderLossConfig


class AutoencoderObjective(nn.Module):
    """The reconstruction, codebook and adversarial terms of a validated ``loss`` block.

    Args:
        loss_cfg: ``l1``, ``ssim``, ``perceptual``, ``perceptual_weights`` (and its
            ``perceptual_sha256``), ``codebook``,
            ``adversarial``, ``adaptive_weight``, ``disc_start``, ``disc_layers``,
            ``disc_channels``.
        spatial_dims: 2 or 3.
        where: the params key of the block, for error messages (``methods.<name>.loss``).
    """

    def __init__(self, loss_cfg: Mapping[str, Any], spatial_dims: int, where: str):
        super().__init__()
        self.l1_weight = float(loss_cfg["l1"])
        self.ssim_weight = float(loss_cfg["ssim"])
        self.perceptual_weight = float(loss_cfg["perceptual"])
        self.codebook_weight = float(loss_cfg["codebook"])
        self.ssim_loss = SSIMLoss(spatial_dims=spatial_dims, data_range=1.0)
        self.perceptual: LocalPerceptualLoss | None = None
        if self.perceptual_weight > 0.0:
            self.perceptual = LocalPerceptualLoss(loss_cfg["perceptual_weights"], loss_cfg.get("perceptual_sha256"),
                                                  param_key=f"{where}.perceptual_weights")
        self.adversarial: PatchAdversarialTerm | None = None
        if float(loss_cfg["adversarial"]) > 0.0:
            self.adversarial = PatchAdversarialTerm(
                spatial_dims,
                num_layers=int(loss_cfg["disc_layers"]),
                channels=int(loss_cfg["disc_channels"]),
                weight=float(loss_cfg["adversarial"]),
                start_step=int(loss_cfg["disc_start"]),
                adaptive=bool(loss_cfg["adaptive_weight"]),
            )

    def reconstruction(self, recon: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """``rec`` (the weighted sum) and its parts for (B, 1, *S) tensors in [0, 1], in float32."""
        recon, image = recon.float(), image.float()
        parts = {"l1": F.l1_loss(recon, image)}
        rec = self.l1_weight * parts["l1"]
        if self.ssim_weight > 0.0:
            parts["ssim_loss"] = self.ssim_loss(recon, image)
            rec = rec + self.ssim_weight * parts["ssim_loss"]
        if self.perceptual is not None:
            parts["perceptual"] = self.perceptual(recon, image)
            rec = rec + self.perceptual_weight * parts["perceptual"]
        return {"rec": rec, **parts}

    def training_losses(
        self,
        recon: torch.Tensor,
        image: torch.Tensor,
        vq_loss: torch.Tensor,
        last_layer: torch.Tensor,
        step: int,
    ) -> dict[str, torch.Tensor]:
        """``ae`` (what the autoencoder minimises) and ``disc`` (the discriminator's loss).

        Their gradients do not cross, so ``ae + disc`` can be optimised in one step.
        """
        parts = self.reconstruction(recon, image)
        ae = parts["rec"] + self.codebook_weight * vq_loss.float()
        out = {**parts, "vq": vq_loss.detach()}
        zero = torch.zeros((), device=image.device)
        disc = zero
        if self.adversarial is not None:
            adv = self.adversarial.losses(image, recon, parts["rec"], last_layer, step)
            ae = ae + adv["generator"]
            disc = adv["discriminator"]
            out.update(generator=adv["generator"].detach(), disc=disc.detach(), adaptive_weight=adv["adaptive_weight"])
        out["ae"] = ae
        out["disc_loss"] = disc
        return out


class VQGANAutoencoderPretraining(PretrainMethod):
    """:class:`~chestssl.models.vqgan.LatentAutoencoder` trained with :class:`AutoencoderObjective`.

    ``cfg``: ``backbone`` (``cnn_attention``, ``swin`` or ``unet_encoder``), ``decoder``,
    ``quantizer``, ``loss``, ``train``. The backbone is built first inside the seeded
    block, so at step 0 it equals the ``scratch`` encoder of the same seed and backbone.
    """

    Config = VQGANConfig
    reconstructs = True
    monitor = ("val/ssim", "max")

    def __init__(self, name: str, cfg: Mapping[str, Any], seed: int):
        super().__init__(name, cfg, seed)
        spatial_dims = int(self.cfg["backbone"]["spatial_dims"])
        with seeded(self.seed):
            encoder = build_backbone(self.cfg["backbone"])
            self.autoencoder = LatentAutoencoder(encoder, self.cfg["decoder"], self.cfg["quantizer"])
            self.objective = AutoencoderObjective(self.cfg["loss"], spatial_dims, f"methods.{name}.loss")
        # Optimisation steps taken; a buffer, so a resumed run knows when the discriminator starts.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))
        self.track_reconstruction_quality(spatial_dims)

    def encoder(self) -> nn.Module:
        return self.autoencoder.encoder

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        out = self.autoencoder(image)
        losses = self.objective.training_losses(
            out.recon, image, out.vq_loss, self.autoencoder.last_layer_weight(), int(self.steps_done)
        )
        self.steps_done += 1
        result = {k: v for k, v in losses.items() if k not in ("ae", "disc_loss")}
        result["loss"] = losses["ae"] + losses["disc_loss"]
        result["ae_loss"] = losses["ae"].detach()
        if out.perplexity is not None:
            result["perplexity"] = out.perplexity.detach()
        return result

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``loss`` (reconstruction + codebook terms; the adversarial terms are left out),
        ``l1``, ``ssim`` and ``psnr`` (dB), means over the batch's images."""
        image = batch["image"].float()
        out = self.autoencoder(image)
        recon = out.recon.float().clamp(0.0, 1.0)
        parts = self.objective.reconstruction(recon, image)
        metrics = {
            "loss": parts["rec"] + self.objective.codebook_weight * out.vq_loss.float(),
            "l1": parts["l1"],
            **self.reconstruction_quality(recon, image),
        }
        if out.perplexity is not None:
            metrics["perplexity"] = out.perplexity
        return metrics

    def validation_epoch_end(self) -> dict[str, torch.Tensor]:
        """Mean SSIM and PSNR over every image of the current validation pass."""
        return self.reconstruction_quality_of_pass()

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 1, *S) in [0, 1] of ``image`` (B, 1, *S)."""
        return self.autoencoder(image).recon.clamp(0.0, 1.0)
