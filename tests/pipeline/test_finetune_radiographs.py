"""Stage finetune_radiographs@<run>: classifiers fine-tuned and tested on radiographs (seeds 001, 002)."""

from __future__ import annotations

import json

import pytest
import torch

from chestssl.data.drr import render_radiographs
from chestssl.eval.examples import load_examples
from chestssl.methods import build_method
from chestssl.model_files import ModelFileError, load_model_file, save_model_file
from chestssl.models.stn import AlignmentSTN, stn_payload
from chestssl.params import ParamsError, pretrain_entry
from chestssl.pipeline.finetune_radiographs import finetune_radiographs
from tests.pipeline.cost_checks import check_cost_record
from tests.pipeline.test_pretrain_radiographs import SIZE, tiny_params


@pytest.fixture
def project(synthetic_processed, tmp_path, monkeypatch):
    """Radiographs rendered from the synthetic CT, the radiograph encoders and an STN, in a project at tmp_path."""
    monkeypatch.chdir(tmp_path)
    render_radiographs(synthetic_processed, tmp_path / "data/radiographs",
                       {"side": SIZE, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]})
    params = tiny_params()
    for name in ("barlow_twins", "scratch_resnet18"):
        _, cfg = pretrain_entry(params, name)
        save_model_file(tmp_path / f"models/pretrain_radiographs/{name}/encoder.pt",
                        build_method(name, cfg, params["seed"]).export())
    stn = AlignmentSTN(output_size=SIZE, block_inplanes=(4, 8, 8, 8), hidden_dim=8)
    save_model_file(tmp_path / "models/alignment/stn.pt", stn_payload(stn, torch.rand(1, SIZE, SIZE)))
    for run in params["radiograph_runs"].values():
        run["train"].update(epochs=2, batch_size=4)
    return params, tmp_path


def test_a_linear_head_run_trains_tests_and_writes_its_outputs(project):
    params, root = project
    metrics = finetune_radiographs(params, "cxr_linear_barlow_twins")
    report = root / "reports/finetune_radiographs/cxr_linear_barlow_twins"
    assert json.loads((report / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    check_cost_record(json.loads((report / "cost.json").read_text()), steps=metrics["steps"])
    assert (report / "live/plots/metrics/train/loss.tsv").is_file()
    # The rendered radiographs' two labels; the frontal views of the two test patients.
    assert metrics["labels"] == ["nodule", "malignant"] and metrics["mode"] == "multilabel"
    test = metrics["test"]
    assert set(test["auroc"]) == {"nodule", "malignant"} and test["n_patients"] == 2
    assert test["n_images"] == 2 and "accuracy" not in test
    saved = load_model_file(root / "models/finetune_radiographs/cxr_linear_barlow_twins/model.pt", "test",
                            required=("state_dict",))
    assert saved["labels"] == ["nodule", "malignant"]
    assert any(key.startswith("network.encoder.") for key in saved["state_dict"])
    # Each label's confusion counts at the threshold, over the two test images.
    counts = test["label_confusion"]
    assert counts["threshold"] == params["evaluate"]["cls_threshold"] and counts["labels"] == ["nodule", "malignant"]
    assert [sum(c) for c in zip(*(counts[k] for k in ("tn", "fp", "fn", "tp")))] == [2, 2]
    # The test images kept for the figure, with the Grad-CAM map of each one's most probable label.
    examples = load_examples(report / "examples.npz")
    assert examples["image"].shape == (2, 1, SIZE, SIZE) and examples["cam"].shape == (2, 1, SIZE, SIZE)
    assert examples["probability"].shape == examples["labels"].shape == (2, 2)
    assert list(examples["explained"]) == list(examples["probability"].argmax(axis=1))
    assert 0.0 <= float(examples["cam"].min()) and float(examples["cam"].max()) <= 1.0
    assert set(examples["view"]) == {"frontal"}


def test_densenet_runs_train_from_scratch_unaligned_and_aligned(project):
    params, root = project
    plain = finetune_radiographs(params, "cxr_densenet121")
    aligned = finetune_radiographs(params, "cxr_densenet121_aligned")
    assert plain["init"] is None and plain["arch"] == "densenet121" and aligned["aligned"] is True
    assert plain["n_train_images"] == aligned["n_train_images"] == 2
    state = load_model_file(root / "models/finetune_radiographs/cxr_densenet121/model.pt", "test")["state_dict"]
    assert any(key.startswith("network.features.") for key in state)
    # DenseNet-121's map is its last dense block's, on the aligned images too.
    for run in ("cxr_densenet121", "cxr_densenet121_aligned"):
        examples = load_examples(root / f"reports/finetune_radiographs/{run}/examples.npz")
        assert examples["cam"].shape == (2, 1, SIZE, SIZE) and "cam_unavailable" not in examples
    (root / "models/alignment/stn.pt").unlink()
    with pytest.raises(FileNotFoundError, match="align_radiographs"):
        finetune_radiographs(params, "cxr_densenet121_aligned", report_dir=root / "again")


def test_unknown_runs_and_missing_encoders_are_named(project):
    params, root = project
    with pytest.raises(ParamsError, match="radiograph_runs: 'cxr_vgg' is not an entry"):
        finetune_radiographs(params, "cxr_vgg")
    (root / "models/pretrain_radiographs/scratch_resnet18/encoder.pt").unlink()
    with pytest.raises(ModelFileError, match=r"rerun `dvc repro pretrain_radiographs@scratch_resnet18`"):
        finetune_radiographs(params, "cxr_linear_scratch_resnet18")
