"""The processed-data contract between ``preprocess`` and everything downstream.

``data/processed/`` holds:

- ``scans/<scan_id>.npz`` (compressed; ``scan_id`` is the PatientID, or
  ``<PatientID>-<last 8 digits of the SeriesInstanceUID>`` for a patient with more than
  one CT series): ``image`` float16 (Z, Y, X) in [0, 1] (HU
  resampled to ``preprocess.spacing`` and windowed to ``preprocess.hu_window``, cropped
  to the body); ``mask`` uint8 (Z, Y, X), 0 background and k > 0 the nodule with
  ``nodule_id == k`` in ``nodules.csv``; ``spacing`` float32 (3,) mm (z, y, x);
  ``origin_index`` int32 (3,) the crop's corner in the resampled volume.
- ``slices.csv``: one row per axial slice (columns :data:`SLICE_COLUMNS`).
  ``label`` is 1 for a nodule slice (more than ``min_nodule_pixels`` mask pixels), 0 for
  a slice without nodule pixels, -1 for a slice in between (excluded from
  classification).
- ``nodules.csv``: one row per nodule cluster (columns :data:`NODULE_COLUMNS`); centroid
  in voxel indices of the processed (resampled, cropped) volume; malignancy, texture and
  calcification are medians over the cluster's annotations; ``readers`` is the number of
  annotations in the cluster.
- ``splits.json``: ``{"train": [...], "val": [...], "test": [...], "seed": int}``,
  lists of PatientIDs: the split is patient-level, so all scans of a patient share it.
- ``skipped.csv``: scans that were skipped (``preprocess.on_error: skip``) and why.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
SLICE_COLUMNS = ["patient_id", "scan_id", "slice_index", "nodule_pixels", "max_malignancy", "label", "split"]
NODULE_COLUMNS = [
    "patient_id", "scan_id", "nodule_id", "centroid_z", "centroid_y", "centroid_x", "diameter_mm",
    "readers", "malignancy", "texture", "calcification", "split",
]
SKIPPED_COLUMNS = ["patient_id", "series_instance_uid", "file", "reason"]


def scan_path(processed_dir: str | Path, scan_id: str) -> Path:
    return Path(processed_dir) / "scans" / f"{scan_id}.npz"


def load_scan(processed_dir: str | Path, scan_id: str) -> dict[str, np.ndarray]:
    """Load one processed scan: ``image`` (Z, Y, X) float32 in [0, 1], ``mask`` (Z, Y, X)."""
    path = scan_path(processed_dir, scan_id)
    if not path.exists():
        raise FileNotFoundError(f"{path} missing; rerun the preprocess stage (dvc repro preprocess)")
    with np.load(path) as z:
        return {
            "image": z["image"].astype(np.float32),
            "mask": z["mask"],
            "spacing": z["spacing"],
            "origin_index": z["origin_index"],
        }


def read_slices(processed_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(processed_dir) / "slices.csv", dtype={"patient_id": str, "scan_id": str})


def read_nodules(processed_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(processed_dir) / "nodules.csv", dtype={"patient_id": str, "scan_id": str})


def read_splits(processed_dir: str | Path) -> dict:
    with open(Path(processed_dir) / "splits.json") as f:
        return json.load(f)
