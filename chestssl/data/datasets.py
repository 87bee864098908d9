"""2D axial slice datasets built from ``data/processed`` (see :mod:`chestssl.data.processed`).

The slice protocol follows the multi-task chest CT autoencoder (seed 000,
"lidc-autoencoder"): axial slices of the windowed CT, a nodule slice being one whose
consensus mask has more than ``preprocess.min_nodule_pixels`` pixels. Unlike seed 000,
whose 8:1:1 split was drawn over slices (one patient's slices in train and test), every
slice here inherits its patient's split from ``splits.json``. Seed 000 took its clean
slices from patients without annotations; ``clean_source`` chooses between that and any
slice without nodule pixels (the default).

Each slice is padded to a square with 0 (air after windowing, so the padding looks like
the background outside the body) and resized to ``size`` x ``size``: the image with area
interpolation when shrinking (it averages, so no aliasing) and bilinear when enlarging,
the mask with nearest-neighbour interpolation so it stays binary.

Where the slices live: the resized slices of a dataset (float16 images, uint8 masks) are
computed once, scan by scan, into two ``.npy`` files of the array cache
(:mod:`chestssl.data.array_cache`: ``$CHESTSSL_CACHE_DIR/slices``, else
``.cache/slices``), keyed by the selected slices, the size and the identity of the scan
files, and every process opens them read-only, memory-mapped. So no process holds the split
in its own memory: the DDP ranks and DataLoader workers reading one dataset share the
page cache's single copy, which the operating system can drop and reread, and a second
construction (another rank, the next stage) reuses the files instead of recomputing them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import Resize, SpatialPad
from torch.utils.data import Dataset

from chestssl.data.array_cache import cached_arrays, digest, open_entry, scan_identity
from chestssl.data.processed import SPLITS, DatasetError, load_scan, read_nodules, read_slices
from chestssl.data.slice_windows import cut_window, window_corner, window_pixels
from chestssl.paths import cache_dir
from chestssl.params import CLEAN_SOURCES  # where the clean slices of cls come from (slices.clean_source)
from chestssl.params import FIELDS_OF_VIEW  # what a slice shows (slices.field_of_view)

TASKS = ("pretrain", "seg", "cls")
SLICE_ARRAYS = ("images", "masks")


class SliceDataset(Dataset):
    """Axial slices of one split, for pretraining, segmentation or classification.

    Args:
        processed_dir: the ``data/processed`` folder.
        split: ``train``, ``val`` or ``test``.
        size: side of the square slices returned.
        task: ``pretrain`` (every slice of the split's scans), ``seg`` (nodule slices,
            ``label == 1``) or ``cls`` (nodule slices, label 1, plus clean slices,
            label 0, sampled at ``clean_per_nodule_slice`` per nodule slice; slices with
            ``label == -1``, a few nodule pixels only, are left out).
        clean_per_nodule_slice: clean slices drawn per nodule slice for ``cls``, whatever
            ``clean_source`` is (all of them, with a warning, when fewer are available).
        seed: seeds the sampling of clean slices.
        patient_ids: if given, only these patients (all must belong to ``split``), e.g.
            for label-fraction studies.
        clean_source: where the clean slices of ``cls`` are drawn from
            (``slices.clean_source``, one of :data:`CLEAN_SOURCES`): ``any_slice``, every
            slice without nodule pixels of the split's patients; ``nodule_free_patients``,
            seed 000's "clean slices from patients without annotations": only the slices of
            the split's patients (within ``patient_ids`` if given) that have no annotated
            nodule (no row in ``nodules.csv``, no nodule pixel in ``slices.csv``). A split
            without such a patient is then an error. Nodule slices and the other tasks do
            not depend on it.
        field_of_view: ``body``, the whole processed slice (cropped to the body);
            ``lungs``, only the scan's ``lung_box`` (the lungs and every nodule, the same
            box for every slice of a scan), so the nodules span more of the ``size`` pixels;
            or ``window``, a window ``size * pixel_mm`` mm across in the lungs, around the
            slice's nodule pixels (:mod:`chestssl.data.slice_windows`), so a pixel spans
            ``pixel_mm`` mm in every scan.
        pixel_mm: a slice pixel's size in mm with ``field_of_view`` ``window`` (needed
            there, unused otherwise).

    All items are computed once, at construction: each scan is loaded once and only the
    needed slices are kept, stored as float16 images and uint8 masks in the array cache
    (see the module's docstring) unless an earlier construction already wrote them there.
    ``images`` and ``masks`` are those (N, size, size) arrays, memory-mapped read-only;
    ``cache_entry`` is their folder.

    Items are dicts:

    - ``image``: (1, size, size) float32 in [0, 1];
    - ``mask``: (1, size, size) float32, 1 on nodule pixels (any nodule), else 0;
    - ``label``: int64 scalar tensor, the slice's label from ``slices.csv`` (1 nodule,
      0 clean, -1 in between; only 1 and 0 occur for ``seg``/``cls``);
    - ``malignancy``: float32 scalar tensor, the slice's ``max_malignancy`` from
      ``slices.csv``: the highest median malignancy rating (1-5) of the nodules on it,
      0 on a slice without nodule pixels;
    - ``patient_id``, ``scan_id``: str; ``slice_index``: int (axial index in the scan).

    ``frame`` holds one row per item (columns of ``slices.csv``) in item order.
    """

    def __init__(
        self,
        processed_dir: str | Path,
        split: str,
        size: int,
        task: str,
        clean_per_nodule_slice: float = 1.0,
        seed: int = 0,
        patient_ids: list[str] | None = None,
        clean_source: str = "any_slice",
        field_of_view: str = "body",
        pixel_mm: float | None = None,
    ) -> None:
        if split not in SPLITS:
            raise DatasetError(f"split: got {split!r}, expected one of {', '.join(SPLITS)}")
        if task not in TASKS:
            raise DatasetError(f"task: got {task!r}, expected one of {', '.join(TASKS)}")
        if not isinstance(size, int) or size < 1:
            raise DatasetError(f"size: got {size!r}, expected a positive integer")
        if clean_per_nodule_slice < 0:
            raise DatasetError(f"clean_per_nodule_slice: got {clean_per_nodule_slice!r}, expected a number >= 0")
        if clean_source not in CLEAN_SOURCES:
            raise DatasetError(f"clean_source: got {clean_source!r}, expected one of {', '.join(CLEAN_SOURCES)}")
        if field_of_view not in FIELDS_OF_VIEW:
            raise DatasetError(f"field_of_view: got {field_of_view!r}, expected one of {', '.join(FIELDS_OF_VIEW)}")
        if field_of_view == "window" and (pixel_mm is None or not pixel_mm > 0):
            raise DatasetError(f"pixel_mm: got {pixel_mm!r}; field_of_view 'window' needs a pixel size in mm > 0 "
                               "(slices.pixel_mm)")
        self.pixel_mm = float(pixel_mm) if field_of_view == "window" else None
        self.processed_dir = Path(processed_dir)
        self.split, self.size, self.task, self.field_of_view = split, size, task, field_of_view
        if not (self.processed_dir / "slices.csv").exists():
            raise FileNotFoundError(
                f"{self.processed_dir / 'slices.csv'} missing; run the preprocess stage (dvc repro preprocess)"
            )
        split_rows = read_slices(self.processed_dir)
        split_rows = split_rows[split_rows["split"] == split]
        if patient_ids is not None:
            split_rows = _restrict_to_patients(split_rows, patient_ids, split, self.processed_dir)
        clean_patients = None
        if task == "cls" and clean_source == "nodule_free_patients":
            clean_patients = _nodule_free(split_rows, read_nodules(self.processed_dir))
            if not clean_patients:
                raise DatasetError(_no_nodule_free_patients(split_rows, split, self.processed_dir, patient_ids))
        frame = _select_rows(split_rows, task, clean_per_nodule_slice, seed, clean_patients)
        if frame.empty:
            scans = sorted(split_rows["scan_id"].unique())
            raise DatasetError(
                f"no {task!r} slices in split {split!r} of {self.processed_dir} "
                f"({len(scans)} scans{': ' + ', '.join(scans[:10]) if scans else ''}"
                f"{', ...' if len(scans) > 10 else ''}); "
                + _empty_hint(task)
            )
        self.frame = frame.reset_index(drop=True)
        self._arrays: dict[str, np.ndarray] | None = self._cached_slices()
        self.labels = torch.tensor(self.frame["label"].to_numpy(), dtype=torch.int64)
        self.malignancy = torch.tensor(self.frame["max_malignancy"].to_numpy(dtype=np.float32), dtype=torch.float32)
        self.patient_ids: list[str] = self.frame["patient_id"].tolist()
        self.scan_ids: list[str] = self.frame["scan_id"].tolist()
        self.slice_indices: list[int] = [int(i) for i in self.frame["slice_index"]]

    def _cached_slices(self) -> dict[str, np.ndarray]:
        """The memory-mapped ``images`` and ``masks`` of the cache entry of these slices, written first if needed."""
        scans = self.frame["scan_id"].unique().tolist()
        key = digest({
            "size": self.size,
            "field_of_view": self.field_of_view,
            "pixel_mm": self.pixel_mm,
            "rows": [[scan, int(index)] for scan, index in zip(self.frame["scan_id"], self.frame["slice_index"])],
            "scans": {scan: scan_identity(self.processed_dir, scan) for scan in scans},
        })
        folder = cache_dir().absolute() / "slices"
        name = f"{self.task}-{self.split}-{self.size}px-{self.field_of_view}-{key[:24]}"
        self.cache_entry = folder / name
        shape = (len(self.frame), self.size, self.size)
        return cached_arrays(
            folder, name, SLICE_ARRAYS, self._write_slices,
            valid=lambda arrays: (arrays["images"].shape == arrays["masks"].shape == shape
                                  and arrays["images"].dtype == np.float16 and arrays["masks"].dtype == np.uint8),
        )

    def _write_slices(self, folder: Path) -> None:
        """Load each scan once; crop (field of view), pad and resize its needed slices into ``folder/{images,masks}.npy``
        ((N, S, S) float16 and uint8), one scan at a time."""
        shape = (len(self.frame), self.size, self.size)
        images = np.lib.format.open_memmap(folder / "images.npy", "w+", np.float16, shape)
        masks = np.lib.format.open_memmap(folder / "masks.npy", "w+", np.uint8, shape)
        for scan_id, rows in self.frame.groupby("scan_id", sort=False):
            scan = load_scan(self.processed_dir, scan_id)
            depth = scan["image"].shape[0]
            wanted = rows["slice_index"].to_numpy()
            if wanted.min() < 0 or wanted.max() >= depth:
                raise DatasetError(
                    f"slices.csv lists slice {int(wanted.max())} of scan {scan_id}, but "
                    f"scans/{scan_id}.npz has {depth} slices; rerun the preprocess stage"
                )
            image, mask = square_resize(*self._field(scan, scan_id, wanted), self.size)
            positions = rows.index.to_numpy(dtype=np.int64)
            images[positions] = image.to(torch.float16).numpy()
            masks[positions] = mask.to(torch.uint8).numpy()
        images.flush()
        masks.flush()

    def _field(self, scan: dict[str, np.ndarray], scan_id: str, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (N, Y', X') images and bool masks of slices ``wanted`` of one scan within the field of view."""
        if self.field_of_view == "body":
            return scan["image"][wanted], scan["mask"][wanted] > 0
        y0, y1, x0, x1 = (int(v) for v in scan["lung_box"])
        if self.field_of_view == "lungs":
            return scan["image"][wanted, y0:y1, x0:x1], scan["mask"][wanted, y0:y1, x0:x1] > 0
        window = window_pixels(self.size, self.pixel_mm, scan["spacing"][1:])
        images, masks = [], []
        for index in wanted:
            corner = window_corner(scan["mask"][index], (y0, y1, x0, x1), window, scan_id, int(index))
            images.append(cut_window(scan["image"][index], corner, window))
            masks.append(cut_window(scan["mask"][index] > 0, corner, window))
        return np.stack(images), np.stack(masks)

    @property
    def images(self) -> np.ndarray:
        """(N, size, size) float16 slices in [0, 1], memory-mapped read-only."""
        return self._mapped()["images"]

    @property
    def masks(self) -> np.ndarray:
        """(N, size, size) uint8 masks (1 on nodule pixels), memory-mapped read-only."""
        return self._mapped()["masks"]

    def _mapped(self) -> dict[str, np.ndarray]:
        if self._arrays is None:  # unpickled, e.g. in a spawned DataLoader worker
            self._arrays = open_entry(self.cache_entry, SLICE_ARRAYS)
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None  # a memmap would pickle as a copy of its data: reopen the files instead
        return state

    def expected_class_counts(self) -> list[float]:
        """Clean (label 0) and nodule (label 1) items in one epoch: every slice once; slices
        labelled -1 (a few nodule pixels only) count in neither."""
        labels = self.labels.numpy()
        return [float(np.sum(labels == k)) for k in (0, 1)]

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": torch.from_numpy(np.array(self.images[index], dtype=np.float32))[None],
            "mask": torch.from_numpy(np.array(self.masks[index], dtype=np.float32))[None],
            "label": self.labels[index],
            "malignancy": self.malignancy[index],
            "patient_id": self.patient_ids[index],
            "scan_id": self.scan_ids[index],
            "slice_index": self.slice_indices[index],
        }


