"""Stages evaluate_pretrain@<method> and evaluate_multihead@<name>: probe, reconstruction and heads on test."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chestssl.methods import build_method
from chestssl.model_files import ModelFileError, save_model_file
from chestssl.params import pretrain_entry
from chestssl.pipeline.evaluate_pretrain import evaluate_pretrain
from tests.pipeline.test_pretrain import stage_params


def _saved_method(params: dict, name: str, path) -> None:
    """``method.pt`` as ``pretrain@<name>`` writes it, of the untrained (seeded) method."""
    _, cfg = pretrain_entry(params, name)
    method = build_method(name, cfg, params["seed"])
    save_model_file(path, {"name": name, "config": cfg, "state_dict": method.state_dict()})


def _where(tmp_path) -> dict:
    return {"model_path": tmp_path / "models" / "method.pt", "out_dir": tmp_path / "reports",
            "heads_dir": tmp_path / "reports" / "heads"}


def test_an_autoencoder_gets_the_probe_and_its_reconstruction_scores(synthetic_processed, tmp_path):
    params = stage_params()
    params["evaluate"]["reconstruction_slices_per_patient"] = 0  # every test slice
    where = _where(tmp_path)
    _saved_method(params, "ae_cnn_attention", where["model_path"])
    metrics = evaluate_pretrain(params, "ae_cnn_attention", synthetic_processed, **where)
    assert json.loads((where["out_dir"] / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    nodule = metrics["probe"]["nodule"]
    # Training split: p1's 4 nodule slices and 4 clean slices; test split: p5's.
    assert nodule["n_train"] == 8 and nodule["n_train_positive"] == 4 and 0.0 <= nodule["auroc"]["value"] <= 1.0
    assert metrics["reconstructs"] is True
    assert 0.0 <= metrics["ssim"]["value"] <= 1.0 and metrics["psnr"]["value"] > 0
    assert metrics["n_images"] == 24 and metrics["n_patients"] == 2  # every slice of the two test patients
    with np.load(where["out_dir"] / "examples.npz") as examples:
        # evaluate.num_examples evenly spaced test slices: the first and the last.
        assert examples["image"].shape == examples["recon"].shape == (2, 1, 32, 32)
        assert list(examples["patient_id"]) == ["p4", "p5"] and list(examples["slice_index"]) == [0, 11]
    assert not where["heads_dir"].exists()


def test_reconstruction_is_scored_on_evenly_spaced_slices_of_each_test_patient(synthetic_processed, tmp_path):
    params = stage_params()
    params["evaluate"] = {**params["evaluate"], "reconstruction_slices_per_patient": 3}
    where = _where(tmp_path)
    _saved_method(params, "ae_cnn_attention", where["model_path"])
    metrics = evaluate_pretrain(params, "ae_cnn_attention", synthetic_processed, **where)
    assert metrics["n_images"] == 6 and metrics["n_patients"] == 2
    assert metrics["reconstruction_items_per_patient"] == 3
    with np.load(where["out_dir"] / "examples.npz") as examples:
        assert list(examples["slice_index"]) == [0, 11]  # still the first and the last


def test_a_scratch_encoder_is_probed_and_shows_one_input(synthetic_processed, tmp_path):
    params = stage_params()
    where = _where(tmp_path)
    _saved_method(params, "scratch_cnn_attention", where["model_path"])
    metrics = evaluate_pretrain(params, "scratch_cnn_attention", synthetic_processed, **where)
    assert metrics["reconstructs"] is False and "nodule" in metrics["probe"] and "ssim" not in metrics
    with np.load(where["out_dir"] / "examples.npz") as examples:
        assert set(examples.files) == {"image"} and examples["image"].shape == (1, 1, 32, 32)


def test_a_multihead_model_gets_its_heads_scored_on_the_downstream_test_slices(synthetic_processed, tmp_path):
    params = stage_params(methods=(), multihead=("multihead_clsseg",), slice_size=64)  # Swin: 64 at least
    where = _where(tmp_path)
    _saved_method(params, "multihead_clsseg", where["model_path"])
    metrics = evaluate_pretrain(params, "multihead_clsseg", synthetic_processed, **where)
    assert metrics["heads"] == ["seg", "cls"] and metrics["seg_beta"] == params["seg_beta"]
    # Through chestssl.eval.downstream.evaluate_predictor: p5's 4 nodule slices for seg,
    # those and as many clean slices for cls.
    assert metrics["segmentation"]["n_images"] == 4 and 0.0 <= metrics["segmentation"]["dice_global"]["value"] <= 1
    assert metrics["classification"]["n_images"] == 8 and "auroc" in metrics["classification"]
    for task in ("seg", "cls"):
        with np.load(where["heads_dir"] / f"{task}_examples.npz") as examples:
            assert len(examples["image"]) == 2
        with np.load(where["heads_dir"] / f"{task}_items.npz") as items:
            assert len(items["patient_id"]) == (4 if task == "seg" else 8)
    with np.load(where["heads_dir"] / "seg_examples.npz") as examples:
        assert examples["prob"].shape == (2, 1, 64, 64) and "features" in examples.files


def test_a_missing_model_file_names_the_stage_that_writes_it(synthetic_processed, tmp_path):
    with pytest.raises(ModelFileError, match=r"rerun `dvc repro pretrain@ae_cnn_attention`"):
        evaluate_pretrain(stage_params(), "ae_cnn_attention", synthetic_processed, **_where(tmp_path))
