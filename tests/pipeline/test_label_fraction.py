"""Stage label_fraction: a run fine-tuned again on nested shares of the training patients (seed 001)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from chestssl.io import save_torch
from chestssl.models.backbones import build_backbone, export_encoder
from chestssl.models.seeding import seeded
from chestssl.params import ParamsError
from chestssl.pipeline.label_fraction import label_fraction

RESNET = {"name": "resnet18", "spatial_dims": 2, "block_inplanes": [4, 8, 8, 16]}
TRAIN = {"epochs": 1, "batch_size": 4, "lr": 0.001, "weight_decay": 0.0, "optimizer": "adam", "betas": [0.9, 0.999],
         "scheduler": "none", "grad_clip": 1.0, "max_steps": 2, "amp": False, "num_workers": 0, "log_every": 1,
         "device": "cpu"}
RUN = {"task": "cls", "arch": "linear", "init": "scratch_resnet18", "class_weights": [1.0, 1.0], "train": TRAIN}


@pytest.fixture
def ablation_inputs(synthetic_processed, tmp_path):
    """(params, paths): data/processed where both training patients have nodule slices, and the
    fine-tuned model file of run ``r`` (only its encoder is read)."""
    slices = pd.read_csv(synthetic_processed / "slices.csv", dtype={"patient_id": str, "scan_id": str})
    slices.loc[(slices["patient_id"] == "p0") & slices["slice_index"].between(4, 7), "label"] = 1
    slices.to_csv(synthetic_processed / "slices.csv", index=False)
    with seeded(0):
        encoder = build_backbone(RESNET)
    model_path = tmp_path / "models" / "finetune" / "r" / "model.pt"
    save_torch(model_path, {"run": "r", "encoder": export_encoder(encoder, RESNET)})
    params = {"seed": 0, "slices": {"size": 48, "clean_per_nodule_slice": 1.0}, "runs": {"r": RUN},
              "evaluate": {"bootstrap_samples": 20, "confidence": 0.95, "seg_threshold": 0.5, "cls_threshold": 0.5},
              "label_fraction": {"fractions": [0.25, 0.5, 1.0], "runs": ["r"]},
              "frozen_parts": {"unfrozen_stages": [0, 2], "runs": ["r"]}}
    where = {"processed_dir": synthetic_processed, "model_path": model_path,
             "report_dir": tmp_path / "reports" / "r", "state_dir": tmp_path / "checkpoints" / "r"}
    return params, where


def test_each_share_is_trained_tested_and_written(ablation_inputs):
    params, where = ablation_inputs
    metrics = label_fraction(params, "r", **where)
    assert json.loads((where["report_dir"] / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    fractions = metrics["fractions"]
    assert list(fractions) == ["25pct", "50pct", "100pct"]
    # Two labelled training patients: 25% and 50% are both one patient, trained once.
    assert fractions["25pct"]["trained_as"] == fractions["50pct"]["trained_as"] == "25pct"
    assert [fractions[key]["n_train_patients"] for key in fractions] == [1, 1, 2]
    assert metrics["n_split_patients"] == 2 and metrics["n_labelled_patients"] == 2
    assert {"accuracy", "auroc"} <= set(fractions["100pct"])
    assert sorted(p.name for p in (where["report_dir"] / "live").iterdir()) == ["100pct", "25pct"]
    assert not where["state_dir"].exists()  # removed once the metrics are written


def test_a_run_not_listed_is_refused(ablation_inputs):
    params, where = ablation_inputs
    params["label_fraction"]["runs"] = []
    with pytest.raises(ParamsError, match="label_fraction.runs: 'r' is not listed"):
        label_fraction(params, "r", **where)
