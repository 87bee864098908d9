"""Seeded, patient-level train/val/test split, stratified by nodule malignancy.

Seed 000 split LIDC-IDRI 8:1:1 at slice level, so slices of one patient landed in both
train and test. Here every patient (all of their scans and slices) goes to exactly one
split, and the split is stratified so that each one sees patients without nodules and
patients with benign, indeterminate and malignant nodules in the proportions of the whole
cohort. A patient's stratum comes from the largest median malignancy rating (LIDC scale
1-5, Armato et al., Med. Phys. 38(2), 2011) over their nodules: below 3 benign, 3
indeterminate, above 3 malignant.

The assignment is deterministic: the same patients, strata, fractions and seed always give
the same split, whatever order the patients come in.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from chestssl.data.processed import SPLITS

STRATA = ("no_nodules", "benign", "indeterminate", "malignant")


def malignancy_stratum(max_malignancy: float | None) -> str:
    """The stratum of a patient whose nodules' largest median malignancy is given.

    ``None`` or NaN (no nodules) gives ``no_nodules``; < 3 ``benign``; 3
    ``indeterminate``; > 3 ``malignant``.
    """
    if max_malignancy is None or (isinstance(max_malignancy, float) and math.isnan(max_malignancy)):
        return "no_nodules"
    if max_malignancy < 3:
        return "benign"
    if max_malignancy == 3:
        return "indeterminate"
    return "malignant"


def patient_strata(
    patients: Iterable[str], nodules: pd.DataFrame, with_nodule_slices: Iterable[str] | None = None
) -> dict[str, str]:
    """Stratum per patient from a nodule table with ``patient_id`` and ``malignancy``.

    Patients without rows in ``nodules`` are ``no_nodules``; so are, when
    ``with_nodule_slices`` is given, patients not in it (their nodules are too small to
    give a nodule slice, so for slice-level tasks they hold only negatives).
    """
    if with_nodule_slices is not None:
        nodules = nodules[nodules["patient_id"].isin(set(with_nodule_slices))]
    largest = nodules.groupby("patient_id")["malignancy"].max() if len(nodules) else pd.Series(dtype=float)
    return {str(p): malignancy_stratum(float(largest[p]) if p in largest.index else None) for p in patients}


def split_counts(num_patients: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Patients per split: largest-remainder rounding of ``fractions * num_patients``.

    When there are at least as many patients as splits with a positive fraction, every
    such split gets at least one patient (taken from the largest split).
    """
    wanted = {name: float(fractions[name]) * num_patients for name in SPLITS}
    counts = {name: math.floor(w) for name, w in wanted.items()}
    # Ties in the remainder go to the split listed first in SPLITS.
    by_remainder = sorted(SPLITS, key=lambda name: (-(wanted[name] - counts[name]), SPLITS.index(name)))
    for name in by_remainder[: num_patients - sum(counts.values())]:
        counts[name] += 1
    positive = [name for name in SPLITS if fractions[name] > 0]
    if num_patients >= len(positive):
        for name in positive:
            if counts[name] == 0:
                donor = max(SPLITS, key=lambda other: (counts[other], -SPLITS.index(other)))
                counts[donor] -= 1
                counts[name] += 1
    return counts


def min_patients(fractions: Mapping[str, float]) -> int:
    """The fewest patients for which :func:`split_counts` gives every split with a positive
    fraction at least one patient (a split with fraction 0 stays empty at any count)."""
    positive = [name for name in SPLITS if float(fractions[name]) > 0]
    if not positive:
        raise ValueError(f"split fractions {dict(fractions)}: none is positive")
    # split_counts fills every positive split from len(positive) patients on; search
    # anyway, so this stays the truth if the rounding rule changes.
    for num_patients in range(len(positive), len(positive) + 10_000):
        counts = split_counts(num_patients, fractions)
        if all(counts[name] > 0 for name in positive):
            return num_patients
    raise ValueError(f"split fractions {dict(fractions)}: no patient count fills every split")


def _interleaved_labels(counts: Mapping[str, int], offset: int) -> list[str]:
    """A sequence holding ``counts[s]`` copies of each split, spread evenly.

    Smooth weighted round-robin: every contiguous run of ``m`` labels holds split ``s``
    ``m * counts[s] / n`` times, give or take less than 2, so a contiguous block of
    patients of one stratum receives each split in proportion. The sequence is rotated by
    ``offset`` (cyclically it stays evenly spread).
    """
    total = sum(counts.values())
    credit = {name: 0 for name in SPLITS}
    labels = []
    for _ in range(total):
        for name in SPLITS:
            credit[name] += counts[name]
        chosen = max(SPLITS, key=lambda name: (credit[name], -SPLITS.index(name)))
        credit[chosen] -= total
        labels.append(chosen)
    offset %= max(total, 1)
    return labels[offset:] + labels[:offset]


def split_patients(strata: Mapping[str, str], fractions: Mapping[str, float], seed: int) -> dict[str, list[str]]:
    """Assign each patient to one of ``train``, ``val``, ``test``.

    Args:
        strata: patient id -> stratum (one of :data:`STRATA`, see :func:`patient_strata`).
        fractions: ``{"train": f, "val": f, "test": f}`` summing to 1.
        seed: the random seed; it decides which patients of a stratum go where.

    Returns ``{"train": [...], "val": [...], "test": [...]}``, each list sorted.
    """
    unknown = sorted({s for s in strata.values() if s not in STRATA})
    if unknown:
        raise ValueError(f"unknown strata {unknown}; expected one of {', '.join(STRATA)}")
    total = sum(float(fractions[name]) for name in SPLITS)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions {dict(fractions)} sum to {total:g}, expected 1")
    rng = np.random.default_rng(seed)
    ordered: list[str] = []
    for stratum in STRATA:
        members = sorted(p for p, s in strata.items() if s == stratum)
        ordered.extend(members[i] for i in rng.permutation(len(members)))
    counts = split_counts(len(ordered), fractions)
    labels = _interleaved_labels(counts, int(rng.integers(max(len(ordered), 1))))
    split = {name: [] for name in SPLITS}
    for patient, name in zip(ordered, labels):
        split[name].append(patient)
    _give_every_split_a_nodule_patient(split, strata, fractions)
    return {name: sorted(members) for name, members in split.items()}


def _give_every_split_a_nodule_patient(
    split: dict[str, list[str]], strata: Mapping[str, str], fractions: Mapping[str, float]
) -> None:
    """Swap patients so that every used split holds a patient with nodules, if possible.

    With few patients, proportional allocation can leave a split without any nodule, and
    then no segmentation or classification metric is defined on it. A split lacking one
    swaps its last patient for a nodule patient of the split that has the most of them
    (its last one), as long as that split keeps at least one. Split sizes do not change.
    """
    def nodule_patients(name: str) -> list[str]:
        return [p for p in split[name] if strata[p] != "no_nodules"]

    for name in (n for n in SPLITS if fractions[n] > 0 and split[n]):
        if nodule_patients(name):
            continue
        donor = max(SPLITS, key=lambda other: (len(nodule_patients(other)), -SPLITS.index(other)))
        if len(nodule_patients(donor)) < 2:
            return
        given, taken = nodule_patients(donor)[-1], split[name][-1]
        split[donor][split[donor].index(given)] = taken
        split[name][-1] = given
