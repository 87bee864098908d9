"""Stages finetune_3d@<run> and evaluate_3d@<run>: seed 003's downstream, SwinUNETR 3D on crops and whole scans."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chestssl.eval.seg3d import load_items_3d, paired_difference_3d, scan_statistics
from chestssl.model_files import load_model_file
from chestssl.params import ParamsError, validate
from chestssl.pipeline.evaluate_3d import evaluate_3d
from chestssl.pipeline.finetune_3d import finetune_3d
from tests.pipeline.test_finetune import saved_encoder
from tests.pipeline.test_pretrain import stage_params
from tests.shipped_params import read_shipped_params

RUNS = ("seg3d_swinunetr_scratch_3d", "seg3d_swinunetr_dae_all_3d")


@pytest.fixture(scope="module")
def params():
    params = stage_params(methods=("scratch_swin_3d", "dae_all_3d"))
    for name in ("scratch_swin_3d", "dae_all_3d"):  # windows of 4^3 tokens, not 7^3: a third less memory
        params["methods"][name]["backbone"]["window_size"] = 4
    for run in params["runs_3d"].values():
        run["train"].update(epochs=2, batch_size=1, max_steps=0)
        run.update(crops_per_scan=1, max_test_scans=0, region="volume", sw_batch_size=1)
    return params


def _where(tmp_path, name: str) -> dict:
    return {"encoder_path": tmp_path / "models" / "pretrain" / "encoder.pt",
            "model_path": tmp_path / "models" / "finetune_3d" / name / "model.pt",
            "report_dir": tmp_path / "reports" / "finetune_3d" / name,
            "checkpoint_path": tmp_path / "checkpoints" / f"{name}.pt"}


def test_both_runs_train_on_fresh_crops_and_are_scored_and_paired_on_whole_scans(params, synthetic_processed,
                                                                                  tmp_path):
    items = {}
    for name in RUNS:
        where = _where(tmp_path, name)
        saved_encoder(params, params["runs_3d"][name]["init"], where["encoder_path"])
        metrics = finetune_3d(params, name, synthetic_processed, **where)
        # 2 training scans x 1 crop, batch 1 (a 64^3 crop through the 3D Swin takes about 1 GB): 2 steps an epoch.
        assert metrics["epochs"] == 2 and metrics["steps"] == 4 and metrics["train_crops_per_epoch"] == 2
        assert 0.0 <= metrics["best_val_dice"] <= 1.0
        assert json.loads((where["report_dir"] / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
        assert json.loads((where["report_dir"] / "cost.json").read_text())["steps"] == 4
        saved = load_model_file(where["model_path"], "finetune_3d@test", required=("encoder", "state_dict"))
        assert saved["encoder"]["backbone"]["spatial_dims"] == 3
        assert (where["report_dir"] / "live" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
        out_dir = tmp_path / "reports" / "evaluate_3d" / name
        scores = evaluate_3d(params, name, synthetic_processed, model_path=where["model_path"], out_dir=out_dir)
        # Test patients p4 (no nodule) and p5 (one nodule); the 12 x 48 x 48 scans are padded to the window.
        assert scores["test_patients"] == 2 and scores["test_scans"] == 2 and scores["test_nodules"] == 1
        for key in ("dice", "dice_global", "detection_rate"):
            value = scores[key]["value"]
            assert value is None or 0.0 <= value <= 1.0
        assert scores["overlap"] == params["runs_3d"][name]["overlap"] and scores["roi_size"] == 64
        assert json.loads((out_dir / "metrics.json").read_text()) == json.loads(json.dumps(scores))
        items[name] = load_items_3d(out_dir / "items.npz")
    paired = paired_difference_3d(items[RUNS[1]], items[RUNS[0]], 20, 0.95, 0)
    assert paired["test_patients"] == 2 and set(paired) >= {"dice", "dice_global", "detection_rate"}


def test_scan_statistics_count_found_nodules_and_dice_without_background():
    ids = np.zeros((8, 8, 8), np.uint8)
    ids[1:3, 1:3, 1:3] = 1
    ids[5:7, 5:7, 5:7] = 2
    prediction = np.zeros_like(ids, dtype=bool)
    prediction[1:3, 1:3, 1:2] = True  # half of nodule 1, none of nodule 2
    stats = scan_statistics(prediction, ids)
    assert stats["nodules"] == 2 and stats["found"] == 1
    assert stats["intersection"] == 4 and stats["predicted"] == 4 and stats["truth"] == 16
    assert stats["dice_sum"] == pytest.approx(2 * 4 / 20) and stats["dice_scored"] == 1
    empty = scan_statistics(np.zeros_like(prediction), np.zeros_like(ids))
    assert empty["dice_scored"] == 0 and empty["nodules"] == 0


def test_a_3d_run_needs_a_3d_swin_init_and_an_existing_baseline(params, synthetic_processed, tmp_path):
    raw = read_shipped_params()
    raw["runs_3d"]["seg3d_swinunetr_dae_all_3d"]["init"] = "dae_all"
    raw["runs_3d"]["seg3d_swinunetr_scratch_3d"]["baseline"] = "nope"
    with pytest.raises(ParamsError) as error:
        validate(raw)
    message = str(error.value)
    assert "runs_3d.seg3d_swinunetr_dae_all_3d.init: 'dae_all' has a 2D 'swin' backbone" in message
    assert "runs_3d.seg3d_swinunetr_scratch_3d.baseline: got 'nope'" in message
    raw = read_shipped_params()
    raw["runs_3d"]["seg3d_swinunetr_scratch_3d"]["crop_size"] = 80
    with pytest.raises(ParamsError, match=r"runs_3d.seg3d_swinunetr_scratch_3d.crop_size: got 80, expected a multiple of 32"):
        validate(raw)
    with pytest.raises(ParamsError, match="runs_3d: 'nope' is not an entry"):
        finetune_3d(params, "nope", synthetic_processed, **_where(tmp_path, "nope"))
