"""The report's figure of the data itself: the base CT, a few processed scans and their radiographs.

:func:`anatomy_section` draws one figure (``figures/anatomy.png``):

- a first row with the base chest CT of the phantom's ``ct`` anatomy
  (:mod:`chestssl.data.base_ct`): an axial slice through the lungs at mid height, a coronal
  slice through their middle, and the frontal and lateral radiographs rendered from it,
  present when ``data.source: phantom`` with ``data.phantom.anatomy: ct`` and the base CT is
  on disk;
- then up to :data:`NUM_SCANS` rows of processed scans (``data/processed``) of the test
  split (of any split when the test split has no nodule), those with the largest nodule
  first: an axial and a coronal slice through the largest nodule's centroid and the
  frontal and lateral radiographs rendered from the scan, the nodules (the radiologists'
  consensus masks) outlined on all four.

Every panel keeps the physical aspect ratio of its pixels. The radiographs are rendered
here as :func:`chestssl.data.drr.render_study` renders them, with NumPy alone, so the report
stage never imports torch or MONAI (:func:`render_views`).

Orientation (as :mod:`chestssl.data.drr`): axial slices anterior at the top and the
patient's right on the image left; coronal slices and radiographs head at the top and the
patient's right on the image left (frontal); lateral radiographs anterior on the left.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns

from chestssl.data import base_ct as base_ct_files
from chestssl.data.drr import (
    DEFAULT_HU_WINDOW,
    VIEWS,
    ViewGeometry,
    attenuation_per_mm,
    hu_from_processed,
    line_integral,
    max_projection,
    study_geometry,
)
from chestssl.data.processed import ProcessedDataError, load_scan, read_nodules, scan_path
from chestssl.data.slice_windows import window_pixels
from chestssl.report.figures import _image_axis, _new_figure, save_figure

FIGURE_NAME = "anatomy.png"
#: At most this many processed scans are shown, one row each.
NUM_SCANS = 2
#: Side (pixels) of the radiographs drawn here, whatever ``radiographs.side`` the pipeline uses.
RADIOGRAPH_SIZE = 256
#: Keep every n-th voxel of the base CT per axis (R, C, S): 1.4 mm pixels in-plane, all slices.
BASE_STRIDE = (2, 2, 1)
_CONTOUR_COLOUR = "#ffd400"
_LUNG_COLOUR = "#4fc3f7"
SOURCES = {
    "ct": "phantom scans built on a real chest CT (the base CT, deformed per patient) with the LIDC-IDRI "
          "radiologists' nodules inserted",
    "geometric": "phantom scans with drawn anatomy (geometric shapes) and the LIDC-IDRI radiologists' nodules "
                 "inserted",
}


# ------------------------------------------------------------------------ radiographs without MONAI


def window_percentiles(image: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """:func:`chestssl.data.drr.window_percentiles` in NumPy: ``image`` (any shape) scaled so its
    ``lower`` and ``upper`` percentiles map to 0 and 1, clipped to [0, 1]; float32."""
    image = np.asarray(image, np.float32)
    low, high = (float(v) for v in np.percentile(image, [lower, upper]))
    if high <= low:
        return (image > low).astype(np.float32)
    scaled = (image - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def pad(geometry: ViewGeometry, image: np.ndarray) -> np.ndarray:
    """:meth:`chestssl.data.drr.ViewGeometry.pad` in NumPy: a ``fitted_shape`` image placed in
    a ``(size, size)`` one at ``pad_before``, zeros around, same dtype."""
    if tuple(image.shape) != geometry.fitted_shape:
        raise ValueError(f"{geometry.view}: expected a {geometry.fitted_shape} image to pad, got {tuple(image.shape)}")
    top, left = geometry.pad_before
    bottom = geometry.size - geometry.fitted_shape[0] - top
    right = geometry.size - geometry.fitted_shape[1] - left
    return np.pad(image, ((top, bottom), (left, right)), mode="constant", constant_values=0)


def render_views(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float], cfg: Mapping[str, Any],
                 hu_window: Sequence[float] = DEFAULT_HU_WINDOW) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The frontal and lateral radiographs of one processed scan, as
    :func:`chestssl.data.drr.render_study` renders them, without MONAI.

    ``image``: ``(Z, Y, X)`` in [0, 1] (HU windowed to ``hu_window``); ``mask``: ``(Z, Y, X)``
    uint8 nodule labels; ``spacing``: (z, y, x) mm; ``cfg``: ``side``, ``mu_water_per_mm``,
    ``window_percentiles``. Returns ``(images, masks)``, each view -> ``(size, size)``: the
    radiograph float32 in [0, 1] and the max-projected nodule labels uint8.
    """
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"expected image and mask of one (Z, Y, X) shape, got {image.shape} and {mask.shape}")
    mu = attenuation_per_mm(hu_from_processed(image, hu_window), cfg["mu_water_per_mm"])
    lower, upper = cfg["window_percentiles"]
    images, masks = {}, {}
    for view, geometry in study_geometry(image.shape, spacing, cfg["side"]).items():
        integral = geometry.resample_image(line_integral(mu, spacing, view))
        images[view] = pad(geometry, window_percentiles(integral, lower, upper))
        masks[view] = pad(geometry, geometry.resample_labels(max_projection(mask, view)))
    return images, masks


