"""3D crops for volumetric pretraining (seed 003)."""

import pytest
import torch

from chestssl.data.crops import CropDataset
from chestssl.data.datasets import DatasetError


def test_crop_shapes_labels_and_malignancy(synthetic_processed):
    # 12 slices deep volumes, 16^3 crops: the depth is padded with air.
    data = CropDataset(synthetic_processed, "train", 16, crops_per_scan=4, positive_fraction=1.0, seed=0)
    assert len(data) == 8  # 2 train patients x 4
    item = data[0]
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 16, 16, 16)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    by_patient = {}
    for i in range(len(data)):
        by_patient.setdefault(data[i]["patient_id"], []).append(data[i])
    # p1 has a nodule and every crop is centred on it; p0 has none.
    assert all(int(it["label"]) == 1 and float(it["malignancy"]) == 4.0 for it in by_patient["p1"])
    assert all(int(it["label"]) == 0 and float(it["malignancy"]) == 0.0 for it in by_patient["p0"])
    assert all(float(it["mask"].sum()) > 0 for it in by_patient["p1"])
    # The crop centre is inside the nodule's slices 4..7 (z is padded by 2 above).
    assert all(0 <= it["slice_index"] < 16 for it in by_patient["p1"])


def test_crops_are_seeded(synthetic_processed):
    first = CropDataset(synthetic_processed, "val", 8, crops_per_scan=3, seed=1)
    again = CropDataset(synthetic_processed, "val", 8, crops_per_scan=3, seed=1)
    other = CropDataset(synthetic_processed, "val", 8, crops_per_scan=3, seed=2)
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)


def test_negative_crops_only_leave_nodules_out(synthetic_processed):
    data = CropDataset(synthetic_processed, "test", 8, crops_per_scan=6, positive_fraction=0.0, seed=0)
    centres_on_nodule = [float(data[i]["mask"][0, 4, 4, 4]) for i in range(len(data))]
    assert centres_on_nodule == [0.0] * len(data)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"size": 0}, "size: got 0"), ({"crops_per_scan": 0}, "crops_per_scan: got 0"),
     ({"positive_fraction": 1.5}, r"positive_fraction: got 1\.5, expected a number in \[0, 1\]")],
)
def test_bad_arguments_are_named(synthetic_processed, kwargs, key):
    args = {"size": 8, "crops_per_scan": 2, "positive_fraction": 0.5}
    args.update(kwargs)
    with pytest.raises(DatasetError, match=key):
        CropDataset(synthetic_processed, "train", args["size"], args["crops_per_scan"], args["positive_fraction"])
