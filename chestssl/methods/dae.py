"""``dae``: Disruptive Autoencoders, a Swin UNETR that reconstructs clean images from disrupted ones.

Valanarasu et al., "Disruptive Autoencoders: Leveraging Low-level Features for 3D
Medical Image Pre-training", arXiv:2307.16896 (2023) (seed 003). The image is disrupted
(:mod:`chestssl.models.disruptions`: Gaussian noise, nearest down/up-sampling, zeroed
patch-embedding channels, or all three), a Swin UNETR reconstructs it, and the loss
compares the reconstruction with the *clean* image::

    loss = |sigmoid(SwinUNETR(disrupt(x))) - x|_1 + mm_con * SupCon(head(mean(h4)), modality)

The encoder is the ``swin`` backbone (MONAI's ``SwinUNETR.swinViT``) and the decoder
SwinUNETR's own (:class:`~chestssl.models.swin.SwinUNETRSegHead` with one output channel),
so encoder and decoder together are exactly a MONAI ``SwinUNETR``. The second term is
the cross-modal contrastive loss (:class:`~chestssl.models.supervised_contrastive.CrossModalContrastiveLoss`,
Khosla et al., NeurIPS 2020) on the bottleneck: the global average of the deepest
hidden state ``h4``, through a linear projection, with each sample's modality as its
class. It only acts on batches that carry a ``modality`` list with at least two
modalities (one of them twice); on single-modality data such as LIDC-IDRI it is 0, the
step logs ``mm_con_active`` = 0 and :attr:`DisruptiveAutoencoderPretraining.mm_con_ever_active`
stays false. It is computed in float32 whatever the autocast state (seed 003's AMP made
it NaN).

Validation disrupts each batch with a generator seeded by (seed, batch index within the
pass), so every epoch sees the same disruptions and its metrics are comparable.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chestssl.methods.base import PretrainMethod
from chestssl.params import MethodConfig
from chestssl.schema import Float, Int, Str
from chestssl.models.backbones import build_backbone
from chestssl.models.collectives import distributed_world_size
from chestssl.models.disruptions import Disruption
from chestssl.models.seeding import seeded
from chestssl.models.supervised_contrastive import CrossModalContrastiveLoss
from chestssl.models.swin import SWIN_UNETR_PATCH_SIZE, SwinEncoder, SwinUNETRSegHead

#: Width of the linear projection of the bottleneck that the contrastive loss compares.
CONTRASTIVE_DIM = 128


class DAEConfig(MethodConfig):
    """``method: dae``: seed 003's Disruptive Autoencoder on a Swin backbone."""

    method: Literal["dae"]
    backbone_names = ("swin",)  # its decoder is SwinUNETR's, which reads the Swin hidden states
    disruption: Str(choices=("denoise", "superres", "local", "all"))
    noise_variance: Float(ge=0.0, doc="variance of the added Gaussian noise; seed 003: 0.1")
    downsample_factor: Int(ge=2, doc="nearest down- then up-sampling factor; seed 003: 4")
    local_fraction: Float(ge=0.0, lt=1.0, doc="fraction of patch-embedding channels zeroed; seed 003: 0.6")
    mm_con: Float(ge=0.0, doc="weight of the cross-modal contrastive term; seed 003: 0.03")
    temperature: Float(gt=0.0, doc="of the contrastive term; seed 003: 0.5")

    def entry_problems(self, backbone: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The decoder is SwinUNETR's, which needs the Swin backbone's patch size to be 2."""
        if backbone["patch_size"] != SWIN_UNETR_PATCH_SIZE:
            return [("backbone", f"its patch_size is {backbone['patch_size']}, but the decoder is SwinUNETR's, which "
                                 f"needs {SWIN_UNETR_PATCH_SIZE} (its last up-sampling must reach the "
                                 "full-resolution skip)")]
        return []


class DisruptiveAutoencoderPretraining(PretrainMethod):
    """Seed 003's DAE on a :class:`~chestssl.models.swin.SwinEncoder` (module docstring).

    ``cfg``: ``backbone`` (a ``swin`` block), ``disruption`` (``denoise`` | ``superres`` |
    ``local`` | ``all``), ``noise_variance``, ``downsample_factor``, ``local_fraction``,
    ``mm_con`` (weight of the contrastive term), ``temperature``. The encoder is built
    first inside the seeded block, so at step 0 it equals the ``scratch`` encoder of the
    same seed and backbone.

    Batches: ``image`` (B, 1, *S) in [0, 1], every size a multiple of 32 and the deepest
    map (S / 32) holding more than one element (64x64 slices, 32x32x64 or 64^3 crops);
    optionally ``modality``, a list of B strings.
    """

    Config = DAEConfig
    reconstructs = True
    monitor = ("val/loss", "min")

    def __init__(self, name: str, cfg: Mapping[str, Any], seed: int):
        super().__init__(name, cfg, seed)
        backbone = self.cfg["backbone"]
        self.disruption = Disruption.from_cfg(self.cfg)
        self.mm_con_weight = float(self.cfg["mm_con"])
        temperature = float(self.cfg["temperature"])
        spatial_dims = int(backbone["spatial_dims"])
        with seeded(self.seed):
            self.swin_encoder: SwinEncoder = build_backbone(backbone)
            self.decoder = SwinUNETRSegHead(self.swin_encoder, out_channels=1)
            self.contrastive_head = nn.Linear(self.swin_encoder.latent_channels, CONTRASTIVE_DIM)
        self.contrastive_loss = CrossModalContrastiveLoss(temperature)
        # Training steps in which the contrastive term was active (saved with the checkpoint).
        self.register_buffer("mm_con_active_steps", torch.zeros((), dtype=torch.int64))
        self.track_reconstruction_quality(spatial_dims)
        self._validation_batches = 0

    @property
    def mm_con_ever_active(self) -> bool:
        """Whether the contrastive term acted in any training step (false on one-modality data)."""
        return bool(self.mm_con_active_steps > 0)

    def encoder(self) -> nn.Module:
        return self.swin_encoder

    def train(self, mode: bool = True) -> "DisruptiveAutoencoderPretraining":
        if self.training and not mode:
            self._validation_batches = 0
        return super().train(mode)

    def forward_disrupted(
        self, image: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Reconstruction (B, 1, *S) in (0, 1) of ``image`` disrupted with ``generator``
        (``None``: undisrupted), and the encoder's five hidden states."""
        if generator is not None:
            image = self.disruption.image(image, generator)
            with self.disruption.in_encoder(self.swin_encoder, generator):
                hidden_states = self.swin_encoder(image)
        else:
            hidden_states = self.swin_encoder(image)
        # SwinUNETR's decoder also reads the raw input through its full-resolution skip
        # (encoder1). When the only disruption acts inside the encoder, that skip would hand
        # the decoder the clean target, so it gets a blank image instead, in training and
        # inference alike.
        skip = image if self.skip_reads_image else torch.zeros_like(image)
        return torch.sigmoid(self.decoder(skip, hidden_states)), hidden_states

    @property
    def skip_reads_image(self) -> bool:
        """Whether the decoder's full-resolution skip reads the (disrupted) input image:
        false when local disturbance of the patch embedding is the only disruption."""
        return bool({"noise", "downsample"} & set(self.disruption.parts))

    def reconstruction_loss(self, reconstruction: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """L1 between the reconstruction and the clean image (both (B, 1, *S)), in float32."""
        return F.l1_loss(reconstruction.float(), clean.float())

    def contrastive_term(
        self, hidden_states: Sequence[torch.Tensor], modalities: Sequence[str] | None
    ) -> tuple[torch.Tensor, bool]:
        """The cross-modal contrastive loss on the bottleneck, and whether it was active.

        Inactive (0) when ``mm_con`` is 0 or the batch carries fewer than two modalities
        (see :meth:`CrossModalContrastiveLoss.informative`). Computed in float32. In
        training under DDP, the batch is every process's part: the term is active when the
        whole batch is informative, and each anchor is contrasted with all of it (as on
        one process with the whole batch, seed 003's 8 GPUs included).
        """
        deepest = hidden_states[-1]
        zero = torch.zeros((), device=deepest.device)
        if self.mm_con_weight == 0.0 or modalities is None:
            return zero, False
        if len(modalities) != deepest.shape[0]:
            raise ValueError(f"batch['modality'] has {len(modalities)} entries for a batch of {deepest.shape[0]} images")
        # Validation shards may hold unequal batch counts, so only training steps gather.
        across = self.training and distributed_world_size() > 1
        if not CrossModalContrastiveLoss.informative(_all_processes(modalities) if across else modalities):
            return zero, False
        with torch.autocast(device_type=deepest.device.type, enabled=False):
            bottleneck = deepest.float().flatten(2).mean(dim=2)
            embeddings = self.contrastive_head(bottleneck)
            return self.contrastive_loss(embeddings, modalities, gather_across_processes=across), True

    def _losses(
        self, image: torch.Tensor, modalities: Sequence[str] | None, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
        reconstruction, hidden_states = self.forward_disrupted(image, generator)
        l1 = self.reconstruction_loss(reconstruction, image)
        contrastive, active = self.contrastive_term(hidden_states, modalities)
        loss = l1 + self.mm_con_weight * contrastive
        parts = {"loss": loss, "l1": l1.detach(), "mm_con_loss": contrastive.detach()}
        return parts, reconstruction, active

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``loss`` (L1 + mm_con * contrastive), ``l1``, ``mm_con_loss``, ``mm_con_active`` (0 or 1).

        The disruptions are drawn from a generator seeded from torch's global CPU
        generator, which the training loop seeds and checkpoints.
        """
        image = batch["image"]
        step_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        generator = torch.Generator(device=image.device).manual_seed(step_seed)
        parts, _, active = self._losses(image, batch.get("modality"), generator)
        if active:
            self.mm_con_active_steps += 1
        parts["mm_con_active"] = torch.tensor(float(active), device=image.device)
        return parts

    def _validation_generator(self, device: torch.device) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.seed, self._validation_batches]).generate_state(1, np.uint64)[0])
        self._validation_batches += 1
        return torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``loss``, ``l1``, ``ssim`` and ``psnr`` (dB) of the reconstruction of the
        disrupted batch against the clean one (means over images).

        The n-th batch of a validation pass is disrupted the same way in every pass. SSIM
        and PSNR are also accumulated for :meth:`validation_epoch_end`.
        """
        image = batch["image"].float()
        parts, reconstruction, _ = self._losses(image, batch.get("modality"), self._validation_generator(image.device))
        reconstruction = reconstruction.float()
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
        """Reconstruction (B, 1, *S) in (0, 1) of the undisrupted ``image`` (B, 1, *S)."""
        return self.forward_disrupted(image, None)[0]


def _all_processes(modalities: Sequence[str]) -> list[str]:
    """The modalities of every process's part of the batch, in rank order."""
    import torch.distributed as dist

    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, list(modalities))
    return [modality for part in every for modality in part]
