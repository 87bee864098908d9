"""Windows of a fixed physical size cut from axial slices (``slices.field_of_view: window``).

A slice shown whole (``body``) or as its scan's box of the lungs (``lungs``) is resized to
``slices.side`` pixels whatever its width, so one pixel spans 3.5 to 5 mm and a pixel's
size differs from scan to scan. A window instead spans ``side * pixel_mm`` mm of every
scan (160 mm with 64 pixels of 2.5 mm): one lung and part of the other, at one
resolution for all patients, as patch-based segmentation trains at a fixed spacing
(nnU-Net; Isensee et al., Nature Methods 2021).

Where a window lies in its slice (:func:`window_corner`), drawn once per slice from a
generator seeded by the scan and the slice index alone, so every stage, task and process
cuts the same window from the same slice:

- on a slice with nodule pixels, uniformly among the positions that hold all of them and
  stay inside the scan's ``lung_box`` (the positions holding them all, when the box is
  narrower than the window; centred on the median nodule pixel, so on the larger of two
  far-apart nodules, when they do not fit in one window);
- on any other slice, uniformly among the positions inside the ``lung_box`` (centred on
  it where it is narrower than the window).

Both kinds are cut at the same scale from the same box, and a nodule lies anywhere in its
window, not at its centre, so neither the framing nor the nodule's place marks a nodule
slice. Parts of a window outside the slice read 0 (air after windowing), as the padding
of the other fields of view.

Only numpy: the report stage computes the windows' scale without importing MONAI.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def window_pixels(side: int, pixel_mm: float, spacing_yx: Sequence[float]) -> tuple[int, int]:
    """Rows and columns of the source slice a window spans: ``side * pixel_mm`` mm at the
    slice's in-plane ``spacing_yx`` (mm), rounded, at least 1."""
    width_mm = side * pixel_mm
    return tuple(max(1, int(round(width_mm / float(s)))) for s in spacing_yx)  # type: ignore[return-value]


def _slice_rng(scan_id: str, slice_index: int) -> np.random.Generator:
    """A generator that depends on the scan and the slice only (the same in every process)."""
    digest = hashlib.sha256(f"{scan_id}/{int(slice_index)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _axis_range(box: tuple[int, int], width: int, nodules: np.ndarray) -> tuple[int, int]:
    """The inclusive range of window starts along one axis (see the module's docstring).

    Args:
        box: ``[b0, b1)`` of the lungs along the axis.
        width: the window's extent along it, in pixels.
        nodules: coordinates of the slice's nodule pixels along it (empty on a clean slice).
    """
    b0, b1 = int(box[0]), int(box[1])
    if b1 - b0 >= width:
        lo, hi = b0, b1 - width
    else:
        lo = hi = (b0 + b1 - width) // 2
    if nodules.size == 0:
        return lo, hi
    m0, m1 = int(nodules.min()), int(nodules.max()) + 1
    if m1 - m0 > width:
        start = int(np.median(nodules)) - width // 2
        return start, start
    n_lo, n_hi = m1 - width, m0
    a, b = max(lo, n_lo), min(hi, n_hi)
    return (a, b) if a <= b else (n_lo, n_hi)


def window_corner(mask: np.ndarray, lung_box: Sequence[int], window: tuple[int, int], scan_id: str,
                  slice_index: int) -> tuple[int, int]:
    """The top-left ``(y0, x0)`` of the window cut from one slice (may lie outside it).

    Args:
        mask: (Y, X) the slice's nodule mask (nonzero on nodule pixels).
        lung_box: ``[y0, y1, x0, x1)`` of the scan's lungs and nodules.
        window: ``(rows, cols)`` of the window (:func:`window_pixels`).
        scan_id, slice_index: seed the draw, so the same slice always gets the same window.
    """
    rows, cols = np.nonzero(np.asarray(mask))
    y_range = _axis_range((lung_box[0], lung_box[1]), window[0], rows)
    x_range = _axis_range((lung_box[2], lung_box[3]), window[1], cols)
    rng = _slice_rng(scan_id, slice_index)
    return int(rng.integers(y_range[0], y_range[1] + 1)), int(rng.integers(x_range[0], x_range[1] + 1))


def cut_window(slices: np.ndarray, corner: tuple[int, int], window: tuple[int, int]) -> np.ndarray:
    """The ``window`` of ``slices`` (..., Y, X) at ``corner``; what lies outside them reads 0.

    Returns (..., rows, cols) of the same dtype."""
    y0, x0 = corner
    rows, cols = window
    out = np.zeros(slices.shape[:-2] + (rows, cols), dtype=slices.dtype)
    sy0, sy1 = max(y0, 0), min(y0 + rows, slices.shape[-2])
    sx0, sx1 = max(x0, 0), min(x0 + cols, slices.shape[-1])
    if sy0 < sy1 and sx0 < sx1:
        out[..., sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = slices[..., sy0:sy1, sx0:sx1]
    return out