def slice_options(slices: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :class:`SliceDataset` that the ``slices`` params set: ``size``,
    ``clean_per_nodule_slice``, ``clean_source``, ``field_of_view`` and ``pixel_mm``."""
    return {"size": int(slices["side"]), "clean_per_nodule_slice": slices["clean_per_nodule_slice"],
            "clean_source": slices["clean_source"], "field_of_view": slices["field_of_view"],
            "pixel_mm": slices["pixel_mm"]}


def square_resize(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad slices to a square with 0 (centred) and resize them to ``size`` x ``size``.

    Args:
        image: (N, Y, X) float slices in [0, 1].
        mask: (N, Y, X) bool or {0, 1} slices.
        size: output side.

    Returns:
        image (N, size, size) float32 and mask (N, size, size) bool. The N slices are
        treated as channels, so all get the same geometry.
    """
    side = max(image.shape[1:])
    pad = SpatialPad(spatial_size=(side, side), mode="constant", value=0)
    image_t = pad(torch.as_tensor(np.asarray(image, np.float32)))
    mask_t = pad(torch.as_tensor(np.asarray(mask, np.float32)))
    # Area interpolation averages the covered pixels when shrinking; it degenerates to
    # nearest when enlarging, where bilinear is the smoother choice.
    image_mode = "area" if side >= size else "bilinear"
    image_t = Resize((size, size), mode=image_mode)(image_t)
    mask_t = Resize((size, size), mode="nearest-exact")(mask_t)
    image_out = torch.as_tensor(image_t).clamp_(0.0, 1.0)
    mask_out = torch.as_tensor(mask_t) > 0.5
    return image_out, mask_out


def _restrict_to_patients(rows: pd.DataFrame, patient_ids: list[str], split: str, processed_dir: Path) -> pd.DataFrame:
    wanted = [str(p) for p in patient_ids]
    unknown = sorted(set(wanted) - set(rows["patient_id"]))
    if unknown:
        raise DatasetError(
            f"patient_ids: {', '.join(unknown[:10])}{', ...' if len(unknown) > 10 else ''} not in split "
            f"{split!r} of {processed_dir} (see splits.json); pass patients of that split only"
        )
    return rows[rows["patient_id"].isin(set(wanted))]


def nodule_free_patients(processed_dir: str | Path, split: str) -> list[str]:
    """Patients of ``split`` without any annotated nodule, sorted: seed 000's source of clean
    slices (``slices.clean_source: nodule_free_patients``).

    A patient is nodule-free when ``nodules.csv`` lists no nodule of any of its scans (no
    annotation clustered into a nodule, even one whose consensus mask is empty) and none
    of its slices has a nodule pixel or a label other than 0 in ``slices.csv``.
    """
    if split not in SPLITS:
        raise DatasetError(f"split: got {split!r}, expected one of {', '.join(SPLITS)}")
    rows = read_slices(processed_dir)
    return sorted(_nodule_free(rows[rows["split"] == split], read_nodules(processed_dir)))


def _nodule_free(rows: pd.DataFrame, nodules: pd.DataFrame) -> set[str]:
    """The patients of ``rows`` (slices) with no nodule in ``nodules`` and no slice with nodule pixels."""
    marked = (rows["nodule_pixels"] > 0) | (rows["label"] != 0)
    annotated = set(nodules["patient_id"]) | set(rows.loc[marked, "patient_id"])
    return set(rows["patient_id"]) - annotated


def _no_nodule_free_patients(rows: pd.DataFrame, split: str, processed_dir: Path,
                             patient_ids: list[str] | None) -> str:
    patients = rows["patient_id"].nunique()
    if patient_ids is not None:
        return (
            f"slices.clean_source: 'nodule_free_patients' draws the clean slices of classification from patients "
            f"without any annotation (seed 000), but the {patients} patient(s) of patient_ids in split {split!r} of "
            f"{processed_dir} all have annotated nodules (nodules.csv); include a patient without nodules in "
            "patient_ids, or set slices.clean_source: any_slice (clean slices from any slice without nodule pixels)"
        )
    return (
        f"slices.clean_source: 'nodule_free_patients' draws the clean slices of classification from patients "
        f"without any annotation (seed 000), but the {patients} patient(s) of split {split!r} in {processed_dir} "
        "all have annotated nodules (nodules.csv); set slices.clean_source: any_slice (clean slices from any slice "
        "without nodule pixels), or preprocess more patients (data.tcia.max_patients, data.phantom.num_scans) or "
        "change preprocess.split so that every split holds a patient without nodules"
    )


def _select_rows(rows: pd.DataFrame, task: str, clean_per_nodule_slice: float, seed: int,
                 clean_patients: set[str] | None = None) -> pd.DataFrame:
    """The slices of ``task``, sorted by scan and slice index; the clean slices of ``cls``
    are drawn from ``clean_patients`` only when given."""
    rows = rows.sort_values(["scan_id", "slice_index"], kind="stable")
    if task == "pretrain":
        return rows
    nodule = rows[rows["label"] == 1]
    if task == "seg":
        return nodule
    clean = rows[rows["label"] == 0]
    if clean_patients is not None:
        clean = clean[clean["patient_id"].isin(clean_patients)]
    wanted = int(round(clean_per_nodule_slice * len(nodule)))
    if wanted > len(clean):
        warnings.warn(
            f"cls: {wanted} clean slices wanted ({clean_per_nodule_slice:g} per nodule slice x {len(nodule)}), "
            f"only {len(clean)} available{' from patients without nodules' if clean_patients is not None else ''}; "
            "using all of them",
            stacklevel=3,
        )
        wanted = len(clean)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(clean), size=wanted, replace=False))
    chosen = pd.concat([nodule, clean.iloc[picked]])
    return chosen.sort_values(["scan_id", "slice_index"], kind="stable")


def _empty_hint(task: str) -> str:
    if task == "pretrain":
        return "the split has no scans: preprocess more scans (data.phantom.num_scans) or change preprocess.split"
    return (
        "the split has no nodule slices: preprocess more scans (data.phantom.num_scans, data.tcia.max_patients), "
        "change preprocess.split, or lower preprocess.min_nodule_pixels"
    )
