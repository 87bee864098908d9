"""Label-fraction ablation (seed 001): fine-tune on a share of the training patients or images.

Seed 001 fine-tunes its Barlow Twins encoder and a randomly initialised one on 1%, 5%, 10%,
15%, 20%, 25%, 50% and 100% of its labelled training *images* (nested subsets, each trained
separately) and plots test accuracy against the share, to show how many labels pretraining
saves. ``label_fraction.unit`` says what a fraction is a share of:

- ``patients`` (:func:`label_fraction_settings`): the share is of training patients (all
  slices of a patient stay together, as the split does), and every subset holds at least
  one patient. The patients drawn from are the training patients with at least one nodule
  slice: one without would add no labelled slice to a classification or segmentation
  subset (clean slices are drawn per nodule slice), and a subset of such patients alone
  could not train.
- ``images``, seed 001's unit (:func:`image_fraction_settings`): the share is of the
  run's training items, the slices ``finetune`` trains the run on (the ``SliceDataset``
  of the train split for the run's task: nodule slices for segmentation, nodule and
  sampled clean slices for classification). A subset may then hold some slices of a
  patient and not others.

Either way the subsets are nested (the 5% subset includes the 1% one), so the curve shows
the effect of adding labels rather than of drawing other data, and fractions that give the
same subset share one training.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from chestssl.ablations.runner import AblationSetting

#: What ``label_fraction.fractions`` are shares of; seed 001's are of images.
UNITS = ("patients", "images")
#: The unit when ``label_fraction.unit`` is not given.
DEFAULT_UNIT = "patients"


def labelled_patients(processed_dir, split: str = "train") -> list[str]:
    """Patients of ``split`` with at least one nodule slice (``label == 1`` in ``slices.csv``), sorted."""
    from chestssl.data.processed import read_slices

    slices = read_slices(processed_dir)
    chosen = slices[(slices["split"] == split) & (slices["label"] == 1)]
    return sorted(chosen["patient_id"].unique())


def fraction_key(fraction: float) -> str:
    """File-safe name of a fraction: 0.05 -> ``5pct``."""
    return f"{fraction * 100:g}pct".replace(".", "p")


def _check_fractions(fractions: Sequence[float]) -> None:
    for fraction in fractions:
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fractions must be in (0, 1], got {fraction!r}")


def patient_subsets(patients: Sequence[str], fractions: Sequence[float], seed: int) -> dict[float, tuple[str, ...]]:
    """Nested subsets of ``patients``: ``{fraction: the first ceil(fraction * n) (at least 1) of one seeded order}``.

    Raises:
        ValueError: no patients, or a fraction outside (0, 1].
    """
    if len(patients) == 0:
        raise ValueError("the train split holds no patients; the label-fraction ablation needs at least one")
    _check_fractions(fractions)
    # sorted() first: the order depends on the seed only, not on how the split was listed.
    listed = sorted(patients)
    order = [listed[i] for i in np.random.default_rng(seed).permutation(len(listed))]
    return {float(f): tuple(order[: max(1, math.ceil(float(f) * len(order) - 1e-9))]) for f in fractions}


def label_fraction_settings(
    patients: Sequence[str], fractions: Sequence[float], seed: int
) -> tuple[list[AblationSetting], dict[float, str]]:
    """The trainings of the ablation in the ``patients`` unit and, per fraction, the key of the
    training that serves it.

    Fractions giving the same number of patients map to one setting (the nested subsets
    are then identical), named after the smallest such fraction.
    """
    return _one_setting_per_subset(patient_subsets(patients, fractions, seed), "patient_ids")


def _one_setting_per_subset(
    subsets: Mapping[float, tuple], field: str
) -> tuple[list[AblationSetting], dict[float, str]]:
    """One setting per distinct subset (``field`` of :class:`AblationSetting` names it), keyed
    after the smallest fraction it serves, and per fraction the key of its setting."""
    settings: dict[tuple, AblationSetting] = {}
    served_by: dict[float, str] = {}
    for fraction in sorted(subsets):
        subset = subsets[fraction]
        if subset not in settings:
            settings[subset] = AblationSetting(key=fraction_key(fraction), **{field: subset})
        served_by[fraction] = settings[subset].key
    return list(settings.values()), served_by


def item_order(labels: Sequence[int], seed: int, stratify: bool) -> list[int]:
    """One seeded order of the items whose labels are ``labels`` (positions into ``labels``).

    Without ``stratify`` it is a seeded permutation. With it, each class keeps the seeded
    order among its own items, and the classes are interleaved in proportion to their
    sizes: the r-th item (from 0) of a class of ``n_c`` items sits at ``r / n_c``, ties
    kept in the seeded order. So the first items of the order are one of each class, and
    any first ``k`` items hold each class in its overall proportion to within one item.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    if not stratify:
        return [int(i) for i in order]
    ordered = np.asarray(labels)[order]
    position = np.empty(len(order), dtype=np.float64)
    for label in np.unique(ordered):
        members = np.flatnonzero(ordered == label)
        position[members] = np.arange(len(members)) / len(members)
    return [int(i) for i in order[np.lexsort((np.arange(len(order)), position))]]


