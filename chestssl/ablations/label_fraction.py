"""Label-fraction ablation (seed 001): fine-tune on a share of the training patients.

Seed 001 fine-tunes its Barlow Twins encoder and a randomly initialised one on 1%, 5%, 10%,
... 100% of the labelled training data and plots test accuracy against the share, to show
how many labels pretraining saves. Here the share is of training *patients* (all slices of
a patient stay together, as the split does), the subsets are nested (the 5% patients
include the 1% ones) so the curve shows the effect of adding labels rather than of
drawing other patients, and every subset holds at least one patient. Fractions that give
the same number of patients share one training.

The patients drawn from are the training patients with at least one nodule slice: one
without would add no labelled slice to a classification or segmentation subset (clean
slices are drawn per nodule slice), and a subset of such patients alone could not train.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from chestssl.ablations.runner import AblationSetting


def labelled_patients(processed_dir, split: str = "train") -> list[str]:
    """Patients of ``split`` with at least one nodule slice (``label == 1`` in ``slices.csv``), sorted."""
    from chestssl.data.processed import read_slices

    slices = read_slices(processed_dir)
    chosen = slices[(slices["split"] == split) & (slices["label"] == 1)]
    return sorted(chosen["patient_id"].unique())


def fraction_key(fraction: float) -> str:
    """File-safe name of a fraction: 0.05 -> ``5pct``."""
    return f"{fraction * 100:g}pct".replace(".", "p")


def patient_subsets(patients: Sequence[str], fractions: Sequence[float], seed: int) -> dict[float, tuple[str, ...]]:
    """Nested subsets of ``patients``: ``{fraction: the first ceil(fraction * n) (at least 1) of one seeded order}``.

    Raises:
        ValueError: no patients, or a fraction outside (0, 1].
    """
    if len(patients) == 0:
        raise ValueError("the train split holds no patients; the label-fraction ablation needs at least one")
    for fraction in fractions:
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fractions must be in (0, 1], got {fraction!r}")
    # sorted() first: the order depends on the seed only, not on how the split was listed.
    listed = sorted(patients)
    order = [listed[i] for i in np.random.default_rng(seed).permutation(len(listed))]
    return {float(f): tuple(order[: max(1, math.ceil(float(f) * len(order) - 1e-9))]) for f in fractions}


def label_fraction_settings(
    patients: Sequence[str], fractions: Sequence[float], seed: int
) -> tuple[list[AblationSetting], dict[float, str]]:
    """The trainings of the ablation and, per fraction, the key of the training that serves it.

    Fractions giving the same number of patients map to one setting (the nested subsets
    are then identical), named after the smallest such fraction.
    """
    subsets = patient_subsets(patients, fractions, seed)
    settings: dict[tuple[str, ...], AblationSetting] = {}
    served_by: dict[float, str] = {}
    for fraction in sorted(subsets):
        ids = subsets[fraction]
        if ids not in settings:
            settings[ids] = AblationSetting(key=fraction_key(fraction), patient_ids=ids)
        served_by[fraction] = settings[ids].key
    return list(settings.values()), served_by


def label_fraction_metrics(
    run_name: str,
    run: Mapping[str, Any],
    n_split_patients: int,
    n_labelled_patients: int,
    served_by: Mapping[float, str],
    results: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The stage's metrics file: one entry per fraction (its own key), in increasing order."""
    fractions = {}
    for fraction in sorted(served_by):
        key = served_by[fraction]
        result = results[key]
        fractions[fraction_key(fraction)] = {
            "fraction": fraction,
            "trained_as": key,
            "n_train_patients": result["n_train_patients"],
            "n_train_images": result["n_train_images"],
            "best_epoch": result["best_epoch"],
            **result["test"],
        }
    return {"run": run_name, "task": run["task"], "init": run["init"], "arch": run["arch"],
            "n_split_patients": n_split_patients, "n_labelled_patients": n_labelled_patients, "fractions": fractions}
