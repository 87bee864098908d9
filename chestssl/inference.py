"""Batched inference over a dataset, gathering outputs and item metadata."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


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

    Returns ``{"output": (N, ...)}`` plus the ``keep`` fields of every item, as numpy
    arrays in dataset order (no shuffling), so outputs line up with patients.
    """
    device = device or auto_device()
    gathered: dict[str, list] = {"output": []}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
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

