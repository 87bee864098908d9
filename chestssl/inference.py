"""Batched inference over a dataset, gathering outputs and item metadata."""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

#: Image voxels per forward pass at most: 64 slices of 64x64 (or studies of two), 32 of
#: 128x128, or two 64^3 crops. The window attention of a 3D Swin transformer over 64^3
#: crops holds about 0.4 GB per crop even without gradients (an evaluation stage on CPU
#: peaks at 2.0 GB with four crops per pass, 1.0 GB with one).
MAX_VOXELS_PER_PASS = 2 * 64**3


def auto_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict_dataset(
    predict: Callable[[dict], torch.Tensor],
    dataset: Dataset,
    batch_size: int = 64,
    device: torch.device | None = None,
    keep: tuple[str, ...] = ("image", "mask", "label", "patient_id", "scan_id", "slice_index"),
) -> dict[str, np.ndarray]:
    """Run ``predict(batch) -> Tensor`` over ``dataset`` in order.

    ``batch_size`` items per forward pass at most, fewer for large items (at most
    :data:`MAX_VOXELS_PER_PASS` image voxels; at least one item). Returns
    ``{"output": (N, ...)}`` plus the ``keep`` fields of every item, as numpy arrays in
    dataset order (no shuffling), so outputs line up with patients.
    """
    device = device or auto_device()
    gathered: dict[str, list] = {"output": []}
    for batch in DataLoader(dataset, batch_size=items_per_pass(dataset, batch_size), shuffle=False):
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        gathered["output"].append(predict(on_device).float().cpu().numpy())
        for key in keep:
            if key in batch:
                value = batch[key]
                gathered.setdefault(key, []).append(
                    value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
                )
    if not gathered["output"]:
        raise ValueError("cannot predict on an empty dataset")
    return {key: np.concatenate(parts) for key, parts in gathered.items()}


def items_per_pass(dataset: Dataset, batch_size: int) -> int:
    """``batch_size``, or fewer so that a pass holds at most :data:`MAX_VOXELS_PER_PASS`
    voxels of the items' ``image`` (read from the first item)."""
    if len(dataset) == 0:
        return batch_size
    item = dataset[0]
    image = item.get("image") if isinstance(item, Mapping) else None
    if not isinstance(image, torch.Tensor) or image.numel() == 0:
        return batch_size
    return max(1, min(batch_size, MAX_VOXELS_PER_PASS // image.numel()))
