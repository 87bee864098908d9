"""Torch datasets over the radiographs rendered from CT (``data/radiographs``, :mod:`chestssl.data.drr`).

The ``radiographs`` stage renders one two-view "study" (frontal and lateral) per processed
CT scan, so a study's ``study_id`` is its ``scan_id``. Two views of the same studies:

- :class:`RadiographDataset`, one item per (study, view): single radiographs, as seed 001
  (Barlow Twins on frontal CheXpert / COVID-19 Radiography images) and seed 002 (STN
  alignment on ChestX-ray14) learn from. Its items carry the keys of
  :class:`chestssl.data.datasets.SliceDataset` (``image``, ``mask``, ``label``,
  ``malignancy``, ``patient_id``, ``scan_id``) with the same meanings, so the training
  loop and the linear probe (:mod:`chestssl.eval.linear_probe`) take it unchanged.
- :class:`RadiographStudyDataset`, one item per study with all its views: seed 004
  (RadDiffusion) pretrains a study-level ViT whose views share a bottleneck CLS token
  (:mod:`chestssl.xray.study_vit`); :func:`collate_radiograph_studies` batches its items.

Labels are study labels from ``studies.csv`` (every view of a study has its study's label):
``nodule`` (1 if the scan has a nodule) or ``malignant`` (the highest median malignancy
rating of the scan's nodules at least
:data:`~chestssl.eval.linear_probe.MALIGNANT_MIN_RATING`, LIDC's "moderately suspicious";
0 without a nodule), the threshold of the CT linear probe. Every study has a 0/1 label, so
classification (``task="cls"``) uses every study of the split, as pretraining does.

The split of a study is its patient's split from ``splits.json`` (``studies.csv`` copies it),
so no patient is in two splits. Everything is loaded once, at construction, into memory
tensors (float16 images, as stored, and boolean masks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from chestssl.data.datasets import DatasetError
from chestssl.data.drr import VIEWS
from chestssl.data.processed import SPLITS
from chestssl.eval.linear_probe import MALIGNANT_MIN_RATING
from chestssl.xray.study_vit import collate_studies

__all__ = [
    "LABELS",
    "RadiographDataset",
    "RadiographStudyDataset",
    "RadiographsNotFoundError",
    "TASKS",
    "VIEWS",
    "collate_radiograph_studies",
    "collate_studies",
    "read_studies",
    "study_labels",
]

TASKS = ("pretrain", "cls")
LABELS = ("nodule", "malignant")
#: Columns of ``studies.csv`` the datasets read.
REQUIRED_COLUMNS = ("scan_id", "patient_id", "split", "nodule", "malignancy")
_LAYOUT = (
    "expected a radiographs folder with studies.csv, radiographs.json and studies/<scan_id>.npz "
    "(chestssl.data.drr.render_radiographs); run the radiographs stage (dvc repro radiographs)"
)


class RadiographsNotFoundError(DatasetError, FileNotFoundError):
    """The radiographs folder, its ``studies.csv`` or a study's ``.npz`` is missing."""


# --------------------------------------------------------------------------------------
# studies.csv
# --------------------------------------------------------------------------------------


def read_studies(radiographs_dir: str | Path) -> pd.DataFrame:
    """``studies.csv`` of a radiographs folder, checked.

    Returns the table (columns of :data:`chestssl.data.drr.STUDY_COLUMNS`) with ``scan_id``
    and ``patient_id`` as str and ``malignancy`` 0 where empty.

    Raises:
        RadiographsNotFoundError: the folder or ``studies.csv`` is missing.
        DatasetError: a required column is missing, ``nodule`` is not 0/1, or a patient is
            in two splits.
    """
    radiographs_dir = Path(radiographs_dir)
    table_path = radiographs_dir / "studies.csv"
    if not radiographs_dir.is_dir():
        raise RadiographsNotFoundError(f"{radiographs_dir} not found; {_LAYOUT}")
    if not table_path.is_file():
        raise RadiographsNotFoundError(f"{table_path} not found; {_LAYOUT}")
    studies = pd.read_csv(table_path, dtype={"scan_id": str, "patient_id": str, "split": str})
    missing = [column for column in REQUIRED_COLUMNS if column not in studies.columns]
    if missing:
        raise DatasetError(
            f"{table_path} has no column(s) {', '.join(missing)}; expected the columns "
            f"{', '.join(REQUIRED_COLUMNS)}, ...; rerun the radiographs stage (dvc repro radiographs)"
        )
    nodule = studies["nodule"]
    if nodule.isna().any() or not nodule.isin([0, 1]).all():
        bad = studies.loc[nodule.isna() | ~nodule.isin([0, 1]), "scan_id"].tolist()
        raise DatasetError(
            f"{table_path}: column nodule must be 0 or 1, not for scans {', '.join(bad[:10])}; "
            "rerun the radiographs stage (dvc repro radiographs)"
        )
    splits_per_patient = studies.groupby("patient_id")["split"].nunique()
    mixed = sorted(splits_per_patient.index[splits_per_patient > 1])
    if mixed:
        raise DatasetError(
            f"{table_path}: patients {', '.join(mixed[:10])} are in more than one split; the split must be "
            "patient-level (splits.json): rerun the preprocess and radiographs stages"
        )
    studies["nodule"] = nodule.astype(np.int64)
    studies["malignancy"] = studies["malignancy"].astype(np.float64).fillna(0.0)
    return studies