def item_subsets(
    labels: Sequence[int], fractions: Sequence[float], seed: int, stratify: bool
) -> dict[float, tuple[int, ...]]:
    """Nested subsets of items: ``{fraction: positions of the first ceil(fraction * n) of one seeded order}``.

    Args:
        labels: the label of each item, in the items' own order (``SliceDataset`` lists
            them by scan and slice, so the subsets depend on the seed only).
        fractions: shares in (0, 1].
        seed: seeds the order (:func:`item_order`).
        stratify: keep every class present, as classification needs (:func:`item_order`):
            each subset holds at least one item of each class among ``labels`` and the
            classes in their overall proportion. Where the items hold one class only (no
            clean slice was sampled, say with ``slices.clean_per_nodule_slice: 0``) the
            subsets hold that class only, as the whole training set does.

    Each subset holds at least one item (with ``stratify``, one per class); its positions
    are sorted, so the whole set lists the items as the full training set does.

    Raises:
        ValueError: no items, or a fraction outside (0, 1].
    """
    if len(labels) == 0:
        raise ValueError("the train split holds no training images; the label-fraction ablation needs at least one")
    _check_fractions(fractions)
    order = item_order(labels, seed, stratify)
    least = len(np.unique(np.asarray(labels))) if stratify else 1
    return {float(f): tuple(sorted(order[: max(least, math.ceil(float(f) * len(order) - 1e-9))])) for f in fractions}


def image_fraction_settings(
    labels: Sequence[int], fractions: Sequence[float], seed: int, stratify: bool
) -> tuple[list[AblationSetting], dict[float, str]]:
    """The trainings of the ablation in the ``images`` unit and, per fraction, the key of the
    training that serves it (as :func:`label_fraction_settings` does for patients).

    Each setting names its items (``item_indices``, positions among ``labels``, the run's
    training items; :func:`item_subsets`); fractions giving the same items map to one
    setting, named after the smallest such fraction.
    """
    return _one_setting_per_subset(item_subsets(labels, fractions, seed, stratify), "item_indices")


def label_fraction_metrics(
    run_name: str,
    run: Mapping[str, Any],
    n_split_patients: int,
    n_labelled_patients: int,
    served_by: Mapping[float, str],
    results: Mapping[str, Mapping[str, Any]],
    unit: str = DEFAULT_UNIT,
    n_labelled_images: int | None = None,
) -> dict[str, Any]:
    """The stage's metrics file: one entry per fraction (its own key), in increasing order.

    ``unit`` (what the fractions are shares of) is recorded at the top; each fraction
    records the training images and patients it had. ``n_labelled_images``: the training
    items drawn from in the ``images`` unit (recorded when given).
    """
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
    drawn_from = {} if n_labelled_images is None else {"n_labelled_images": n_labelled_images}
    return {"run": run_name, "task": run["task"], "init": run["init"], "arch": run["arch"], "unit": unit,
            "n_split_patients": n_split_patients, "n_labelled_patients": n_labelled_patients, **drawn_from,
            "fractions": fractions}