# ------------------------------------------------------------------------ panels


@dataclass(frozen=True)
class Panel:
    """One image of the figure: ``image`` (rows, cols) shown between ``vmin`` and ``vmax``, with
    pixels of ``pixel_mm`` (rows, cols) mm; ``mask`` (rows, cols) outlined where > 0 (``None``:
    nothing to outline); ``title`` above it."""

    image: np.ndarray
    pixel_mm: tuple[float, float]
    title: str
    vmin: float = 0.0
    vmax: float = 1.0
    mask: np.ndarray | None = None
    outline: str = _CONTOUR_COLOUR


def _radiograph_panels(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float], cfg: Mapping[str, Any],
                       hu_window: Sequence[float], label: str) -> list[Panel]:
    """The frontal and lateral :class:`Panel` of a ``(Z, Y, X)`` volume (:func:`render_views`)."""
    images, masks = render_views(image, mask, spacing, cfg, hu_window)
    geometry = study_geometry(image.shape, spacing, cfg["side"])
    return [Panel(images[view], geometry[view].pixel_mm, f"{label}\n{view} radiograph",
                  mask=masks[view] if masks[view].any() else None) for view in VIEWS]


def base_ct_panels(base, hu_window: Sequence[float], cfg: Mapping[str, Any]) -> list[Panel]:
    """The base CT's row: axial slice through the lungs' mid height, coronal slice through
    their middle (anterior-posterior), frontal and lateral radiographs.

    ``base``: a :class:`chestssl.data.ct_anatomy.BaseCT` (``hu`` int16 (R, C, S): rows toward
    posterior, columns toward the patient's left, slices upward; ``spacing`` (3,) mm).
    """
    hu = np.asarray(base.hu)
    spacing = np.asarray(base.spacing, dtype=float)
    lung = np.asarray(base.lung) > 0
    centre = np.argwhere(lung).mean(axis=0) if lung.any() else (np.array(hu.shape) - 1) / 2.0
    row, slice_ = (int(round(float(v))) for v in (centre[0], centre[2]))
    low, high = (float(v) for v in hu_window)
    axial = hu[:, :, slice_]  # (R, C): anterior at the top, the patient's right on the left
    coronal = hu[row].T[::-1]  # (S, C): the most superior slice at the top
    panels = [
        Panel(axial, (spacing[0], spacing[1]), f"base CT\naxial, slice {slice_}", low, high,
              mask=lung[:, :, slice_], outline=_LUNG_COLOUR),
        Panel(coronal, (spacing[2], spacing[1]), f"base CT\ncoronal, row {row}", low, high,
              mask=lung[row].T[::-1], outline=_LUNG_COLOUR),
    ]
    # As a processed scan: (Z, Y, X) with slice 0 the most inferior, windowed to [0, 1].
    volume = np.clip((hu.transpose(2, 0, 1).astype(np.float32) - low) / (high - low), 0.0, 1.0)
    spacing_zyx = (spacing[2], spacing[0], spacing[1])
    return panels + _radiograph_panels(volume, np.zeros(volume.shape, np.uint8), spacing_zyx, cfg,
                                       hu_window, "base CT")


