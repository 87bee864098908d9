"""Digitally reconstructed radiographs (DRRs): frontal and lateral chest X-rays rendered from CT.

Seeds 001 (Barlow Twins on CheXpert / COVID-19 Radiography), 002 (STN alignment on
ChestX-ray14) and 004 (RadDiffusion on two-view MIMIC-CXR studies) learn from chest
radiographs. We have CT (LIDC-IDRI, or its phantom), so we render a two-view "study" per
scan from the processed volume (:mod:`chestssl.data.processed`), with the nodule labels
carried along:

1. HU from the processed image by inverting ``preprocess.hu_window``. The processed image
   was clipped to that window, so HU above its top are lost: bone is at most the window top
   (400 HU by default) and the bone contrast of the DRR is weaker than in a real radiograph.
2. Linear attenuation ``mu = mu_water * (1 + HU / 1000)`` per mm, clipped at 0 (air).
3. Parallel-beam line integrals ``sum(mu * voxel length)`` (mm), along the
   anterior-posterior axis for the frontal view (an image over (z, x)) and along the
   left-right axis for the lateral view (over (z, y)).
4. The displayed value of a radiograph is ``-log(I / I0)``, which for ``I = I0 exp(-line
   integral)`` (Beer-Lambert) is the line integral itself: bone bright, lungs dark. It is
   windowed to [0, 1] between two percentiles of each image (``window_percentiles``).
5. Resampled to square pixels and fitted into ``size`` x ``size``, keeping the aspect ratio,
   centred, padded with 0.

Orientation (processed volumes, see :mod:`chestssl.data.preprocess`: slice 0 is the most
inferior; y = DICOM rows, increasing towards posterior; x = DICOM columns, increasing towards
the patient's left):

- both views: head at the top (row 0 is the most superior slice);
- frontal: the radiological display convention of a PA (and AP) chest film, the patient seen
  from the front: the patient's right on the image left (column 0 = x index 0);
- lateral: anterior on the image left, posterior (spine) on the right, as a lateral chest
  film is usually hung (column 0 = y index 0).

Both views of a study share one pixel size (mm), chosen so that the largest of the three
physical extents fills ``size`` pixels; so a structure lies on the same row in both views.
Parallel beams have no magnification, so PA and AP give the same image.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from chestssl.data.processed import load_scan, read_nodules, read_slices
from chestssl.errors import UserError

VIEWS = ("frontal", "lateral")
#: ``preprocess.hu_window``'s default; the processed images do not record their window.
DEFAULT_HU_WINDOW = (-1000.0, 400.0)
#: The labels of a rendered study (the label columns of ``studies.csv``).
LABELS = ("nodule", "malignant")
#: The other columns of a rendered study's row of ``studies.csv``.
STUDY_COLUMNS = [
    "scan_id", "malignancy", "nodule_id", "frontal_row", "frontal_col", "lateral_row", "lateral_col",
]
#: The ``radiographs`` params the renderer reads.
CFG_FIELDS = ("side", "mu_water_per_mm", "window_percentiles")


class RadiographError(UserError, RuntimeError):
    """The processed folder cannot be rendered (e.g. it lists no scans)."""


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


def _as_float(value: Any) -> float | None:
    """A finite float from a number or numeric string (YAML 1.1 leaves "2e-2" a string)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _checked_hu_window(hu_window: Sequence[float]) -> tuple[float, float]:
    pair = [_as_float(v) for v in hu_window] if len(hu_window) == 2 else [None]
    if None in pair or not pair[0] < pair[1]:
        raise ValueError(f"hu_window: got {list(hu_window)!r}, expected [low, high] HU with low < high")
    return float(pair[0]), float(pair[1])


# --------------------------------------------------------------------------------------
# Physics
# --------------------------------------------------------------------------------------


