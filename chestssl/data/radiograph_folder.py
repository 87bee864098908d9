"""The radiographs folder (``data/radiographs``): one layout for rendered and real chest X-rays.

The ``radiographs`` stage fills it either with two-view studies rendered from the processed
CT (:mod:`chestssl.data.drr`, ``data.cxr.source: rendered``) or with a real chest X-ray
dataset (:mod:`chestssl.data.cxr_import`: CheXpert, ChestX-ray14, COVID-19 Radiography,
MIMIC-CXR). Everything downstream (:mod:`chestssl.data.radiograph_datasets`) reads this
layout only, so it never needs to know where the radiographs came from.

Files (layout version :data:`LAYOUT_VERSION`):

- ``radiographs.json``: ``layout``, ``source``, ``size`` (S), ``labels`` (the names of the
  label columns of ``studies.csv``, in order), ``views`` (the views present) and what the
  source records about itself (rendering settings, dataset root, ...).
- ``studies.csv``: one row per study: ``study_id`` (unique), ``patient_id``, ``split``
  (``train``, ``val`` or ``test``, patient-level), one column per label (1.0 positive,
  0.0 negative, empty unknown), then source-specific columns.
- ``images.csv``: one row per image: ``study_id``, ``view`` (``frontal`` or ``lateral``),
  then source-specific columns. A study's images are consecutive rows, and studies come in
  the order of ``studies.csv``; row i is ``images.npy[i]``. A study has one or more
  images (MIMIC-CXR studies hold up to five).
- ``images.npy``: (N, S, S) float16 in [0, 1], memory-mapped when read, so a dataset of
  hundreds of thousands of radiographs is never loaded whole.
- ``masks.npy`` (optional): (N, S, S) bool, per image a region of interest (rendered: the
  projected nodules).
- ``skipped.csv`` (optional): inputs left out, with the reason (never a silent skip).

:class:`RadiographFolderWriter` builds the folder beside its final place and swaps it in
at the end, so a reader never sees a partial folder; an interrupted build resumes where it
stopped when it is started again on the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from chestssl.data.processed import SPLITS, DatasetError
from chestssl.io import write_csv, write_json

__all__ = [
    "LAYOUT_VERSION",
    "RadiographFolder",
    "RadiographFolderWriter",
    "RadiographsNotFoundError",
    "VIEWS",
    "input_fingerprint",
    "open_radiograph_folder",
]

LAYOUT_VERSION = 2
VIEWS = ("frontal", "lateral")
STUDY_KEY_COLUMNS = ("study_id", "patient_id", "split")
IMAGE_KEY_COLUMNS = ("study_id", "view")
#: Seconds between two resume checkpoints of a build.
CHECKPOINT_SECONDS = 30.0
_RERUN = "rerun the radiographs stage (dvc repro radiographs)"
_LAYOUT = (
    "expected a radiographs folder with radiographs.json, studies.csv, images.csv and images.npy "
    "(chestssl.data.radiograph_folder); run the radiographs stage (dvc repro radiographs)"
)


class RadiographsNotFoundError(DatasetError, FileNotFoundError):
    """The radiographs folder or one of its files is missing."""


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RadiographFolder:
    """An opened radiographs folder.

    Attributes:
        path: the folder.
        info: ``radiographs.json``.
        studies: ``studies.csv`` (``study_id``, ``patient_id``, ``split`` as str; label
            columns float with NaN for unknown), in stored order.
        images: ``images.csv`` plus ``study`` (int, the row of the image's study in
            ``studies``), in stored order.
        pixels: (N, S, S) float16, read-only memory map of ``images.npy``.
        masks: (N, S, S) bool memory map of ``masks.npy``, or ``None``.
    """

    path: Path
    info: dict[str, Any]
    studies: pd.DataFrame
    images: pd.DataFrame
    pixels: np.ndarray
    masks: np.ndarray | None

    @property
    def label_names(self) -> list[str]:
        return list(self.info["labels"])

    @property
    def size(self) -> int:
        return int(self.pixels.shape[-1])

    @property
    def source(self) -> str:
        return str(self.info["source"])

    def label_matrix(self, rows: pd.DataFrame | None = None) -> np.ndarray:
        """(R, L) float32 labels of ``rows`` of :attr:`studies` (all by default), NaN unknown."""
        rows = self.studies if rows is None else rows
        return rows[self.label_names].to_numpy(np.float32).reshape(len(rows), len(self.label_names))


def open_radiograph_folder(path: str | os.PathLike) -> RadiographFolder:
    """Open and check a radiographs folder written by :class:`RadiographFolderWriter`.

    Raises:
        RadiographsNotFoundError: the folder or a file is missing.
        DatasetError: a file is from an older layout or inconsistent (the message says what
            and how to rebuild it).
    """
    path = Path(path)
    if not path.is_dir():
        raise RadiographsNotFoundError(f"{path} not found; {_LAYOUT}")
    for name in ("radiographs.json", "studies.csv", "images.csv", "images.npy"):
        if not (path / name).is_file():
            raise RadiographsNotFoundError(f"{path / name} not found; {_LAYOUT}")
    info = json.loads((path / "radiographs.json").read_text())
    if not isinstance(info, dict) or info.get("layout") != LAYOUT_VERSION:
        found = info.get("layout", 1) if isinstance(info, dict) else None
        raise DatasetError(
            f"{path} is in radiographs layout {found}, this code reads layout {LAYOUT_VERSION}; {_RERUN}"
        )
    labels = info.get("labels")
    if not isinstance(labels, list) or not all(isinstance(name, str) for name in labels):
        raise DatasetError(f"{path / 'radiographs.json'}: 'labels' must list the label column names; {_RERUN}")
    text_columns = {column: str for column in (*STUDY_KEY_COLUMNS, "view", "scan_id")}
    # Only empty cells are missing: ids such as "NA" stay text.
    studies = pd.read_csv(path / "studies.csv", dtype=text_columns, keep_default_na=False, na_values=[""])
    images = pd.read_csv(path / "images.csv", dtype=text_columns, keep_default_na=False, na_values=[""])
    _check_columns(path / "studies.csv", studies, [*STUDY_KEY_COLUMNS, *labels])
    _check_columns(path / "images.csv", images, IMAGE_KEY_COLUMNS)
    for table_path, frame, keys in ((path / "studies.csv", studies, STUDY_KEY_COLUMNS),
                                    (path / "images.csv", images, IMAGE_KEY_COLUMNS)):
        empty = [column for column in keys if frame[column].isna().any()]
        if empty:
            raise DatasetError(f"{table_path}: empty cells in {', '.join(empty)}; {_RERUN}")
    _check_studies(path / "studies.csv", studies, labels)
    images = _check_images(path, studies, images)
    pixels = np.load(path / "images.npy", mmap_mode="r")
    size = int(info.get("size", -1))
    if pixels.dtype != np.float16 or pixels.shape != (len(images), size, size):
        raise DatasetError(
            f"{path / 'images.npy'}: {pixels.dtype} {pixels.shape}, expected float16 ({len(images)}, {size}, {size}) "
            f"(one image per row of images.csv, radiographs.json size {size}); {_RERUN}"
        )
    masks = None
    if (path / "masks.npy").is_file():
        masks = np.load(path / "masks.npy", mmap_mode="r")
        if masks.dtype != np.bool_ or masks.shape != pixels.shape:
            raise DatasetError(
                f"{path / 'masks.npy'}: {masks.dtype} {masks.shape}, expected bool {pixels.shape}; {_RERUN}"
            )
    return RadiographFolder(path, info, studies, images, pixels, masks)


def _check_columns(table_path: Path, frame: pd.DataFrame, required: Sequence[str]) -> None:
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DatasetError(f"{table_path} has no column(s) {', '.join(missing)}; {_RERUN}")


def _check_studies(table_path: Path, studies: pd.DataFrame, labels: Sequence[str]) -> None:
    duplicated = studies["study_id"][studies["study_id"].duplicated()].tolist()
    if duplicated:
        raise DatasetError(f"{table_path}: study_id {', '.join(duplicated[:5])} listed more than once; {_RERUN}")
    bad_split = sorted(set(studies["split"]) - set(SPLITS))
    if bad_split:
        raise DatasetError(f"{table_path}: split {bad_split} is not one of {', '.join(SPLITS)}; {_RERUN}")
    for name in labels:
        values = pd.to_numeric(studies[name], errors="coerce")
        bad = studies.loc[studies[name].notna() & ~values.isin([0.0, 1.0]), "study_id"].tolist()
        if bad:
            raise DatasetError(
                f"{table_path}: label {name!r} must be 1, 0 or empty (unknown), not for studies "
                f"{', '.join(bad[:5])}; {_RERUN}"
            )
        studies[name] = values.astype(np.float64)
    splits_per_patient = studies.groupby("patient_id")["split"].nunique()
    mixed = sorted(splits_per_patient.index[splits_per_patient > 1])
    if mixed:
        raise DatasetError(
            f"{table_path}: patients {', '.join(mixed[:10])} are in more than one split; the split must be "
            f"patient-level: {_RERUN}"
        )


def _check_images(path: Path, studies: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    position = pd.Series(np.arange(len(studies)), index=studies["study_id"])
    unknown = sorted(set(images["study_id"]) - set(position.index))
    if unknown:
        raise DatasetError(f"{path / 'images.csv'}: study_id {', '.join(unknown[:5])} not in studies.csv; {_RERUN}")
    bad_views = sorted(set(images["view"]) - set(VIEWS))
    if bad_views:
        raise DatasetError(f"{path / 'images.csv'}: views {bad_views}, expected {', '.join(VIEWS)}; {_RERUN}")
    study = position.loc[images["study_id"]].to_numpy(np.int64)
    if np.any(np.diff(study) < 0):
        raise DatasetError(
            f"{path / 'images.csv'}: a study's images must be consecutive rows, studies in the order of "
            f"studies.csv; {_RERUN}"
        )
    without = studies["study_id"][~np.isin(np.arange(len(studies)), study)].tolist()
    if without:
        raise DatasetError(f"{path / 'studies.csv'}: studies {', '.join(without[:5])} have no image; {_RERUN}")
    return images.assign(study=study)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def input_fingerprint(settings: Mapping[str, Any], files: Iterable[str | os.PathLike]) -> str:
    """A hash of the build ``settings`` (JSON-able) and of each input file's path, size and
    modification time: equal fingerprints mean an interrupted build can be resumed."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for file in files:
        stat = os.stat(file)
        digest.update(f"\0{os.fspath(file)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


class RadiographFolderWriter:
    """Builds a radiographs folder image by image, resumable, swapped in whole at the end.

    The images go to ``.<name>.partial/`` beside ``out_dir`` (memory-mapped ``images.npy`` and
    ``masks.npy``, so memory stays flat however many images there are). Every
    :data:`CHECKPOINT_SECONDS` :meth:`checkpoint` records how many leading images are done;
    a writer opened later with the same ``fingerprint`` and shape starts from there
    (:attr:`done`), any other leftover is discarded. :meth:`finish` writes the tables and
    replaces ``out_dir`` by the built folder.

    Args:
        out_dir: the folder to produce (``data/radiographs``).
        num_images: N; size: S.
        with_masks: also write ``masks.npy``.
        fingerprint: :func:`input_fingerprint` of everything the images depend on.
    """

    def __init__(self, out_dir: str | os.PathLike, num_images: int, size: int, with_masks: bool, fingerprint: str):
        if num_images < 1:
            raise ValueError(f"num_images: got {num_images}, expected at least one image")
        self.out_dir = Path(out_dir)
        self.partial = self.out_dir.parent / f".{self.out_dir.name}.partial"
        self.shape = (int(num_images), int(size), int(size))
        self.fingerprint = fingerprint
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        for leftover in self.out_dir.parent.glob(f".{self.out_dir.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self.done = self._resumable(with_masks)
        mode = "r+" if self.done else "w+"
        if not self.done:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir()
        self.pixels = np.lib.format.open_memmap(self.partial / "images.npy", mode, np.float16, self.shape)
        self.masks = (np.lib.format.open_memmap(self.partial / "masks.npy", mode, np.bool_, self.shape)
                      if with_masks else None)
        self._last_checkpoint = time.monotonic()

    def _progress(self, with_masks: bool, done: int) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "shape": list(self.shape), "masks": with_masks, "done": done}

    def _resumable(self, with_masks: bool) -> int:
        try:
            progress = json.loads((self.partial / "progress.json").read_text())
        except (OSError, ValueError):
            return 0
        if not isinstance(progress, dict) or {**progress, "done": 0} != self._progress(with_masks, 0):
            return 0
        done = progress.get("done")
        return int(done) if isinstance(done, int) and 0 <= done <= self.shape[0] else 0

    def put(self, index: int, image: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Image ``index``: (S, S) values in [0, 1]; ``mask`` (S, S) where the folder has masks."""
        if np.shape(image) != self.shape[1:]:
            raise ValueError(f"image {index}: shape {np.shape(image)}, expected {self.shape[1:]}")
        self.pixels[index] = np.clip(image, 0.0, 1.0)
        if self.masks is not None:
            if mask is None:
                raise ValueError(f"image {index}: this folder stores masks, got none")
            self.masks[index] = np.asarray(mask) > 0

    def checkpoint(self, done: int, force: bool = False) -> None:
        """Record that images ``[0, done)`` are written (at most every CHECKPOINT_SECONDS)."""
        if not force and time.monotonic() - self._last_checkpoint < CHECKPOINT_SECONDS:
            return
        self.pixels.flush()
        if self.masks is not None:
            self.masks.flush()
        write_json(self.partial / "progress.json", self._progress(self.masks is not None, int(done)))
        self._last_checkpoint = time.monotonic()

    def finish(
        self,
        info: Mapping[str, Any],
        studies: pd.DataFrame,
        images: pd.DataFrame,
        skipped: pd.DataFrame | None = None,
    ) -> None:
        """Write the tables and ``radiographs.json``, check the folder, swap it in for ``out_dir``."""
        if len(images) != self.shape[0]:
            raise ValueError(f"images has {len(images)} rows, the folder holds {self.shape[0]} images")
        self.pixels.flush()
        if self.masks is not None:
            self.masks.flush()
        del self.pixels, self.masks
        (self.partial / "progress.json").unlink(missing_ok=True)
        views = [view for view in VIEWS if (images["view"] == view).any()]
        write_json(self.partial / "radiographs.json",
                   {**info, "layout": LAYOUT_VERSION, "size": self.shape[-1], "views": views})
        write_csv(self.partial / "studies.csv", studies)
        write_csv(self.partial / "images.csv", images)
        if skipped is not None:
            write_csv(self.partial / "skipped.csv", skipped)
        open_radiograph_folder(self.partial)  # never swap in a folder the readers reject
        if self.out_dir.exists():
            previous = Path(tempfile.mkdtemp(dir=self.out_dir.parent, prefix=f".{self.out_dir.name}.tmp-"))
            os.replace(self.out_dir, previous / self.out_dir.name)
            os.replace(self.partial, self.out_dir)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(self.partial, self.out_dir)
