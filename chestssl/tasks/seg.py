"""Nodule segmentation on a pretrained encoder (seed 000's downstream task).

Architectures (the ``arch`` param), two output channels (background, nodule) with
softmax; the nodule probability is ``softmax(logits)[:, 1]``:

- ``unetpp``: UNet++ (Zhou et al., DLMIA 2018, arXiv:1807.10165), MONAI
  ``BasicUNetPlusPlus``, on a ``unet_encoder`` (its own down path) or a
  ``cnn_attention`` encoder (its levels replace the UNet++'s shallow down blocks, as
  seed 000 built it);
- ``swin_unetr``: Swin UNETR (Hatamizadeh et al., BrainLes 2021), MONAI ``SwinUNETR``,
  on a ``swin`` encoder loaded into ``swinViT``.

Losses, as seed 000 compared them:

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

from typing import Any, Mapping, Sequence

import torch
from monai.losses import DiceLoss, FocalLoss
from monai.metrics import Cumulative, compute_dice, compute_iou
from torch import nn

from chestssl.models.unet import UNetEncoder, unetpp_from_encoder
from chestssl.tasks.base import TaskModel, class_weight_tensor

#: Architectures of the ``seg`` task (the ``arch`` param) -> the backbones each accepts.
SEG_ARCHS: dict[str, tuple[str, ...]] = {"unetpp": ("unet_encoder", "cnn_attention"), "swin_unetr": ("swin",)}


class WeightedCrossEntropy(nn.Module):
    """Class-weighted cross-entropy for logits (B, 2, *S) and a binary mask (B, 1, *S).

    torch's mean over pixels weighted by the weight of each pixel's true class.
    """

    def __init__(self, class_weights: torch.Tensor):
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(weight=class_weights)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.cross_entropy(logits, mask[:, 0].long())


#: Segmentation losses (the ``loss`` param of a seg run, ``seg_loss`` of a multihead entry).
SEG_LOSSES = ("ce", "dice", "focal")


def make_seg_loss(
    kind: str,
    class_weights: Sequence[float],
    focal_gamma: float,
    focal_alpha: float,
    where: str = "runs.run",
    keys: tuple[str, str] = ("loss", "class_weights"),
) -> nn.Module:
    """The segmentation loss ``kind``; it takes (logits (B, 2, *S), mask (B, 1, *S)).

    ``where`` is the params entry and ``keys`` the names of its loss and class-weight
    params, for error messages (e.g. ``runs.seg_unetpp.loss``).
    """
    if kind == "ce":
        return WeightedCrossEntropy(class_weight_tensor(class_weights, f"{where}.{keys[1]}"))
    if kind == "dice":
        return DiceLoss(
            include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
        )
    if kind == "focal":
        return FocalLoss(to_onehot_y=True, use_softmax=True, gamma=float(focal_gamma), alpha=float(focal_alpha))
    raise ValueError(f"{where}.{keys[0]}: got {kind!r}, expected one of {', '.join(map(repr, SEG_LOSSES))}")


def build_seg_loss(run_cfg: Mapping[str, Any], name: str = "run") -> nn.Module:
    """The loss named by ``run_cfg["loss"]`` with the run's class weights and focal settings."""
    return make_seg_loss(
        run_cfg.get("loss"), run_cfg["class_weights"], run_cfg["focal_gamma"], run_cfg["focal_alpha"], f"runs.{name}"
    )


def build_seg_network(arch: str, encoder: nn.Module, seed: int) -> nn.Module:
    """The segmentation network of ``arch`` around (a copy of) ``encoder``; decoder seeded."""
    if arch == "swin_unetr":
        from chestssl.models.swin import swin_unetr_from_encoder

        return swin_unetr_from_encoder(encoder, out_channels=2, seed=seed)
    if isinstance(encoder, UNetEncoder):
        return unetpp_from_encoder(encoder, out_channels=2, seed=seed)
    from chestssl.models.cnn_attention import unetpp_from_cnn_attention

    return unetpp_from_cnn_attention(encoder, out_channels=2, seed=seed)


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
        self.loss_fn = build_seg_loss(self.run_cfg, name)
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