def hu_from_processed(image: np.ndarray, hu_window: Sequence[float] = DEFAULT_HU_WINDOW) -> np.ndarray:
    """Invert the windowing of the preprocess stage: ``[0, 1]`` -> HU in ``hu_window``.

    ``image`` is any shape (the processed ``(Z, Y, X)`` volume); returns float32 of the same
    shape. The processed image was clipped to the window, so HU above its top (bone, metal)
    come back as the window top and HU below its bottom as the bottom.
    """
    low, high = _checked_hu_window(hu_window)
    return (low + np.asarray(image, np.float32) * np.float32(high - low)).astype(np.float32)


def attenuation_per_mm(hu: np.ndarray, mu_water_per_mm: float) -> np.ndarray:
    """Linear attenuation coefficient per mm from HU: ``mu_water * (1 + HU / 1000)``, >= 0.

    HU is defined as ``1000 * (mu - mu_water) / mu_water``, so this is its inverse (air,
    -1000 HU, has 0). Same shape as ``hu``, float32.
    """
    mu = np.float32(mu_water_per_mm) * (1.0 + np.asarray(hu, np.float32) / np.float32(1000.0))
    return np.maximum(mu, 0.0).astype(np.float32)


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"view: got {view!r}, expected one of {', '.join(VIEWS)}")


def _ray_axis(view: str) -> int:
    """Axis of a ``(Z, Y, X)`` volume the rays of ``view`` run along."""
    _check_view(view)
    return 1 if view == "frontal" else 2


def line_integral(mu: np.ndarray, spacing: Sequence[float], view: str) -> np.ndarray:
    """Parallel-beam line integrals of ``mu`` (per mm) through a ``(Z, Y, X)`` volume.

    Frontal rays run anterior-posterior (along y), lateral rays left-right (along x); each
    ray sums ``mu`` times the voxel length along it (``spacing`` is (z, y, x) mm). Returns
    the dimensionless ``-log(I / I0)``: frontal ``(Z, X)``, lateral ``(Z, Y)``, float32, in
    display orientation (row 0 = the most superior slice; see the module docstring).
    """
    axis = _ray_axis(view)
    projection = np.asarray(mu, np.float32).sum(axis=axis, dtype=np.float64) * float(spacing[axis])
    return np.ascontiguousarray(projection[::-1], dtype=np.float32)


def max_projection(labels: np.ndarray, view: str) -> np.ndarray:
    """Maximum of a ``(Z, Y, X)`` label volume along the rays of ``view``, in display
    orientation: frontal ``(Z, X)``, lateral ``(Z, Y)``, same dtype. Where two nodules
    overlap along a ray the larger label wins."""
    axis = _ray_axis(view)
    return np.ascontiguousarray(np.asarray(labels).max(axis=axis)[::-1])


