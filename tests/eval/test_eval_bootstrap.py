"""Patient-level bootstrap: resampling, intervals, undefined resamples, weighted AUROC."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from chestssl.eval.bootstrap import PatientBootstrap, SumMetric, ratio

MEAN = {"mean": SumMetric(lambda s: ratio(s["x"], s["n"]), "no items")}


def _items(n_patients: int, per_patient: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ids = np.repeat([f"p{i:03d}" for i in range(n_patients)], per_patient)
    patient_effect = np.repeat(rng.normal(0.0, 1.0, n_patients), per_patient)
    x = 5.0 + patient_effect + 0.5 * rng.standard_normal(ids.size)
    return ids, {"x": x, "n": np.ones(ids.size)}


def test_counts_draw_every_resample_from_all_patients():
    ids, _ = _items(7, 3)
    boot = PatientBootstrap(ids, 200, 0.95, seed=1)
    assert boot.counts.shape == (200, 7)
    np.testing.assert_array_equal(boot.counts.sum(axis=1), 7)
    assert boot.counts.max() > 1  # some patient drawn twice somewhere: with replacement
    assert list(boot.patients) == sorted(set(ids))


def test_interval_contains_point_estimate_and_matches_explicit_resampling():
    ids, items = _items(30, 4)
    boot = PatientBootstrap(ids, 500, 0.95, seed=0)
    result = boot.evaluate(items, MEAN)["mean"]
    assert result["value"] == pytest.approx(items["x"].mean())
    assert result["ci_low"] < result["value"] < result["ci_high"]
    # Resample b recomputed the slow way: all items of the drawn patients, duplicates kept.
    sums = boot.patient_sums(items)
    for b in (0, 17, 499):
        chosen = np.repeat(np.arange(boot.n_patients), boot.counts[b].astype(int))
        x = np.concatenate([items["x"][boot.item_patient == p] for p in chosen])
        assert (boot.counts[b] @ sums["x"]) / (boot.counts[b] @ sums["n"]) == pytest.approx(x.mean())


def test_interval_narrows_with_more_patients():
    widths = []
    for n_patients in (8, 200):
        ids, items = _items(n_patients, 3, seed=n_patients)
        result = PatientBootstrap(ids, 400, 0.95, seed=0).evaluate(items, MEAN)["mean"]
        widths.append(result["ci_high"] - result["ci_low"])
    assert widths[1] < widths[0] / 2


def test_same_seed_same_interval_other_seed_other_interval():
    ids, items = _items(20, 2)
    first = PatientBootstrap(ids, 300, 0.9, seed=5).evaluate(items, MEAN)
    again = PatientBootstrap(ids, 300, 0.9, seed=5).evaluate(items, MEAN)
    other = PatientBootstrap(ids, 300, 0.9, seed=6).evaluate(items, MEAN)
    assert first == again
    assert first["mean"]["ci_low"] != other["mean"]["ci_low"]


def test_higher_confidence_gives_wider_interval():
    ids, items = _items(25, 2)
    narrow = PatientBootstrap(ids, 500, 0.5, seed=0).evaluate(items, MEAN)["mean"]
    wide = PatientBootstrap(ids, 500, 0.99, seed=0).evaluate(items, MEAN)["mean"]
    assert wide["ci_high"] - wide["ci_low"] > narrow["ci_high"] - narrow["ci_low"]


def test_single_patient_gives_value_without_interval_and_says_why():
    ids, items = _items(1, 5)
    result = PatientBootstrap(ids, 100, 0.95, seed=0).evaluate(items, MEAN)["mean"]
    assert result["value"] == pytest.approx(items["x"].mean())
    assert result["ci_low"] is None and result["ci_high"] is None
    assert "one patient (p000)" in result["note"]


def test_zero_resamples_gives_value_without_interval():
    ids, items = _items(4, 2)
    result = PatientBootstrap(ids, 0, 0.95, seed=0).evaluate(items, MEAN)["mean"]
    assert result["value"] is not None and result["ci_low"] is None
    assert "bootstrap_samples is 0" in result["note"]


def test_undefined_point_estimate_is_null_with_reason():
    ids = np.array(["a", "b", "c"])
    metric = {"precision": SumMetric(lambda s: ratio(s["tp"], s["pred"]), "no positive prediction")}
    result = PatientBootstrap(ids, 50, 0.95, 0).evaluate({"tp": np.zeros(3), "pred": np.zeros(3)}, metric)
    assert result["precision"] == {
        "value": None, "ci_low": None, "ci_high": None, "note": "undefined: no positive prediction"
    }


def test_resamples_where_metric_is_undefined_are_left_out_and_counted():
    # Only patient "a" has predictions: resamples without "a" have undefined precision.
    ids = np.array(["a", "b", "c", "d"])
    metric = {"precision": SumMetric(lambda s: ratio(s["tp"], s["pred"]), "no positive prediction")}
    boot = PatientBootstrap(ids, 300, 0.95, 0)
    result = boot.evaluate({"tp": np.array([1.0, 0, 0, 0]), "pred": np.array([2.0, 0, 0, 0])}, metric)["precision"]
    n_without_a = int((boot.counts[:, 0] == 0).sum())
    assert n_without_a > 0
    assert result["value"] == 0.5 and result["ci_low"] == 0.5 and result["ci_high"] == 0.5
    assert result["note"].startswith(f"{n_without_a} of 300 bootstrap resamples left out")


def test_weighted_auroc_equals_sklearn_on_each_resample():
    rng = np.random.default_rng(3)
    ids = np.repeat([f"p{i}" for i in range(12)], 5)
    labels = (rng.random(ids.size) < 0.4).astype(int)
    scores = np.round(rng.random(ids.size) + 0.3 * labels, 1)  # rounding creates ties
    boot = PatientBootstrap(ids, 40, 0.95, seed=2)
    samples = boot.auroc_samples(scores, labels)
    checked = 0
    for b in range(40):
        chosen = np.repeat(np.arange(boot.n_patients), boot.counts[b].astype(int))
        rows = np.concatenate([np.flatnonzero(boot.item_patient == p) for p in chosen])
        if np.unique(labels[rows]).size < 2:
            assert np.isnan(samples[b])
            continue
        assert samples[b] == pytest.approx(roc_auc_score(labels[rows], scores[rows]))
        checked += 1
    assert checked > 30


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"patient_ids": [], "n_bootstrap": 10, "confidence": 0.95}, "non-empty"),
        ({"patient_ids": ["a"], "n_bootstrap": -1, "confidence": 0.95}, "n_bootstrap must be an integer >= 0, got -1"),
        ({"patient_ids": ["a"], "n_bootstrap": 10, "confidence": 1.0}, r"confidence must be in \(0, 1\), got 1.0"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PatientBootstrap(seed=0, **kwargs)
