"""Label-fraction subsets (of patients or of images), and both ablations' settings trained and tested
on tiny data, with resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chestssl import paths
from chestssl.ablations.frozen_parts import frozen_parts_metrics, frozen_parts_settings
from chestssl.ablations.label_fraction import (
    fraction_key,
    image_fraction_settings,
    item_subsets,
    label_fraction_metrics,
    label_fraction_settings,
    labelled_patients,
    patient_subsets,
)
from chestssl.ablations.runner import (
    AblationSetting,
    finish_ablation,
    run_ablation,
    run_dataset,
    run_encoder_payload,
    setting_fingerprint,
)
from chestssl.io import save_torch
from chestssl.models.backbones import build_backbone, export_encoder
from chestssl.models.seeding import seeded
from chestssl.train.checkpoint import digest

RESNET = {"name": "resnet18", "spatial_dims": 2, "block_inplanes": [4, 8, 8, 16]}
TRAIN = {"epochs": 2, "batch_size": 4, "lr": 0.001, "weight_decay": 0.0, "optimizer": "adam", "betas": [0.9, 0.999],
         "scheduler": "none", "grad_clip": 1.0, "max_steps": 0, "amp": False, "num_workers": 0, "log_every": 1,
         "device": "cpu"}
RUN = {"task": "cls", "arch": "linear", "init": "scratch_resnet18", "class_weights": [1.0, 1.0], "train": TRAIN}


def test_subsets_are_nested_seeded_and_never_empty():
    patients = [f"p{i:02d}" for i in range(20)]
    subsets = patient_subsets(patients, [0.01, 0.05, 0.1, 0.25, 0.5, 1.0], seed=3)
    sizes = [len(subsets[f]) for f in sorted(subsets)]
    assert sizes == [1, 1, 2, 5, 10, 20]
    ordered = [subsets[f] for f in sorted(subsets)]
    for small, large in zip(ordered, ordered[1:]):
        assert large[: len(small)] == small
    assert set(subsets[1.0]) == set(patients)
    assert patient_subsets(list(reversed(patients)), [0.25], seed=3) == {0.25: subsets[0.25]}
    assert patient_subsets(patients, [0.25], seed=4)[0.25] != subsets[0.25]


def test_fractions_with_the_same_patients_share_one_training():
    settings, served_by = label_fraction_settings([f"p{i}" for i in range(10)], [0.01, 0.05, 0.1, 0.5, 1.0], seed=0)
    assert [s.key for s in settings] == ["1pct", "50pct", "100pct"]
    assert served_by == {0.01: "1pct", 0.05: "1pct", 0.1: "1pct", 0.5: "50pct", 1.0: "100pct"}
    assert fraction_key(0.005) == "0p5pct"


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1])
def test_bad_fraction_is_refused(bad):
    with pytest.raises(ValueError, match=r"fractions must be in \(0, 1\]"):
        patient_subsets(["a", "b"], [bad], seed=0)


def test_patient_unit_settings_are_what_they_were():
    """The patients unit draws exactly the subsets it drew before images could be drawn, and a
    finished patient setting keeps its fingerprint (so kept results are still reused)."""
    settings, served_by = label_fraction_settings([f"p{i:02d}" for i in range(12)], [0.1, 0.25, 0.5, 1.0], seed=7)
    order = ("p04", "p06", "p10", "p00", "p01", "p03", "p08", "p07", "p02", "p05", "p09", "p11")
    assert settings == [AblationSetting(key="10pct", patient_ids=order[:2]),
                        AblationSetting(key="25pct", patient_ids=order[:3]),
                        AblationSetting(key="50pct", patient_ids=order[:6]),
                        AblationSetting(key="100pct", patient_ids=order)]
    assert all(setting.item_indices is None for setting in settings)
    assert served_by == {0.1: "10pct", 0.25: "25pct", 0.5: "50pct", 1.0: "100pct"}
    before = {"key": "10pct", "patient_ids": order[:2], "unfrozen_stages": None}  # the setting's fields until now
    assert setting_fingerprint(settings[0], {"seed": 0}) == digest(dict(setting=before, seed=0))


SEED_FRACTIONS = [0.01, 0.05, 0.10, 0.15, 0.20, 0.25, 0.50, 1.0]  # seed 001's shares of its training images


def test_image_subsets_are_nested_seeded_and_keep_both_classes():
    labels = np.array([1] * 30 + [0] * 90)  # one nodule slice to three clean ones, as listed by scan and slice
    subsets = item_subsets(labels, SEED_FRACTIONS, seed=3, stratify=True)
    ordered = [subsets[f] for f in sorted(subsets)]
    assert [len(items) for items in ordered] == [max(2, math.ceil(f * 120)) for f in SEED_FRACTIONS] \
        == [2, 6, 12, 18, 24, 30, 60, 120]
    for small, large in zip(ordered, ordered[1:]):
        assert set(small) < set(large)
    assert subsets[1.0] == tuple(range(120))  # the whole training set, in its own order
    for items in ordered:
        nodule = int(labels[list(items)].sum())
        assert 1 <= nodule and len(items) - nodule >= 1, "both classes in every share"
        assert abs(nodule - len(items) / 4) <= 1, "the classes in their overall proportion"
    assert item_subsets(labels, [0.25], seed=3, stratify=True) == {0.25: subsets[0.25]}
    assert item_subsets(labels, [0.25], seed=4, stratify=True)[0.25] != subsets[0.25]


def test_one_share_of_images_keeps_the_rarer_class():
    labels = [0] * 99 + [1]  # one nodule slice among 100
    smallest = item_subsets(labels, [0.01, 0.02], seed=0, stratify=True)
    assert [sorted(labels[i] for i in smallest[f]) for f in (0.01, 0.02)] == [[0, 1], [0, 1]]
    # Without stratification (segmentation: nodule slices only) 1% of 100 is one image.
    assert len(item_subsets(labels, [0.01], seed=0, stratify=False)[0.01]) == 1
    # Items of one class only (no clean slice sampled): every share holds that class, at least one image.
    assert len(item_subsets([1] * 50, [0.01], seed=0, stratify=True)[0.01]) == 1


def test_fractions_with_the_same_images_share_one_training():
    labels = [0, 1] * 5
    settings, served_by = image_fraction_settings(labels, SEED_FRACTIONS, seed=0, stratify=True)
    # 1%-20% of 10 images are all the first 2 (one per class); 25% is 3.
    assert [s.key for s in settings] == ["1pct", "25pct", "50pct", "100pct"]
    assert [len(s.item_indices) for s in settings] == [2, 3, 5, 10]
    assert all(s.patient_ids is None for s in settings)
    assert served_by == {0.01: "1pct", 0.05: "1pct", 0.1: "1pct", 0.15: "1pct", 0.2: "1pct", 0.25: "25pct",
                         0.5: "50pct", 1.0: "100pct"}


@pytest.mark.parametrize("bad", [0.0, 1.5])
def test_bad_image_fraction_and_no_images_are_refused(bad):
    with pytest.raises(ValueError, match=r"fractions must be in \(0, 1\]"):
        item_subsets([0, 1], [bad], seed=0, stratify=True)
    with pytest.raises(ValueError, match="no training images"):
        item_subsets([], [0.5], seed=0, stratify=True)


def test_a_setting_names_patients_or_items_and_its_fingerprint_follows_its_items():
    with pytest.raises(ValueError, match="not both"):
        AblationSetting(key="x", patient_ids=("p0",), item_indices=(0,))
    with pytest.raises(ValueError, match="empty"):
        AblationSetting(key="x", item_indices=())
    common = {"seed": 0}
    first = setting_fingerprint(AblationSetting(key="10pct", item_indices=(0, 1)), common, "items a")
    assert setting_fingerprint(AblationSetting(key="10pct", item_indices=(0, 2)), common, "items a") != first
    assert setting_fingerprint(AblationSetting(key="10pct", item_indices=(0, 1)), common, "items b") != first
    assert setting_fingerprint(AblationSetting(key="10pct", patient_ids=("p0",)), common) != first


def test_only_patients_with_nodule_slices_are_drawn(synthetic_processed):
    assert labelled_patients(synthetic_processed, "train") == ["p1"]
    assert labelled_patients(synthetic_processed, "test") == ["p5"]


def test_empty_train_split_is_refused():
    with pytest.raises(ValueError, match="no patients"):
        patient_subsets([], [0.5], seed=0)


def _run(ablation, params, settings):
    """:func:`run_ablation` of run ``r`` with the stage's paths (relative to the workspace)."""
    model_path = paths.finetune_model_path("r")
    return run_ablation(ablation, "r", params, run_encoder_payload(model_path, "r"), settings,
                        processed_dir=paths.PROCESSED_DIR, model_path=model_path,
                        report_dir=paths.ablation_report_dir(ablation, "r"),
                        state_dir=paths.CHECKPOINT_DIR / ablation / "r")


