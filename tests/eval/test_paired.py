"""Per-slice item scores and the paired patient bootstrap of pretrained vs scratch."""

from __future__ import annotations

import numpy as np
import pytest

from chestssl.eval.bootstrap import PatientBootstrap
from chestssl.eval.metrics import evaluate_classification, evaluate_segmentation
from chestssl.eval.paired import (
    load_item_scores,
    paired_difference,
    runs_without_scratch_twin,
    save_item_scores,
    scratch_pairs,
    segmentation_item_scores,
)

N_PATIENTS, SLICES_PER_PATIENT, SIZE = 8, 3, 8


def seg_data(seed: int = 0):
    """Masks with a square nodule on two of each patient's three slices, and the ids."""
    rng = np.random.default_rng(seed)
    n = N_PATIENTS * SLICES_PER_PATIENT
    masks = np.zeros((n, 1, SIZE, SIZE), np.float32)
    for i in range(n):
        if i % SLICES_PER_PATIENT:
            y, x = rng.integers(0, SIZE - 3, size=2)
            masks[i, 0, y : y + int(rng.integers(2, 4)), x : x + 3] = 1.0
    patient_id = np.repeat([f"LIDC-IDRI-{p:04d}" for p in range(N_PATIENTS)], SLICES_PER_PATIENT)
    scan_id = np.char.add(patient_id, "_s")
    slice_index = np.tile(np.arange(10, 10 + SLICES_PER_PATIENT), N_PATIENTS)
    return masks, patient_id, scan_id, slice_index


def seg_scores(probs, masks, patient_id, scan_id, slice_index, threshold=0.5):
    return {
        "task": "seg", "patient_id": patient_id, "scan_id": scan_id, "slice_index": slice_index,
        **segmentation_item_scores(probs, masks, threshold),
    }


def noisy_probs(masks, flip_fraction, seed):
    """Probabilities whose thresholded mask differs from ``masks`` on about ``flip_fraction`` of pixels."""
    rng = np.random.default_rng(seed)
    flipped = rng.random(masks.shape) < flip_fraction
    binary = np.where(flipped, 1.0 - masks, masks)
    return np.clip(binary * 0.8 + 0.1 + 0.05 * rng.standard_normal(masks.shape), 0.0, 1.0).astype(np.float32)


def cls_scores(scores, labels, patient_id, scan_id, slice_index):
    return {"task": "cls", "patient_id": patient_id, "scan_id": scan_id, "slice_index": slice_index,
            "score": scores, "label": labels}


def test_segmentation_item_scores_roundtrip_without_pickle(tmp_path):
    masks, patient_id, scan_id, slice_index = seg_data()
    probs = noisy_probs(masks, 0.1, seed=1)
    arrays = segmentation_item_scores(probs, masks, 0.5)
    assert sorted(arrays) == ["dice", "intersection", "jaccard", "pred_pixels", "target_pixels"]
    path = tmp_path / "evaluate" / "items.npz"
    save_item_scores(
        path, task="seg", patient_id=patient_id.astype(object), scan_id=list(scan_id), slice_index=slice_index, **arrays
    )
    loaded = load_item_scores(path)
    assert loaded["task"] == "seg" and loaded["source"] == str(path)
    assert loaded["patient_id"].dtype.kind == "U" and loaded["patient_id"].tolist() == patient_id.tolist()
    np.testing.assert_array_equal(loaded["slice_index"], slice_index)
    for name, values in arrays.items():
        np.testing.assert_array_equal(loaded[name], values)
    assert loaded["intersection"].dtype == np.int64 and loaded["dice"].dtype == np.float64
    with np.load(path, allow_pickle=False) as data:  # readable without pickle
        assert str(data["task"]) == "seg"
    assert [p.name for p in path.parent.iterdir()] == ["items.npz"]  # no temporary file left behind


def test_classification_item_scores_roundtrip(tmp_path):
    path = tmp_path / "cls.npz"
    save_item_scores(path, task="cls", patient_id=["a", "a", "b"], scan_id=["a", "a", "b"], slice_index=[3, 4, 3],
                     score=np.array([0.1, 0.9, 0.4], np.float32), label=np.array([0, 1, 1]))
    loaded = load_item_scores(path)
    assert loaded["task"] == "cls"
    np.testing.assert_allclose(loaded["score"], [0.1, 0.9, 0.4], rtol=1e-6)
    assert loaded["label"].tolist() == [0, 1, 1]


