"""Dice and IoU of a segmentation head over a validation pass, from accumulated overlap counts.

A validation pass adds up, batch by batch, the (intersection, predicted, true) pixel
counts of each batch (:func:`overlap_counts`); the global Dice and IoU over every pixel
of the pass follow from the sums (:func:`dice_iou_from_counts`). Shared by the models
with a segmentation head that the loop validates: the segmentation task
(:mod:`chestssl.tasks.seg`) and the multihead models (:mod:`chestssl.methods.multihead`).
The test-split metrics with intervals are :mod:`chestssl.eval.metrics`.
"""

from __future__ import annotations

import torch


def overlap_counts(prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(intersection, predicted pixels, true pixels) of two binary tensors of one shape, as float64 (3,)."""
    prediction, mask = prediction.bool(), mask.bool()
    return torch.stack([(prediction & mask).sum(), prediction.sum(), mask.sum()]).double()


def dice_iou_from_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU (0-d each) from (3,) (intersection, predicted, true) sums; 1 when both masks are empty."""
    intersection, predicted, true = counts.unbind(-1)
    union = predicted + true - intersection
    if float(predicted + true) == 0.0:
        one = torch.ones((), dtype=counts.dtype, device=counts.device)
        return one, one
    return 2.0 * intersection / (predicted + true), intersection / union
