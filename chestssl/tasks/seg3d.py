"""3D nodule segmentation on a pretrained 3D Swin encoder (seed 003's downstream task).

Seed 003 (Valanarasu et al., "Disruptive Autoencoders", arXiv:2307.16896) fine-tunes the
pretrained Swin UNETR (Hatamizadeh et al., BrainLes 2021) whole with MONAI's ``DiceCELoss``
and scores Dice without the background by sliding-window inference with overlap 0.5. Here
the task is LIDC's nodules (background, nodule) on the processed CT volumes, the network
MONAI's ``SwinUNETR`` with ``spatial_dims`` 3 whose ``swinViT`` is the ``init`` entry's
encoder (:func:`chestssl.models.swin.swin_unetr_from_encoder`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from monai.losses import DiceCELoss
from monai.metrics import Cumulative
from torch import nn

from chestssl.models.overlap import dice_iou_from_counts, overlap_counts
from chestssl.tasks.base import TaskModel


class Segmentation3DTask(TaskModel):
    """SwinUNETR 3D whose ``swinViT`` starts from ``encoder``; the whole network is trained.

    ``forward(image (B, 1, D, H, W)) -> logits (B, 2, D, H, W)``, every size a multiple of 32;
    ``predict(batch) -> nodule probability (B, 1, D, H, W)`` (softmax channel 1).

    Loss: ``DiceCELoss(to_onehot_y=True, softmax=True)`` on the two channels (seed 003).
    Validation: ``loss`` and the global ``dice`` / ``iou`` of the nodule over every voxel
    of the validation crops at ``threshold``.

    Args:
        name, run_cfg, seed: see :class:`~chestssl.tasks.base.TaskModel` (``run_cfg``: a
            validated ``runs_3d`` entry).
        encoder: a 3D :class:`~chestssl.models.swin.SwinEncoder` with patch size 2 (copied).
        threshold: probability above which a voxel counts as nodule.
    """

    def __init__(self, name: str, run_cfg: Mapping[str, Any], encoder: nn.Module, seed: int,
                 threshold: float = 0.5):
        from chestssl.models.swin import SwinEncoder, swin_unetr_from_encoder

        super().__init__(name, run_cfg, seed)
        if not isinstance(encoder, SwinEncoder) or encoder.spatial_dims != 3:
            raise ValueError(f"runs_3d.{name}: SwinUNETR 3D needs a 3D swin encoder, got "
                             f"{type(encoder).__name__} with spatial_dims {getattr(encoder, 'spatial_dims', None)}")
        self.threshold = float(threshold)
        self.network = swin_unetr_from_encoder(encoder, out_channels=2, seed=self.seed)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self._epoch_counts = self.register_accumulator(Cumulative())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": self.loss_fn(self(batch["image"]).float(), batch["mask"])}

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        logits = self(batch["image"]).float()
        prediction = (torch.softmax(logits, dim=1)[:, 1:2] > self.threshold).float()
        counts = overlap_counts(prediction, batch["mask"])
        self._epoch_counts.append(counts.cpu())
        dice, iou = dice_iou_from_counts(counts)
        return {"loss": self.loss_fn(logits, batch["mask"]), "dice": dice.float(), "iou": iou.float()}

    def validation_epoch_end(self) -> dict[str, torch.Tensor]:
        if len(self._epoch_counts) == 0:
            return {}
        dice, iou = dice_iou_from_counts(self._epoch_counts.get_buffer().sum(dim=0))
        return {"dice": dice.float(), "iou": iou.float()}

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return torch.softmax(self(batch["image"]).float(), dim=1)[:, 1:2]