def scan_panels(scan: Mapping[str, np.ndarray], nodule: pd.Series, hu_window: Sequence[float],
                cfg: Mapping[str, Any]) -> list[Panel]:
    """A processed scan's row: axial and coronal slices through ``nodule``'s centroid (a row
    of ``nodules.csv``), frontal and lateral radiographs; nodules outlined on each.

    ``scan``: :func:`chestssl.data.processed.load_scan`'s ``image`` (Z, Y, X) in [0, 1],
    ``mask`` (Z, Y, X) uint8 and ``spacing`` (z, y, x) mm.
    """
    image, mask = scan["image"], scan["mask"]
    spacing = tuple(float(s) for s in scan["spacing"])
    centre = [int(np.clip(round(float(nodule[f"centroid_{axis}"])), 0, n - 1))
              for axis, n in zip("zy", image.shape[:2])]
    z, y = centre
    label = f"{nodule['scan_id']}, nodule {float(nodule['diameter_mm']):.0f} mm"
    axial_mask, coronal_mask = mask[z] > 0, mask[:, y][::-1] > 0
    return [
        Panel(image[z], (spacing[1], spacing[2]), f"{label}\naxial, slice {z}",
              mask=axial_mask if axial_mask.any() else None),
        Panel(image[:, y][::-1], (spacing[0], spacing[2]), f"{label}\ncoronal, row {y}",
              mask=coronal_mask if coronal_mask.any() else None),
        *_radiograph_panels(image, mask, spacing, cfg, hu_window, label),
    ]


def anatomy_figure(path: str | os.PathLike, rows: Sequence[Sequence[Panel]], title: str) -> Path:
    """One row of panels per entry of ``rows`` (up to 4 panels each), every panel in its
    physical aspect ratio, outlines drawn as contours at 0.5 of its mask."""
    if not rows:
        raise ValueError("no panels to draw")
    columns = max(len(row) for row in rows)
    with sns.axes_style("white"):
        figure = _new_figure(2.6 * columns, 2.9 * len(rows) + 0.5)
        axes = figure.subplots(len(rows), columns, squeeze=False)
        for row, panels in enumerate(rows):
            for column in range(columns):
                ax = axes[row, column]
                _image_axis(ax)
                if column >= len(panels):
                    ax.axis("off")
                    continue
                panel = panels[column]
                ax.imshow(np.asarray(panel.image, np.float32), cmap="gray", vmin=panel.vmin, vmax=panel.vmax,
                          interpolation="antialiased", aspect=panel.pixel_mm[0] / panel.pixel_mm[1])
                if panel.mask is not None and panel.mask.any():
                    ax.contour(np.asarray(panel.mask > 0, np.float32), levels=[0.5], colors=panel.outline,
                               linewidths=0.9)
                ax.set_title(panel.title, fontsize=8)
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


# ------------------------------------------------------------------------ the section


def choose_nodules(nodules: pd.DataFrame, count: int = NUM_SCANS) -> pd.DataFrame:
    """The largest nodule (``diameter_mm``, then lowest ``nodule_id``) of each of up to
    ``count`` scans: those of the test split (of any split when the test split has no
    nodule), the largest nodules first, ties by ``scan_id``."""
    pool = nodules[nodules["split"] == "test"]
    if pool.empty:
        pool = nodules
    largest = (pool.sort_values(["scan_id", "diameter_mm", "nodule_id"], ascending=[True, False, True], kind="stable")
               .drop_duplicates("scan_id"))
    return largest.sort_values(["diameter_mm", "scan_id"], ascending=[False, True], kind="stable").head(count)


def _mm(values: Sequence[float]) -> str:
    return " x ".join(f"{float(v):.3g}" for v in values)


def anatomy_title(params: Mapping[str, Any]) -> str:
    """The figure's (and its report section's) title for the data the params name."""
    data = params["data"]
    if data["source"] != "phantom":
        return "The data: CT scans and their radiographs"
    if (data.get("phantom") or {}).get("anatomy", "ct") == "ct":
        return "The data: base CT, phantom scans and their radiographs"
    return "The data: phantom scans and their radiographs"


