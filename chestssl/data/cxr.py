"""Readers for real chest X-ray datasets in their published layouts, and one image loader.

The pipeline renders radiographs from CT (``data.cxr.source: rendered``); a user who has a
real chest X-ray dataset on disk points ``data.cxr.source`` and ``data.cxr.root`` at it
instead. Each reader turns one dataset's published folder layout and label files into
the same table (a pandas DataFrame), one row per image:

- ``path``: absolute image path;
- ``patient_id``, ``study_id``: strings; ``study_id`` is unique over the whole table, so
  the views of one study group by it alone (seed 004 pretrains on studies of 2-5 views);
- ``view``: ``frontal`` or ``lateral``; ``view_position``: the raw AP/PA/LL/... value
  where the dataset gives one, else NaN;
- ``split``: ``train``, ``val`` or ``test``, patient-level (no patient in two splits);
- one column per label: float 1.0 / 0.0, NaN where unknown and not mapped (COVID-19
  Radiography instead has one integer column ``class``, see below).

The datasets (``data.cxr.source``):

- ``chexpert`` (seed 001; Irvin et al., AAAI 2019), v1.0 or v1.0-small: ``train.csv`` and
  ``valid.csv``. ``valid.csv`` is the test split; the patients of ``train.csv`` are split
  into train/val by a seeded patient-level draw of ``val_fraction``.
- ``chestxray14`` (seed 002; Wang et al., CVPR 2017, NIH): ``Data_Entry_2017.csv`` (or
  ``Data_Entry_2017_v2020.csv``, preferred when both are there) with the official
  patient-level ``train_val_list.txt`` / ``test_list.txt``; val is a seeded patient-level
  share ``val_fraction`` of train_val. Each image is its own study
  (``<patient>_<follow-up>``, the image name without extension).
- ``covid_radiography`` (seed 001; Chowdhury et al., IEEE Access 2020; Rahman et al.,
  Comput. Biol. Med. 2021): class folders, one 4-class label ``class`` (int):
  0 COVID, 1 Normal, 2 Lung_Opacity, 3 Viral Pneumonia (:data:`COVID_CLASSES`). The
  database gives no patient ids, so each image is its own patient and study; the split
  is a seeded draw stratified by class (``val_fraction``, ``test_fraction``).
- ``mimic_cxr`` (seed 004; Johnson et al., MIMIC-CXR-JPG 2.0.0, PhysioNet 2019):
  metadata, CheXpert-labeller labels per study and the official patient-level split
  (``validate`` becomes ``val``).

Labels of CheXpert and MIMIC-CXR (the 14 CheXpert observations): 1 positive, 0 negative,
blank (not mentioned) -> 0, -1 (uncertain) -> 1 / 0 / NaN for ``uncertain`` = positive /
negative / ignore (Irvin et al.'s U-Ones / U-Zeros / U-Ignore; seed 004 used U-Ones).
A MIMIC-CXR study without a row in the label file has NaN labels (no report sections to
label).

``test_fraction`` applies to COVID-19 Radiography only, and ``val_fraction`` to all but
MIMIC-CXR: the other datasets publish their test split (and MIMIC-CXR its val split).

Never a silent skip: every listed image not found on disk, and every row that cannot be
used (a view neither frontal nor lateral, an image in no split list, ...), is returned in
the ``skipped`` table (columns :data:`SKIPPED_COLUMNS`) with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from chestssl.data.processed import SPLITS
from chestssl.data.splits import split_counts
from chestssl.errors import UserError
from chestssl.params import CHESTXRAY14_LABELS, CHEXPERT_LABELS, CXR_SOURCES, UNCERTAIN_POLICIES

LOG = logging.getLogger(__name__)

SOURCES = CXR_SOURCES
#: Sources read from disk by :func:`read_cxr_dataset` (``rendered`` comes from the CT).
DATASET_SOURCES = SOURCES[1:]
VIEWS = ("frontal", "lateral")
TABLE_COLUMNS = ["path", "patient_id", "study_id", "view", "view_position", "split"]
SKIPPED_COLUMNS = ["path", "reason", "listed_in"]

#: COVID-19 Radiography classes; the ``class`` column holds the index into this tuple.
COVID_CLASSES = ("COVID", "Normal", "Lung_Opacity", "Viral Pneumonia")
COVID_LABEL = "class"

#: View positions (DICOM ViewPosition, as MIMIC-CXR and ChestX-ray14 give them) by view.
#: Decubitus films (LLD/RLD) are still frontal projections. Obliques (LAO, RAO, LPO),
#: SWIMMERS and blanks are neither, and are skipped.
FRONTAL_POSITIONS = frozenset({"PA", "AP", "AP AXIAL", "PA LLD", "PA RLD", "AP LLD", "AP RLD"})
LATERAL_POSITIONS = frozenset({"LATERAL", "LL", "RL", "XTABLE LATERAL"})

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

CHEXPERT_LAYOUT = (
    "expected the CheXpert layout (v1.0 or v1.0-small): <root>/train.csv and <root>/valid.csv with columns "
    "Path, Sex, Age, Frontal/Lateral, AP/PA and the 14 labels, and the images they list, e.g. "
    "<root>/train/patient00001/study1/view1_frontal.jpg (Path starts with the dataset folder's name, "
    "e.g. CheXpert-v1.0-small/train/...)"
)
CHESTXRAY14_LAYOUT = (
    "expected the ChestX-ray14 layout: <root>/Data_Entry_2017.csv (or Data_Entry_2017_v2020.csv), "
    "<root>/train_val_list.txt, <root>/test_list.txt and the PNG images in <root>/images/ or spread over "
    "<root>/images_001/images/ ... <root>/images_012/images/"
)
COVID_LAYOUT = (
    "expected the COVID-19 Radiography Database layout: class folders <root>/COVID, <root>/Normal, "
    "<root>/Lung_Opacity and <root>/Viral Pneumonia, each holding images/ (masks/ is ignored) or, in the "
    "older release, the images directly"
)
MIMIC_LAYOUT = (
    "expected the MIMIC-CXR-JPG layout: <root>/mimic-cxr-2.0.0-metadata.csv(.gz), "
    "<root>/mimic-cxr-2.0.0-chexpert.csv(.gz), <root>/mimic-cxr-2.0.0-split.csv(.gz) and the images at "
    "<root>/files/p10/p10000032/s50414267/<dicom_id>.jpg"
)


class CXRLayoutError(UserError, FileNotFoundError):
    """A file or folder of the dataset's published layout is missing; the message names it."""


