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
