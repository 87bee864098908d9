"""The view of the processed CT a pretraining entry is fed, picked by its backbone.

A 2D backbone (``backbone.spatial_dims: 2``) reads axial slices (seed 000's protocol,
:class:`~chestssl.data.datasets.SliceDataset`); a 3D one reads cubic crops (seed 003's,
:class:`~chestssl.data.crops.CropDataset`). So a method works in either dimension with
no change to a stage script.

Two views per split:

- :func:`pretrain_view`: what the pretext task trains on (every slice of the split's
  scans, or ``crops.per_scan`` crops per scan; with ``crops.draw: every_epoch`` the
  training crops are drawn anew every epoch, as in seed 003,
  :class:`~chestssl.data.crops.EpochCropDataset`, and the validation crops once, so
  validation metrics compare across epochs; with the entry's ``epoch_unit: scans``, one
  slice of each scan, :mod:`chestssl.data.slice_epochs`, likewise);
- :func:`labelled_view`: items with a reliable label, for linear probing (nodule and
  clean slices, leaving out slices with a few nodule pixels only; or the crops, labelled
  by whether they hold nodule voxels).

:func:`evenly_per_patient` thins a view to a fixed number of items per patient, e.g. for
test-split reconstruction metrics, whose patient-bootstrap intervals gain little from a
patient's hundredth slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch.utils.data import Dataset, Subset

from chestssl.data.crops import CropDataset, EpochCropDataset
from chestssl.data.datasets import SliceDataset, slice_options
from chestssl.data.slice_epochs import EpochSliceDataset, one_slice_per_scan
from chestssl.params import DEFAULT_EPOCH_UNIT


def spatial_dims_of(entry: Mapping[str, Any]) -> int:
    """2 or 3: the ``spatial_dims`` of a validated method entry's backbone."""
    return int(entry["backbone"]["spatial_dims"])


def view_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The params the views read (beside the entry and the seed), e.g. for a resume fingerprint."""
    return {"slices": params["slices"], "crops": params["crops"],
            "min_nodule_pixels": params["preprocess"]["min_nodule_pixels"]}


def _crops(params: Mapping[str, Any], processed_dir: Path, split: str,
           pretext: bool = False) -> CropDataset | EpochCropDataset:
    """The split's crops: the pretext task's training crops drawn anew every epoch with
    ``crops.draw: every_epoch``, any other drawn once."""
    crops = params["crops"]
    kind = EpochCropDataset if pretext and split == "train" and crops["draw"] == "every_epoch" else CropDataset
    return kind(
        processed_dir, split, crops["side"], crops["per_scan"], crops["positive_fraction"], seed=params["seed"],
        min_nodule_voxels=params["preprocess"]["min_nodule_pixels"],
    )


def pretrain_view(params: Mapping[str, Any], entry: Mapping[str, Any], split: str, processed_dir: Path) -> Dataset:
    """The items the pretext task of ``entry`` trains or is validated on, for ``split``.

    A 2D entry with ``epoch_unit: scans`` (seed 003's epochs over volumes) trains on one
    slice of each training scan drawn anew every epoch, and is validated on one slice of
    each validation scan drawn once (every validation slice each epoch would cost many
    times the training epoch); its test split keeps every slice.
    """
    if spatial_dims_of(entry) == 3:
        return _crops(params, processed_dir, split, pretext=True)
    slices = SliceDataset(processed_dir, split, task="pretrain", seed=params["seed"], **slice_options(params["slices"]))
    if entry.get("epoch_unit", DEFAULT_EPOCH_UNIT) != "scans" or split == "test":
        return slices
    if split == "train":
        return EpochSliceDataset(slices, seed=params["seed"])
    return one_slice_per_scan(slices, seed=params["seed"])


def labelled_view(params: Mapping[str, Any], entry: Mapping[str, Any], split: str, processed_dir: Path) -> Dataset:
    """Labelled items of ``split`` in the view of ``entry``'s backbone (for linear probes)."""
    if spatial_dims_of(entry) == 3:
        return _crops(params, processed_dir, split)
    return SliceDataset(processed_dir, split, task="cls", seed=params["seed"], **slice_options(params["slices"]))


def evenly_per_patient(dataset: Dataset, per_patient: int) -> Dataset:
    """At most ``per_patient`` items of each patient of ``dataset``, evenly spaced in item
    order (for slices: from the patient's first to last slice), in the dataset's order.

    ``dataset`` has ``patient_ids``, one per item (:class:`SliceDataset`, :class:`CropDataset`).
    ``per_patient`` 0 keeps every item and returns ``dataset`` itself.
    """
    if per_patient < 0:
        raise ValueError(f"per_patient: got {per_patient}, expected 0 (every item) or a positive count")
    if per_patient == 0:
        return dataset
    positions: dict[str, list[int]] = {}
    for index, patient in enumerate(dataset.patient_ids):
        positions.setdefault(str(patient), []).append(index)
    kept: list[int] = []
    for items in positions.values():
        if len(items) <= per_patient:
            kept.extend(items)
        else:
            picks = np.linspace(0, len(items) - 1, per_patient).round().astype(int)
            kept.extend(items[i] for i in picks)
    return Subset(dataset, sorted(kept))