class CXRDataError(UserError, ValueError):
    """The dataset's files are there but unusable (bad columns or values, no usable image)."""


@dataclass(frozen=True)
class CXRConfig:
    """The ``data.cxr`` settings (see the module docstring for what each means per dataset).

    ``labels`` ``None`` (or empty) means all labels of the dataset, in the dataset's order;
    a list picks a subset, and the label columns follow the list's order.
    """

    source: str = "rendered"
    root: str | None = None
    labels: tuple[str, ...] | None = None
    uncertain: str = "positive"
    frontal_only: bool = False
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "CXRConfig":
        """The settings of a validated ``data.cxr`` block; keys left out take the defaults.

        An empty ``labels`` list becomes ``None`` (all labels), so both spellings of "all"
        describe one dataset.
        """
        values = {field.name: cfg[field.name] for field in dataclasses.fields(cls) if field.name in cfg}
        if values.get("labels") is not None:
            values["labels"] = tuple(values["labels"]) or None
        if values.get("root") is not None:
            values["root"] = str(values["root"])
        return cls(**values)


def dataset_labels(source: str) -> tuple[str, ...]:
    """All label names a dataset source offers (for ``covid_radiography``: ``("class",)``)."""
    if source in ("chexpert", "mimic_cxr"):
        return CHEXPERT_LABELS
    if source == "chestxray14":
        return CHESTXRAY14_LABELS
    if source == "covid_radiography":
        return (COVID_LABEL,)
    raise ValueError(f"source {source!r} has no fixed label set; expected one of {', '.join(DATASET_SOURCES)}")


