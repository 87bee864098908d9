"""Stage label_fraction: a run fine-tuned again on nested shares of the training patients or images (seed 001)."""

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
    params = {"seed": 0, "slices": {"side": 48, "clean_per_nodule_slice": 1.0, "clean_source": "any_slice", "field_of_view": "body",
                         "pixel_mm": 2.5},
              "runs": {"r": RUN},
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
    assert metrics["unit"] == "patients" and "n_labelled_images" not in metrics
    assert {"accuracy", "auroc"} <= set(fractions["100pct"])
    assert sorted(p.name for p in (where["report_dir"] / "live").iterdir()) == ["100pct", "25pct"]
    assert not where["state_dir"].exists()  # removed once the metrics are written


def test_each_training_writes_its_cost_keyed_as_the_shares_it_serves(ablation_inputs):
    """cost.json holds one record per fit (not per fraction): 25% and 50% share one training."""
    from tests.pipeline.cost_checks import check_cost_record

    params, where = ablation_inputs
    metrics = label_fraction(params, "r", **where)
    cost = json.loads((where["report_dir"] / "cost.json").read_text())
    assert set(cost) == {"fits"}
    assert sorted(cost["fits"]) == sorted({entry["trained_as"] for entry in metrics["fractions"].values()}) == [
        "100pct", "25pct"]
    for fit in cost["fits"].values():
        check_cost_record(fit, steps=2)  # train.max_steps
    # The same model at every share: the same parameters, all of them trained.
    assert cost["fits"]["25pct"]["parameters"] == cost["fits"]["100pct"]["parameters"]
    assert cost["fits"]["25pct"]["trainable_parameters"] == cost["fits"]["25pct"]["parameters"]


def test_shares_of_images_record_the_unit_and_train_identical_shares_once(ablation_inputs):
    params, where = ablation_inputs
    params["label_fraction"].update(unit="images", fractions=[0.05, 0.1, 1.0])
    metrics = label_fraction(params, "r", **where)
    assert metrics["unit"] == "images" and metrics["n_labelled_images"] == 16  # 8 nodule + 8 clean slices
    fractions = metrics["fractions"]
    # 5% and 10% of 16 images are both the two first of the order (one per class), trained once.
    assert fractions["5pct"]["trained_as"] == fractions["10pct"]["trained_as"] == "5pct"
    assert [fractions[key]["n_train_images"] for key in fractions] == [2, 2, 16]
    assert [fractions[key]["n_train_patients"] for key in fractions][-1] == 2
    assert all(1 <= entry["n_train_patients"] <= 2 for entry in fractions.values())
    assert sorted(p.name for p in (where["report_dir"] / "live").iterdir()) == ["100pct", "5pct"]


def test_the_patient_unit_draws_what_it_drew_before(ablation_inputs, monkeypatch):
    """``unit: patients`` (the default profile's) and no unit at all give the patient settings of
    :func:`label_fraction_settings`, without a training set of items."""
    import chestssl.ablations.runner as runner
    from chestssl.ablations.label_fraction import label_fraction_settings

    params, where = ablation_inputs
    seen = []

    def record(ablation, name, params, payload, settings, **kwargs):
        seen.append((list(settings), kwargs.get("train_items")))
        return {}  # as on a non-main process: nothing is written

    monkeypatch.setattr(runner, "run_ablation", record)
    assert label_fraction(params, "r", **where) is None
    params["label_fraction"]["unit"] = "patients"
    assert label_fraction(params, "r", **where) is None
    expected, _ = label_fraction_settings(["p0", "p1"], [0.25, 0.5, 1.0], seed=0)
    assert seen == [(expected, None), (expected, None)]
    assert [len(setting.patient_ids) for setting in expected] == [1, 2]
    assert all(setting.item_indices is None for setting in expected)


def test_a_run_not_listed_is_refused(ablation_inputs):
    params, where = ablation_inputs
    params["label_fraction"]["runs"] = []
    with pytest.raises(ParamsError, match="label_fraction.runs: 'r' is not listed"):
        label_fraction(params, "r", **where)


def test_patient_subsets_take_nodule_free_patients_for_seed_000s_clean_slices(ablation_inputs, monkeypatch):
    """With ``slices.clean_source: nodule_free_patients`` a subset of patients with nodule slices
    would hold no clean slice: each subset takes the same share of the nodule-free patients."""
    import chestssl.ablations.runner as runner
    from chestssl.ablations.runner import AblationSetting
    from chestssl.pipeline.label_fraction import with_nodule_free_patients

    params, where = ablation_inputs
    slices = pd.read_csv(where["processed_dir"] / "slices.csv", dtype={"patient_id": str, "scan_id": str})
    slices.loc[slices["patient_id"] == "p0", "label"] = 0  # p0 without nodules again, p1 with
    slices.to_csv(where["processed_dir"] / "slices.csv", index=False)
    seen = []
    monkeypatch.setattr(runner, "run_ablation", lambda *args, **kwargs: seen.append(list(args[4])) or {})
    params["label_fraction"]["unit"] = "patients"
    params["slices"]["clean_source"] = "nodule_free_patients"
    assert label_fraction(params, "r", **where) is None
    assert seen == [[AblationSetting(key="25pct", patient_ids=("p1", "p0"))]]

    settings = [AblationSetting(key=f"{k}", patient_ids=tuple(f"n{i}" for i in range(k))) for k in (1, 2, 4)]
    free = [f"f{i}" for i in range(8)]
    extended = with_nodule_free_patients(settings, [f"n{i}" for i in range(4)], free, seed=0)
    added = [setting.patient_ids[len(before.patient_ids):] for setting, before in zip(extended, settings)]
    assert [len(a) for a in added] == [2, 4, 8]  # the same share: 1/4, 1/2, 4/4 of the 8
    assert added[0] == added[1][:2] and added[1] == added[2][:4]  # nested
    assert with_nodule_free_patients(settings, ["n0", "n1", "n2", "n3"], [], seed=0) == settings
