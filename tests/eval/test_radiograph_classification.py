"""Test metrics of fine-tuned radiograph classifiers: per-label and mean AUROC, accuracy, confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from chestssl.eval.radiograph_classification import evaluate_radiograph_classification, label_confusion


def _data(seed: int = 0, images: int = 60, labels: int = 3):
    rng = np.random.default_rng(seed)
    truth = (rng.random((images, labels)) < 0.4).astype(np.float64)
    probs = np.clip(truth * 0.5 + rng.random((images, labels)) * 0.6, 0, 1)
    patients = np.repeat([f"p{i}" for i in range(images // 3)], 3)
    return probs, truth, patients


def test_multilabel_auroc_per_label_and_mean_with_intervals():
    probs, truth, patients = _data()
    truth[::7, 1] = np.nan  # unknown labels are left out of that label's AUROC
    metrics = evaluate_radiograph_classification(probs, truth, patients, ["a", "b", "c"], "multilabel",
                                                 n_bootstrap=200, seed=1)
    known = ~np.isnan(truth[:, 1])
    assert metrics["auroc"]["b"]["value"] == pytest.approx(roc_auc_score(truth[known, 1], probs[known, 1]))
    values = [metrics["auroc"][k]["value"] for k in "abc"]
    mean = metrics["mean_auroc"]
    assert mean["value"] == pytest.approx(np.mean(values)) and mean["labels"] == 3
    for record in [*metrics["auroc"].values(), mean]:
        assert record["ci_low"] <= record["value"] <= record["ci_high"]
    assert (metrics["n_images"], metrics["n_patients"]) == (60, 20) and "accuracy" not in metrics
    again = evaluate_radiograph_classification(probs, truth, patients, ["a", "b", "c"], "multilabel",
                                               n_bootstrap=200, seed=1)
    assert again == metrics


def test_a_label_with_one_class_is_null_and_left_out_of_the_mean():
    probs, truth, patients = _data()
    truth[:, 2] = 0.0
    metrics = evaluate_radiograph_classification(probs, truth, patients, ["a", "b", "c"], "multilabel",
                                                 n_bootstrap=50)
    assert metrics["auroc"]["c"]["value"] is None
    assert "all 60 known test images have label 0" in metrics["auroc"]["c"]["note"]
    assert metrics["mean_auroc"]["labels"] == 2
    truth[:, :] = 1.0
    none = evaluate_radiograph_classification(probs, truth, patients, ["a", "b", "c"], "multilabel", n_bootstrap=50)
    assert none["mean_auroc"]["value"] is None and "no label has both classes" in none["mean_auroc"]["note"]


def test_multiclass_accuracy_and_confusion_matrix():
    classes = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    predicted = np.array([0, 1, 2, 0, 2, 2, 1, 1, 2, 2])
    probs = np.full((10, 3), 0.1)
    probs[np.arange(10), predicted] = 0.8
    truth = np.eye(3)[classes]
    patients = [f"p{i // 2}" for i in range(10)]
    metrics = evaluate_radiograph_classification(probs, truth, patients, ["x", "y", "z"], "multiclass",
                                                 n_bootstrap=100)
    assert metrics["accuracy"]["value"] == pytest.approx(0.8)
    assert metrics["confusion_matrix"] == {"labels": ["x", "y", "z"], "counts": [[2, 1, 0], [0, 2, 1], [0, 0, 4]]}
    with pytest.raises(ValueError, match="needs one-hot labels"):
        evaluate_radiograph_classification(probs, np.ones((10, 3)), patients, ["x", "y", "z"], "multiclass")


def test_multilabel_confusion_counts_each_label_at_the_threshold_over_known_images():
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.4], [0.3, 0.8], [0.5, 0.1]])
    truth = np.array([[1, 0], [0, 1], [0, np.nan], [1, 1], [np.nan, 0]], dtype=np.float64)
    counts = label_confusion(probs, truth, ["a", "b"], 0.5)
    # a: known rows 0-3: (pred, true) = (1,1) (1,0) (0,0) (0,1); b: rows 0, 1, 3, 4: (0,0) (1,1) (1,1) (0,0)
    assert counts == {"labels": ["a", "b"], "threshold": 0.5, "tn": [1, 2], "fp": [1, 0], "fn": [1, 0], "tp": [1, 2]}
    metrics = evaluate_radiograph_classification(probs, truth, [f"p{i}" for i in range(5)], ["a", "b"],
                                                 "multilabel", n_bootstrap=10, threshold=0.65)
    assert metrics["label_confusion"]["tp"] == [1, 2] and metrics["label_confusion"]["fp"] == [0, 0]
    with pytest.raises(ValueError, match="expected a probability"):
        label_confusion(probs, truth, ["a", "b"], 1.5)


def test_shapes_and_mode_are_checked():
    probs, truth, patients = _data()
    diverged = probs.copy()
    diverged[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite for 1 of 60 test images"):
        evaluate_radiograph_classification(diverged, truth, patients, ["a", "b", "c"], "multilabel")
    with pytest.raises(ValueError, match=r"must both be \(images, 2 labels\)"):
        evaluate_radiograph_classification(probs, truth, patients, ["a", "b"], "multilabel")
    with pytest.raises(ValueError, match="mode: got 'binary'"):
        evaluate_radiograph_classification(probs, truth, patients, ["a", "b", "c"], "binary")