def window_percentiles(image: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Scale ``image`` (any shape) linearly so its ``lower`` and ``upper`` percentiles map to
    0 and 1, and clip to [0, 1]; float32. When the two percentiles coincide (a nearly
    constant image), values above them give 1 and the rest 0."""
    from monai.transforms import ScaleIntensityRange

    image = np.asarray(image, np.float32)
    low, high = (float(v) for v in np.percentile(image, [lower, upper]))
    if high <= low:
        return (image > low).astype(np.float32)
    scaled = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)(image)
    return np.asarray(scaled, dtype=np.float32)


# --------------------------------------------------------------------------------------
# Geometry: native projection -> size x size
# --------------------------------------------------------------------------------------


def _axis_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and normalised weights, each (n_out, taps), of an antialiased linear
    resampling of one axis from ``n_in`` to ``n_out`` samples: output ``i`` is centred at
    input position ``(i + 0.5) * scale`` (``scale = n_in / n_out``, half-pixel centres) and
    weighs the inputs by a triangle of half-width ``max(scale, 1)``, as PyTorch's
    ``interpolate(mode="bilinear", antialias=True, align_corners=False)`` does."""
    scale = n_in / n_out
    support, inverse = (scale, 1.0 / scale) if scale >= 1.0 else (1.0, 1.0)
    centres = scale * (np.arange(n_out, dtype=np.float64) + 0.5)
    first = np.maximum((centres - support + 0.5).astype(np.int64), 0)  # truncation, as C's cast
    stop = np.minimum((centres + support + 0.5).astype(np.int64), n_in)
    taps = int((stop - first).max())
    index = first[:, None] + np.arange(taps)[None, :]
    weights = np.maximum(0.0, 1.0 - np.abs((index - centres[:, None] + 0.5) * inverse))
    weights = np.where(index < stop[:, None], weights, 0.0)
    weights = weights / weights.sum(axis=1, keepdims=True)
    return np.minimum(index, n_in - 1), weights


def antialiased_resize(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A 2D ``image`` resampled to ``shape`` (float64), bilinear with antialiasing, the
    columns first, then the rows (:func:`_axis_taps`).

    Computed with NumPy's elementwise float64 arithmetic, one tap at a time, so the result
    is the same bits on every x86-64 CPU (PyTorch's kernel is vectorised differently by CPU,
    and its results differ in the last bits between its AVX2 and baseline code); it agrees
    with PyTorch's to float32 precision.
    """
    result = np.asarray(image, dtype=np.float64)
    for axis, n_out in ((1, int(shape[1])), (0, int(shape[0]))):
        index, weights = _axis_taps(result.shape[axis], n_out)
        moved = np.moveaxis(result, axis, 0)
        total = np.zeros((n_out, *moved.shape[1:]), dtype=np.float64)
        for tap in range(index.shape[1]):
            total += weights[:, tap].reshape(-1, *[1] * (moved.ndim - 1)) * moved[index[:, tap]]
        result = np.moveaxis(total, 0, axis)
    return np.ascontiguousarray(result)


@dataclass(frozen=True)
class ViewGeometry:
    """Where one view of a ``(Z, Y, X)`` volume lands in its ``size`` x ``size`` radiograph.

    ``native_shape`` (rows, cols) is the projection's shape (frontal ``(Z, X)``, lateral
    ``(Z, Y)``) with pixels of ``native_pixel_mm`` (rows, cols); it is resampled to
    ``fitted_shape`` and padded with ``pad_before`` (top, left) rows/columns before and the
    rest after. Pixel centres follow the half-pixel convention of
    ``torch.nn.functional.interpolate(align_corners=False)``: native pixel ``i`` maps to
    ``(i + 0.5) * fitted / native - 0.5``.
    """

    view: str
    native_shape: tuple[int, int]
    native_pixel_mm: tuple[float, float]
    fitted_shape: tuple[int, int]
    pad_before: tuple[int, int]
    size: int

    @property
    def pixel_mm(self) -> tuple[float, float]:
        """The radiograph's pixel size (rows, cols) in mm; square up to the rounding of
        ``fitted_shape`` to whole pixels."""
        return tuple(  # type: ignore[return-value]
            n * mm / f for n, mm, f in zip(self.native_shape, self.native_pixel_mm, self.fitted_shape)
        )

    def resample_image(self, image: np.ndarray) -> np.ndarray:
        """``native_shape`` -> ``fitted_shape`` float32, bilinear with antialiasing (a
        triangle filter as wide as the shrink factor, so thin structures do not alias;
        :func:`antialiased_resize`)."""
        self._check_native(image)
        return antialiased_resize(image, self.fitted_shape).astype(np.float32)

    def resample_labels(self, labels: np.ndarray) -> np.ndarray:
        """``native_shape`` -> ``fitted_shape`` label image (uint8), by majority.

        Each label's indicator is resampled like the image (so the label map stays aligned
        with it) and every pixel takes the label of largest coverage, background included.
        A nodule that would vanish (smaller than a pixel after shrinking) keeps the one pixel
        it covers most, so no nodule present in the projection is lost.
        """
        self._check_native(labels)
        present = [int(k) for k in np.unique(labels) if k > 0]
        fitted = np.zeros(self.fitted_shape, np.uint8)
        if not present:
            return fitted
        ids = np.array([0, *present])
        coverage = np.stack([antialiased_resize((np.asarray(labels) == k).astype(np.float64), self.fitted_shape)
                             for k in ids])
        fitted = ids[coverage.argmax(axis=0)].astype(np.uint8)
        for channel, label in enumerate(present, start=1):
            if not (fitted == label).any():
                fitted[np.unravel_index(coverage[channel].argmax(), self.fitted_shape)] = label
        return fitted

    def pad(self, image: np.ndarray) -> np.ndarray:
        """``fitted_shape`` -> ``(size, size)``, padding with 0 (MONAI ``BorderPad``)."""
        from monai.transforms import BorderPad
        from monai.utils import convert_to_numpy

        if tuple(image.shape) != self.fitted_shape:
            raise ValueError(f"{self.view}: expected a {self.fitted_shape} image to pad, got {tuple(image.shape)}")
        top, left = self.pad_before
        bottom = self.size - self.fitted_shape[0] - top
        right = self.size - self.fitted_shape[1] - left
        padded = BorderPad(spatial_border=[top, bottom, left, right], mode="constant", value=0)(image[None])
        return convert_to_numpy(padded, dtype=image.dtype)[0]

    def voxel_to_pixel(self, index_zyx: Sequence[float]) -> tuple[float, float]:
        """(row, col) in the ``size`` x ``size`` radiograph of a (fractional) voxel index
        ``(z, y, x)`` of the processed volume, by exactly the geometry of the rendering
        (orientation, resampling, padding)."""
        z, y, x = (float(v) for v in index_zyx)
        native_row = self.native_shape[0] - 1 - z  # row 0 is the last (most superior) slice
        native_col = x if self.view == "frontal" else y
        row = (native_row + 0.5) * self.fitted_shape[0] / self.native_shape[0] - 0.5 + self.pad_before[0]
        col = (native_col + 0.5) * self.fitted_shape[1] / self.native_shape[1] - 0.5 + self.pad_before[1]
        return row, col

    def _check_native(self, image: np.ndarray) -> None:
        if tuple(image.shape) != self.native_shape:
            raise ValueError(f"{self.view}: expected a {self.native_shape} projection, got {tuple(image.shape)}")


def study_geometry(
    volume_shape: Sequence[int], spacing: Sequence[float], size: int
) -> dict[str, ViewGeometry]:
    """The geometry of both views of a ``(Z, Y, X)`` volume with voxel ``spacing`` (z, y, x) mm.

    One pixel size for the study, ``max(Z * sz, Y * sy, X * sx) / size`` mm: the largest
    physical extent fills ``size`` pixels, the others keep their aspect ratio and are centred.
    """
    shape = tuple(int(n) for n in volume_shape)
    mm = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1 or len(mm) != 3 or not all(math.isfinite(s) and s > 0 for s in mm):
        raise ValueError(f"expected a 3D (Z, Y, X) shape and positive spacing, got {shape} and {mm}")
    pixel_mm = max(n * s for n, s in zip(shape, mm)) / size
    geometry = {}
    for view, col_axis in (("frontal", 2), ("lateral", 1)):
        native = (shape[0], shape[col_axis])
        native_mm = (mm[0], mm[col_axis])
        fitted = tuple(min(size, max(1, round(n * s / pixel_mm))) for n, s in zip(native, native_mm))
        pad_before = tuple((size - f) // 2 for f in fitted)
        geometry[view] = ViewGeometry(view, native, native_mm, fitted, pad_before, size)  # type: ignore[arg-type]
    return geometry


# --------------------------------------------------------------------------------------
# One study
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedStudy:
    """The two views of one scan.

    ``images[view]`` float32 ``(size, size)`` in [0, 1]; ``masks[view]`` uint8
    ``(size, size)``, the max-projected nodule labels (``nodule_id`` of ``nodules.csv``);
    ``geometry[view]`` maps voxel indices to pixels (:meth:`ViewGeometry.voxel_to_pixel`).
    """

    images: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    geometry: dict[str, ViewGeometry]


def render_study(
    image: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    cfg: Mapping[str, Any],
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
) -> RenderedStudy:
    """Render the frontal and lateral radiographs of one processed scan.

    Args:
        image: ``(Z, Y, X)`` in [0, 1], the processed CT (HU windowed to ``hu_window``).
        mask: ``(Z, Y, X)`` uint8 nodule labels.
        spacing: voxel size (z, y, x) in mm.
        cfg: the ``radiographs`` params (``side``, ``mu_water_per_mm``, ``window_percentiles``).
        hu_window: the ``preprocess.hu_window`` the image was windowed with.
    """
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"expected image and mask of one (Z, Y, X) shape, got {image.shape} and {mask.shape}")
    mu = attenuation_per_mm(hu_from_processed(image, hu_window), cfg["mu_water_per_mm"])
    lower, upper = cfg["window_percentiles"]
    geometry = study_geometry(image.shape, spacing, cfg["side"])
    images, masks = {}, {}
    for view, geo in geometry.items():
        integral = geo.resample_image(line_integral(mu, spacing, view))
        images[view] = geo.pad(window_percentiles(integral, lower, upper))
        masks[view] = geo.pad(geo.resample_labels(max_projection(mask, view)))
    return RenderedStudy(images, masks, geometry)


def study_labels(nodules: pd.DataFrame, geometry: Mapping[str, ViewGeometry]) -> dict[str, Any]:
    """The labels of one study from its scan's rows of ``nodules.csv``.

    ``nodule``: 1 if the scan has a nodule; ``malignancy``: the largest of the nodules'
    median malignancy, 0 without one; ``nodule_id`` and the (row, col) of the largest
    nodule's (largest ``diameter_mm``, then lowest id) centroid in each view, ``None``
    without one.
    """
    labels: dict[str, Any] = {"nodule": int(len(nodules) > 0), "malignancy": 0.0, "nodule_id": None}
    labels.update({f"{view}_{axis}": None for view in VIEWS for axis in ("row", "col")})
    if len(nodules):
        labels["malignancy"] = float(nodules["malignancy"].max())
        largest = nodules.sort_values(["diameter_mm", "nodule_id"], ascending=[False, True]).iloc[0]
        labels["nodule_id"] = int(largest["nodule_id"])
        centroid = largest[["centroid_z", "centroid_y", "centroid_x"]].to_numpy(np.float64)
        for view, geo in geometry.items():
            row, col = geo.voxel_to_pixel(centroid)
            labels[f"{view}_row"], labels[f"{view}_col"] = round(row, 3), round(col, 3)
    return labels


# --------------------------------------------------------------------------------------
# The processed folder
# --------------------------------------------------------------------------------------


def _require(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; expected a processed folder with slices.csv, nodules.csv and "
            "scans/<scan_id>.npz (chestssl.data.processed); run the preprocess stage first (dvc repro preprocess)"
        )


def render_radiographs(
    processed_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: Mapping[str, Any],
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    progress: bool = False,
) -> pd.DataFrame:
    """Render a two-view study for every scan of ``processed_dir`` into the radiographs folder ``out_dir``.

    Writes the layout of :mod:`chestssl.data.radiograph_folder`:

    - ``studies.csv``: one row per scan in ``scan_id`` order, ``study_id`` = ``scan_id``,
      with the labels ``nodule`` (the scan has a nodule) and ``malignant`` (its highest
      median malignancy rating is at least
      :data:`~chestssl.data.labels.MALIGNANT_MIN_RATING`), then ``scan_id``,
      ``malignancy`` and the largest nodule's id and projected centre per view
      (:data:`STUDY_COLUMNS`; empty without a nodule);
    - ``images.csv``: the frontal then the lateral view of each study, with its pixel size
      (``pixel_mm_row``, ``pixel_mm_col``);
    - ``images.npy`` (float16) and ``masks.npy`` (the projected nodules);
    - ``radiographs.json``: ``cfg``, ``hu_window`` and the orientation.

    The folder is built beside ``out_dir`` and swapped in at the end, so an interrupted run
    leaves the previous output (or none); run again, it resumes at the last checkpoint if
    the processed scans and settings are unchanged. Returns ``studies.csv``'s table.
    """
    from chestssl.data.labels import MALIGNANT_MIN_RATING
    from chestssl.data.radiograph_folder import RadiographFolderWriter, input_fingerprint

    processed_dir, out_dir = Path(processed_dir), Path(out_dir)
    cfg = {name: cfg[name] for name in CFG_FIELDS}  # the settings the rendering reads, fingerprinted
    hu_window = _checked_hu_window(hu_window)
    for name in ("slices.csv", "nodules.csv"):
        _require(processed_dir / name)
    scans = read_slices(processed_dir)[["scan_id", "patient_id", "split"]].drop_duplicates("scan_id")
    scans = scans.sort_values("scan_id", kind="stable").reset_index(drop=True)
    if scans.empty:
        raise RadiographError(f"{processed_dir / 'slices.csv'} lists no scans; rerun the preprocess stage")
    nodules = read_nodules(processed_dir)
    inputs = [processed_dir / "nodules.csv", *(processed_dir / "scans" / f"{scan_id}.npz" for scan_id in scans["scan_id"])]
    for path in inputs:
        _require(path)
    fingerprint = input_fingerprint({"cfg": cfg, "hu_window": list(hu_window), "scans": scans.to_dict("list")}, inputs)
    writer = RadiographFolderWriter(out_dir, 2 * len(scans), cfg["side"], with_masks=True, fingerprint=fingerprint)

    studies, images = [], []
    for position, scan in enumerate(tqdm(scans.itertuples(index=False), total=len(scans), desc="radiographs",
                                         unit="scan", disable=not progress)):
        volume = load_scan(processed_dir, scan.scan_id)
        if 2 * position >= writer.done:  # not written before an interruption
            try:
                study = render_study(volume["image"], volume["mask"], volume["spacing"], cfg, hu_window)
                for offset, view in enumerate(VIEWS):
                    writer.put(2 * position + offset, study.images[view], study.masks[view])
            except BaseException:  # keep what is done for the next run
                writer.checkpoint(2 * position, force=True)
                raise
            writer.checkpoint(2 * position + 2)
            geometry = study.geometry
        else:  # the labels still need the view geometry
            geometry = study_geometry(volume["image"].shape, volume["spacing"], cfg["side"])
        labels = study_labels(nodules[nodules["scan_id"] == scan.scan_id], geometry)
        malignant = int(labels["nodule"] == 1 and labels["malignancy"] >= MALIGNANT_MIN_RATING)
        studies.append({"study_id": scan.scan_id, "patient_id": scan.patient_id, "split": scan.split,
                        "nodule": labels["nodule"], "malignant": malignant, "scan_id": scan.scan_id,
                        **{key: value for key, value in labels.items() if key != "nodule"}})
        for view in VIEWS:
            row_mm, col_mm = geometry[view].pixel_mm
            images.append({"study_id": scan.scan_id, "view": view,
                           "pixel_mm_row": round(float(row_mm), 6), "pixel_mm_col": round(float(col_mm), 6)})
    table = pd.DataFrame(studies, columns=["study_id", "patient_id", "split", *LABELS, *STUDY_COLUMNS])
    table = table.astype({"nodule_id": "Int64"})
    writer.finish(
        {
            "source": "rendered",
            "labels": list(LABELS),
            "cfg": cfg,
            "hu_window": list(hu_window),
            "orientation": {
                "rows": "row 0 = most superior (head at the top), both views",
                "frontal": "radiological PA display: patient's right on the image left",
                "lateral": "anterior on the image left, posterior on the right",
            },
        },
        table,
        pd.DataFrame(images),
    )
    return table