def as_cxr_config(cfg: CXRConfig | Mapping[str, Any]) -> CXRConfig:
    """``cfg`` as a :class:`CXRConfig`: itself, or built by :meth:`CXRConfig.from_params`."""
    return cfg if isinstance(cfg, CXRConfig) else CXRConfig.from_params(cfg)


def read_cxr_dataset(cfg: CXRConfig | Mapping[str, Any]) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """Read the dataset ``cfg.source`` at ``cfg.root`` into the common table.

    Returns ``(table, label_names, skipped)``: the table (columns :data:`TABLE_COLUMNS`
    then ``label_names``), sorted by split, patient, study and path with a fresh index;
    and the skipped rows (columns :data:`SKIPPED_COLUMNS`), which are also logged.

    Raises ``ValueError`` for a source that is not read from disk (``rendered`` is made
    from the CT) or labels the dataset does not have, :class:`CXRLayoutError` for a
    missing file or folder, :class:`CXRDataError` when no image is usable.
    """
    cfg = as_cxr_config(cfg)
    if cfg.source not in READERS:
        raise ValueError(f"source: got {cfg.source!r}, expected a dataset read from disk: "
                         f"{', '.join(DATASET_SOURCES)} (rendered radiographs are made from the CT)")
    known_labels = dataset_labels(cfg.source)
    label_names = list(cfg.labels) if cfg.labels else list(known_labels)
    unknown_labels = [label for label in label_names if label not in known_labels]
    if unknown_labels:
        raise ValueError(f"labels: {unknown_labels} are not {cfg.source} labels; known: "
                         + ", ".join(repr(label) for label in known_labels))
    root = _require_dir(Path(cfg.root).expanduser().absolute(), cfg.source)
    table, skipped_rows = READERS[cfg.source](root, cfg, label_names)
    skipped = pd.DataFrame(skipped_rows, columns=SKIPPED_COLUMNS)
    if cfg.frontal_only:
        table = table[table["view"] == "frontal"]
    if table.empty:
        reasons = "; ".join(f"{r.path}: {r.reason}" for r in skipped.head(3).itertuples())
        raise CXRDataError(
            f"no usable image in the {cfg.source} dataset at {root}"
            + (" with data.cxr.frontal_only: true" if cfg.frontal_only else "")
            + f" ({len(skipped)} rows skipped{', e.g. ' + reasons if reasons else ''}); {LAYOUTS[cfg.source]}"
        )
    if len(skipped):
        LOG.warning(
            "%s: skipped %d of %d images (first: %s: %s)", cfg.source, len(skipped), len(skipped) + len(table),
            skipped["path"].iloc[0], skipped["reason"].iloc[0],
        )
    table = table.assign(split_order=table["split"].map(SPLITS.index))
    table = table.sort_values(["split_order", "patient_id", "study_id", "path"]).drop(columns="split_order")
    return table[TABLE_COLUMNS + label_names].reset_index(drop=True), label_names, skipped


# --- CheXpert -----------------------------------------------------------------------------

_CHEXPERT_PATH = re.compile(r"(?:^|/)(patient\d+)/(study\d+)/[^/]+$")