def test_item_scores_errors_name_what_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.npz not found.*evaluate"):
        load_item_scores(tmp_path / "missing.npz")
    ids = {"patient_id": ["a", "b"], "scan_id": ["a", "b"], "slice_index": [0, 0]}
    with pytest.raises(ValueError, match="task must be one of seg, cls"):
        save_item_scores(tmp_path / "x.npz", task="rec", **ids, score=[0.1, 0.2], label=[0, 1])
    with pytest.raises(ValueError, match="missing: label; unexpected: labels"):
        save_item_scores(tmp_path / "x.npz", task="cls", **ids, score=[0.1, 0.2], labels=[0, 1])
    with pytest.raises(ValueError, match=r"label must be 0 or 1, got also \[-1\]"):
        save_item_scores(tmp_path / "x.npz", task="cls", **ids, score=[0.1, 0.2], label=[0, -1])
    with pytest.raises(ValueError, match=r"score must hold finite values in \[0, 1\]"):
        save_item_scores(tmp_path / "x.npz", task="cls", **ids, score=[0.1, 1.5], label=[0, 1])
    with pytest.raises(ValueError, match=r"scan a, slice 0\) occurs more than once"):
        save_item_scores(tmp_path / "x.npz", task="cls", patient_id=["a", "a"], scan_id=["a", "a"],
                         slice_index=[0, 0], score=[0.1, 0.2], label=[0, 1])
    assert not (tmp_path / "x.npz").exists()


def test_identical_runs_differ_by_zero_with_a_zero_interval():
    masks, patient_id, scan_id, slice_index = seg_data()
    a = seg_scores(noisy_probs(masks, 0.1, seed=2), masks, patient_id, scan_id, slice_index)
    order = np.random.default_rng(3).permutation(patient_id.size)  # same items, another order
    b = {k: (v[order] if isinstance(v, np.ndarray) else v) for k, v in a.items()}
    result = paired_difference(a, b, n_bootstrap=200, confidence=0.95, seed=0)
    assert result["task"] == "seg"
    assert (result["n_patients"], result["n_items"], result["n_bootstrap"]) == (N_PATIENTS, masks.shape[0], 200)
    assert result["confidence"] == 0.95
    for metric in ("dice_global", "jaccard_global", "dice_per_image"):
        entry = result[metric]
        assert entry["a"] == pytest.approx(entry["b"])
        assert (entry["difference"], entry["ci_low"], entry["ci_high"]) == (0.0, 0.0, 0.0)
        assert entry["verdict"] == "no clear difference"


def test_clearly_better_segmentation_wins_and_values_match_the_metrics_file():
    masks, patient_id, scan_id, slice_index = seg_data()
    worse_probs, better_probs = noisy_probs(masks, 0.3, seed=4), noisy_probs(masks, 0.0, seed=5)
    worse = seg_scores(worse_probs, masks, patient_id, scan_id, slice_index)
    better = seg_scores(better_probs, masks, patient_id, scan_id, slice_index)
    result = paired_difference(worse, better, n_bootstrap=300, confidence=0.95, seed=1)
    reverse = paired_difference(better, worse, n_bootstrap=300, confidence=0.95, seed=1)
    separate = evaluate_segmentation(worse_probs, masks, patient_id, n_bootstrap=0)
    for metric in ("dice_global", "jaccard_global", "dice_per_image"):
        assert result[metric]["verdict"] == "b better", result[metric]
        assert reverse[metric]["verdict"] == "a better", reverse[metric]
        assert result[metric]["ci_low"] > 0.0
        assert result[metric]["a"] == pytest.approx(separate[metric]["value"])
        assert result[metric]["difference"] == pytest.approx(result[metric]["b"] - result[metric]["a"])
        assert reverse[metric]["difference"] == pytest.approx(-result[metric]["difference"])


def test_interval_is_the_percentile_of_per_resample_differences():
    masks, patient_id, scan_id, slice_index = seg_data(seed=6)
    a = seg_scores(noisy_probs(masks, 0.15, seed=7), masks, patient_id, scan_id, slice_index)
    b = seg_scores(noisy_probs(masks, 0.12, seed=8), masks, patient_id, scan_id, slice_index)
    result = paired_difference(a, b, n_bootstrap=50, confidence=0.9, seed=11)
    boot = PatientBootstrap(patient_id, 50, 0.9, 11)
    differences = []
    for counts in boot.counts:  # brute force: weight every slice by its patient's draw count
        weight = counts[boot.item_patient]

        def dice(s):
            return 2 * (weight * s["intersection"]).sum() / (weight * (s["pred_pixels"] + s["target_pixels"])).sum()

        differences.append(dice(b) - dice(a))
    low, high = np.percentile(differences, [5.0, 95.0])
    assert result["dice_global"]["ci_low"] == pytest.approx(low)
    assert result["dice_global"]["ci_high"] == pytest.approx(high)