def study_labels(studies: pd.DataFrame, label: str) -> np.ndarray:
    """The (N,) int64 0/1 label of each row of ``studies``.

    ``nodule``: the ``nodule`` column; ``malignant``: 1 where the scan has a nodule and
    ``malignancy >= MALIGNANT_MIN_RATING`` (4, as the CT linear probe), else 0.
    """
    _check_choice("label", label, LABELS)
    if label == "nodule":
        return studies["nodule"].to_numpy(np.int64)
    malignant = (studies["nodule"] == 1) & (studies["malignancy"] >= MALIGNANT_MIN_RATING)
    return malignant.to_numpy(np.int64)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _check_choice(argument: str, value: Any, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise DatasetError(f"{argument}: got {value!r}, expected one of {', '.join(allowed)}")


def _checked_views(views: str | Sequence[str]) -> tuple[str, ...]:
    """``views`` as a tuple of distinct known views (a single name is one view)."""
    chosen = (views,) if isinstance(views, str) else tuple(views)
    if not chosen:
        raise DatasetError(f"views: got {views!r}, expected one or more of {', '.join(VIEWS)}")
    for view in chosen:
        _check_choice("views", view, VIEWS)
    if len(set(chosen)) != len(chosen):
        raise DatasetError(f"views: got {list(chosen)!r}, expected distinct views among {', '.join(VIEWS)}")
    return chosen


def _select_split(
    studies: pd.DataFrame, split: str, patient_ids: Sequence[str] | None, radiographs_dir: Path
) -> pd.DataFrame:
    """The studies of ``split`` (restricted to ``patient_ids``), sorted by scan id."""
    selected = studies[studies["split"] == split]
    if patient_ids is not None:
        wanted = [str(p) for p in patient_ids]
        if not wanted:
            raise DatasetError(
                "patient_ids: got an empty list, expected at least one patient of split "
                f"{split!r} (or None for all of them)"
            )
        unknown = sorted(set(wanted) - set(selected["patient_id"]))
        if unknown:
            raise DatasetError(
                f"patient_ids: {', '.join(unknown[:10])}{', ...' if len(unknown) > 10 else ''} not in split "
                f"{split!r} of {radiographs_dir / 'studies.csv'} (see splits.json); pass patients of that split only"
            )
        selected = selected[selected["patient_id"].isin(set(wanted))]
    if selected.empty:
        raise DatasetError(
            f"no studies in split {split!r} of {radiographs_dir / 'studies.csv'}; the split has no "
            "scans: preprocess more scans (data.phantom.num_scans, data.tcia.max_patients) or change "
            "preprocess.split, then dvc repro radiographs"
        )
    return selected.sort_values("scan_id", kind="stable").reset_index(drop=True)


def _load_views(
    radiographs_dir: Path, scan_ids: Sequence[str], views: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, V, S, S) float16 in [0, 1] and nodule masks (N, V, S, S) bool of the
    ``views`` of each study, in the order of ``scan_ids`` and ``views``."""
    images: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    first_path: Path | None = None
    for position, scan_id in enumerate(scan_ids):
        path = radiographs_dir / "studies" / f"{scan_id}.npz"
        if not path.is_file():
            raise RadiographsNotFoundError(f"{path} not found (listed in studies.csv); {_LAYOUT}")
        with np.load(path) as arrays:
            needed = [name for view in views for name in (view, f"{view}_mask")]
            absent = [name for name in needed if name not in arrays.files]
            if absent:
                raise DatasetError(
                    f"{path} has no array(s) {', '.join(absent)}; expected {', '.join(needed)}; "
                    "rerun the radiographs stage (dvc repro radiographs)"
                )
            study_images = np.stack([arrays[view] for view in views]).astype(np.float16)
            study_masks = np.stack([arrays[f"{view}_mask"] for view in views]) > 0
        if images is None or masks is None:
            side = study_images.shape[-1]
            if study_images.shape[1:] != (side, side):
                raise DatasetError(
                    f"{path}: views of shape {study_images.shape[1:]}, expected square (size, size) images; "
                    "rerun the radiographs stage (dvc repro radiographs)"
                )
            images = torch.empty((len(scan_ids), len(views), side, side), dtype=torch.float16)
            masks = torch.empty((len(scan_ids), len(views), side, side), dtype=torch.bool)
            first_path = path
        if study_images.shape != tuple(images.shape[1:]) or study_masks.shape != study_images.shape:
            raise DatasetError(
                f"{path}: images {study_images.shape[1:]} and masks {study_masks.shape[1:]}, but {first_path} "
                f"has {tuple(images.shape[2:])}; every study of a radiographs folder has one size: rerun the "
                "radiographs stage (dvc repro radiographs)"
            )
        images[position] = torch.from_numpy(study_images)
        masks[position] = torch.from_numpy(study_masks)
    assert images is not None and masks is not None  # _select_split never returns an empty selection
    return images, masks


class _RadiographStudies:
    """The studies of one split, loaded: shared by the image- and study-level datasets.

    Attributes: ``studies`` (one row of ``studies.csv`` per study, sorted by scan id),
    ``views``, ``images`` (N, V, S, S) float16, ``masks`` (N, V, S, S) bool, ``labels`` (N,)
    int64, ``malignancy`` (N,) float32, ``size`` (S).
    """

    def __init__(
        self,
        radiographs_dir: str | Path,
        split: str,
        views: str | Sequence[str],
        label: str,
        patient_ids: Sequence[str] | None,
    ) -> None:
        _check_choice("split", split, SPLITS)
        _check_choice("label", label, LABELS)
        self.views = _checked_views(views)
        self.radiographs_dir = Path(radiographs_dir)
        self.split, self.label = split, label
        self.studies = _select_split(read_studies(self.radiographs_dir), split, patient_ids, self.radiographs_dir)
        self.images, self.masks = _load_views(self.radiographs_dir, self.studies["scan_id"].tolist(), self.views)
        self.labels = torch.tensor(study_labels(self.studies, label), dtype=torch.int64)
        self.malignancy = torch.tensor(self.studies["malignancy"].to_numpy(np.float32), dtype=torch.float32)
        self.size = int(self.images.shape[-1])


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


class RadiographDataset(Dataset):
    """One item per (study, view) of a split: single radiographs (seeds 001, 002).

    Args:
        radiographs_dir: the ``data/radiographs`` folder (stage ``radiographs``).
        split: ``train``, ``val`` or ``test``.
        views: the views to include, among ``frontal`` and ``lateral`` (e.g. ``("frontal",)``
            for seed 001's frontal-only protocol); a single name is one view.
        task: ``pretrain`` or ``cls``. Both use every study of the split: every study
            has a 0/1 label, so no study is left out of classification.
        label: ``nodule`` or ``malignant`` (see :func:`study_labels`). The linear probe
            reads ``label`` as the nodule label and derives ``malignant`` from
            ``malignancy`` itself, so give it the default ``nodule`` dataset.
        patient_ids: if given, only these patients (all must belong to ``split``), e.g.
            for label-fraction studies.

    Items, in study order (scan id), views in the order of ``views`` within a study:

    - ``image``: (1, S, S) float32 in [0, 1];
    - ``mask``: (1, S, S) float32, 1 on the projected nodule pixels of this view (any
      nodule), else 0;
    - ``label``: int64 scalar tensor, the study's 0/1 label;
    - ``malignancy``: float32 scalar tensor, the highest median malignancy rating (1-5) of
      the study's nodules, 0 without one (as ``SliceDataset``'s);
    - ``view``: str; ``patient_id``, ``scan_id``, ``study_id`` (= ``scan_id``): str.

    ``frame`` holds one row per item (columns of ``studies.csv`` plus ``view``), in item
    order; ``size`` is S.
    """

    def __init__(
        self,
        radiographs_dir: str | Path,
        split: str,
        views: str | Sequence[str] = VIEWS,
        task: str = "pretrain",
        label: str = "nodule",
        patient_ids: Sequence[str] | None = None,
    ) -> None:
        _check_choice("task", task, TASKS)
        self.task = task
        self._studies = _RadiographStudies(radiographs_dir, split, views, label, patient_ids)
        self.radiographs_dir, self.split, self.label = self._studies.radiographs_dir, split, label
        self.views, self.size = self._studies.views, self._studies.size
        studies = self._studies.studies
        self.frame = studies.loc[studies.index.repeat(len(self.views))].reset_index(drop=True)
        self.frame["view"] = list(self.views) * len(studies)

    def __len__(self) -> int:
        return len(self._studies.studies) * len(self.views)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} radiographs")
        study, view = divmod(index % len(self), len(self.views))
        scan_id = self._studies.studies.at[study, "scan_id"]
        return {
            "image": self._studies.images[study, view].unsqueeze(0).to(torch.float32),
            "mask": self._studies.masks[study, view].unsqueeze(0).to(torch.float32),
            "label": self._studies.labels[study],
            "malignancy": self._studies.malignancy[study],
            "view": self.views[view],
            "patient_id": self._studies.studies.at[study, "patient_id"],
            "scan_id": scan_id,
            "study_id": scan_id,
        }


class RadiographStudyDataset(Dataset):
    """One item per study of a split, with all its views (seed 004's study-level input).

    Args:
        radiographs_dir, split, label, patient_ids: as :class:`RadiographDataset`.
        views: the views of every study, in this order.

    Items:

    - ``images``: (V, 1, S, S) float32 in [0, 1], the views in the order of ``views``;
    - ``label``: int64 scalar tensor, the study's 0/1 label;
    - ``malignancy``: float32 scalar tensor (as :class:`RadiographDataset`'s);
    - ``study_id`` (= ``scan_id``), ``patient_id``: str; ``views``: tuple of V view names.

    Batch them with ``DataLoader(..., collate_fn=collate_radiograph_studies)``. ``frame``
    holds one row of ``studies.csv`` per item; ``size`` is S.
    """

    def __init__(
        self,
        radiographs_dir: str | Path,
        split: str,
        views: str | Sequence[str] = VIEWS,
        label: str = "nodule",
        patient_ids: Sequence[str] | None = None,
    ) -> None:
        self._studies = _RadiographStudies(radiographs_dir, split, views, label, patient_ids)
        self.radiographs_dir, self.split, self.label = self._studies.radiographs_dir, split, label
        self.views, self.size = self._studies.views, self._studies.size
        self.frame = self._studies.studies

    def __len__(self) -> int:
        return len(self._studies.studies)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} studies")
        index %= len(self)
        return {
            "images": self._studies.images[index].unsqueeze(1).to(torch.float32),
            "label": self._studies.labels[index],
            "malignancy": self._studies.malignancy[index],
            "study_id": self._studies.studies.at[index, "scan_id"],
            "patient_id": self._studies.studies.at[index, "patient_id"],
            "views": self.views,
        }


def collate_radiograph_studies(studies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`~chestssl.xray.study_vit.collate_studies`, keeping patients, malignancy and views.

    Args:
        studies: S items of :class:`RadiographStudyDataset`.

    Returns:
        ``images`` (sum V_i, 1, S, S), ``study_index`` (sum V_i,) int64, ``num_views`` (S,)
        int64, ``label`` (S,) int64 and ``study_id`` (S ids), as ``collate_studies``; plus
        ``malignancy`` (S,) float32 and ``patient_id`` (S ids) where every item has them, and
        ``view`` (sum V_i view names, one per row of ``images``) where every item has ``views``.
    """
    batch = collate_studies(studies)
    if all("malignancy" in study for study in studies):
        batch["malignancy"] = torch.stack([torch.as_tensor(study["malignancy"]) for study in studies])
    if all("patient_id" in study for study in studies):
        batch["patient_id"] = [study["patient_id"] for study in studies]
    if all("views" in study for study in studies):
        batch["view"] = [view for study in studies for view in study["views"]]
    return batch