def read_chexpert(root: Path, cfg: CXRConfig, label_names: list[str]) -> tuple[pd.DataFrame, list[list[str]]]:
    """CheXpert v1.0 / v1.0-small at ``root`` (the folder holding ``train.csv``, ``valid.csv``).

    ``Path`` is relative to ``root``'s parent and starts with the dataset folder's name;
    that first part is replaced by ``root``, so a renamed folder still works. Returns the
    table (all views; the caller applies ``frontal_only``) and the skipped rows.
    """
    required = ["Path", "Frontal/Lateral", "AP/PA", *label_names]
    frames, skipped = [], []
    for filename, official_split in (("train.csv", "train"), ("valid.csv", "test")):
        label_file = _require_file(root / filename, "chexpert")
        frame = _read_csv(label_file, required, dtype={"Path": str, "Frontal/Lateral": str, "AP/PA": str})
        labels = _map_chexpert_labels(frame, label_names, cfg.uncertain, label_file)
        paths = [_chexpert_image_path(root, p) for p in frame["Path"]]
        ids = [_CHEXPERT_PATH.search(p.replace("\\", "/")) for p in frame["Path"]]
        views = frame["Frontal/Lateral"].str.strip().str.lower()
        usable = []
        for path, match, view, listed in zip(paths, ids, views, frame["Path"]):
            if match is None:
                skipped.append([listed, "Path does not end in patientNNNNN/studyN/<image>", filename])
            elif view not in VIEWS:
                skipped.append([str(path), f"Frontal/Lateral is {view!r}, expected Frontal or Lateral", filename])
            elif not path.is_file():
                skipped.append([str(path), "image listed but not found on disk", filename])
            else:
                usable.append(True)
                continue
            usable.append(False)
        keep = np.array(usable, dtype=bool)
        part = pd.DataFrame({
            "path": [str(p) for p, k in zip(paths, keep) if k],
            "patient_id": [m.group(1) for m, k in zip(ids, keep) if k],
            "study_id": [f"{m.group(1)}/{m.group(2)}" for m, k in zip(ids, keep) if k],
            "view": views[keep].to_numpy(),
            "view_position": _blank_to_nan(frame["AP/PA"][keep]).to_numpy(),
            "split": official_split,
        })
        frames.append(pd.concat([part, labels[keep].reset_index(drop=True)], axis=1))
    table = pd.concat(frames, ignore_index=True)
    table = _draw_val_patients(table, cfg)
    return _one_split_per_patient(table, "chexpert"), skipped


def _chexpert_image_path(root: Path, listed: str) -> Path:
    parts = Path(listed.replace("\\", "/")).parts
    if parts and parts[0] in ("train", "valid", "test"):
        return root.joinpath(*parts)
    return root.joinpath(*parts[1:])


# --- ChestX-ray14 -------------------------------------------------------------------------

def read_chestxray14(root: Path, cfg: CXRConfig, label_names: list[str]) -> tuple[pd.DataFrame, list[list[str]]]:
    """NIH ChestX-ray14 at ``root``: the official test list, val drawn from train_val by patient."""
    entry_file = next(
        (root / name for name in ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv") if (root / name).is_file()),
        None,
    )
    if entry_file is None:
        raise CXRLayoutError(f"{root / 'Data_Entry_2017.csv'} not found (nor Data_Entry_2017_v2020.csv); "
                             f"{CHESTXRAY14_LAYOUT}")
    entries = _read_csv(
        entry_file, ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position"],
        dtype={"Image Index": str, "Finding Labels": str, "View Position": str},
    )
    official: dict[str, str] = {}
    for filename, split in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        list_file = _require_file(root / filename, "chestxray14")
        for name in list_file.read_text().split():
            official[name] = split
    images = _index_chestxray14_images(root)

    findings = entries["Finding Labels"].fillna("").str.split("|")
    unknown = sorted({f for row in findings for f in row if f not in CHESTXRAY14_LABELS and f != "No Finding"})
    if unknown:
        raise CXRDataError(f"{entry_file}: Finding Labels holds {unknown}, expected '|'-joined names from "
                           f"{', '.join(CHESTXRAY14_LABELS)}, or 'No Finding'")
    rows, skipped = [], []
    for name, found, follow_up, patient, position in zip(
        entries["Image Index"], findings, entries["Follow-up #"], entries["Patient ID"], entries["View Position"]
    ):
        view = _view_of_position(position)
        located = str(images.get(name, root / "images" / name))
        if name not in official:
            skipped.append([located, "in neither train_val_list.txt nor test_list.txt", entry_file.name])
        elif view is None:
            skipped.append([located, f"View Position {position!r} is neither frontal nor lateral", entry_file.name])
        elif name not in images:
            skipped.append([located, "image listed but not found under images/ or images_*/images/",
                            entry_file.name])
        else:
            patient_id = f"{int(patient):08d}"
            rows.append([located, patient_id, f"{patient_id}_{int(follow_up):03d}", view,
                         position.strip(), official[name],
                         *(1.0 if label in found else 0.0 for label in label_names)])
    in_entries = set(entries["Image Index"])
    for name, split in official.items():
        if name not in in_entries:
            skipped.append([name, f"listed in the {split} list but has no row in {entry_file.name}",
                            "test_list.txt" if split == "test" else "train_val_list.txt"])
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS + label_names)
    table = _draw_val_patients(table, cfg)
    return _one_split_per_patient(table, "chestxray14"), skipped


