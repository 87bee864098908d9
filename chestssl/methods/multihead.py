"""``multihead``: seed 000's multi-task autoencoder, one encoder with several heads.

A shared encoder (seed 000: the Swin transformer of SwinUNETR) feeds

- a reconstruction head: the latent adapter, optional vector quantiser and decoder of
  :class:`~chestssl.models.vqgan.LatentAutoencoder`, trained with the ``vqgan`` objective
  (:class:`~chestssl.methods.vqgan.AutoencoderObjective`);
- ``seg`` (optional): SwinUNETR's decoder on the encoder's hidden states
  (:class:`~chestssl.models.swin.SwinUNETRSegHead`), nodule mask, loss ``seg_loss``;
- ``cls`` (optional): a ResNet on the latent (:func:`~chestssl.models.classifier.latent_resnet`),
  nodule slice vs clean slice, class-weighted cross-entropy (slices labelled -1, with a
  few nodule pixels only, do not count). The head sees the pretraining slices, mostly
  clean: ``cls_class_weights: balanced`` weighs the classes by their expected counts in a
  training epoch (:meth:`MultiheadAutoencoder.fit_class_weights`).

The objective, as seed 000 (where beta was hard-coded; here it is the ``seg_beta`` param)::

    loss = ae + seg_beta * seg + cls_weight * cls        (+ the discriminator's own loss)

Multi-task learning: Caruana, "Multitask Learning", Machine Learning 28, 1997.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from monai.metrics import Cumulative
from pydantic import ValidationInfo, field_validator
from torch import nn

from chestssl.methods.base import PretrainMethod
from chestssl.methods.vqgan import AutoencoderLossConfig, AutoencoderObjective, DecoderConfig, QuantizerConfig
from chestssl.params import BALANCED, ClsClassWeights, MethodConfig
from chestssl.schema import Float, List, Nullable, Str, problem
from chestssl.models.backbones import backbone_name, build_backbone
from chestssl.models.classifier import latent_resnet
from chestssl.models.losses import balanced_class_weights, class_weight_tensor, make_seg_loss
from chestssl.models.overlap import dice_iou_from_counts, overlap_counts
from chestssl.models.seeding import seeded
from chestssl.models.swin import SWIN_UNETR_PATCH_SIZE
from chestssl.models.vqgan import LatentAutoencoder

HEADS = ("seg", "cls")
#: The cls head's classes, in the order of its logits and of ``cls_class_weights``.
CLS_CLASSES = ("clean", "nodule")


class MultiheadConfig(MethodConfig):
    """A ``multihead`` entry: seed 000's multi-task autoencoder."""

    section = "multihead"
    method: Literal["multihead"]
    heads: List(Str(choices=HEADS), doc="seg, cls or both, each once")
    seg_beta: Nullable(Float(ge=0.0, doc="null: the top-level seg_beta"))
    cls_weight: Float(ge=0.0)
    seg_loss: Str(choices=("ce", "dice", "focal"))
    seg_class_weights: List(Float(ge=0.0), length=2)
    focal_gamma: Float(ge=0.0)
    focal_alpha: Float(ge=0.0, le=1.0)
    cls_arch: Str(choices=("resnet18", "resnet50"))
    cls_class_weights: ClsClassWeights
    decoder: DecoderConfig
    quantizer: QuantizerConfig
    loss: AutoencoderLossConfig

    @field_validator("heads")
    @classmethod
    def _heads_once(cls, heads: list[str]) -> list[str]:
        if not heads or len(set(heads)) != len(heads):
            raise problem(f"got {heads!r}, expected one or both of 'seg', 'cls', each once")
        return heads

    @field_validator("seg_class_weights")
    @classmethod
    def _seg_weights_not_both_zero(cls, weights: list[float], info: ValidationInfo) -> list[float]:
        if info.data.get("seg_loss") == "ce" and not any(weights):
            raise problem(f"got {weights!r}, but seg_loss 'ce' weighs each pixel by its class; expected 2 weights "
                          "(background, nodule) that are not both 0")
        return weights

    def entry_problems(self, backbone: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The seg head is SwinUNETR's decoder: it needs a Swin backbone of patch size 2."""
        if "seg" not in self.heads:
            return []
        if backbone["name"] != "swin":
            return [("backbone", f"the seg head is SwinUNETR's decoder and needs a 'swin' backbone, "
                                 f"got a {backbone['name']!r} one")]
        if backbone["patch_size"] != SWIN_UNETR_PATCH_SIZE:
            return [("backbone", f"its patch_size is {backbone['patch_size']}, but the seg head is SwinUNETR's "
                                 f"decoder, which needs {SWIN_UNETR_PATCH_SIZE} (its last up-sampling must reach "
                                 "the full-resolution skip)")]
        return []


class MultiheadAutoencoder(PretrainMethod):
    """Shared encoder + reconstruction head + ``heads`` (``seg`` and/or ``cls``).

    ``cfg`` (a validated ``multihead.<name>`` entry with ``seg_beta`` resolved, see
    :func:`chestssl.params.pretrain_entry`): ``heads``, ``seg_beta``, ``cls_weight``,
    ``seg_loss``, ``seg_class_weights``, ``focal_gamma``, ``focal_alpha``, ``cls_arch``,
    ``cls_class_weights``, ``backbone``, ``decoder``, ``quantizer``, ``loss``, ``train``.

    Shapes: image (B, 1, *S) -> reconstruction (B, 1, *S), seg logits (B, 2, *S), cls
    logits (B, 2).
    """

    Config = MultiheadConfig
    reconstructs = True
    monitor = ("val/loss", "min")

    def __init__(self, name: str, cfg: Mapping[str, Any], seed: int):
        super().__init__(name, cfg, seed)
        where = f"multihead.{name}"
        heads = list(self.cfg["heads"])
        self.heads = tuple(h for h in HEADS if h in heads)
        self.seg_beta = float(self.cfg["seg_beta"])
        self.cls_weight = float(self.cfg["cls_weight"])
        backbone = self.cfg["backbone"]
        spatial_dims = int(backbone["spatial_dims"])
        with seeded(self.seed):
            encoder = build_backbone(backbone)
            self.autoencoder = LatentAutoencoder(encoder, self.cfg["decoder"], self.cfg["quantizer"])
            self.objective = AutoencoderObjective(self.cfg["loss"], spatial_dims, f"{where}.loss")
            self._deepest_map_is_latent = backbone_name(encoder) in ("swin", "unet_encoder")
            self.seg_head: nn.Module | None = None
            self.cls_head: nn.Module | None = None
            if "seg" in self.heads:
                from chestssl.models.swin import SwinUNETRSegHead

                self.seg_head = SwinUNETRSegHead(encoder, out_channels=2)
            if "cls" in self.heads:
                self.cls_head = latent_resnet(spatial_dims, encoder.latent_channels, self.cfg["cls_arch"], 2)
        self.seg_loss = make_seg_loss(
            self.cfg["seg_loss"], self.cfg["seg_class_weights"], self.cfg["focal_gamma"], self.cfg["focal_alpha"]
        )
        weights = self.cfg["cls_class_weights"]
        # `balanced` weights are set from the training data (fit_class_weights); a buffer, so
        # a resumed run and the saved method keep them.
        self.register_buffer("cls_class_weights", class_weight_tensor([1.0, 1.0] if weights == BALANCED else weights))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))
        self.track_reconstruction_quality(spatial_dims)
        self._seg_counts = self.register_accumulator(Cumulative())

    def encoder(self) -> nn.Module:
        return self.autoencoder.encoder

    def fit_class_weights(self, train_data: Any) -> dict[str, Any]:
        """Resolve ``cls_class_weights: balanced`` from the expected class counts of one
        training epoch over ``train_data`` (its ``expected_class_counts()``: a
        :class:`~chestssl.data.datasets.SliceDataset` or
        :class:`~chestssl.data.slice_epochs.EpochSliceDataset`) and return what the cls loss
        weighs, for ``metrics.json``: ``cls_class_weights`` and ``cls_train_class_counts``
        (clean, nodule); empty without a cls head.

        Raises:
            ValueError: ``balanced`` on data without slice labels (3D crops), or without a class.
        """
        if self.cls_head is None:
            return {}
        key = f"multihead.{self.name}.cls_class_weights"
        counts = train_data.expected_class_counts() if hasattr(train_data, "expected_class_counts") else None
        if self.cfg["cls_class_weights"] == BALANCED:
            if counts is None:
                raise ValueError(f"{key}: {BALANCED!r} needs slice labels, but the training data "
                                 f"({type(train_data).__name__}) has none; give 2 weights (clean, nodule)")
            self.cls_class_weights.copy_(class_weight_tensor(balanced_class_weights(counts, key, CLS_CLASSES)))
        recorded = {"cls_class_weights": dict(zip(CLS_CLASSES, self.cls_class_weights.tolist()))}
        if counts is not None:
            recorded["cls_train_class_counts"] = dict(zip(CLS_CLASSES, (round(c, 3) for c in counts)))
        return recorded

    # -- forward --------------------------------------------------------------------
    def forward_heads(self, image: torch.Tensor) -> dict[str, Any]:
        """One encoder pass feeding every head: ``ae`` (the autoencoder output), ``seg``
        logits (B, 2, *S) and ``cls`` logits (B, 2) where those heads exist."""
        encoder = self.encoder()
        hidden = encoder.feature_maps(image)
        # The Swin and UNet encoders' deepest map is their latent; others (cnn_attention)
        # add layers after it, so their latent is computed on its own.
        latent = hidden[-1] if self._deepest_map_is_latent else encoder.latent(image)
        out: dict[str, Any] = {"ae": self.autoencoder.forward_from_latent(latent)}
        if self.seg_head is not None:
            out["seg"] = self.seg_head(image, hidden)
        if self.cls_head is not None:
            out["cls"] = self.cls_head(latent)
        return out

    def cls_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross-entropy over slices labelled 0 or 1; 0 if a batch has none."""
        valid = label >= 0
        if not bool(valid.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits[valid].float(), label[valid], weight=self.cls_class_weights)

    def task_losses(self, out: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The weighted head losses ``seg`` and ``cls`` (unweighted values too, for logs)."""
        losses = {}
        if "seg" in out:
            losses["seg"] = self.seg_loss(out["seg"].float(), batch["mask"])
        if "cls" in out:
            losses["cls"] = self.cls_loss(out["cls"], batch["label"])
        return losses

    def combine(self, ae_loss: torch.Tensor, task_losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``ae + seg_beta * seg + cls_weight * cls``."""
        total = ae_loss
        if "seg" in task_losses:
            total = total + self.seg_beta * task_losses["seg"]
        if "cls" in task_losses:
            total = total + self.cls_weight * task_losses["cls"]
        return total

    # -- training loop interface ----------------------------------------------------
    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        out = self.forward_heads(image)
        ae_out = out["ae"]
        ae = self.objective.training_losses(
            ae_out.recon, image, ae_out.vq_loss, self.autoencoder.last_layer_weight(), int(self.steps_done)
        )
        self.steps_done += 1
        tasks = self.task_losses(out, batch)
        result = {k: v for k, v in ae.items() if k not in ("ae", "disc_loss")}
        result.update({f"{k}_loss": v.detach() for k, v in tasks.items()})
        result["ae_loss"] = ae["ae"].detach()
        result["loss"] = self.combine(ae["ae"], tasks) + ae["disc_loss"]
        return result

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``loss`` (as training, without the adversarial terms), ``ssim``, ``psnr``, and
        per head ``seg_loss`` + ``dice`` (over the batch's pixels) or ``cls_loss`` + ``accuracy``."""
        image = batch["image"].float()
        out = self.forward_heads(image)
        recon = out["ae"].recon.float().clamp(0.0, 1.0)
        parts = self.objective.reconstruction(recon, image)
        tasks = self.task_losses(out, batch)
        ae_loss = parts["rec"] + self.objective.codebook_weight * out["ae"].vq_loss.float()
        metrics = {
            "loss": self.combine(ae_loss, tasks),
            "ae_loss": ae_loss,
            **self.reconstruction_quality(recon, image),
            **{f"{k}_loss": v for k, v in tasks.items()},
        }
        if "seg" in out:
            prediction = torch.softmax(out["seg"].float(), dim=1)[:, 1:2] > 0.5
            counts = overlap_counts(prediction, batch["mask"])
            self._seg_counts.append(counts.cpu())
            metrics["dice"] = dice_iou_from_counts(counts)[0].float()
        if "cls" in out:
            valid = batch["label"] >= 0
            if bool(valid.any()):
                correct = out["cls"][valid].argmax(dim=1) == batch["label"][valid]
                metrics["accuracy"] = correct.float().mean()
        return metrics

    def validation_epoch_end(self) -> dict[str, torch.Tensor]:
        """SSIM and PSNR over every image, and the global Dice over every pixel, of the pass."""
        metrics = self.reconstruction_quality_of_pass()
        if not metrics:
            return {}
        if len(self._seg_counts) > 0:
            metrics["dice"] = dice_iou_from_counts(self._seg_counts.get_buffer().sum(dim=0))[0].float()
        return metrics

    # -- evaluation -----------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 1, *S) in [0, 1]."""
        return self.autoencoder(image).recon.clamp(0.0, 1.0)

    @torch.no_grad()
    def predict_segmentation(self, image: torch.Tensor) -> torch.Tensor:
        """Nodule probability (B, 1, *S) from the seg head."""
        if self.seg_head is None:
            raise RuntimeError(f"multihead.{self.name} has no seg head (heads: {list(self.heads)})")
        hidden = self.encoder().feature_maps(image)
        return torch.softmax(self.seg_head(image, hidden).float(), dim=1)[:, 1:2]

    @torch.no_grad()
    def predict_classification(self, image: torch.Tensor) -> torch.Tensor:
        """Probability of a nodule slice (B,) from the cls head."""
        if self.cls_head is None:
            raise RuntimeError(f"multihead.{self.name} has no cls head (heads: {list(self.heads)})")
        return torch.softmax(self.cls_head(self.encoder().latent(image)).float(), dim=1)[:, 1]

    @torch.no_grad()
    def encoder_feature_maps(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The shared encoder's maps, shallow to deep (for feature-map figures)."""
        return list(self.encoder().feature_maps(image))