@pytest.fixture
def workspace(synthetic_processed, tmp_path, monkeypatch):
    """A workspace with data/processed and a finished finetune@r (only its encoder is read)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    processed = synthetic_processed.rename(tmp_path / "data" / "processed")
    # Give train patient p0 nodule slices too (labels only), so both train patients are labelled.
    slices = pd.read_csv(processed / "slices.csv", dtype={"patient_id": str, "scan_id": str})
    slices.loc[(slices["patient_id"] == "p0") & slices["slice_index"].between(4, 7), "label"] = 1
    slices.to_csv(processed / "slices.csv", index=False)
    with seeded(0):
        encoder = build_backbone(RESNET)
    save_torch(paths.finetune_model_path("r"), {"run": "r", "encoder": export_encoder(encoder, RESNET)})
    return {"seed": 0, "slices": {"side": 48, "clean_per_nodule_slice": 1.0, "clean_source": "any_slice", "field_of_view": "body",
                         "pixel_mm": 2.5},
            "runs": {"r": RUN},
            "evaluate": {"bootstrap_samples": 20, "confidence": 0.95, "seg_threshold": 0.5, "cls_threshold": 0.5}}


def test_label_fraction_settings_train_test_and_resume(workspace, monkeypatch):
    params = workspace
    patients = labelled_patients(paths.PROCESSED_DIR, "train")
    assert patients == ["p0", "p1"]
    settings, served_by = label_fraction_settings(patients, [0.5, 1.0], seed=0)
    report_dir = paths.ablation_report_dir("label_fraction", "r")
    results = _run("label_fraction", params, settings)
    assert set(results) == {"50pct", "100pct"}
    assert results["50pct"]["n_train_patients"] == 1 and results["100pct"]["n_train_patients"] == 2
    assert results["50pct"]["n_train_images"] < results["100pct"]["n_train_images"]
    for result in results.values():
        assert {"accuracy", "auroc", "f1"} <= set(result["test"])
        assert result["test"]["n_patients"] == 2
    curve = Path("plots") / "metrics" / "val" / "loss.tsv"
    assert (report_dir / "live" / "50pct" / curve).is_file() and (report_dir / "live" / "100pct" / curve).is_file()
    metrics = label_fraction_metrics("r", RUN, 2, len(patients), served_by, results)
    assert list(metrics["fractions"]) == ["50pct", "100pct"]
    json.dumps(metrics)

    # A rerun reuses the finished settings instead of training again.
    import chestssl.train.loop as loop

    def no_training(*args, **kwargs):
        raise AssertionError("a finished setting was trained again")

    monkeypatch.setattr(loop, "fit", no_training)
    published = (report_dir / "live" / "50pct" / curve).read_text()
    shutil.rmtree(report_dir / "live")  # as DVC removes a stage's outputs before running it
    again = _run("label_fraction", params, settings)
    assert again == results
    assert (report_dir / "live" / "50pct" / curve).read_text() == published, "the finished settings' curves are kept"
    finish_ablation(paths.CHECKPOINT_DIR / "label_fraction" / "r")
    assert not (paths.CHECKPOINT_DIR / "label_fraction" / "r").exists()


def test_a_kept_result_keeps_its_cost_and_one_kept_without_a_cost_trains_again(workspace, monkeypatch):
    """A reused setting reports the cost of the fit that made it (in the stage's cost.json)."""
    from chestssl.ablations.runner import ablation_costs

    params = workspace
    settings, _ = label_fraction_settings(["p0", "p1"], [1.0], seed=0)
    results = _run("label_fraction", params, settings)
    cost = results["100pct"]["cost"]
    assert cost["epochs"] == 2 and cost["steps"] > 0 and cost["parameters"] >= cost["trainable_parameters"] > 0
    assert ablation_costs(results) == {"fits": {"100pct": cost}}

    import chestssl.train.loop as loop

    class Trained(Exception):
        pass

    def no_training(*args, **kwargs):
        raise Trained()

    monkeypatch.setattr(loop, "fit", no_training)
    assert _run("label_fraction", params, settings)["100pct"]["cost"] == cost
    kept = paths.CHECKPOINT_DIR / "label_fraction" / "r" / "100pct.json"
    kept.write_text(json.dumps({key: value for key, value in json.loads(kept.read_text()).items() if key != "cost"}))
    with pytest.raises(Trained):
        _run("label_fraction", params, settings)


def test_image_settings_train_on_their_items_and_a_changed_subset_trains_again(workspace, monkeypatch):
    params = workspace
    items = run_dataset(params, "r", paths.PROCESSED_DIR, "train")
    labels = items.frame["label"].to_numpy()
    assert len(items) == 16 and sorted(set(labels)) == [0, 1]
    settings, served_by = image_fraction_settings(labels, [0.25, 1.0], seed=0, stratify=True)
    results = _run("label_fraction", params, settings)
    assert [results[key]["n_train_images"] for key in ("25pct", "100pct")] == [4, 16]
    assert results["100pct"]["n_train_patients"] == 2 and 1 <= results["25pct"]["n_train_patients"] <= 2
    metrics = label_fraction_metrics("r", RUN, 2, 2, served_by, results, unit="images", n_labelled_images=16)
    assert metrics["unit"] == "images" and metrics["n_labelled_images"] == 16
    assert [entry["n_train_images"] for entry in metrics["fractions"].values()] == [4, 16]

    # Reused as they are; a share drawn otherwise (another seed) under the same key is trained again.
    import chestssl.train.loop as loop

    class Trained(Exception):
        pass

    def no_training(model, train, *args, **kwargs):
        raise Trained(len(train))

    monkeypatch.setattr(loop, "fit", no_training)
    assert _run("label_fraction", params, settings) == results
    other, _ = image_fraction_settings(labels, [0.25, 1.0], seed=1, stratify=True)
    assert other[0].item_indices != settings[0].item_indices
    with pytest.raises(Trained, match="4"):
        _run("label_fraction", params, other)


def test_frozen_parts_settings_train_only_what_they_name(workspace):
    params = workspace
    encoder = build_backbone(RESNET)
    settings = frozen_parts_settings(encoder, [2, 0], "r")
    assert [s.key for s in settings] == ["unfrozen_0", "unfrozen_2"]
    results = _run("frozen_parts", params, settings)
    metrics = frozen_parts_metrics("r", RUN, encoder, results)
    head_only, deeper = metrics["settings"]["unfrozen_0"], metrics["settings"]["unfrozen_2"]
    assert head_only["label"] == "head" and head_only["trained"] == []
    assert deeper["trained"] == ["layer4", "layer3"] and deeper["label"] == "head + layer4, layer3"
    layer34 = sum(p.numel() for name in ("layer3", "layer4") for p in getattr(encoder, name).parameters())
    assert deeper["trainable_parameters"] - head_only["trainable_parameters"] == layer34
    assert metrics["encoder_stages"] == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_frozen_parts_refuses_more_stages_than_the_encoder_has():
    with pytest.raises(ValueError, match="exceed the 5 stages"):
        frozen_parts_settings(build_backbone(RESNET), [0, 7], "r")