def _index_chestxray14_images(root: Path) -> dict[str, Path]:
    folders = ([root / "images"] if (root / "images").is_dir() else []) + sorted(
        folder for folder in root.glob("images_*/images") if folder.is_dir()
    )
    if not folders:
        raise CXRLayoutError(f"no image folder {root / 'images'} nor {root / 'images_001' / 'images'} ...; "
                             f"{CHESTXRAY14_LAYOUT}")
    index: dict[str, Path] = {}
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file():
                    index.setdefault(entry.name, Path(entry.path))
    return index


# --- COVID-19 Radiography Database ----------------------------------------------------------

_COVID_FOLDER_NAMES = {"covid": 0, "covid19": 0, "normal": 1, "lungopacity": 2, "viralpneumonia": 3}


def read_covid_radiography(
    root: Path, cfg: CXRConfig, label_names: list[str]
) -> tuple[pd.DataFrame, list[list[str]]]:
    """COVID-19 Radiography Database at ``root``: one row per image of the four class folders.

    Class folders match by name ignoring case, spaces, '-' and '_' ("COVID-19" is COVID).
    Images are read from ``<class>/images/`` when it exists, else from ``<class>/``
    itself; neither ``masks/`` nor the metadata ``.xlsx`` files are read. Every image is
    frontal, and its own patient and study (the database gives no patient ids), with id
    ``<class>/<file stem>``. Nothing is ever skipped: no file lists the images.
    """
    folders: dict[int, Path] = {}
    for child in sorted(root.iterdir()):
        index = _COVID_FOLDER_NAMES.get(re.sub(r"[\s_-]", "", child.name.lower()))
        if index is None or not child.is_dir():
            continue
        if index in folders:
            raise CXRDataError(f"both {folders[index]} and {child} look like the {COVID_CLASSES[index]!r} "
                               f"class folder; keep one. {COVID_LAYOUT}")
        folders[index] = child
    missing = [root / COVID_CLASSES[i] for i in range(len(COVID_CLASSES)) if i not in folders]
    if missing:
        raise CXRLayoutError(f"class folder(s) {', '.join(map(str, missing))} not found; {COVID_LAYOUT}")
    rows = []
    for index, folder in sorted(folders.items()):
        image_dir = folder / "images" if (folder / "images").is_dir() else folder
        files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            LOG.warning("covid_radiography: no image in %s", image_dir)
        for path in files:
            image_id = f"{COVID_CLASSES[index]}/{path.stem}"
            rows.append([str(path), image_id, image_id, "frontal", np.nan, "", index])
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS + [COVID_LABEL])
    fractions = {"train": 1 - cfg.val_fraction - cfg.test_fraction, "val": cfg.val_fraction,
                 "test": cfg.test_fraction}
    table["split"] = _seeded_group_split(table["patient_id"], fractions, cfg.seed, strata=table[COVID_LABEL])
    return table, []


