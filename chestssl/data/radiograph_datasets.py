"""Torch datasets over the radiographs folder (``data/radiographs``, :mod:`chestssl.data.radiograph_folder`).

The ``radiographs`` stage fills the folder with two-view studies rendered from the CT
(:mod:`chestssl.data.drr`) or with a real chest X-ray dataset
(:mod:`chestssl.data.cxr_import`). Two views of its studies:

- :class:`RadiographDataset`, one item per image: single radiographs, as seed 001 (Barlow
  Twins on frontal CheXpert / COVID-19 Radiography images) and seed 002 (STN alignment on
  ChestX-ray14) learn from.
- :class:`RadiographStudyDataset`, one item per study with all its images: seed 004
  (RadDiffusion) pretrains a study-level ViT whose views share a bottleneck CLS token
  (:mod:`chestssl.models.study_vit`); :func:`collate_radiograph_studies` batches its items,
  whose numbers of images may differ (:func:`collate_studies`).

Labels are the study's (every image of a study has its study's labels): the label columns
named in ``radiographs.json`` (rendered: ``nodule`` and ``malignant``; a dataset: its
findings), as a float vector with NaN where a label is unknown. The probes
(:mod:`chestssl.eval.radiograph_probe`) leave unknown labels out.

The split of a study is its patient's (no patient is in two splits). Images are read from
the folder's memory map when an item is asked for, so a large dataset is never loaded
whole.

Seed 002's alignment experiment reads the frontal images of a split as one tensor
(:func:`stack_images`), at most ``max_images`` of them from whole patients (:func:`capped`),
and probes them again after moving or aligning them (:class:`ReplacedImages`);
:class:`IndexedImages` serves such a tensor to the training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from chestssl.data.datasets import DatasetError
from chestssl.data.processed import SPLITS
from chestssl.data.radiograph_folder import VIEWS, RadiographFolder, RadiographsNotFoundError, open_radiograph_folder

__all__ = [
    "IndexedImages",
    "RadiographDataset",
    "RadiographStudyDataset",
    "RadiographsNotFoundError",
    "ReplacedImages",
    "VIEWS",
    "capped",
    "collate_radiograph_studies",
    "collate_studies",
    "stack_images",
]


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


def _select_split(folder: RadiographFolder, split: str, patient_ids: Sequence[str] | None) -> pd.DataFrame:
    """The studies of ``split`` (restricted to ``patient_ids``), sorted by study id."""
    table = folder.path / "studies.csv"
    selected = folder.studies[folder.studies["split"] == split]
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
                f"{split!r} of {table}; pass patients of that split only"
            )
        selected = selected[selected["patient_id"].isin(set(wanted))]
    if selected.empty:
        hint = ("preprocess more scans (data.phantom.num_scans, data.tcia.max_patients) or change "
                "preprocess.split" if folder.source == "rendered" else "check data.cxr.val_fraction and "
                "data.cxr.test_fraction, or the dataset's split files")
        raise DatasetError(f"no studies in split {split!r} of {table}; {hint}, then dvc repro radiographs")
    return selected.sort_values("study_id", kind="stable")


class _RadiographSplit:
    """The studies of one split and their images of the chosen views: shared by both datasets.

    Attributes: ``folder``; ``studies`` (rows of ``studies.csv``, sorted by study id, only
    studies with an image of ``views``; fresh index); ``images`` (rows of ``images.csv``:
    the studies' images of ``views``, by study, then in the order of ``views``, then as
    stored; ``study`` = the row of ``studies``; ``row`` = the row of ``images.npy``);
    ``labels`` (N_studies, L) float32; ``views``; ``size``.
    """

    def __init__(
        self,
        radiographs_dir: str | Path | RadiographFolder,
        split: str,
        views: str | Sequence[str],
        patient_ids: Sequence[str] | None,
    ) -> None:
        _check_choice("split", split, SPLITS)
        self.views = _checked_views(views)
        if isinstance(radiographs_dir, RadiographFolder):
            self.folder = radiographs_dir
        else:
            self.folder = open_radiograph_folder(radiographs_dir)
        self.split = split
        selected = _select_split(self.folder, split, patient_ids)
        images = self.folder.images.reset_index().rename(columns={"index": "row"})
        images = images[images["view"].isin(self.views) & images["study"].isin(selected.index)]
        if images.empty:
            raise DatasetError(
                f"no {'/'.join(self.views)} images in split {split!r} of {self.folder.path}; the folder holds "
                f"{', '.join(self.folder.info.get('views', [])) or 'no'} views: change pretrain_radiographs.views"
            )
        self.studies = selected[selected.index.isin(images["study"])]  # keeps the study-id order
        order = pd.Series(np.arange(len(self.studies)), index=self.studies.index)
        images = images.assign(study=order.loc[images["study"]].to_numpy(np.int64),
                               _view=images["view"].map(self.views.index))
        self.images = images.sort_values(["study", "_view", "row"], kind="stable").drop(columns="_view")
        self.images = self.images.reset_index(drop=True)
        self.studies = self.studies.reset_index(drop=True)
        self.labels = torch.from_numpy(self.folder.label_matrix(self.studies))
        self.size = self.folder.size
        # Image rows of each study, for study-level items.
        self.study_rows = [group.index.to_numpy() for _, group in self.images.groupby("study", sort=True)]

    @property
    def label_names(self) -> list[str]:
        return self.folder.label_names

    def image(self, position: int) -> torch.Tensor:
        """Image ``position`` of :attr:`images` as (1, S, S) float32."""
        row = int(self.images.at[position, "row"])
        return torch.from_numpy(np.asarray(self.folder.pixels[row], dtype=np.float32)).unsqueeze(0)

    def mask(self, position: int) -> torch.Tensor | None:
        if self.folder.masks is None:
            return None
        row = int(self.images.at[position, "row"])
        return torch.from_numpy(np.asarray(self.folder.masks[row], dtype=np.float32)).unsqueeze(0)


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


class RadiographDataset(Dataset):
    """One item per image of a split: single radiographs (seeds 001, 002).

    Args:
        radiographs_dir: the ``data/radiographs`` folder (stage ``radiographs``), or that
            folder already opened (:func:`~chestssl.data.radiograph_folder.open_radiograph_folder`),
            so datasets of several splits read its tables once.
        split: ``train``, ``val`` or ``test``.
        views: the views to include, among ``frontal`` and ``lateral`` (e.g. ``("frontal",)``
            for seed 001's frontal-only protocol); a single name is one view.
        patient_ids: if given, only these patients (all must belong to ``split``), e.g.
            for label-fraction experiments.

    Items, by study id, a study's images in the order of ``views``:

    - ``image``: (1, S, S) float32 in [0, 1];
    - ``labels``: (L,) float32, the study's labels (``label_names``), NaN where unknown;
    - ``mask``: (1, S, S) float32, only where the folder has masks (rendered: 1 on the
      projected nodule pixels of this view);
    - ``view``, ``patient_id``, ``study_id``: str.

    ``frame`` holds one row per item (the study's row of ``studies.csv`` plus the image's
    ``view``), in item order; ``size`` is S; ``label_names`` the L label names; ``folder``
    the opened radiographs folder.
    """

    def __init__(
        self,
        radiographs_dir: str | Path | RadiographFolder,
        split: str,
        views: str | Sequence[str] = VIEWS,
        patient_ids: Sequence[str] | None = None,
    ) -> None:
        self._split = _RadiographSplit(radiographs_dir, split, views, patient_ids)
        self.folder, self.split = self._split.folder, split
        self.radiographs_dir = self.folder.path
        self.views, self.size, self.label_names = self._split.views, self._split.size, self._split.label_names
        studies = self._split.studies
        self.frame = studies.loc[self._split.images["study"]].reset_index(drop=True)
        self.frame["view"] = self._split.images["view"].to_numpy()

    def __len__(self) -> int:
        return len(self._split.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} radiographs")
        index %= len(self)
        study = int(self._split.images.at[index, "study"])
        item = {
            "image": self._split.image(index),
            "labels": self._split.labels[study],
            "view": self._split.images.at[index, "view"],
            "patient_id": self._split.studies.at[study, "patient_id"],
            "study_id": self._split.studies.at[study, "study_id"],
        }
        mask = self._split.mask(index)
        if mask is not None:
            item["mask"] = mask
        return item


class RadiographStudyDataset(Dataset):
    """One item per study of a split, with all its images of ``views`` (seed 004's study-level input).

    Args:
        radiographs_dir, split, patient_ids: as :class:`RadiographDataset`.
        views: the views to include, in this order within a study.

    Items:

    - ``images``: (V, 1, S, S) float32 in [0, 1]; V (>= 1) may differ between studies;
    - ``labels``: (L,) float32, NaN where unknown;
    - ``study_id``, ``patient_id``: str; ``views``: tuple of V view names.

    Batch them with ``DataLoader(..., collate_fn=collate_radiograph_studies)``. ``frame``
    holds one row of ``studies.csv`` per item; ``size`` is S; ``label_names`` the labels.
    """

    def __init__(
        self,
        radiographs_dir: str | Path | RadiographFolder,
        split: str,
        views: str | Sequence[str] = VIEWS,
        patient_ids: Sequence[str] | None = None,
    ) -> None:
        self._split = _RadiographSplit(radiographs_dir, split, views, patient_ids)
        self.folder, self.split = self._split.folder, split
        self.radiographs_dir = self.folder.path
        self.views, self.size, self.label_names = self._split.views, self._split.size, self._split.label_names
        self.frame = self._split.studies

    def __len__(self) -> int:
        return len(self._split.studies)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} studies")
        index %= len(self)
        rows = self._split.study_rows[index]
        return {
            "images": torch.stack([self._split.image(int(row)) for row in rows]),
            "labels": self._split.labels[index],
            "study_id": self._split.studies.at[index, "study_id"],
            "patient_id": self._split.studies.at[index, "patient_id"],
            "views": tuple(self._split.images.loc[rows, "view"]),
        }


# --------------------------------------------------------------------------------------
# Batches of studies
# --------------------------------------------------------------------------------------


def _describe_study(position: int, study: Mapping[str, Any]) -> str:
    """``study 3`` or ``study 3 (study_id 'abc')`` for error messages."""
    if "study_id" in study:
        return f"study {position} (study_id {study['study_id']!r})"
    return f"study {position}"


def _optional_key(studies: Sequence[Mapping[str, Any]], key: str) -> bool:
    """Whether every study has ``key`` (True) or none has (False); a ValueError when only some do."""
    lacking = [position for position, study in enumerate(studies) if key not in study]
    if lacking and len(lacking) < len(studies):
        raise ValueError(
            f"collate_studies: studies {lacking} have no {key!r} while the others have one; "
            f"give every study of a batch a {key!r} or none"
        )
    return not lacking


def collate_studies(studies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate per-study samples into one batch of views (seed 004: studies of 2-5 views).

    Args:
        studies: S dicts, each with ``images`` (V_i, C, H, W), V_i >= 1, the same (C, H, W)
            for all, and optionally ``label`` (a tensor or number; the same shape for all)
            and ``study_id``. ``label`` and ``study_id`` must be on every study or on none.

    Returns:
        ``images`` (sum V_i, C, H, W), the studies' views in order; ``study_index``
        (sum V_i,) int64, the study number of each view; ``num_views`` (S,) int64;
        ``label`` (S, ...) stacked, and ``study_id`` a list of S ids, when present.

    Raises:
        ValueError: naming the study, for an empty list, a study without ``images`` or with
            0 views, images of another shape, and ``label`` / ``study_id`` on only some
            studies or labels of different shapes.
    """
    if len(studies) == 0:
        raise ValueError("collate_studies: got no studies; a batch needs at least one study")
    view_shape: tuple[int, ...] | None = None
    images: list[torch.Tensor] = []
    for position, study in enumerate(studies):
        name = _describe_study(position, study)
        if "images" not in study:
            raise ValueError(
                f"collate_studies: {name} has no 'images'; expected a dict with 'images' (V, C, H, W) "
                f"and optional 'label', 'study_id', got keys {sorted(study)}"
            )
        views = study["images"]
        if not isinstance(views, torch.Tensor) or views.ndim != 4:
            shape = tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__
            raise ValueError(f"collate_studies: {name} has images {shape}, expected a tensor (V, C, H, W)")
        if views.shape[0] == 0:
            raise ValueError(f"collate_studies: {name} has 0 views; every study needs at least one view")
        if view_shape is None:
            view_shape = tuple(views.shape[1:])
        elif tuple(views.shape[1:]) != view_shape:
            raise ValueError(
                f"collate_studies: {name} has views of (C, H, W) {tuple(views.shape[1:])}, study 0's are "
                f"{view_shape}; every study's views must have the same (C, H, W)"
            )
        images.append(views)
    num_views = torch.tensor([views.shape[0] for views in images], dtype=torch.int64)
    batch: dict[str, Any] = {
        "images": torch.cat(images),
        "study_index": torch.repeat_interleave(torch.arange(len(images), dtype=torch.int64), num_views),
        "num_views": num_views,
    }
    if _optional_key(studies, "label"):
        labels = [torch.as_tensor(study["label"]) for study in studies]
        for position, label in enumerate(labels):
            if label.shape != labels[0].shape:
                raise ValueError(
                    f"collate_studies: {_describe_study(position, studies[position])} has a label of shape "
                    f"{tuple(label.shape)}, study 0's has {tuple(labels[0].shape)}; every label must have one shape"
                )
        batch["label"] = torch.stack(labels)
    if _optional_key(studies, "study_id"):
        batch["study_id"] = [study["study_id"] for study in studies]
    return batch


def collate_radiograph_studies(studies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`collate_studies`, keeping labels, patients and views.

    Args:
        studies: B items of :class:`RadiographStudyDataset`.

    Returns:
        ``images`` (sum V_i, 1, S, S), ``study_index`` (sum V_i,) int64, ``num_views`` (B,)
        int64 and ``study_id`` (B ids), as ``collate_studies``; plus ``labels`` (B, L)
        float32, ``patient_id`` (B ids) and ``view`` (sum V_i view names, one per row of
        ``images``) where every item has them.
    """
    batch = collate_studies(studies)
    if all("labels" in study for study in studies):
        batch["labels"] = torch.stack([torch.as_tensor(study["labels"]) for study in studies])
    if all("patient_id" in study for study in studies):
        batch["patient_id"] = [study["patient_id"] for study in studies]
    if all("views" in study for study in studies):
        batch["view"] = [view for study in studies for view in study["views"]]
    return batch


# --------------------------------------------------------------------------------------
# Image tensors (seed 002's alignment experiment)
# --------------------------------------------------------------------------------------


def stack_images(dataset: Dataset) -> torch.Tensor:
    """(N, 1, S, S) float32 stack of the ``image`` of every item of ``dataset``, in order."""
    return torch.stack([dataset[index]["image"] for index in range(len(dataset))])


def capped(dataset: RadiographDataset, max_images: int, seed: int) -> RadiographDataset:
    """``dataset`` cut to at most ``max_images`` images of whole patients, drawn in a seeded
    random order (a patient whose images would pass the cap is passed over; at least one
    patient is kept); ``dataset`` itself when ``max_images`` is 0 or not exceeded."""
    if max_images == 0 or len(dataset) <= max_images:
        return dataset
    counts = dataset.frame.groupby("patient_id", sort=True).size()
    kept, total = [], 0
    for position in np.random.default_rng(seed).permutation(len(counts)):
        count = int(counts.iloc[position])
        if total + count <= max_images or not kept:
            kept.append(str(counts.index[position]))
            total += count
        if total >= max_images:
            break
    return RadiographDataset(dataset.folder, dataset.split, dataset.views, patient_ids=kept)


class ReplacedImages(Dataset):
    """The items of a radiograph dataset with their ``image`` replaced by ``images[i]`` (1, H, W).

    ``label_names`` are the base dataset's, so the probes read it like the base.
    """

    def __init__(self, base: Dataset, images: torch.Tensor):
        if len(base) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images for a dataset of {len(base)} items")
        self.base, self.images = base, images

    def __len__(self) -> int:
        return len(self.base)

    @property
    def label_names(self) -> list[str]:
        return list(self.base.label_names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.base[index], "image": self.images[index]}


class IndexedImages(Dataset):
    """Images of a tensor (N, 1, H, W) as items ``{"image": (1, H, W), "index": int}``, with
    optional per-image tensors (``extra``: name -> (N, ...)) added to each item as ``extra[name][i]``.

    The ``index`` lets a training step put a batch back in dataset order.
    """

    def __init__(self, images: torch.Tensor, extra: Mapping[str, torch.Tensor] | None = None):
        if images.ndim != 4:
            raise ValueError(f"IndexedImages: expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        self.images = images
        self.extra = dict(extra or {})
        for name, values in self.extra.items():
            if values.shape[0] != images.shape[0]:
                raise ValueError(f"IndexedImages: {values.shape[0]} {name!r} values for {images.shape[0]} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "index": index,
                **{name: values[index] for name, values in self.extra.items()}}
