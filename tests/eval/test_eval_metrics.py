"""Segmentation, classification and reconstruction metrics on hand-checked inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from chestssl.eval import (
    DATA_RANGE,
    PSNR_CAP_DB,
    evaluate_classification,
    evaluate_reconstruction,
    evaluate_segmentation,
)
from chestssl.io import write_json


def _strict_json_roundtrip(tmp_path, metrics: dict) -> dict:
    """Write with chestssl.io and read back refusing NaN/Infinity (not valid JSON)."""
    path = tmp_path / "metrics.json"
    write_json(path, metrics)

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant} in metrics")

    return json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------------------- segmentation


def test_perfect_segmentation_scores_one_everywhere(tmp_path):
    masks = np.zeros((4, 1, 16, 16), np.uint8)
    masks[0, 0, 2:6, 2:6] = 1
    masks[1, 0, 8:12, 3:9] = 2  # labelled nodule ids count as foreground
    masks[3, 0, 0:2, 0:2] = 1  # image 2 has an empty target (and an empty prediction)
    probs = (masks > 0).astype(np.float32)
    metrics = evaluate_segmentation(probs, masks, ["a", "a", "b", "c"], n_bootstrap=100, seed=0)
    for key in ("dice_global", "dice_per_image", "dice_per_image_nonempty", "jaccard_global", "jaccard_per_image",
                "precision", "recall"):
        assert metrics[key]["value"] == pytest.approx(1.0), key
        assert metrics[key]["ci_low"] == pytest.approx(1.0) and metrics[key]["ci_high"] == pytest.approx(1.0)
    assert metrics["n_images"] == 4 and metrics["n_patients"] == 3 and metrics["n_images_empty_target"] == 1
    assert _strict_json_roundtrip(tmp_path, metrics)["dice_global"]["value"] == 1.0


def test_global_and_per_image_differ_as_computed_by_hand():
    masks = np.zeros((3, 1, 8, 8), np.uint8)
    probs = np.zeros((3, 1, 8, 8), np.float32)
    # Image 0: target 2 px, prediction 2 px, 1 px overlap -> Dice 0.5, Jaccard 1/3.
    masks[0, 0, 0, 0:2] = 1
    probs[0, 0, 0, 1:3] = 0.9
    # Image 1: target 8 px predicted exactly -> Dice 1, Jaccard 1.
    masks[1, 0, 4, 0:8] = 1
    probs[1, 0, 4, 0:8] = 0.6
    # Image 2: empty target, 1 px predicted -> scores 0; below-threshold probabilities ignored.
    probs[2, 0, 7, 7] = 0.5
    probs[2, 0, 3, 3] = 0.49
    metrics = evaluate_segmentation(probs, masks, ["a", "b", "c"], threshold=0.5, n_bootstrap=50)
    # Pooled: TP = 1 + 8 = 9, predicted = 2 + 8 + 1 = 11, target = 2 + 8 = 10.
    assert metrics["dice_global"]["value"] == pytest.approx(18 / 21)
    assert metrics["jaccard_global"]["value"] == pytest.approx(9 / 12)
    assert metrics["dice_per_image"]["value"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert metrics["jaccard_per_image"]["value"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert metrics["dice_per_image_nonempty"]["value"] == pytest.approx(0.75)
    assert metrics["jaccard_per_image_nonempty"]["value"] == pytest.approx(2 / 3)
    assert metrics["precision"]["value"] == pytest.approx(9 / 11)
    assert metrics["recall"]["value"] == pytest.approx(9 / 10)
    assert metrics["threshold"] == 0.5


def test_segmentation_with_only_empty_targets_reports_undefined_metrics():
    masks = np.zeros((2, 1, 8, 8), np.uint8)
    probs = np.zeros((2, 1, 8, 8), np.float32)
    metrics = evaluate_segmentation(probs, masks, ["a", "b"], n_bootstrap=20)
    assert metrics["dice_per_image"]["value"] == 1.0  # empty target, empty prediction: 1 by rule
    assert metrics["dice_global"]["value"] is None
    assert "no foreground pixel" in metrics["dice_global"]["note"]
    assert metrics["dice_per_image_nonempty"]["value"] is None
    assert metrics["recall"]["note"] == "undefined: no foreground pixel in the targets"


def test_segmentation_accepts_torch_tensors_and_3d_crops():
    masks = torch.zeros(2, 1, 4, 8, 8)
    masks[0, 0, 1:3, 2:5, 2:5] = 1
    metrics = evaluate_segmentation(masks.clone(), masks, ["a", "b"], n_bootstrap=10)
    assert metrics["dice_global"]["value"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "probs, masks, ids, message",
    [
        (np.full((2, 1, 8, 8), 3.0), np.zeros((2, 1, 8, 8)), ["a", "b"], r"probs must be foreground probabilities"),
        (np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), ["a", "b"], r"\(N, 1, H, W\)"),
        (np.zeros((2, 1, 8, 8)), np.zeros((2, 1, 8, 9)), ["a", "b"], "same shape"),
        (np.zeros((2, 1, 8, 8)), np.zeros((2, 1, 8, 8)), ["a"], "one patient id per item"),
    ],
)
def test_segmentation_input_errors(probs, masks, ids, message):
    with pytest.raises(ValueError, match=message):
        evaluate_segmentation(probs, masks, ids, n_bootstrap=5)


# -------------------------------------------------------------------------- classification


def test_classification_on_known_scores():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    metrics = evaluate_classification(scores, labels, ["a", "b", "c", "d"], threshold=0.5, n_bootstrap=200)
    assert metrics["auroc"]["value"] == pytest.approx(0.75)
    assert metrics["confusion_matrix"] == {"tn": 2, "fp": 0, "fn": 1, "tp": 1}
    assert metrics["accuracy"]["value"] == pytest.approx(0.75)
    assert metrics["precision"]["value"] == pytest.approx(1.0)
    assert metrics["recall"]["value"] == pytest.approx(0.5)
    assert metrics["specificity"]["value"] == pytest.approx(1.0)
    assert metrics["f1"]["value"] == pytest.approx(2 / 3)
    assert metrics["auroc"]["ci_low"] <= 0.75 <= metrics["auroc"]["ci_high"]
    assert "resamples left out" in metrics["auroc"]["note"]  # some resamples draw one class only


def test_classification_matches_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.3).astype(int)
    scores = np.clip(0.35 + 0.3 * labels + 0.25 * rng.standard_normal(300), 0, 1)
    ids = np.array([f"p{i % 40}" for i in range(300)])
    metrics = evaluate_classification(scores, labels, ids, threshold=0.5, n_bootstrap=300, seed=1)
    predicted = scores >= 0.5
    assert metrics["accuracy"]["value"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["precision"]["value"] == pytest.approx(precision_score(labels, predicted))
    assert metrics["recall"]["value"] == pytest.approx(recall_score(labels, predicted))
    assert metrics["f1"]["value"] == pytest.approx(f1_score(labels, predicted))
    assert metrics["auroc"]["value"] == pytest.approx(roc_auc_score(labels, scores))
    for key in ("accuracy", "precision", "recall", "f1", "auroc"):
        assert metrics[key]["ci_low"] <= metrics[key]["value"] <= metrics[key]["ci_high"], key
        assert "note" not in metrics[key]
    assert metrics["n_patients"] == 40 and metrics["n_images"] == 300


def test_one_class_auroc_is_null_with_reason(tmp_path):
    metrics = evaluate_classification([0.2, 0.7, 0.9], [1, 1, 1], ["a", "b", "c"], n_bootstrap=50)
    assert metrics["auroc"]["value"] is None and metrics["auroc"]["ci_low"] is None
    assert "label 1" in metrics["auroc"]["note"] and "both classes" in metrics["auroc"]["note"]
    assert metrics["specificity"]["value"] is None
    assert metrics["recall"]["value"] == pytest.approx(2 / 3)
    assert _strict_json_roundtrip(tmp_path, metrics)["auroc"]["value"] is None


def test_no_positive_prediction_gives_null_precision():
    metrics = evaluate_classification([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1], ["a", "b", "c", "d"], n_bootstrap=20)
    assert metrics["precision"]["value"] is None
    assert metrics["precision"]["note"] == "undefined: no positive prediction"
    assert metrics["f1"]["value"] == 0.0


@pytest.mark.parametrize(
    "scores, labels, message",
    [
        ([0.1, 0.9], [0, -1], "drop excluded slices"),
        ([0.1, 2.5], [0, 1], "probabilities"),
        ([0.1, 0.9, 0.5], [0, 1], "must match"),
    ],
)
def test_classification_input_errors(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        evaluate_classification(scores, labels, ["a", "b", "c"][: len(scores)], n_bootstrap=5)


# -------------------------------------------------------------------------- reconstruction


def _phantom_images(n: int, size: int = 24) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    images = np.stack([0.3 + 0.4 * np.exp(-((yy - 8 - i) ** 2 + (xx - 12) ** 2) / 20.0) for i in range(n)])
    return images[:, None].astype(np.float32)


def test_identical_reconstruction_has_ssim_one_and_capped_psnr(tmp_path):
    images = _phantom_images(3)
    metrics = evaluate_reconstruction(images.copy(), images, ["a", "b", "b"], n_bootstrap=30)
    assert metrics["ssim"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["psnr"]["value"] == PSNR_CAP_DB
    assert metrics["n_psnr_capped"] == 3
    assert metrics["l1"]["value"] == 0.0 and metrics["mse"]["value"] == 0.0
    assert metrics["data_range"] == DATA_RANGE == 1.0
    assert _strict_json_roundtrip(tmp_path, metrics)["psnr"]["value"] == PSNR_CAP_DB


def test_known_noise_level_gives_known_psnr_and_reference_ssim():
    images = _phantom_images(2)
    checkerboard = np.where((np.indices(images.shape[2:]).sum(axis=0) % 2) == 0, 0.1, -0.1).astype(np.float32)
    recon = images + checkerboard  # |error| = 0.1 everywhere, stays inside [0, 1]
    metrics = evaluate_reconstruction(recon, images, ["a", "b"], n_bootstrap=30)
    assert metrics["mse"]["value"] == pytest.approx(0.01, rel=1e-5)
    assert metrics["l1"]["value"] == pytest.approx(0.1, rel=1e-5)
    assert metrics["psnr"]["value"] == pytest.approx(20.0, abs=1e-3)  # 10 log10(1 / 0.01)
    reference = np.mean(
        [
            structural_similarity(images[i, 0], recon[i, 0], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False)
            for i in range(2)
        ]
    )
    assert metrics["ssim"]["value"] == pytest.approx(reference, abs=1e-4)
    assert metrics["ssim"]["value"] < 0.95
    assert metrics["n_psnr_capped"] == 0


def test_reconstruction_is_clamped_to_unit_range_before_scoring():
    images = _phantom_images(2)
    images[:, :, :4] = 1.0
    recon = images.copy()
    recon[:, :, :4] = 1.7  # beyond the window: clamping makes it exact
    metrics = evaluate_reconstruction(recon, images, ["a", "b"], n_bootstrap=10)
    assert metrics["mse"]["value"] == 0.0 and metrics["psnr"]["value"] == PSNR_CAP_DB


def test_reconstruction_input_errors():
    images = _phantom_images(2)
    with pytest.raises(ValueError, match=r"images must be intensities windowed in \[0, 1\]"):
        evaluate_reconstruction(images, images * 300, ["a", "b"], n_bootstrap=5)
    with pytest.raises(ValueError, match="recon holds NaN"):
        evaluate_reconstruction(np.full_like(images, np.nan), images, ["a", "b"], n_bootstrap=5)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        evaluate_reconstruction(images[:, :, :8, :8], images[:, :, :8, :8], ["a", "b"], n_bootstrap=5)