# --- MIMIC-CXR-JPG ------------------------------------------------------------------------

_MIMIC_SPLITS = {"train": "train", "validate": "val", "test": "test"}


def read_mimic_cxr(root: Path, cfg: CXRConfig, label_names: list[str]) -> tuple[pd.DataFrame, list[list[str]]]:
    """MIMIC-CXR-JPG 2.0.0 at ``root``: one row per image, labels per study, the official split.

    ``study_id`` is MIMIC's (unique over patients), so the views of a study group by it.
    """
    ids = {"dicom_id": str, "subject_id": str, "study_id": str}
    metadata_file = _find_mimic_file(root, "metadata")
    labels_file = _find_mimic_file(root, "chexpert")
    split_file = _find_mimic_file(root, "split")
    metadata = _read_csv(metadata_file, ["dicom_id", "subject_id", "study_id", "ViewPosition"],
                         dtype={**ids, "ViewPosition": str})
    study_labels = _read_csv(labels_file, ["subject_id", "study_id", *label_names], dtype=ids)
    splits = _read_csv(split_file, ["dicom_id", "split"], dtype={"dicom_id": str, "split": str})
    unknown_splits = sorted(set(splits["split"].dropna()) - set(_MIMIC_SPLITS))
    if unknown_splits:
        raise CXRDataError(f"{split_file}: split holds {unknown_splits}, expected {', '.join(_MIMIC_SPLITS)}")

    mapped = _map_chexpert_labels(study_labels, label_names, cfg.uncertain, labels_file)
    study_labels = pd.concat([study_labels[["subject_id", "study_id"]], mapped], axis=1)
    if study_labels.duplicated(["subject_id", "study_id"]).any():
        raise CXRDataError(f"{labels_file}: more than one row for a (subject_id, study_id); expected one per study")
    split_of = dict(zip(splits["dicom_id"], splits["split"].map(_MIMIC_SPLITS)))
    merged = metadata.merge(study_labels, on=["subject_id", "study_id"], how="left")

    keep, skipped, paths, views = [], [], [], []
    for dicom_id, subject, study, position in zip(
        merged["dicom_id"], merged["subject_id"], merged["study_id"], merged["ViewPosition"]
    ):
        path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg"
        view = _view_of_position(position)
        reason = (
            f"no row in {split_file.name}" if dicom_id not in split_of
            else f"ViewPosition {position!r} is neither frontal nor lateral" if view is None
            else "image listed but not found on disk" if not path.is_file()
            else None
        )
        if reason is not None:
            skipped.append([str(path), reason, metadata_file.name])
        keep.append(reason is None)
        paths.append(str(path))
        views.append(view)
    keep_mask = np.array(keep, dtype=bool)
    kept = merged[keep_mask]
    table = pd.DataFrame({
        "path": np.array(paths, dtype=object)[keep_mask],
        "patient_id": kept["subject_id"].to_numpy(),
        "study_id": kept["study_id"].to_numpy(),
        "view": np.array(views, dtype=object)[keep_mask],
        "view_position": _blank_to_nan(kept["ViewPosition"]).to_numpy(),
        "split": kept["dicom_id"].map(split_of).to_numpy(),
    })
    table = pd.concat([table, kept[label_names].reset_index(drop=True).astype(float)], axis=1)
    return _one_split_per_patient(table, "mimic_cxr"), skipped


def _find_mimic_file(root: Path, kind: str) -> Path:
    for name in (f"mimic-cxr-2.0.0-{kind}.csv", f"mimic-cxr-2.0.0-{kind}.csv.gz"):
        if (root / name).is_file():
            return root / name
    raise CXRLayoutError(f"{root / f'mimic-cxr-2.0.0-{kind}.csv'} not found (nor .csv.gz); {MIMIC_LAYOUT}")


