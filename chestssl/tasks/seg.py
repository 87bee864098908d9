"""Nodule segmentation on a pretrained encoder (seed 000's downstream task).

Architectures (the ``arch`` param), two output channels (background, nodule) with
softmax; the nodule probability is ``softmax(logits)[:, 1]``:

- ``unetpp``: UNet++ (Zhou et al., DLMIA 2018, arXiv:1807.10165), MONAI
  ``BasicUNetPlusPlus``, on a ``unet_encoder`` (its own down path) or a
  ``cnn_attention`` encoder (its levels replace the UNet++'s shallow down blocks, as
  seed 000 built it);
- ``swin_unetr``: Swin UNETR (Hatamizadeh et al., BrainLes 2021), MONAI ``SwinUNETR``,
  on a ``swin`` encoder loaded into ``swinViT``.

Losses (the ``loss`` param: ``ce``, ``dice``, ``focal``, as seed 000 compared them):
:func:`chestssl.models.losses.make_seg_loss`. Dice and IoU over a validation pass:
:mod:`chestssl.models.overlap`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from monai.metrics import Cumulative, compute_dice, compute_iou
from torch import nn

from chestssl.models.losses import make_seg_loss
from chestssl.models.overlap import dice_iou_from_counts, overlap_counts
from chestssl.models.unet import UNetEncoder, unetpp_from_encoder
from chestssl.params import SEG_ARCH_BACKBONES
from chestssl.tasks.base import TaskModel

#: Architectures of the ``seg`` task (the ``arch`` param) -> the backbones each accepts.
SEG_ARCHS: dict[str, tuple[str, ...]] = SEG_ARCH_BACKBONES


def build_seg_loss(run_cfg: Mapping[str, Any]) -> nn.Module:
    """The loss named by ``run_cfg["loss"]`` with the run's class weights and focal settings."""
    return make_seg_loss(run_cfg.get("loss"), run_cfg["class_weights"], run_cfg["focal_gamma"], run_cfg["focal_alpha"])


def build_seg_network(arch: str, encoder: nn.Module, seed: int) -> nn.Module:
    """The segmentation network of ``arch`` around (a copy of) ``encoder``; decoder seeded."""
    if arch == "swin_unetr":
        from chestssl.models.swin import swin_unetr_from_encoder

        return swin_unetr_from_encoder(encoder, out_channels=2, seed=seed)
    if isinstance(encoder, UNetEncoder):
        return unetpp_from_encoder(encoder, out_channels=2, seed=seed)
    from chestssl.models.cnn_attention import unetpp_from_cnn_attention

    return unetpp_from_cnn_attention(encoder, out_channels=2, seed=seed)


class SegmentationTask(TaskModel):
    """UNet++ or Swin UNETR whose encoder starts from ``encoder``; the whole network is trained.

    ``forward(image (B, 1, *S)) -> logits (B, 2, *S)``;
    ``predict(batch) -> nodule probability (B, 1, *S)``.

    Args:
        name, run_cfg, seed: see :class:`~chestssl.tasks.base.TaskModel`; ``run_cfg``
            holds ``arch``, ``loss``, ``class_weights``, ``focal_gamma``, ``focal_alpha``.
        encoder: the pretrained backbone (copied into the network).
        threshold: probability above which a pixel counts as nodule in the metrics.
    """

    def __init__(
        self, name: str, run_cfg: Mapping[str, Any], encoder: nn.Module, seed: int, threshold: float = 0.5
    ):
        super().__init__(name, run_cfg, seed)
        arch = self.checked_arch(SEG_ARCHS, encoder)
        self.threshold = float(threshold)
        self.arch = arch
        self.network = build_seg_network(arch, encoder, self.seed)
        self.loss_fn = build_seg_loss(self.run_cfg)
        self._epoch_counts = self.register_accumulator(Cumulative())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.network(image)
        return out[0] if isinstance(out, (list, tuple)) else out

    @torch.no_grad()
    def encoder_feature_maps(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's maps inside the network, shallow to deep (for feature-map figures)."""
        if self.arch == "swin_unetr":
            return list(self.network.swinViT(image, self.network.normalize))
        maps, x = [], image
        for name in ("conv_0_0", "conv_1_0", "conv_2_0", "conv_3_0", "conv_4_0"):
            x = getattr(self.network, name)(x)
            maps.append(x)
        return maps

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        logits = self(batch["image"])
        return {"loss": self.loss_fn(logits.float(), batch["mask"])}

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``loss``, and ``dice`` / ``iou`` over all pixels of the batch at ``threshold``.

        Dice of one batch-wide mask (seed 000's micro average), 1 when prediction and
        truth are both empty. The pixel counts are also accumulated for the epoch.
        """
        logits = self(batch["image"]).float()
        mask = batch["mask"]
        prediction = (torch.softmax(logits, dim=1)[:, 1:2] > self.threshold).float()
        flat_prediction, flat_mask = prediction.reshape(1, 1, -1), mask.reshape(1, 1, -1).float()
        self._epoch_counts.append(overlap_counts(prediction, mask).cpu())
        return {
            "loss": self.loss_fn(logits, mask),
            "dice": compute_dice(flat_prediction, flat_mask, ignore_empty=False).reshape(()),
            "iou": compute_iou(flat_prediction, flat_mask, ignore_empty=False).reshape(()),
        }

    def validation_epoch_end(self) -> dict[str, torch.Tensor]:
        """Global ``dice`` and ``iou`` over every pixel of the current validation pass."""
        if len(self._epoch_counts) == 0:
            return {}
        counts = self._epoch_counts.get_buffer().sum(dim=0)
        dice, iou = dice_iou_from_counts(counts)
        return {"dice": dice.float(), "iou": iou.float()}

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Nodule probability (B, 1, *S) for ``batch["image"]`` (B, 1, *S)."""
        return torch.softmax(self(batch["image"]).float(), dim=1)[:, 1:2]
