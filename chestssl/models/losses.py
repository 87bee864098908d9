"""Losses shared by the pretext methods and the downstream tasks, and seed 002's alignment loss.

Segmentation losses (:func:`make_seg_loss`: the ``loss`` param of a seg run, ``seg_loss``
of a multihead entry), as seed 000 compared them; each takes (logits (B, 2, *S), mask
(B, 1, *S)):

- ``ce``: cross-entropy with ``class_weights`` (seed 000: [1, 50]; :class:`WeightedCrossEntropy`);
- ``dice``: soft Dice on the nodule channel over the whole batch (one Dice for all
  pixels of the batch), smoothing 1e-5 (Milletari et al., "V-Net", 3DV 2016), MONAI
  ``DiceLoss``;
- ``focal``: focal loss with ``focal_gamma`` and ``focal_alpha`` (alpha for the nodule
  class, 1 - alpha for background; Lin et al., "Focal Loss for Dense Object
  Detection", ICCV 2017), MONAI ``FocalLoss``.

``class_weights`` apply to ``ce`` only; ``focal`` balances classes with alpha. With two
softmax channels, softmax(l)[1] = sigmoid(l1 - l0), so the Dice and focal losses equal
seed 000's sigmoid versions on the logit difference. :func:`class_weight_tensor` checks
class weights for the classification heads too.

Alignment (seed 002; Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015,
arXiv:1506.02025): :class:`AlignmentLoss`, ``pixel_weight * MSE(aligned, canonical) +
MSE(f(aligned), f(canonical))`` with a frozen feature network ``f``
(:class:`EncoderFeatures` makes one of a pretrained encoder).

The other losses of the project sit next to the models they train: the cross-modal
contrastive loss (:mod:`chestssl.models.supervised_contrastive`), the perceptual loss
(:mod:`chestssl.models.perceptual`), the adversarial losses (:mod:`chestssl.models.adversarial`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

#: Segmentation losses (the ``loss`` param of a seg run, ``seg_loss`` of a multihead entry).
SEG_LOSSES = ("ce", "dice", "focal")
#: Weight of the pixel MSE against the feature MSE in :class:`AlignmentLoss` (seed 002).
DEFAULT_PIXEL_WEIGHT = 15.0


# --------------------------------------------------------------------------------------
# Classification and segmentation
# --------------------------------------------------------------------------------------


def class_weight_tensor(weights: Sequence[float]) -> torch.Tensor:
    """Class weights as a (2,) float32 tensor; refuses all-zero weights (nothing to learn)."""
    tensor = torch.as_tensor([float(w) for w in weights], dtype=torch.float32)
    if tensor.numel() != 2 or bool((tensor < 0).any()) or float(tensor.sum()) == 0.0:
        raise ValueError(
            f"class weights: got {list(weights)}, expected 2 non-negative weights "
            "(background/clean, nodule) that are not both 0"
        )
    return tensor


def balanced_class_weights(counts: Sequence[float], key: str, classes: Sequence[str]) -> list[float]:
    """sklearn's "balanced" weights ``n_items / (n_classes * n_items_of_the_class)`` for the
    ``counts`` of a training set, one per class (expected counts per epoch where items are
    drawn); ``key`` names the param in the error for a class without items."""
    empty = [cls for cls, count in zip(classes, counts) if count <= 0]
    if empty:
        raise ValueError(
            f"{key}: 'balanced' weighs each class by its share of the training set, but the "
            f"training set of {sum(counts):g} slice(s) holds no {' and no '.join(empty)} slice; give explicit "
            "weights, or draw clean slices (slices.clean_per_nodule_slice > 0) from a split that has them"
        )
    total = float(sum(counts))
    return [total / (len(classes) * float(count)) for count in counts]


class WeightedCrossEntropy(nn.Module):
    """Class-weighted cross-entropy for logits (B, 2, *S) and a binary mask (B, 1, *S).

    torch's mean over pixels weighted by the weight of each pixel's true class.
    """

    def __init__(self, class_weights: torch.Tensor):
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(weight=class_weights)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.cross_entropy(logits, mask[:, 0].long())


def make_seg_loss(
    kind: str,
    class_weights: Sequence[float],
    focal_gamma: float,
    focal_alpha: float,
) -> nn.Module:
    """The segmentation loss ``kind``; it takes (logits (B, 2, *S), mask (B, 1, *S))."""
    if kind == "ce":
        return WeightedCrossEntropy(class_weight_tensor(class_weights))
    if kind == "dice":
        return DiceLoss(
            include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
        )
    if kind == "focal":
        return FocalLoss(to_onehot_y=True, use_softmax=True, gamma=float(focal_gamma), alpha=float(focal_alpha))
    raise ValueError(f"unknown segmentation loss {kind!r}; known: {', '.join(map(repr, SEG_LOSSES))}")


# --------------------------------------------------------------------------------------
# Alignment (seed 002)
# --------------------------------------------------------------------------------------


class EncoderFeatures(nn.Module):
    """A pretrained encoder as :class:`AlignmentLoss`'s feature network.

    ``forward(x)``: (B, 1, H, W) -> the encoder's ``feature_maps(x)`` (a list of maps
    (B, C_i, H_i, W_i), shallow to deep, as every backbone of
    :mod:`chestssl.models.backbones` gives), or ``representation(x)`` (B, D) for an encoder
    without maps. The loss freezes it (no parameter requires gradients, eval mode);
    gradients still flow through it to ``x``, which is how the loss reaches the STN.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        has_maps = callable(getattr(encoder, "feature_maps", None))
        if not has_maps and not callable(getattr(encoder, "representation", None)):
            raise ValueError(f"{type(encoder).__name__} has neither feature_maps() nor representation(); "
                             "the alignment loss needs a backbone of chestssl.models.backbones")
        self.encoder = encoder
        self._use_maps = has_maps

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, 1, H, W) -> list of (B, C_i, H_i, W_i) maps, or (B, D)."""
        if self._use_maps:
            return list(self.encoder.feature_maps(x))
        return self.encoder.representation(x)


def _feature_list(features: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [features] if isinstance(features, torch.Tensor) else list(features)


class AlignmentLoss(nn.Module):
    """Seed 002's loss: ``pixel_weight * MSE(aligned, canonical) + MSE(f(aligned), f(canonical))``.

    Args:
        feature_net: any module mapping (B, 1, H, W) images to features, a tensor or a
            list/tuple of tensors (in the pipeline an encoder trained earlier, through
            :class:`EncoderFeatures`; nothing is downloaded). It is frozen: its parameters
            never require gradients, and it stays in eval mode even when a parent calls
            ``train()``. Gradients flow through it to the aligned image. With several
            feature maps the feature term is the mean of their MSEs.
        pixel_weight: weight of the pixel term (seed: 15).

    ``forward(aligned (B, 1, H, W), canonical (1, H, W) or (B, 1, H, W))`` -> dict with
    ``loss`` (optimised), ``pixel`` and ``feature`` (the unweighted terms, detached), all 0-d.
    """

    def __init__(self, feature_net: nn.Module, pixel_weight: float = DEFAULT_PIXEL_WEIGHT):
        super().__init__()
        if isinstance(pixel_weight, bool) or not isinstance(pixel_weight, (int, float)) or pixel_weight < 0:
            raise ValueError(f"pixel_weight: got {pixel_weight!r}, expected a number >= 0")
        self.pixel_weight = float(pixel_weight)
        self.feature_net = feature_net
        for parameter in self.feature_net.parameters():
            parameter.requires_grad_(False)
        self.feature_net.eval()

    def train(self, mode: bool = True) -> "AlignmentLoss":
        """Set the mode of this module; the feature network stays in eval mode."""
        super().train(mode)
        self.feature_net.eval()
        return self

    def forward(self, aligned: torch.Tensor, canonical: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 1, H, W) aligned and (1, H, W) / (B, 1, H, W) canonical -> {loss, pixel, feature}."""
        if aligned.ndim != 4 or aligned.shape[1] != 1 or not torch.is_floating_point(aligned):
            raise ValueError(f"AlignmentLoss: expected aligned radiographs of shape (B, 1, H, W), floating point, "
                             f"got {tuple(aligned.shape)} {aligned.dtype}")
        target = canonical[None] if canonical.ndim == 3 else canonical
        if target.ndim != 4 or target.shape[1] != 1 or target.shape[2:] != aligned.shape[2:]:
            raise ValueError(
                f"AlignmentLoss: canonical of shape {tuple(canonical.shape)} does not match aligned images "
                f"{tuple(aligned.shape)}; expected (1, {aligned.shape[2]}, {aligned.shape[3]}) (the STN's output_size)"
            )
        if target.shape[0] not in (1, aligned.shape[0]):
            raise ValueError(f"AlignmentLoss: {target.shape[0]} canonical images for a batch of {aligned.shape[0]}")
        target = target.to(aligned)
        pixel = F.mse_loss(aligned, target.expand_as(aligned))
        with torch.no_grad():
            target_features = _feature_list(self.feature_net(target))
        aligned_features = _feature_list(self.feature_net(aligned))
        if len(aligned_features) != len(target_features):
            raise ValueError("AlignmentLoss: the feature network returned a different number of maps per call")
        feature = torch.stack(
            [F.mse_loss(mine, theirs.expand_as(mine)) for mine, theirs in zip(aligned_features, target_features)]
        ).mean()
        return {"loss": self.pixel_weight * pixel + feature, "pixel": pixel.detach(), "feature": feature.detach()}