READERS: dict[str, Callable[[Path, CXRConfig, list[str]], tuple[pd.DataFrame, list[list[str]]]]] = {
    "chexpert": read_chexpert,
    "chestxray14": read_chestxray14,
    "covid_radiography": read_covid_radiography,
    "mimic_cxr": read_mimic_cxr,
}
LAYOUTS = {
    "chexpert": CHEXPERT_LAYOUT,
    "chestxray14": CHESTXRAY14_LAYOUT,
    "covid_radiography": COVID_LAYOUT,
    "mimic_cxr": MIMIC_LAYOUT,
}


# --- shared helpers -----------------------------------------------------------------------

def _require_dir(root: Path, source: str) -> Path:
    if not root.is_dir():
        raise CXRLayoutError(f"data.cxr.root: folder {root} not found; {LAYOUTS[source]}")
    return root


def _require_file(path: Path, source: str) -> Path:
    if not path.is_file():
        raise CXRLayoutError(f"{path} not found; {LAYOUTS[source]}")
    return path


def _read_csv(path: Path, required: Iterable[str], dtype: Mapping[str, Any]) -> pd.DataFrame:
    """A label file (``.csv`` or ``.csv.gz``) that must hold the ``required`` columns."""
    frame = pd.read_csv(path, dtype=dict(dtype), keep_default_na=False, na_values=[""])
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise CXRDataError(f"{path}: missing columns {missing}; it has {list(frame.columns)}")
    return frame


def _blank_to_nan(values: pd.Series) -> pd.Series:
    stripped = values.astype(object).where(values.notna(), "").astype(str).str.strip()
    return stripped.where(stripped != "", np.nan)


def _view_of_position(position: Any) -> str | None:
    """``frontal`` / ``lateral`` for a DICOM ViewPosition, ``None`` for obliques and blanks."""
    if not isinstance(position, str):
        return None
    position = position.strip().upper()
    if position in FRONTAL_POSITIONS:
        return "frontal"
    if position in LATERAL_POSITIONS:
        return "lateral"
    return None


def _map_chexpert_labels(frame: pd.DataFrame, label_names: list[str], uncertain: str, source: Path) -> pd.DataFrame:
    """CheXpert-labeller values to floats: 1 -> 1, 0 -> 0, blank -> 0, -1 per ``uncertain``.

    ``uncertain``: ``positive`` -> 1 (U-Ones), ``negative`` -> 0 (U-Zeros), ``ignore`` ->
    NaN (U-Ignore), after Irvin et al., AAAI 2019. Any other value is an error naming
    ``source`` and the column.
    """
    uncertain_value = {"positive": 1.0, "negative": 0.0, "ignore": math.nan}[uncertain]
    mapped = {}
    for label in label_names:
        values = pd.to_numeric(frame[label], errors="coerce")
        bad = (values.notna() & ~values.isin([1.0, 0.0, -1.0])) | (values.isna() & frame[label].notna())
        if bad.any():
            raise CXRDataError(f"{source}: column {label!r} holds {frame[label][bad].iloc[0]!r}, expected "
                               "1.0, 0.0, -1.0 (uncertain) or blank")
        mapped[label] = values.fillna(0.0).replace(-1.0, uncertain_value).astype(float)
    return pd.DataFrame(mapped, index=frame.index)


def _seeded_group_split(
    groups: pd.Series, fractions: Mapping[str, float], seed: int, strata: pd.Series | None = None
) -> pd.Series:
    """Assign each group (patient) to one split; returns the split of every row.

    Within each stratum the groups are sorted, shuffled by ``seed`` and cut by
    :func:`~chestssl.data.splits.split_counts` (so, given enough groups, each split with a
    positive fraction gets at least one). The same groups, strata, fractions and seed
    give the same split whatever the row order. A group's stratum is that of its first row.
    """
    strata = pd.Series("all", index=groups.index) if strata is None else strata
    stratum_of = dict(zip(groups, strata))
    rng = np.random.default_rng(seed)
    split_of: dict[Any, str] = {}
    for stratum in sorted(set(stratum_of.values()), key=str):
        members = sorted(g for g, s in stratum_of.items() if s == stratum)
        shuffled = [members[i] for i in rng.permutation(len(members))]
        counts = split_counts(len(shuffled), fractions)
        start = 0
        for name in SPLITS:
            for group in shuffled[start:start + counts[name]]:
                split_of[group] = name
            start += counts[name]
    return groups.map(split_of)