def test_classification_pairs_accuracy_f1_and_auroc():
    rng = np.random.default_rng(9)
    n = N_PATIENTS * 4
    patient_id = np.repeat([f"p{p}" for p in range(N_PATIENTS)], 4)
    slice_index = np.tile(np.arange(4), N_PATIENTS)
    labels = np.tile([0, 1, 0, 1], N_PATIENTS)
    guess = rng.random(n)  # uninformative
    separating = np.clip(0.75 * labels + 0.1 + 0.1 * rng.random(n), 0.0, 1.0)
    a = cls_scores(guess, labels, patient_id, patient_id, slice_index)
    b = cls_scores(separating, labels, patient_id, patient_id, slice_index)
    result = paired_difference(a, b, n_bootstrap=300, confidence=0.95, seed=0, threshold=0.5)
    assert result["task"] == "cls" and result["threshold"] == 0.5
    for metric in ("accuracy", "f1", "auroc"):
        assert result[metric]["verdict"] == "b better", (metric, result[metric])
    assert result["auroc"]["b"] == 1.0
    separate = evaluate_classification(guess, labels, patient_id, n_bootstrap=0)
    for metric in ("accuracy", "f1", "auroc"):
        assert result[metric]["a"] == pytest.approx(separate[metric]["value"])
    same = paired_difference(a, a, n_bootstrap=100, confidence=0.95, seed=0)
    assert all(same[m]["difference"] == 0.0 and same[m]["verdict"] == "no clear difference" for m in ("f1", "auroc"))


def test_undefined_differences_say_why():
    patient_id = np.array(["p0", "p0", "p1", "p1"])
    slice_index = np.array([0, 1, 0, 1])
    one_class = cls_scores(np.array([0.2, 0.7, 0.4, 0.9]), np.zeros(4, int), patient_id, patient_id, slice_index)
    result = paired_difference(one_class, one_class, n_bootstrap=20, confidence=0.95, seed=0)
    assert result["auroc"]["a"] is None and result["auroc"]["difference"] is None
    assert result["auroc"]["verdict"] == "undefined" and "one class" in result["auroc"]["note"]
    lone = cls_scores(np.array([0.2, 0.7]), np.array([0, 1]), patient_id[:2], patient_id[:2], slice_index[:2])
    result = paired_difference(lone, lone, n_bootstrap=20, confidence=0.95, seed=0)
    assert result["accuracy"]["difference"] == 0.0 and result["accuracy"]["ci_low"] is None
    assert result["accuracy"]["verdict"] == "undefined" and "one patient" in result["accuracy"]["note"]


def test_runs_on_different_items_or_truths_are_refused():
    masks, patient_id, scan_id, slice_index = seg_data()
    probs = noisy_probs(masks, 0.1, seed=10)
    a = seg_scores(probs, masks, patient_id, scan_id, slice_index)
    a["source"] = "reports/evaluate/seg_scratch/items.npz"
    keep = np.arange(1, patient_id.size)
    b = seg_scores(probs[keep], masks[keep], patient_id[keep], scan_id[keep], slice_index[keep])
    b["source"] = "reports/evaluate/seg_ae/items.npz"
    with pytest.raises(ValueError, match=(
        r"seg_scratch/items\.npz \(24 test slices\) and .*seg_ae/items\.npz \(23 test slices\).*"
        r"only in the first: LIDC-IDRI-0000_s/10; only in the second: none; evaluate both runs on the same test split"
    )):
        paired_difference(a, b, n_bootstrap=10, confidence=0.95, seed=0)
    other_truth = dict(a, target_pixels=a["target_pixels"] + (np.arange(patient_id.size) == 1))
    with pytest.raises(ValueError, match="disagree on the ground-truth nodule pixel count of 1 test slices, first scan "
                       "LIDC-IDRI-0000_s slice 11"):
        paired_difference(a, other_truth, n_bootstrap=10, confidence=0.95, seed=0)
    cls = cls_scores(np.zeros(patient_id.size), np.zeros(patient_id.size, int), patient_id, scan_id, slice_index)
    with pytest.raises(ValueError, match="compare runs of one task"):
        paired_difference(a, cls, n_bootstrap=10, confidence=0.95, seed=0)


