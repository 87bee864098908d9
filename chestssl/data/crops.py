"""3D crops of the processed CT volumes (seed 003's protocol, Disruptive Autoencoders).

Seed 003 pretrains a 3D Swin UNETR on random 96^3 crops of CT volumes. Here the crops of
a split are drawn once, when the dataset is built, with MONAI's
``RandCropByPosNegLabeld`` seeded by ``seed``: per scan ``crops_per_scan`` crops, centred
on a nodule voxel or on a background voxel with probability ``positive_fraction`` /
``1 - positive_fraction`` (a scan without nodules gets only background crops). A volume
smaller than the crop in some axis is first padded with 0 (air after windowing). Fixed
crops keep the dataset map-style, so the training loop's data order, resume and
determinism work as for slices, and the same seed gives the same crops.

Items have the keys of :class:`chestssl.data.datasets.SliceDataset`, with 3D shapes:

- ``image``: (1, C, C, C) float32 in [0, 1]; ``mask``: (1, C, C, C) float32, 1 on
  nodule voxels;
- ``label``: int64, 1 if the crop holds more than ``min_nodule_voxels`` nodule voxels,
  else 0;
- ``malignancy``: float32, the highest median malignancy (``nodules.csv``) of the
  nodules in the crop, 0 without one;
- ``patient_id``, ``scan_id``: str; ``slice_index``: int, the axial index of the crop's
  centre in the processed volume.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd
from torch.utils.data import Dataset

from chestssl.data.datasets import DatasetError
from chestssl.data.processed import SPLITS, load_scan, read_nodules, read_slices


class CropDataset(Dataset):
    """Fixed random 3D crops of one split's scans.

    Args:
        processed_dir: the ``data/processed`` folder.
        split: ``train``, ``val`` or ``test``.
        size: side C of the cubic crops (``crops.size`` in params.yaml).
        crops_per_scan: crops drawn from each scan (``crops.per_scan``).
        positive_fraction: probability that a crop is centred on a nodule voxel
            (``crops.positive_fraction``).
        seed: seeds the crop positions.
        min_nodule_voxels: a crop with more nodule voxels than this is labelled 1.
    """

    def __init__(
        self,
        processed_dir: str | Path,
        split: str,
        size: int,
        crops_per_scan: int,
        positive_fraction: float = 0.5,
        seed: int = 0,
        min_nodule_voxels: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise DatasetError(f"split: got {split!r}, expected one of {', '.join(SPLITS)}")
        if not isinstance(size, int) or size < 1:
            raise DatasetError(f"size: got {size!r}, expected a positive integer")
        if not isinstance(crops_per_scan, int) or crops_per_scan < 1:
            raise DatasetError(f"crops_per_scan: got {crops_per_scan!r}, expected a positive integer")
        if not 0.0 <= positive_fraction <= 1.0:
            raise DatasetError(f"positive_fraction: got {positive_fraction!r}, expected a number in [0, 1]")
        self.processed_dir = Path(processed_dir)
        self.split, self.size = split, size
        if not (self.processed_dir / "slices.csv").exists():
            raise FileNotFoundError(
                f"{self.processed_dir / 'slices.csv'} missing; run the preprocess stage (dvc repro preprocess)"
            )
        slices = read_slices(self.processed_dir)
        scans = slices.loc[slices["split"] == split, ["scan_id", "patient_id"]].drop_duplicates("scan_id")
        if scans.empty:
            raise DatasetError(
                f"no scans in split {split!r} of {self.processed_dir}; add scans (data.phantom.num_scans) or "
                "change preprocess.split"
            )
        nodules = read_nodules(self.processed_dir)
        malignancy_of = {
            (row.scan_id, int(row.nodule_id)): float(row.malignancy) for row in nodules.itertuples(index=False)
        }
        spatial = (size, size, size)
        cropper = Compose([
            SpatialPadd(["image", "mask"], spatial_size=spatial, value=0.0),
            RandCropByPosNegLabeld(
                ["image", "mask"], label_key="mask", spatial_size=spatial,
                pos=positive_fraction, neg=1.0 - positive_fraction, num_samples=crops_per_scan,
                allow_smaller=False,
            ),
        ])
        cropper.set_random_state(seed)
        images, masks, labels, malignancy = [], [], [], []
        self.patient_ids: list[str] = []
        self.scan_ids: list[str] = []
        self.slice_indices: list[int] = []
        for scan_id, patient_id in scans.itertuples(index=False):
            scan = load_scan(self.processed_dir, scan_id)
            nodule_ids = torch.from_numpy(scan["mask"].astype(np.int64))[None]
            with warnings.catch_warnings():
                # A scan without nodules gets background crops only, as documented above.
                warnings.filterwarnings("ignore", message="Num foregrounds 0")
                crops = cropper({"image": torch.from_numpy(scan["image"])[None], "mask": nodule_ids})
            for crop in crops:
                ids = crop["mask"].as_tensor() if hasattr(crop["mask"], "as_tensor") else crop["mask"]
                present = [int(k) for k in torch.unique(ids) if int(k) > 0]
                voxels = int((ids > 0).sum())
                images.append(crop["image"].as_tensor().to(torch.float16))
                masks.append((ids > 0).to(torch.uint8))
                labels.append(1 if voxels > min_nodule_voxels else 0)
                malignancy.append(max((malignancy_of.get((scan_id, k), 0.0) for k in present), default=0.0))
                self.patient_ids.append(str(patient_id))
                self.scan_ids.append(str(scan_id))
                self.slice_indices.append(int(crop["image"].meta["crop_center"][0]))
        self.images = torch.stack(images)
        self.masks = torch.stack(masks)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.malignancy = torch.tensor(malignancy, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self.images[index].to(torch.float32),
            "mask": self.masks[index].to(torch.float32),
            "label": self.labels[index],
            "malignancy": self.malignancy[index],
            "patient_id": self.patient_ids[index],
            "scan_id": self.scan_ids[index],
            "slice_index": self.slice_indices[index],
        }
