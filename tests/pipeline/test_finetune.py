"""Stage finetune@<run>: a downstream run trained from the encoder its pretraining stage exported."""

from __future__ import annotations

import json

import pytest

from chestssl.methods import build_method
from chestssl.model_files import ModelFileError, load_model_file, save_model_file
from chestssl.params import ParamsError
from chestssl.pipeline.finetune import finetune
from tests.pipeline.test_pretrain import stage_params


def saved_encoder(params: dict, init: str, path) -> None:
    """``encoder.pt`` as ``pretrain@<init>`` exports it, of the untrained (seeded) method."""
    save_model_file(path, build_method(init, params["methods"][init], params["seed"]).export())


def _where(tmp_path) -> dict:
    return {"encoder_path": tmp_path / "models" / "pretrain" / "encoder.pt",
            "model_path": tmp_path / "models" / "finetune" / "model.pt",
            "report_dir": tmp_path / "reports", "checkpoint_path": tmp_path / "checkpoints" / "ckpt.pt"}


@pytest.fixture
def params():
    return stage_params(runs=("seg_unetpp_scratch", "cls_linear_scratch_resnet18"))


def test_a_segmentation_run_writes_its_best_model_curves_and_metrics(params, synthetic_processed, tmp_path):
    where = _where(tmp_path)
    saved_encoder(params, "scratch_cnn_attention", where["encoder_path"])
    metrics = finetune(params, "seg_unetpp_scratch", synthetic_processed, **where)
    # The segmentation run trains on p1's 4 nodule slices: one step per epoch, 1 epoch.
    assert metrics["epochs"] == 1 and metrics["steps"] == 1
    assert 0.0 <= metrics["best_val_dice"] <= 1.0 and "val_dice" in metrics
    assert json.loads((where["report_dir"] / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    saved = load_model_file(where["model_path"], "finetune@test", required=("encoder", "state_dict"))
    assert saved["run"] == "seg_unetpp_scratch" and saved["config"] == params["runs"]["seg_unetpp_scratch"]
    assert saved["encoder"]["backbone"]["name"] == "cnn_attention"
    assert (where["report_dir"] / "live" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    assert not where["checkpoint_path"].exists()
    cost = json.loads((where["report_dir"] / "cost.json").read_text())
    assert cost["steps"] == 1 and cost["epochs"] == 1 and cost["parameters"] > 0
    assert cost["train_seconds"] > 0 and cost["peak_memory_gb"] > 0 and cost["device"] == "cpu"


def test_a_classification_run_picks_its_best_epoch_by_validation_loss(params, synthetic_processed, tmp_path):
    where = _where(tmp_path)
    saved_encoder(params, "scratch_resnet18", where["encoder_path"])
    metrics = finetune(params, "cls_linear_scratch_resnet18", synthetic_processed, **where)
    assert metrics["best_val_loss"] == pytest.approx(metrics["val_loss"])  # one epoch: the best is the last
    assert load_model_file(where["model_path"], "finetune@test")["encoder"]["backbone"]["name"] == "resnet18"


def test_an_unknown_run_or_a_missing_encoder_is_explained(params, synthetic_processed, tmp_path):
    with pytest.raises(ParamsError, match="runs: 'nope' is not an entry"):
        finetune(params, "nope", synthetic_processed, **_where(tmp_path))
    with pytest.raises(ModelFileError, match=r"rerun `dvc repro pretrain@scratch_cnn_attention`"):
        finetune(params, "seg_unetpp_scratch", synthetic_processed, **_where(tmp_path))


def test_balanced_class_weights_are_computed_from_the_training_set_recorded_and_evaluated(
        params, synthetic_processed, tmp_path):
    from chestssl.pipeline.evaluate import evaluate

    where = _where(tmp_path)
    name = "cls_linear_scratch_resnet18"
    params["runs"][name]["class_weights"] = "balanced"
    params["slices"].update(clean_per_nodule_slice=2.0, clean_source="nodule_free_patients")
    saved_encoder(params, "scratch_resnet18", where["encoder_path"])
    metrics = finetune(params, name, synthetic_processed, **where)
    # Train split: p1's 4 nodule slices and 8 clean slices of p0, the patient without nodules.
    assert metrics["train_class_counts"] == {"clean": 8, "nodule": 4}
    assert metrics["class_weights"] == pytest.approx({"clean": 12 / (2 * 8), "nodule": 12 / (2 * 4)})
    assert json.loads((where["report_dir"] / "metrics.json").read_text())["class_weights"] == metrics["class_weights"]
    saved = load_model_file(where["model_path"], "finetune@test")
    assert saved["class_weights"] == metrics["class_weights"] and saved["config"]["class_weights"] == "balanced"
    # evaluate rebuilds the run with the recorded weights; the test clean slices come from p4.
    scores = evaluate(params, name, synthetic_processed, model_path=where["model_path"], out_dir=tmp_path / "eval")
    assert scores["n_images"] == 4 + 8
    del saved["class_weights"]
    save_model_file(where["model_path"], saved)
    with pytest.raises(ModelFileError, match=rf"no class_weights recorded .* rerun `dvc repro finetune@{name}`"):
        evaluate(params, name, synthetic_processed, model_path=where["model_path"], out_dir=tmp_path / "eval")


def test_several_training_seeds_train_one_model_each_on_the_same_data_and_resume_the_finished_ones(
        params, synthetic_processed, tmp_path, monkeypatch):
    import chestssl.train.loop as loop
    from chestssl.paths import seed_model_path
    from chestssl.pipeline.finetune import seed_checkpoint_path

    where = _where(tmp_path)
    params["training_seeds"] = 2
    saved_encoder(params, "scratch_resnet18", where["encoder_path"])
    name = "cls_linear_scratch_resnet18"
    metrics = finetune(params, name, synthetic_processed, **where)
    first = load_model_file(where["model_path"], "finetune@test")
    second = load_model_file(seed_model_path(where["model_path"], 43), "finetune@test")
    assert (first["training_seed"], second["training_seed"]) == (42, 43)
    assert any(not (first["state_dict"][k] == second["state_dict"][k]).all() for k in first["state_dict"])
    assert set(metrics["best_val_loss_by_training_seed"]) == {"42", "43"}
    assert (seed_model_path(where["model_path"], 43).parent / "live" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    cost = json.loads((where["report_dir"] / "cost.json").read_text())
    assert cost["training_seeds"] == 2 and cost["train_seconds_all_seeds"] >= cost["train_seconds"]
    assert not where["checkpoint_path"].exists() and not seed_checkpoint_path(where["checkpoint_path"], 43).exists()

    # Interrupted in the second seed's fit: the rerun takes the first seed's finished fit from
    # its kept checkpoint (no training step) and trains the second again.
    real_fit, trained, interrupt = loop.fit, [], [True]

    def fit_that_stops_in_the_second_seed(model, *args, **kwargs):
        if args[5] == 43 and interrupt:
            interrupt.pop()
            raise KeyboardInterrupt
        result = real_fit(model, *args, **kwargs)
        trained.append((args[5], result.resumed))
        return result

    monkeypatch.setattr(loop, "fit", fit_that_stops_in_the_second_seed)
    with pytest.raises(KeyboardInterrupt):
        finetune(params, name, synthetic_processed, **where)
    assert where["checkpoint_path"].exists()  # the first seed's finished fit is kept
    trained.clear()
    trained.append("rerun")
    finetune(params, name, synthetic_processed, **where)
    assert trained == ["rerun", (42, True), (43, False)]
    assert not where["checkpoint_path"].exists()