def seg_run(arch: str, init: str, loss: str = "ce", lr: float = 0.001) -> dict:
    return {"task": "seg", "arch": arch, "init": init, "loss": loss, "class_weights": [1.0, 50.0],
            "train": {"epochs": 2, "lr": lr, "betas": [0.9, 0.999]}}


CNN = {"name": "cnn_attention", "spatial_dims": 2}
SWIN = {"name": "swin", "spatial_dims": 2, "feature_size": 12}


def test_scratch_pairs_differ_only_in_init():
    kinds = {"scratch": "scratch", "scratch_swin": "scratch", "ae": "vqgan", "ae_swin": "vqgan",
             "multihead_seg": "multihead"}
    backbones = {"scratch": CNN, "ae": dict(CNN), "scratch_swin": SWIN, "ae_swin": dict(SWIN), "multihead_seg": SWIN}
    runs = {
        "seg_unetpp_scratch": seg_run("unetpp", "scratch"),
        "seg_unetpp_ae": seg_run("unetpp", "ae"),
        "seg_unetpp_ae_dice": seg_run("unetpp", "ae", loss="dice"),  # another loss: not a pair
        "seg_unetpp_ae_lr": seg_run("unetpp", "ae", lr=0.01),  # another nested train value: not a pair
        "seg_swin_scratch": seg_run("swin_unetr", "scratch_swin"),
        "seg_swin_scratch_cnn": seg_run("swin_unetr", "scratch"),  # a scratch CNN: pairs with no Swin
        "seg_swin_ae": seg_run("swin_unetr", "ae_swin"),
        "seg_swin_multihead": seg_run("swin_unetr", "multihead_seg"),
        "cls_scratch": {"task": "cls", "arch": "resnet18", "init": "scratch", "class_weights": [1.0, 1.0]},
        "cls_ae": {"task": "cls", "arch": "resnet18", "init": "ae", "class_weights": [1.0, 1.0]},
    }
    assert scratch_pairs(runs, kinds, backbones) == [
        ("cls_scratch", "cls_ae"),
        ("seg_swin_scratch", "seg_swin_ae"),
        ("seg_swin_scratch", "seg_swin_multihead"),
        ("seg_unetpp_scratch", "seg_unetpp_ae"),
    ]
    assert scratch_pairs(dict(reversed(runs.items())), kinds, backbones) == scratch_pairs(runs, kinds, backbones)
    # The pretrained runs that no scratch run matches are named (scratch runs never are).
    assert runs_without_scratch_twin(runs, kinds, scratch_pairs(runs, kinds, backbones)) == [
        "seg_unetpp_ae_dice", "seg_unetpp_ae_lr"]
    assert runs_without_scratch_twin(runs, kinds, []) == [
        "cls_ae", "seg_swin_ae", "seg_swin_multihead", "seg_unetpp_ae", "seg_unetpp_ae_dice", "seg_unetpp_ae_lr"]
    with pytest.raises(ValueError, match=r"runs\.bad\.init: got 'mae'"):
        scratch_pairs({"bad": seg_run("unetpp", "mae")}, kinds, backbones)


def test_a_linear_head_on_a_scratch_resnet_pairs_only_with_a_pretrained_resnet():
    """The same linear-head params on other encoders compare encoders, not pretraining."""
    resnet = {"name": "resnet18", "spatial_dims": 2, "block_inplanes": [16, 32, 64, 128]}
    vit = {"name": "vit", "spatial_dims": 2, "patch_size": 8}
    kinds = {"scratch_resnet18": "scratch", "barlow_twins": "barlow_twins", "scratch_vit": "scratch", "mae": "mae",
             "barlow_twins_wide": "barlow_twins"}
    backbones = {"scratch_resnet18": resnet, "barlow_twins": dict(resnet), "scratch_vit": vit, "mae": dict(vit),
                 "barlow_twins_wide": {**resnet, "block_inplanes": [64, 128, 256, 512]}}
    linear = {"task": "cls", "arch": "linear", "recipe": "linear_head", "class_weights": [1.0, 1.0]}
    runs = {f"cls_linear_{name}": {**linear, "init": name} for name in kinds}
    assert scratch_pairs(runs, kinds, backbones) == [
        ("cls_linear_scratch_resnet18", "cls_linear_barlow_twins"),
        ("cls_linear_scratch_vit", "cls_linear_mae"),
    ]
