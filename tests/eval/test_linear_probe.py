"""Linear probe: labels per slice, features of a frozen encoder, balanced logistic
regression per label with patient-bootstrap intervals, and the pretraining monitor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from chestssl.data.datasets import SliceDataset
from chestssl.eval.bootstrap import PatientBootstrap
from chestssl.eval.linear_probe import (
    NOT_PROBED,
    LinearProbeMonitor,
    ProbeFeatures,
    average_precision_samples,
    extract_features,
    fit_linear_probe,
    probe_labels,
    weighted_average_precision,
)
from chestssl.methods import build_method
from chestssl.models import UNetEncoder, seeded

FEATURES = (4, 8, 8, 16, 16)
PROBE = dict(C=1.0, max_iter=200, seed=0)


def _synthetic(n_patients: int, per_patient: int, dim: int, separation: float, seed: int) -> ProbeFeatures:
    """Items of ``n_patients`` patients; both labels shift the first two features by ``separation``."""
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    nodule = rng.integers(0, 2, n)
    malignant = nodule * rng.integers(0, 2, n)
    features = rng.standard_normal((n, dim))
    features[:, 0] += separation * nodule
    features[:, 1] += separation * malignant
    ids = np.repeat([f"p{i:02d}" for i in range(n_patients)], per_patient)
    return ProbeFeatures(features.astype(np.float32), {"nodule": nodule, "malignant": malignant}, ids)


def test_probe_labels_per_slice():
    labels = probe_labels({"label": torch.tensor([-1, 0, 1, 1, 1]), "malignancy": torch.tensor([5.0, 0, 4, 3.5, 5])})
    np.testing.assert_array_equal(labels["nodule"], [NOT_PROBED, 0, 1, 1, 1])
    np.testing.assert_array_equal(labels["malignant"], [NOT_PROBED, 0, 1, 0, 1])
    assert all(values.dtype == np.int64 for values in labels.values())
    with pytest.raises(ValueError, match="'malignancy'"):
        probe_labels({"label": np.array([0, 1])})
    with pytest.raises(ValueError, match=r"got also \[2\]"):
        probe_labels({"label": np.array([0, 2]), "malignancy": np.zeros(2)})


def test_separable_features_score_about_one_and_random_ones_about_a_half():
    separable = fit_linear_probe(_synthetic(20, 10, 8, 8.0, 0), _synthetic(20, 10, 8, 8.0, 1), n_bootstrap=50,
                                 confidence=0.95, **PROBE)
    for name in ("nodule", "malignant"):
        for metric in ("auroc", "auprc", "f1"):
            assert separable[name][metric]["value"] > 0.97, (name, metric)
        assert separable[name]["converged"] is True
    assert separable["mean"]["auroc"] > 0.99 and separable["mean"]["labels"] == ["nodule", "malignant"]
    random = fit_linear_probe(_synthetic(40, 25, 8, 0.0, 2), _synthetic(40, 25, 8, 0.0, 3), n_bootstrap=0,
                              confidence=0.95, **PROBE)
    for name in ("nodule", "malignant"):
        assert abs(random[name]["auroc"]["value"] - 0.5) < 0.08, name
    assert abs(random["mean"]["auroc"] - 0.5) < 0.08


def test_scores_match_scikit_learn_and_the_result_is_json_ready():
    train, test = _synthetic(12, 8, 6, 1.0, 4), _synthetic(12, 8, 6, 1.0, 5)
    result = fit_linear_probe(train, test, n_bootstrap=20, confidence=0.9, **PROBE)
    scaler = StandardScaler().fit(train.features)
    y_train, y_test = train.labels["nodule"], test.labels["nodule"]
    model = LogisticRegression(class_weight="balanced", C=1.0, max_iter=200)
    model.fit(scaler.transform(train.features), y_train)
    probability = model.predict_proba(scaler.transform(test.features))[:, 1]
    nodule = result["nodule"]
    assert nodule["auroc"]["value"] == pytest.approx(roc_auc_score(y_test, probability))
    assert nodule["auprc"]["value"] == pytest.approx(average_precision_score(y_test, probability))
    assert nodule["f1"]["value"] == pytest.approx(f1_score(y_test, probability >= 0.5))
    assert nodule["n_train"] == len(train) and nodule["n_images"] == len(test) and nodule["n_patients"] == 12
    assert (result["n_features"], result["C"], result["max_iter"]) == (6, 1.0, 200)
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_intervals_bracket_the_estimates():
    result = fit_linear_probe(_synthetic(15, 6, 6, 1.2, 6), _synthetic(15, 6, 6, 1.2, 7), n_bootstrap=300,
                              confidence=0.95, **PROBE)
    for name in ("nodule", "malignant"):
        for metric in ("auroc", "auprc", "f1"):
            entry = result[name][metric]
            assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], (name, metric, entry)
            assert entry["ci_low"] < entry["ci_high"]


def test_one_class_label_is_skipped_with_the_reason():
    train, test = _synthetic(6, 6, 4, 3.0, 8), _synthetic(6, 6, 4, 3.0, 9)
    no_malignant = ProbeFeatures(test.features, {**test.labels, "malignant": np.zeros(len(test))}, test.patient_ids)
    result = fit_linear_probe(train, no_malignant, n_bootstrap=10, confidence=0.95, **PROBE)
    assert result["malignant"] == {"skipped": result["malignant"]["skipped"]}
    assert "all 36 test items have 'malignant' = 0" in result["malignant"]["skipped"]
    assert result["mean"]["labels"] == ["nodule"] and result["mean"]["auroc"] == result["nodule"]["auroc"]["value"]
    # Items left out (-1) do not count as a class; nothing left at all is said too.
    only_left_out = {"nodule": np.full(len(train), NOT_PROBED), "malignant": train.labels["malignant"]}
    result = fit_linear_probe(ProbeFeatures(train.features, only_left_out, train.patient_ids), test,
                              n_bootstrap=0, confidence=0.95, **PROBE)
    assert result["nodule"] == {"skipped": "no training item has a 'nodule' label"}
    one_class_train = {**train.labels, "nodule": np.ones(len(train))}
    both = fit_linear_probe(ProbeFeatures(train.features, one_class_train, train.patient_ids), no_malignant,
                            n_bootstrap=0, confidence=0.95, **PROBE)
    assert "training items" in both["nodule"]["skipped"] and both["mean"] == {
        "auroc": None, "auprc": None, "f1": None, "labels": []}


def test_items_left_out_are_not_scored():
    train, test = _synthetic(8, 6, 4, 3.0, 10), _synthetic(8, 6, 4, 3.0, 11)
    nodule = test.labels["nodule"].copy()
    nodule[:12] = NOT_PROBED
    result = fit_linear_probe(train, ProbeFeatures(test.features, {"nodule": nodule, "malignant": nodule},
                                                   test.patient_ids), n_bootstrap=0, confidence=0.95, **PROBE)
    assert result["nodule"]["n_images"] == len(test) - 12 and result["nodule"]["n_patients"] == 6


def test_bootstrapped_average_precision_equals_weighted_scikit_learn():
    rng = np.random.default_rng(0)
    ids = np.repeat([f"p{i}" for i in range(9)], 5)
    labels = rng.integers(0, 2, ids.size)
    scores = np.round(rng.random(ids.size), 1)  # ties between items
    boot = PatientBootstrap(ids, 40, 0.95, seed=3)
    samples = average_precision_samples(boot, scores, labels)
    for b in range(40):
        weight = boot.counts[b, boot.item_patient]
        if (weight * labels).sum() == 0:
            assert np.isnan(samples[b])
        else:
            assert samples[b] == pytest.approx(average_precision_score(labels, scores, sample_weight=weight))
    assert np.isnan(weighted_average_precision(np.zeros(3), np.ones(3)))


def test_bad_probe_settings_name_the_argument():
    train, test = _synthetic(4, 4, 3, 2.0, 12), _synthetic(4, 4, 3, 2.0, 13)
    with pytest.raises(ValueError, match=r"^C: got 0"):
        fit_linear_probe(train, test, C=0, max_iter=10, seed=0, n_bootstrap=0, confidence=0.95)
    with pytest.raises(ValueError, match=r"^max_iter: got 0"):
        fit_linear_probe(train, test, C=1.0, max_iter=0, seed=0, n_bootstrap=0, confidence=0.95)
    with pytest.raises(ValueError, match="3 dimensions, test features 2"):
        fit_linear_probe(train, ProbeFeatures(test.features[:, :2], test.labels, test.patient_ids), n_bootstrap=0,
                         confidence=0.95, **PROBE)
    with pytest.raises(ValueError, match=r"^every_epochs: got 0"):
        LinearProbeMonitor([], [], every_epochs=0, C=1.0, max_iter=10, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        ProbeFeatures(np.full((2, 2), np.nan), {}, np.array(["a", "b"]))


def test_unconverged_fit_is_reported():
    result = fit_linear_probe(_synthetic(6, 6, 6, 1.0, 14), _synthetic(6, 6, 6, 1.0, 15), C=100.0, max_iter=1,
                              seed=0, n_bootstrap=0, confidence=0.95)
    assert result["nodule"]["converged"] is False and "raise probe.max_iter" in result["nodule"]["note"]


def _unet(seed: int = 0) -> UNetEncoder:
    with seeded(seed):
        return UNetEncoder(2, 1, FEATURES)


def test_extract_features_of_a_tiny_backbone(synthetic_processed):
    data = SliceDataset(synthetic_processed, "train", 32, "pretrain")
    encoder = _unet().train()
    features = extract_features(encoder, data, "cpu", batch_size=5)
    assert encoder.training, "the encoder's mode is restored"
    assert features.features.shape == (24, 16) and features.features.dtype == np.float32
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        expected = encoder.eval().representation(images).numpy()
    np.testing.assert_allclose(features.features, expected, rtol=1e-5, atol=1e-6)
    assert features.patient_ids.tolist() == data.patient_ids
    np.testing.assert_array_equal(features.labels["nodule"], data.labels.numpy())
    # Fixture: p1's nodule (malignancy 4) on slices 4..7, no other nodule in train.
    expected_malignant = [int(p == "p1" and 4 <= s <= 7) for p, s in zip(data.patient_ids, data.slice_indices)]
    np.testing.assert_array_equal(features.labels["malignant"], expected_malignant)
    with pytest.raises(ValueError, match="has no representation"):
        extract_features(torch.nn.Conv2d(1, 1, 3), data, "cpu")


def test_monitor_probes_every_n_epochs_on_the_validation_split(synthetic_processed):
    train = SliceDataset(synthetic_processed, "train", 32, "cls")
    val = SliceDataset(synthetic_processed, "val", 32, "cls")
    method = build_method("scratch", {"method": "scratch", "backbone": {
        "name": "unet_encoder", "spatial_dims": 2, "features": list(FEATURES)}}, seed=0)
    monitor = LinearProbeMonitor(train, val, every_epochs=2, C=1.0, max_iter=100, seed=0)
    calls = []
    original = method.encoder

    def counting_encoder():
        calls.append(1)
        return original()

    method.encoder = counting_encoder
    rng_before = torch.get_rng_state()
    results = {epoch: monitor(method, epoch) for epoch in (1, 2, 3, 4)}
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert results[1] == results[3] == {} and len(calls) == 2
    assert set(results[2]) == {"probe/nodule/auroc", "probe/malignant/auroc", "probe/mean_auroc"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in results[2].values())
    assert results[2] == results[4], "same weights, same probe"
    expected = fit_linear_probe(extract_features(original(), train), extract_features(original(), val),
                                C=1.0, max_iter=100, seed=0, n_bootstrap=0, confidence=0.95)
    assert results[2]["probe/mean_auroc"] == pytest.approx(expected["mean"]["auroc"])
