"""Batched inference: outputs in dataset order, passes bounded in voxels."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from chestssl.inference import MAX_VOXELS_PER_PASS, predict_dataset


class Images(Dataset):
    def __init__(self, count: int, shape: tuple[int, ...]) -> None:
        self.count, self.shape = count, shape

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.full(self.shape, float(index)), "patient_id": f"p{index}"}


def test_outputs_follow_the_dataset_and_passes_hold_a_bounded_number_of_voxels():
    sizes = []

    def predict(batch):
        sizes.append(len(batch["image"]))
        return batch["image"].flatten(1).mean(1)

    slices = predict_dataset(predict, Images(70, (1, 64, 64)), device=torch.device("cpu"))
    assert sizes == [64, 6], "64 slices of 64x64 per pass, as asked"
    assert np.array_equal(slices["output"], np.arange(70, dtype=np.float32))
    assert list(slices["patient_id"]) == [f"p{i}" for i in range(70)]

    sizes.clear()
    predict_dataset(predict, Images(40, (1, 128, 128)), device=torch.device("cpu"))
    assert sizes == [32, 8], "32 slices of 128x128 per pass"
    sizes.clear()
    crops = predict_dataset(predict, Images(6, (1, 64, 64, 64)), device=torch.device("cpu"))
    assert sizes == [2, 2, 2] and MAX_VOXELS_PER_PASS == 2 * 64**3, "two 64^3 crops per pass, not 64"
    assert np.array_equal(crops["output"], np.arange(6, dtype=np.float32))
    sizes.clear()
    predict_dataset(predict, Images(2, (1, 96, 96, 96)), device=torch.device("cpu"))
    assert sizes == [1, 1], "at least one item per pass"