def _draw_val_patients(table: pd.DataFrame, cfg: CXRConfig) -> pd.DataFrame:
    """Move a seeded ``val_fraction`` of the train split's patients to val."""
    train = table["split"] == "train"
    fractions = {"train": 1 - cfg.val_fraction, "val": cfg.val_fraction, "test": 0.0}
    table = table.copy()
    table.loc[train, "split"] = _seeded_group_split(table.loc[train, "patient_id"], fractions, cfg.seed)
    return table


def _one_split_per_patient(table: pd.DataFrame, source: str) -> pd.DataFrame:
    """Give a patient found in several official splits the most held-out of them (test > val > train).

    The published splits are patient-level, so this changes nothing on an intact
    dataset; a patient it moves is logged.
    """
    splits_per_patient = table.groupby("patient_id")["split"].agg(lambda s: max(s, key=SPLITS.index))
    held_out = table["patient_id"].map(splits_per_patient)
    moved = table.loc[held_out != table["split"], "patient_id"].unique()
    if len(moved):
        LOG.warning("%s: %d patients were in several splits (e.g. %s); all their images go to the most "
                    "held-out one", source, len(moved), moved[0])
    return table.assign(split=held_out)


# --- image loading ------------------------------------------------------------------------

def load_radiograph(path: str | os.PathLike, size: int) -> np.ndarray:
    """One radiograph as a float32 ``(size, size)`` array in [0, 1].

    Read with PIL (8-bit or 16-bit PNG, JPEG, any other PIL format) and made grayscale:
    8-bit values / 255; 16-bit values / 65535 (the full 16-bit range, not the image's own
    min-max, so intensities mean the same across images); RGB / palette images via PIL's
    luma (ITU-R 601-2). EXIF orientation is applied.

    Aspect is kept: the longer side is resized to ``size`` (``area`` averaging when
    shrinking, bilinear when enlarging; MONAI ``Resize(size_mode="longest")``), then the
    shorter side is padded with 0 (black) symmetrically to ``size``, the odd pixel at the
    end (bottom/right) (MONAI ``SpatialPad``).
    """
    from monai.transforms import Resize, SpatialPad
    from monai.utils import convert_to_numpy
    from PIL import Image, ImageOps, UnidentifiedImageError
    import torch

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: got {size!r}, expected a positive integer")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"radiograph {path} not found")
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                # Decode a JPEG at the smallest DCT scale still >= size on both sides: much faster.
                image.draft("L", (size, size))
            pixels = _grayscale_unit(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError) as error:
        raise CXRDataError(f"{path}: not a readable image ({error})") from error
    height, width = pixels.shape
    mode = "area" if max(height, width) > size else "bilinear"
    resize = Resize(size, size_mode="longest", mode=mode, align_corners=None if mode == "area" else False)
    square = SpatialPad((size, size), method="symmetric", mode="constant")(resize(torch.from_numpy(pixels)[None]))
    return np.clip(convert_to_numpy(square, dtype=np.float32)[0], 0.0, 1.0)


def _grayscale_unit(image: Any) -> np.ndarray:
    """A PIL image as a float32 (H, W) array in [0, 1] (see :func:`load_radiograph`)."""
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.float32) / 65535.0
    if image.mode == "I":
        return np.clip(np.asarray(image, dtype=np.float32), 0, 65535) / 65535.0
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        return (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
