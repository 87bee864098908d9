"""Seed 002's canonical chest: the mean radiograph that an alignment STN maps every radiograph onto.

Seed 002 (chest X-ray alignment with a spatial transformer; Jaderberg et al., "Spatial
Transformer Networks", NeurIPS 2015, arXiv:1506.02025) crops each training radiograph
to its lungs, resizes the crops to one size (320 x 256) and averages them
(:func:`canonical_chest`). Without lung masks the whole radiographs are averaged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.transforms import Resize
from monai.transforms.utils import generate_spatial_bounding_box

from chestssl.data.affine import size_pair


def _as_2d_list(items: torch.Tensor | np.ndarray | Sequence, key: str) -> list[torch.Tensor]:
    """A batch (N, 1, H, W) / (N, H, W) or a sequence of (1, H, W) / (H, W) -> N float (H, W) tensors."""
    if isinstance(items, (torch.Tensor, np.ndarray)):
        array = torch.as_tensor(items)
        if array.ndim == 4 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 3:
            raise ValueError(f"{key}: expected shape (N, 1, H, W) or (N, H, W), got {tuple(array.shape)}")
        items = list(array)
    result = []
    for index, item in enumerate(items):
        image = torch.as_tensor(item)
        if image.ndim == 3 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 2:
            raise ValueError(f"{key}[{index}]: expected shape (1, H, W) or (H, W), got {tuple(image.shape)}")
        result.append(image)
    if not result:
        raise ValueError(f"{key}: no radiographs given; the canonical chest is a mean over at least one")
    return result


def lung_bounding_box(mask: torch.Tensor) -> tuple[slice, slice] | None:
    """(rows, columns) slices of the non-zero pixels of an (H, W) mask; None when it is empty."""
    start, end = generate_spatial_bounding_box(torch.as_tensor(mask)[None], select_fn=lambda m: m > 0)
    if any(stop <= begin for begin, stop in zip(start, end)):
        return None
    return slice(start[0], end[0]), slice(start[1], end[1])


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) -> (1, H', W') with MONAI's ``Resize``, one axis at a time: area averaging where
    an axis shrinks (anti-aliased), bilinear where it grows.

    MONAI's ``anti_aliasing`` option smooths with zero padding, which darkens the border
    of every crop; area averaging does not.
    """
    resized = image[None]
    for axis, target in enumerate(size, start=1):
        current = resized.shape[axis]
        if current == target:
            continue
        shape = list(resized.shape[1:])
        shape[axis - 1] = target
        if target < current:
            resized = Resize(shape, mode="area")(resized)
        else:
            resized = Resize(shape, mode="bilinear", align_corners=False)(resized)
    return torch.as_tensor(resized).to(torch.float32)


def canonical_chest(
    images: torch.Tensor | np.ndarray | Sequence,
    lung_masks: torch.Tensor | np.ndarray | Sequence | None = None,
    *,
    size: int | Sequence[int],
) -> torch.Tensor:
    """Seed 002's canonical chest: the mean of radiographs cropped to the lungs and resized.

    Args:
        images: N radiographs, a batch (N, 1, H, W) / (N, H, W) or a sequence of
            (1, H_i, W_i) / (H_i, W_i) arrays (sizes may differ).
        lung_masks: the lung masks of the same radiographs in the same forms (non-zero =
            lung); each radiograph is cropped to its mask's bounding box. None: the whole
            radiographs are used.
        size: (H', W') of the canonical chest (seed 002: 320 x 256), or one int for both.

    Returns the mean of the crops, each resized to ``size`` (:func:`_resize`): (1, H', W')
    float32.
    """
    height, width = size_pair(size, "canonical size")
    radiographs = _as_2d_list(images, "images")
    masks = None if lung_masks is None else _as_2d_list(lung_masks, "lung_masks")
    if masks is not None and len(masks) != len(radiographs):
        raise ValueError(
            f"lung_masks: {len(masks)} masks for {len(radiographs)} radiographs; expected one per radiograph"
        )
    total = torch.zeros(1, height, width, dtype=torch.float32)
    for index, radiograph in enumerate(radiographs):
        radiograph = radiograph.to(torch.float32)
        if masks is not None:
            if tuple(masks[index].shape) != tuple(radiograph.shape):
                raise ValueError(
                    f"lung_masks[{index}]: shape {tuple(masks[index].shape)} differs from its radiograph's "
                    f"{tuple(radiograph.shape)}"
                )
            box = lung_bounding_box(masks[index])
            if box is None:
                raise ValueError(
                    f"lung_masks[{index}]: no lung pixel (the mask is all zeros); expected non-zero = lung"
                )
            radiograph = radiograph[box]
        total += _resize(radiograph, (height, width))
    return total / len(radiographs)
