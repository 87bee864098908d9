"""A real chest X-ray dataset into the radiographs folder (``data.cxr.source`` other than ``rendered``).

:func:`chestssl.data.cxr.read_cxr_dataset` reads the dataset's published layout into one
table (one row per image, patient-level split, labels); :func:`import_radiographs` loads
every listed image at ``radiographs.side`` (:func:`chestssl.data.cxr.load_radiograph`) and
writes the layout of :mod:`chestssl.data.radiograph_folder`, the same one the rendered
radiographs use, so pretraining, probing and alignment run unchanged on it.

Labels become binary columns of ``studies.csv``, one per label:

- CheXpert, MIMIC-CXR, ChestX-ray14: the dataset's labels (``data.cxr.labels``, all by
  default), 1 / 0, empty where unknown (CheXpert's uncertain labels under
  ``data.cxr.uncertain: ignore``, a MIMIC-CXR study without labels). The probe leaves
  unknown labels out.
- COVID-19 Radiography: its single 4-class label becomes one column per class (one-vs-rest:
  ``COVID``, ``Normal``, ``Lung_Opacity``, ``Viral Pneumonia``).

A study's label is positive where any of its images' is (the label files of CheXpert and
MIMIC-CXR are per study already), negative where all known ones are negative, unknown
where none is known. Images listed but not usable are in ``skipped.csv``; an image that
is listed and present but cannot be decoded stops the import with its path (a resumed run
continues after it is replaced or removed from the label file).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from tqdm import tqdm

from chestssl.data.cxr import COVID_CLASSES, COVID_LABEL, CXRConfig, as_cxr_config, load_radiograph, read_cxr_dataset

__all__ = ["binary_labels", "import_radiographs", "study_table"]


def binary_labels(table: pd.DataFrame, label_names: list[str], source: str) -> tuple[pd.DataFrame, list[str]]:
    """The label columns of ``table`` as binary columns (float 1 / 0 / NaN) and their names."""
    if source == "covid_radiography":
        classes = table[COVID_LABEL].to_numpy(np.int64)
        names = list(COVID_CLASSES)
        return pd.DataFrame({name: (classes == index).astype(np.float64) for index, name in enumerate(names)},
                            index=table.index), names
    return table[label_names].astype(np.float64), list(label_names)


def study_table(table: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """One row per study (in order of first appearance): ``study_id``, ``patient_id``,
    ``split``, the labels (any image positive -> 1, else 0 where known, NaN if none is)
    and ``num_images``."""
    keyed = pd.concat([table[["study_id", "patient_id", "split"]], labels], axis=1)
    grouped = keyed.groupby("study_id", sort=False)
    studies = grouped[["patient_id", "split"]].first()
    studies[list(labels.columns)] = grouped[list(labels.columns)].max()  # max skips NaN; all NaN -> NaN
    studies["num_images"] = grouped.size()
    return studies.reset_index()


def import_radiographs(
    cfg: CXRConfig | Mapping[str, Any],
    out_dir: str | os.PathLike,
    size: int,
    progress: bool = False,
) -> pd.DataFrame:
    """Read the dataset of ``cfg`` (``data.cxr``) and write it as the radiographs folder ``out_dir``.

    Args:
        cfg: the validated ``data.cxr`` params, or a :class:`~chestssl.data.cxr.CXRConfig`.
        out_dir: the radiographs folder (``data/radiographs``).
        size: the side of the stored images (``radiographs.side``).

    Returns ``studies.csv``'s table. ``images.csv`` keeps each image's ``view_position`` and
    its ``path`` relative to ``cfg.root``.
    """
    from chestssl.data.radiograph_folder import RadiographFolderWriter, input_fingerprint

    cfg = as_cxr_config(cfg)
    # Sorted by split, patient, study and path: a study's images are consecutive rows, as
    # the folder layout needs (the writer checks it).
    table, label_names, skipped = read_cxr_dataset(cfg)
    labels, names = binary_labels(table, label_names, cfg.source)
    studies = study_table(table, labels)
    root = Path(cfg.root).expanduser().absolute()
    paths = table["path"].tolist()
    settings = {"cfg": dataclasses.asdict(cfg), "size": size, "labels": names}
    writer = RadiographFolderWriter(out_dir, len(table), size, with_masks=False,
                                    fingerprint=input_fingerprint(settings, paths))
    for index in tqdm(range(writer.done, len(paths)), desc=f"{cfg.source} radiographs", unit="image",
                      disable=not progress, initial=writer.done, total=len(paths)):
        try:
            writer.put(index, load_radiograph(paths[index], size))
        except BaseException:  # an unreadable image or an interrupt: keep what is done
            writer.checkpoint(index, force=True)
            raise
        writer.checkpoint(index + 1)
    images = table[["study_id", "view", "view_position"]].assign(
        path=[os.path.relpath(path, root) for path in paths]
    )
    writer.finish(
        {
            "source": cfg.source,
            "labels": names,
            "dataset": {**dataclasses.asdict(cfg), "root": str(root), "labels_read": label_names},
            "skipped_images": int(len(skipped)),
        },
        studies,
        images,
        skipped=skipped,
    )
    return studies
