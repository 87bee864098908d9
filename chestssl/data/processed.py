"""The processed-data contract between ``preprocess`` and everything downstream.

``data/processed/`` holds:

- ``scans/<scan_id>.npz`` (compressed; ``scan_id`` is the PatientID, or
  ``<PatientID>-<last 8 digits of the SeriesInstanceUID>`` for a patient with more than
  one CT series): ``image`` float16 (Z, Y, X) in [0, 1] (HU
  resampled to ``preprocess.spacing`` and windowed to ``preprocess.hu_window``, cropped
  to the body); ``mask`` uint8 (Z, Y, X), 0 background and k > 0 the nodule with
  ``nodule_id == k`` in ``nodules.csv``; ``spacing`` float32 (3,) mm (z, y, x);
  ``origin_index`` int32 (3,) the crop's corner in the resampled volume; ``lung_box``
  int32 (4,) ``[y0, y1, x0, x1)``, the in-plane box of the lungs and nodules in the
  cropped volume (slices with ``slices.field_of_view: lungs`` show only it).
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

``splits.json`` is the one source of truth for the split. The readers here are the only
way to it: :func:`read_splits` checks it (every patient in exactly one split, known
patients only) and :func:`read_slices` / :func:`read_nodules` check that their ``split``
column agrees with it, so an edited or corrupt file is an error, never a silent second
split. Every reader names the file and says to rerun ``preprocess`` when a file is
missing, truncated or not in this layout.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from chestssl.errors import UserError

SPLITS = ("train", "val", "test")
SLICE_COLUMNS = ["patient_id", "scan_id", "slice_index", "nodule_pixels", "max_malignancy", "label", "split"]
NODULE_COLUMNS = [
    "patient_id", "scan_id", "nodule_id", "centroid_z", "centroid_y", "centroid_x", "diameter_mm",
    "readers", "malignancy", "texture", "calcification", "split",
]
SKIPPED_COLUMNS = ["patient_id", "series_instance_uid", "file", "reason"]


SCAN_ARRAYS = ("image", "mask", "spacing", "origin_index", "lung_box")
RERUN = "rerun the preprocess stage (dvc repro -f preprocess)"


class ProcessedDataError(UserError):
    """A file of ``data/processed`` that is missing, corrupt or inconsistent with the others."""


class DatasetError(UserError, ValueError):
    """The processed data cannot give the requested slices (names split, task and remedy).

    Defined here, beside the readers, so that modules that raise it need not import the
    torch datasets of :mod:`chestssl.data.datasets` (which re-exports it).
    """


def scan_path(processed_dir: str | Path, scan_id: str) -> Path:
    return Path(processed_dir) / "scans" / f"{scan_id}.npz"


def load_scan(processed_dir: str | Path, scan_id: str) -> dict[str, np.ndarray]:
    """Load one processed scan: ``image`` (Z, Y, X) float32 in [0, 1], ``mask`` (Z, Y, X), and
    the other arrays of :data:`SCAN_ARRAYS` as stored."""
    path = scan_path(processed_dir, scan_id)
    if not path.exists():
        raise FileNotFoundError(f"{path} missing; {RERUN}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ProcessedDataError(f"{path}: a single array, not a processed scan archive; {RERUN}")
        with loaded as z:
            missing = [name for name in SCAN_ARRAYS if name not in z.files]
            if missing:
                raise ProcessedDataError(f"{path}: no array {', '.join(missing)}, so it is not a processed scan; {RERUN}")
            scan = {name: z[name] for name in SCAN_ARRAYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # truncated, foreign or not an archive
        raise ProcessedDataError(f"{path}: unreadable ({type(exc).__name__}: {exc}); {RERUN}") from None
    if scan["image"].shape != scan["mask"].shape or scan["image"].ndim != 3:
        raise ProcessedDataError(f"{path}: image {scan['image'].shape} and mask {scan['mask'].shape} are not one "
                                 f"(Z, Y, X) volume; {RERUN}")
    box = scan["lung_box"]
    if (box.shape != (4,) or not np.issubdtype(box.dtype, np.integer) or not 0 <= box[0] < box[1] <= scan["image"].shape[1]
            or not 0 <= box[2] < box[3] <= scan["image"].shape[2]):
        raise ProcessedDataError(f"{path}: lung_box {box.tolist()} is not a box [y0, y1, x0, x1) inside the "
                                 f"{scan['image'].shape[1]} x {scan['image'].shape[2]} slices; {RERUN}")
    scan["image"] = scan["image"].astype(np.float32)
    return scan


def read_slices(processed_dir: str | Path) -> pd.DataFrame:
    """``slices.csv``, its ``split`` column checked against ``splits.json``."""
    slices = _read_table(Path(processed_dir) / "slices.csv", SLICE_COLUMNS)
    return _with_checked_split(slices, _checked_splits(processed_dir, set(slices["patient_id"])), processed_dir)


def read_nodules(processed_dir: str | Path) -> pd.DataFrame:
    """``nodules.csv``, its ``split`` column checked against ``splits.json``."""
    return _with_checked_split(_read_table(Path(processed_dir) / "nodules.csv", NODULE_COLUMNS),
                               read_splits(processed_dir), processed_dir)


def read_splits(processed_dir: str | Path) -> dict:
    """``splits.json``, checked: lists of PatientIDs under train, val and test, each patient
    in one split only, and only patients that ``slices.csv`` knows."""
    known = set(_read_table(Path(processed_dir) / "slices.csv", ["patient_id"])["patient_id"])
    return _checked_splits(processed_dir, known)


def _checked_splits(processed_dir: str | Path, known: set[str]) -> dict:
    path = Path(processed_dir) / "splits.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing; {RERUN}")
    try:
        splits = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProcessedDataError(f"{path}: not valid JSON ({exc}); {RERUN}") from None
    if not isinstance(splits, dict) or any(not isinstance(splits.get(name), list) for name in SPLITS):
        raise ProcessedDataError(f"{path}: expected lists of PatientIDs under {', '.join(SPLITS)}; {RERUN}")
    seen: dict[str, str] = {}
    for name in SPLITS:
        for patient in splits[name]:
            if not isinstance(patient, str):
                raise ProcessedDataError(f"{path}: {name} lists {patient!r}, not a PatientID string; {RERUN}")
            if patient in seen:
                raise ProcessedDataError(f"{path}: patient {patient} is in both {seen[patient]} and {name}; a patient "
                                         f"belongs to one split only; {RERUN}")
            seen[patient] = name
    unknown = sorted(set(seen) - known)
    if unknown:
        raise ProcessedDataError(f"{path}: {len(unknown)} patient(s) not in slices.csv ({', '.join(unknown[:5])}); "
                                 f"{RERUN}")
    return splits


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} missing; {RERUN}")
    try:
        table = pd.read_csv(path, dtype={"patient_id": str, "scan_id": str})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ProcessedDataError(f"{path}: unreadable as CSV ({type(exc).__name__}: {exc}); {RERUN}") from None
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ProcessedDataError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(columns)}); "
                                 f"{RERUN}")
    return table


def _with_checked_split(table: pd.DataFrame, splits: dict, processed_dir: str | Path) -> pd.DataFrame:
    """``table`` if each row's ``split`` is its patient's split in ``splits``."""
    split_of = {patient: name for name in SPLITS for patient in splits[name]}
    expected = table["patient_id"].map(split_of)
    unassigned = sorted(table.loc[expected.isna(), "patient_id"].unique())
    if unassigned:
        raise ProcessedDataError(f"{Path(processed_dir) / 'splits.json'}: no split for patient(s) "
                                 f"{', '.join(unassigned[:5])}; every patient must be in exactly one split; {RERUN}")
    disagree = table.loc[expected != table["split"], "patient_id"].unique()
    if len(disagree):
        raise ProcessedDataError(f"{Path(processed_dir)}: the split column of its tables disagrees with splits.json "
                                 f"for patient(s) {', '.join(sorted(disagree)[:5])}; {RERUN}")
    return table
