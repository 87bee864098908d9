"""Patient-level, stratified, seeded splits (chestssl.data.splits)."""

from __future__ import annotations

import pandas as pd
import pytest

from chestssl.data.splits import (
    STRATA,
    malignancy_stratum,
    patient_strata,
    split_counts,
    split_patients,
)

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def _cohort(sizes: dict[str, int]) -> dict[str, str]:
    return {f"{stratum}-{i:03d}": stratum for stratum, n in sizes.items() for i in range(n)}


def test_malignancy_strata():
    assert malignancy_stratum(None) == "no_nodules"
    assert malignancy_stratum(float("nan")) == "no_nodules"
    assert malignancy_stratum(1.0) == "benign"
    assert malignancy_stratum(2.5) == "benign"
    assert malignancy_stratum(3.0) == "indeterminate"
    assert malignancy_stratum(3.5) == "malignant"
    assert malignancy_stratum(5) == "malignant"


def test_patient_strata_uses_largest_median_malignancy():
    nodules = pd.DataFrame({"patient_id": ["a", "a", "b", "c"], "malignancy": [2.0, 4.5, 3.0, 1.0]})
    strata = patient_strata(["a", "b", "c", "d"], nodules)
    assert strata == {"a": "malignant", "b": "indeterminate", "c": "benign", "d": "no_nodules"}
    empty = pd.DataFrame(columns=["patient_id", "malignancy"])
    assert patient_strata(["x"], empty) == {"x": "no_nodules"}


@pytest.mark.parametrize("n", list(range(0, 40)))
def test_split_counts_sum_and_non_empty(n):
    counts = split_counts(n, FRACTIONS)
    assert sum(counts.values()) == n
    if n >= 3:
        assert all(c >= 1 for c in counts.values())
    # Rounding moves a count by less than one; the non-empty rule by one more for tiny n.
    tolerance = 1 if n >= 5 else 2
    for name, fraction in FRACTIONS.items():
        assert abs(counts[name] - fraction * n) < tolerance


def test_split_counts_zero_fraction_stays_empty():
    counts = split_counts(10, {"train": 0.8, "val": 0.2, "test": 0.0})
    assert counts == {"train": 8, "val": 2, "test": 0}


@pytest.mark.parametrize("sizes", [
    {"no_nodules": 1, "benign": 1, "indeterminate": 1},
    {"no_nodules": 2, "malignant": 2},
    {"no_nodules": 20, "benign": 11, "indeterminate": 7, "malignant": 13},
    {"malignant": 50},
])
def test_no_patient_in_two_splits_and_every_split_used(sizes):
    strata = _cohort(sizes)
    split = split_patients(strata, FRACTIONS, seed=0)
    assigned = [p for name in ("train", "val", "test") for p in split[name]]
    assert sorted(assigned) == sorted(strata), "every patient in exactly one split"
    assert len(assigned) == len(set(assigned))
    assert all(split[name] for name in ("train", "val", "test")), split


def test_same_seed_same_split_whatever_the_input_order():
    strata = _cohort({"no_nodules": 10, "benign": 6, "indeterminate": 5, "malignant": 9})
    reversed_strata = dict(reversed(list(strata.items())))
    assert split_patients(strata, FRACTIONS, seed=7) == split_patients(reversed_strata, FRACTIONS, seed=7)
    others = [split_patients(strata, FRACTIONS, seed=s) for s in range(1, 6)]
    assert any(o != split_patients(strata, FRACTIONS, seed=7) for o in others), "the seed must matter"


def test_strata_are_spread_in_proportion():
    sizes = {"no_nodules": 40, "benign": 15, "indeterminate": 10, "malignant": 25}
    strata = _cohort(sizes)
    for seed in range(5):
        split = split_patients(strata, FRACTIONS, seed=seed)
        for stratum in STRATA:
            for name, fraction in FRACTIONS.items():
                got = sum(strata[p] == stratum for p in split[name])
                assert abs(got - fraction * sizes[stratum]) < 2, (seed, stratum, name, got)
        assert [len(split[n]) for n in ("train", "val", "test")] == [54, 18, 18]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown strata"):
        split_patients({"a": "huge"}, FRACTIONS, seed=0)
    with pytest.raises(ValueError, match="sum to"):
        split_patients({"a": "benign"}, {"train": 0.5, "val": 0.2, "test": 0.2}, seed=0)


def test_split_counts_exact_for_round_numbers():
    assert split_counts(10, FRACTIONS) == {"train": 6, "val": 2, "test": 2}
    assert split_counts(8, FRACTIONS) == {"train": 5, "val": 2, "test": 1}


def test_every_split_gets_a_nodule_patient_when_there_are_enough():
    # Two nodule patients would both land in train by proportional allocation alone.
    strata = {f"n{i}": "no_nodules" for i in range(6)} | {"m0": "malignant", "m1": "malignant", "b0": "benign"}
    for seed in range(20):
        split = split_patients(strata, {"train": 0.5, "val": 0.25, "test": 0.25}, seed)
        for name, members in split.items():
            assert any(strata[p] != "no_nodules" for p in members), (seed, name, split)
        assert sorted(sum(split.values(), [])) == sorted(strata)


def test_patients_without_nodule_slices_count_as_without_nodules():
    nodules = pd.DataFrame({"patient_id": ["a", "b"], "malignancy": [4.0, 2.0]})
    strata = patient_strata(["a", "b", "c"], nodules, with_nodule_slices=["a"])
    assert strata == {"a": "malignant", "b": "no_nodules", "c": "no_nodules"}
