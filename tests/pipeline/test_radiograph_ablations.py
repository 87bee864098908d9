"""Stages label_fraction_radiographs@<run> and frozen_parts_radiographs@<run>: seed 001's ablations on radiographs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chestssl.ablations.radiographs import radiograph_fraction_settings, stratum_of_each_image
from chestssl.params import ParamsError
from chestssl.pipeline.radiograph_ablations import frozen_parts_radiographs, label_fraction_radiographs
from tests.pipeline.cost_checks import check_cost_record
from tests.pipeline.test_finetune_radiographs import project  # noqa: F401  (fixture)

#: Both views of the two training patients: four training images, two with a projected nodule.
VIEWS = ["frontal", "lateral"]


def _stage_args(root, stage: str, run: str) -> dict:
    return {"radiographs_dir": root / "data/radiographs", "encoder_dir": root / "models/pretrain_radiographs",
            "stn_path": root / "models/alignment/stn.pt", "report_dir": root / "reports" / stage / run,
            "state_dir": root / "checkpoints" / stage / run}


def test_strata_are_the_class_or_whether_an_image_has_a_finding():
    labels = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=float)
    assert stratum_of_each_image(labels, "multiclass").tolist() == [1, 0, 2, 1]
    findings = np.array([[0, 0], [1, np.nan], [np.nan, np.nan], [0, 1]], dtype=float)
    assert stratum_of_each_image(findings, "multilabel").tolist() == [0, 1, 0, 1]


def test_image_shares_are_nested_seeded_and_keep_every_class():
    labels = np.eye(4)[np.repeat(np.arange(4), 25)]  # 100 images, 25 of each of 4 classes
    settings, served_by = radiograph_fraction_settings(labels, "multiclass", [0.01, 0.1, 1.0], seed=3)
    chosen = {setting.key: set(setting.item_indices) for setting in settings}
    smallest, tenth, whole = (chosen[served_by[f]] for f in (0.01, 0.1, 1.0))
    assert smallest <= tenth <= whole and len(whole) == 100 and len(tenth) == 10
    assert {int(labels[i].argmax()) for i in smallest} == {0, 1, 2, 3}  # one of each class even at 1%
    again, _ = radiograph_fraction_settings(labels, "multiclass", [0.01, 0.1, 1.0], seed=3)
    assert again == settings


def test_label_fraction_trains_each_share_of_the_images_and_tests_as_the_run(project):  # noqa: F811
    params, root = project
    params["radiograph_runs"]["cxr_linear_barlow_twins"]["views"] = VIEWS
    params["label_fraction"].update(fractions=[0.5, 1.0], radiograph_runs=["cxr_linear_barlow_twins"])
    where = _stage_args(root, "label_fraction_radiographs", "cxr_linear_barlow_twins")
    metrics = label_fraction_radiographs(params, "cxr_linear_barlow_twins", **where)
    assert json.loads((where["report_dir"] / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["unit"] == "images" and metrics["task"] == "radiograph_multilabel"
    assert metrics["labels"] == ["nodule", "malignant"] and metrics["n_labelled_images"] == 4
    half, whole = sorted(metrics["fractions"].values(), key=lambda entry: entry["fraction"])
    assert (half["fraction"], whole["fraction"]) == (0.5, 1.0)
    assert (half["n_train_images"], whole["n_train_images"]) == (2, 4)
    for entry in (half, whole):
        # the run's own test: mean and per-label AUROC over the test patients' images
        assert set(entry["auroc"]) == {"nodule", "malignant"} and entry["n_patients"] == 2
        assert {"value", "ci_low", "ci_high"} <= set(entry["mean_auroc"]) and entry["n_images"] == 4
    cost = json.loads((where["report_dir"] / "cost.json").read_text())
    assert set(cost["fits"]) == {entry["trained_as"] for entry in (half, whole)}
    for record in cost["fits"].values():
        check_cost_record(record, steps=2)  # 2 epochs of one batch each
    for key in cost["fits"]:
        assert (where["report_dir"] / "live" / key / "plots" / "metrics" / "val" / "mean_auroc.tsv").is_file()
    assert not where["state_dir"].exists()  # resume state removed once the metrics are written


def test_frozen_parts_trains_what_each_setting_names(project):  # noqa: F811
    params, root = project
    params["frozen_parts"].update(unfrozen_stages=[0, 1], radiograph_runs=["cxr_linear_barlow_twins"])
    where = _stage_args(root, "frozen_parts_radiographs", "cxr_linear_barlow_twins")
    metrics = frozen_parts_radiographs(params, "cxr_linear_barlow_twins", **where)
    assert metrics["task"] == "radiograph_multilabel" and metrics["init"] == "barlow_twins"
    head, layer4 = metrics["settings"]["unfrozen_0"], metrics["settings"]["unfrozen_1"]
    assert head["label"] == "head" and layer4["label"] == "head + layer4"
    assert head["trainable_parameters"] < layer4["trainable_parameters"]
    assert "mean_auroc" in head and set(head["auroc"]) == {"nodule", "malignant"}
    assert set(json.loads((where["report_dir"] / "cost.json").read_text())["fits"]) == {"unfrozen_0", "unfrozen_1"}


def test_runs_not_listed_or_without_a_pretrained_encoder_are_refused(project):  # noqa: F811
    params, root = project
    params["label_fraction"]["radiograph_runs"] = ["cxr_linear_barlow_twins"]
    with pytest.raises(ParamsError, match=r"label_fraction.radiograph_runs: 'cxr_linear_scratch_resnet18' is not listed"):
        label_fraction_radiographs(params, "cxr_linear_scratch_resnet18",
                                   **_stage_args(root, "label_fraction_radiographs", "x"))
    params["frozen_parts"]["radiograph_runs"] = ["cxr_densenet121"]
    with pytest.raises(ParamsError, match="freezes stages of a pretrained encoder"):
        frozen_parts_radiographs(params, "cxr_densenet121", **_stage_args(root, "frozen_parts_radiographs", "x"))
    assert not (root / "reports").exists()
