"""Nodule segmentation with UNet++ on a pretrained encoder (seed 000's downstream task).

UNet++: Zhou et al., DLMIA 2018 (arXiv:1807.10165), MONAI ``BasicUNetPlusPlus``, two
output channels (background, nodule) with softmax; the nodule probability is
``softmax(logits)[:, 1]``. Losses, as seed 000 compared them:

- ``ce``: cross-entropy with ``class_weights`` (seed 000: [1, 50]);
- ``dice``: soft Dice on the nodule channel over the whole batch (one Dice for all
  pixels of the batch), smoothing 1e-5 (Milletari et al., "V-Net", 3DV 2016), MONAI
  ``DiceLoss``;
- ``focal``: focal loss with ``focal_gamma`` and ``focal_alpha`` (alpha for the nodule
  class, 1 - alpha for background; Lin et al., "Focal Loss for Dense Object
  Detection", ICCV 2017), MONAI ``FocalLoss``.

``class_weights`` apply to ``ce`` only; ``focal`` balances classes with alpha.
With two softmax channels, softmax(l)[1] = sigmoid(l1 - l0), so the Dice and focal
losses equal seed 000's sigmoid versions on the logit difference.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from monai.losses import DiceLoss, FocalLoss
from monai.metrics import Cumulative, compute_dice, compute_iou
from torch import nn

from chestssl.models.unet import unetpp_from_encoder
from chestssl.tasks.base import TaskModel, class_weight_tensor

#: Architectures of the ``seg`` task (the ``arch`` param).
SEG_ARCHS = ("unetpp",)


class WeightedCrossEntropy(nn.Module):
    """Class-weighted cross-entropy for logits (B, 2, *S) and a binary mask (B, 1, *S).

    torch's mean over pixels weighted by the weight of each pixel's true class.
    """

    def __init__(self, class_weights: torch.Tensor):
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(weight=class_weights)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.cross_entropy(logits, mask[:, 0].long())


def _ce(run_cfg: Mapping[str, Any], name: str) -> nn.Module:
    return WeightedCrossEntropy(class_weight_tensor(run_cfg["class_weights"], name))


def _dice(run_cfg: Mapping[str, Any], name: str) -> nn.Module:
    return DiceLoss(
        include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
    )


def _focal(run_cfg: Mapping[str, Any], name: str) -> nn.Module:
    return FocalLoss(
        to_onehot_y=True,
        use_softmax=True,
        gamma=float(run_cfg["focal_gamma"]),
        alpha=float(run_cfg["focal_alpha"]),
    )


#: Loss builders keyed by the ``loss`` param; each loss takes (logits (B, 2, *S), mask (B, 1, *S)).
SEG_LOSSES: dict[str, Callable[[Mapping[str, Any], str], nn.Module]] = {"ce": _ce, "dice": _dice, "focal": _focal}


def build_seg_loss(run_cfg: Mapping[str, Any], name: str = "run") -> nn.Module:
    """The loss named by ``run_cfg["loss"]``."""
    kind = run_cfg.get("loss")
    if kind not in SEG_LOSSES:
        raise ValueError(f"runs.{name}.loss: got {kind!r}, expected one of {', '.join(map(repr, SEG_LOSSES))}")
    return SEG_LOSSES[kind](run_cfg, name)


def overlap_counts(prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(intersection, predicted pixels, true pixels) of two binary tensors, as float64 (3,)."""
    prediction, mask = prediction.bool(), mask.bool()
    return torch.stack([(prediction & mask).sum(), prediction.sum(), mask.sum()]).double()


def dice_iou_from_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU from (intersection, predicted, true) sums; 1 when both masks are empty."""
    intersection, predicted, true = counts.unbind(-1)
    union = predicted + true - intersection
    if float(predicted + true) == 0.0:
        one = torch.ones((), dtype=counts.dtype, device=counts.device)
        return one, one
    return 2.0 * intersection / (predicted + true), intersection / union


class SegmentationTask(TaskModel):
    """UNet++ whose encoder blocks start from ``encoder``; the whole network is trained.

    ``forward(image (B, 1, *S)) -> logits (B, 2, *S)``;
    ``predict(batch) -> nodule probability (B, 1, *S)``.

    Args:
        name, run_cfg, seed: see :class:`~chestssl.tasks.base.TaskModel`; ``run_cfg``
            holds ``arch``, ``loss``, ``class_weights``, ``focal_gamma``, ``focal_alpha``.
        encoder: the pretrained :class:`UNetEncoder` (copied into the UNet++).
        threshold: probability above which a pixel counts as nodule in the metrics.
    """

    def __init__(
        self, name: str, run_cfg: Mapping[str, Any], encoder: nn.Module, seed: int, threshold: float = 0.5
    ):
        super().__init__(name, run_cfg, seed)
        arch = self.checked_arch(SEG_ARCHS, encoder)
        self.threshold = float(threshold)
        self.network = unetpp_from_encoder(encoder, out_channels=2, seed=self.seed)
        self.loss_fn = build_seg_loss(self.run_cfg, name)
        self._epoch_counts = self.register_accumulator(Cumulative())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)[0]

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