def anatomy_section(
    params: Mapping[str, Any],
    processed_dir: str | os.PathLike,
    figures_dir: str | os.PathLike,
    base_ct_dir: str | os.PathLike = base_ct_files.DEFAULT_DIR,
    base_ct_expected: Mapping[str, str] | None = None,
) -> tuple[list[tuple[str, Path]], list[str]]:
    """(captioned figures, skipped notes) of the data: ``figures_dir/anatomy.png``.

    ``params``: the loaded params (``data.source``, ``data.phantom.anatomy``,
    ``preprocess.hu_window``, ``preprocess.clevel``, ``radiographs``); ``processed_dir``: the
    preprocess stage's folder; ``base_ct_dir``, ``base_ct_expected``: the base CT's folder
    and its files' SHA-256s (:func:`chestssl.data.ct_anatomy.load_base_ct`; the pinned ones by
    default). What cannot be shown (no base CT for this data, no processed data, no nodule)
    is a skipped note; no figure at all when nothing can be shown.
    """
    data = params["data"]
    source = data["source"]
    anatomy = (data.get("phantom") or {}).get("anatomy", "ct") if source == "phantom" else None
    hu_window = tuple(float(v) for v in params["preprocess"].get("hu_window", DEFAULT_HU_WINDOW))
    clevel = float(params["preprocess"].get("clevel", 0.5))
    cfg = {**params["radiographs"], "side": RADIOGRAPH_SIZE}
    rows: list[list[Panel]] = []
    skipped: list[str] = []
    described: list[str] = []

    if anatomy == "ct":
        from chestssl.data.ct_anatomy import load_base_ct  # nibabel and scipy: only when drawn

        try:
            base = load_base_ct(base_ct_dir, expected=base_ct_expected, stride=BASE_STRIDE)
        except base_ct_files.BaseCTError as error:
            hint = "" if base_ct_files.FETCH_COMMAND in str(error) else f" (`{base_ct_files.FETCH_COMMAND}` fetches it)"
            skipped.append(f"Data figure, base CT row: {error}{hint}.")
        else:
            rows.append(base_ct_panels(base, hu_window, cfg))
            described.append(f"the first row is the base CT (drawn with voxels of {_mm(base.spacing)} mm; lungs "
                             "outlined in blue): an axial slice through the lungs at mid height, a coronal slice "
                             "through their middle, and its radiographs")
    else:
        why = "drawn (geometric) anatomy" if source == "phantom" else f"real CT (`data.source: {source}`)"
        skipped.append(f"Data figure, base CT row: the data are {why}, which has no base CT "
                       "(only `data.phantom.anatomy: ct` is built on one).")

    scan_rows: list[list[Panel]] = []
    spacings: list[tuple[float, ...]] = []
    try:
        nodules = read_nodules(processed_dir)
        chosen = choose_nodules(nodules)
        for _, nodule in chosen.iterrows():
            scan = load_scan(processed_dir, str(nodule["scan_id"]))
            spacings.append(tuple(float(s) for s in scan["spacing"]))
            scan_rows.append(scan_panels(scan, nodule, hu_window, cfg))
    except (FileNotFoundError, ProcessedDataError) as error:
        skipped.append(f"Data figure, scan rows: {error}")
    else:
        if chosen.empty:
            skipped.append(f"Data figure, scan rows: {Path(processed_dir) / 'nodules.csv'} lists no nodule.")
        else:
            scans = ("the test-split scan" if len(chosen) == 1 else f"the {len(chosen)} test-split scans")
            if not (chosen["split"] == "test").all():
                scans = ("the scan" if len(chosen) == 1 else f"the {len(chosen)} scans") + \
                    " of any split (the test split has none with a nodule)"
            largest = "the largest nodule" if len(chosen) == 1 else "the largest nodules"
            pixels = " or ".join(f"{_mm(s[1:])} mm axial, {_mm((s[0], s[2]))} mm coronal"
                                 for s in sorted(set(spacings)))
            described.append(
                f"{'the next' if rows else 'the'} {'row is' if len(chosen) == 1 else 'rows are'} {scans} with "
                f"{largest}: axial and coronal slices through the largest nodule's centroid (pixels of {pixels}) "
                "and the frontal and lateral radiographs rendered from the scan; nodules outlined in yellow, the "
                f"radiologists' consensus (pylidc, `preprocess.clevel` {clevel:g}), max-projected in the radiographs")
            rows += scan_rows
    if not rows:
        return [], skipped

    if source == "phantom":
        data_source = SOURCES.get(anatomy, f"phantom scans ({anatomy} anatomy)")
    else:
        data_source = f"real LIDC-IDRI CT (`data.source: {source}`)"
    caption = (f"The data: {data_source}; " + "; ".join(described)
               + f". Radiographs drawn at {RADIOGRAPH_SIZE} x {RADIOGRAPH_SIZE} px (the pipeline renders them at "
               f"`radiographs.side` {params['radiographs']['side']}); slices in the window "
               f"[{hu_window[0]:g}, {hu_window[1]:g}] HU; every panel in its physical aspect ratio; head at the top, "
               "the patient's right on the left, anterior on the left of the lateral view")
    path = anatomy_figure(Path(figures_dir) / FIGURE_NAME, rows, anatomy_title(params))
    return [(caption, path)], skipped


