"""Stage evaluate@<run>: a fine-tuned run scored on the test split, with examples, items and Grad-CAM."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chestssl.eval.paired import load_item_scores
from chestssl.methods import build_method
from chestssl.model_files import ModelFileError, save_model_file
from chestssl.pipeline.evaluate import evaluate
from chestssl.tasks import build_task
from tests.pipeline.test_pretrain import stage_params


def saved_run(params: dict, name: str, path) -> None:
    """``model.pt`` as ``finetune@<name>`` writes it, of the untrained (seeded) run."""
    run = params["runs"][name]
    encoder = build_method(run["init"], params["methods"][run["init"]], params["seed"]).export()
    model = build_task(run, encoder, params["seed"], name=name)
    save_model_file(path, {"run": name, "config": run, "encoder": encoder, "state_dict": model.state_dict()})


@pytest.fixture
def params():
    return stage_params(runs=("seg_unetpp_scratch", "cls_linear_scratch_resnet18"))


def test_a_segmentation_run_gets_dice_examples_and_items(params, synthetic_processed, tmp_path):
    model_path, out_dir = tmp_path / "model.pt", tmp_path / "reports"
    saved_run(params, "seg_unetpp_scratch", model_path)
    metrics = evaluate(params, "seg_unetpp_scratch", synthetic_processed, model_path=model_path, out_dir=out_dir)
    assert json.loads((out_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    # The test split's nodule slices: p5's 4.
    assert metrics["n_images"] == 4 and metrics["n_patients"] == 1
    dice = metrics["dice_global"]
    assert 0.0 <= dice["value"] <= 1.0
    assert dice["ci_low"] is None and "note" in dice  # one patient: no interval over patients
    with np.load(out_dir / "examples.npz") as examples:
        assert {"image", "mask", "prob", "features"} <= set(examples.files) and len(examples["image"]) == 2
    items = load_item_scores(out_dir / "items.npz")
    assert items["task"] == "seg" and len(items["dice"]) == 4


def test_a_classification_run_gets_auroc_and_grad_cam_maps_on_its_examples(params, synthetic_processed, tmp_path):
    model_path, out_dir = tmp_path / "model.pt", tmp_path / "reports"
    saved_run(params, "cls_linear_scratch_resnet18", model_path)
    metrics = evaluate(params, "cls_linear_scratch_resnet18", synthetic_processed, model_path=model_path,
                       out_dir=out_dir)
    assert metrics["n_images"] == 8 and 0.0 <= metrics["auroc"]["value"] <= 1.0  # 4 nodule + 4 clean slices
    with np.load(out_dir / "examples.npz") as examples:
        assert {"image", "label", "score", "cam"} <= set(examples.files)
        assert examples["cam"].shape == examples["image"].shape == (2, 1, 32, 32)
        assert 0.0 <= examples["cam"].min() and examples["cam"].max() <= 1.0
    assert load_item_scores(out_dir / "items.npz")["task"] == "cls"


def test_a_missing_model_names_the_finetune_stage(params, synthetic_processed, tmp_path):
    with pytest.raises(ModelFileError, match=r"rerun `dvc repro finetune@seg_unetpp_scratch`"):
        evaluate(params, "seg_unetpp_scratch", synthetic_processed, model_path=tmp_path / "model.pt",
                 out_dir=tmp_path / "reports")
    assert not (tmp_path / "reports").exists()


def test_the_other_training_seeds_are_scored_on_the_same_slices_and_their_spread_recorded(
        params, synthetic_processed, tmp_path):
    from chestssl.paths import seed_model_path

    params["training_seeds"] = 3
    name = "cls_linear_scratch_resnet18"
    model_path, out_dir = tmp_path / "model.pt", tmp_path / "reports"
    saved_run(params, name, model_path)
    for offset, seed in enumerate((43, 44), start=1):
        seeded = {**params, "seed": params["seed"] + offset}
        saved_run(seeded, name, seed_model_path(model_path, seed))
    metrics = evaluate(params, name, synthetic_processed, model_path=model_path, out_dir=out_dir)
    spread = metrics["training_seeds"]
    assert spread["seeds"] == [42, 43, 44]
    accuracy = spread["metrics"]["accuracy"]
    assert accuracy["values"][0] == metrics["accuracy"]["value"] and accuracy["n"] == 3
    assert accuracy["mean"] == pytest.approx(np.mean(accuracy["values"]))
    assert accuracy["sd"] == pytest.approx(np.std(accuracy["values"], ddof=1))
    assert json.loads((out_dir / "metrics.json").read_text())["training_seeds"] == json.loads(json.dumps(spread))

    seed_model_path(model_path, 44).unlink()
    with pytest.raises(ModelFileError, match=r"seeds/44/model.pt.*dvc repro finetune@cls_linear_scratch_resnet18"):
        evaluate(params, name, synthetic_processed, model_path=model_path, out_dir=out_dir)
