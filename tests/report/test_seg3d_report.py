"""The report's 3D nodule segmentation table (seed 003's downstream): runs and their paired difference."""

from __future__ import annotations

import json

import numpy as np

from chestssl.eval.seg3d import save_items_3d, score_items_3d, load_items_3d
from chestssl.report.seg3d import segmentation_3d_table

RUN = {"crop_size": 64, "region": "lung_box", "max_test_scans": 2, "overlap": 0.5}
PARAMS = {
    "seed": 0,
    "evaluate": {"bootstrap_samples": 50, "confidence": 0.95},
    "methods": {"scratch_swin_3d": {"backbone": {"feature_size": 12}}, "dae_all_3d": {"backbone": {"feature_size": 12}}},
    "runs_3d": {"scratch": {**RUN, "init": "scratch_swin_3d", "baseline": None},
                "dae": {**RUN, "init": "dae_all_3d", "baseline": "scratch"},
                "absent": {**RUN, "init": "dae_all_3d", "baseline": None}},
}


def _scored(folder, found):
    rows = [{"dice_sum": 0.5 * f, "dice_scored": 1.0, "intersection": 5.0 * f, "predicted": 10.0, "truth": 10.0,
             "nodules": 1.0, "found": float(f)} for f in found]
    save_items_3d(folder / "items.npz", ["p1", "p2", "p3"], ["p1", "p2", "p3"], rows)
    (folder / "metrics.json").write_text(json.dumps(score_items_3d(load_items_3d(folder / "items.npz"), 50, 0.95, 0)))


def test_each_scored_run_and_the_pretrained_minus_scratch_row_are_shown(tmp_path):
    for name, found in (("scratch", [0, 1, 0]), ("dae", [1, 1, 0])):
        (tmp_path / name).mkdir()
        _scored(tmp_path / name, found)
    costs = {"finetune_3d@scratch": {"parameters": 1000, "steps": 4, "train_seconds": 3.0, "peak_memory_gb": 1.0}}
    (table,), skipped = segmentation_3d_table(PARAMS, lambda name: tmp_path / name, costs)
    assert skipped == ["3D nodule segmentation: run `absent` has no metrics; run `dvc repro evaluate_3d@absent`."]
    assert list(table.numbers["entry"]) == ["scratch", "dae", "dae - scratch"]
    difference = table.numbers.iloc[2]
    assert np.isclose(difference["detection_rate"], 2 / 3 - 1 / 3)
    assert difference["detection_rate_ci_low"] <= difference["detection_rate"] <= difference["detection_rate_ci_high"]
    markdown = table.markdown()
    assert "difference: dae - scratch" in markdown and "BTCV" in markdown and "64^3" in markdown
    assert "Nodules found" in markdown and "n/a" in markdown  # dae has no cost file


def test_no_runs_or_no_metrics_leave_a_note(tmp_path):
    assert segmentation_3d_table({**PARAMS, "runs_3d": {}}, lambda name: tmp_path)[1] == [
        "3D nodule segmentation: `runs_3d` is empty."]
    tables, skipped = segmentation_3d_table(PARAMS, lambda name: tmp_path / name)
    assert tables == [] and len(skipped) == 3