# ----------------------------------------------------------------------------- nodule scale


def _stored_shape(archive: zipfile.ZipFile, name: str) -> tuple[int, ...]:
    """The shape of array ``name`` in an ``.npz`` archive, from its header alone."""
    with archive.open(f"{name}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(handle)
    return tuple(int(n) for n in shape)


def nodule_scale(processed_dir: str | os.PathLike, size: int, field_of_view: str = "body",
                 pixel_mm: float | None = None) -> dict[str, float] | None:
    """How large the nodules are in the ``size`` x ``size`` slices the 2D models see.

    A slice (with ``field_of_view`` ``lungs``, its scan's ``lung_box``; with ``window``, a
    window ``size * pixel_mm`` mm across, :mod:`chestssl.data.slice_windows`) is padded to a
    square of its longer side and resized to ``size`` (:func:`chestssl.data.datasets.square_resize`),
    so one of its pixels spans ``max(Y * sy, X * sx) / size`` mm of its scan. Returns the medians over the nodules of
    ``nodules.csv`` (each with its scan's pixel size): ``nodule_mm`` (consensus diameter),
    ``mm_per_pixel`` and ``nodule_pixels``, with ``nodules``, their count; ``None`` without
    nodules or processed data.
    """
    if field_of_view == "window" and not (pixel_mm is not None and pixel_mm > 0):
        raise ValueError(f"pixel_mm: got {pixel_mm!r}; field_of_view 'window' needs a pixel size in mm > 0")
    try:
        nodules = read_nodules(processed_dir)
    except (FileNotFoundError, ProcessedDataError):
        return None
    if nodules.empty:
        return None
    pixel_mm_of_scan = {}
    for scan_id in nodules["scan_id"].unique():
        path = scan_path(processed_dir, str(scan_id))
        try:
            with zipfile.ZipFile(path) as archive:
                _, rows, cols = _stored_shape(archive, "image")
            with np.load(path, allow_pickle=False) as archive:
                spacing = np.asarray(archive["spacing"], dtype=float)
                if field_of_view == "lungs":
                    y0, y1, x0, x1 = (int(v) for v in archive["lung_box"])
                    rows, cols = y1 - y0, x1 - x0
                elif field_of_view == "window":
                    rows, cols = window_pixels(size, pixel_mm, spacing[1:])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return None
        pixel_mm_of_scan[scan_id] = max(rows * spacing[1], cols * spacing[2]) / size
    mm_per_pixel = nodules["scan_id"].map(pixel_mm_of_scan).to_numpy(float)
    diameters = nodules["diameter_mm"].to_numpy(float)
    return {"nodules": int(len(nodules)), "nodule_mm": float(np.median(diameters)),
            "mm_per_pixel": float(np.median(mm_per_pixel)), "nodule_pixels": float(np.median(diameters / mm_per_pixel))}
