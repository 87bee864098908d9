"""Label-fraction subsets, and both ablations' settings trained and tested on tiny data, with resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from chestssl import paths
from chestssl.ablations.frozen_parts import frozen_parts_metrics, frozen_parts_settings
from chestssl.ablations.label_fraction import (
    fraction_key,
    label_fraction_metrics,
    label_fraction_settings,
    labelled_patients,
    patient_subsets,
)
from chestssl.ablations.runner import finish_ablation, run_ablation, run_encoder_payload
from chestssl.io import save_torch
from chestssl.models.backbones import build_backbone, export_encoder
from chestssl.models.seeding import seeded

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
    return {"seed": 0, "slices": {"size": 48, "clean_per_nodule_slice": 1.0}, "runs": {"r": RUN},
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
