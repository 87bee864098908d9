"""The table of classifiers fine-tuned on radiographs (seeds 001, 002)."""

from __future__ import annotations

import pytest

from chestssl.report.radiograph_finetune import radiograph_finetune_table

RUNS = {
    "cxr_linear_barlow_twins": {"arch": "linear", "init": "barlow_twins", "mode": "multilabel", "aligned": False},
    "cxr_densenet121": {"arch": "densenet121", "init": None, "mode": "multilabel", "aligned": False},
    "cxr_densenet121_aligned": {"arch": "densenet121", "init": None, "mode": "multiclass", "aligned": True},
}


def _entry(value, low=None, high=None, note=None):
    entry = {"value": value, "ci_low": low, "ci_high": high}
    if note:
        entry["note"] = note
    return entry


def finetune_metrics(run: str) -> dict:
    test = {"auroc": {"nodule": _entry(0.71, 0.6, 0.8),
                      "malignant": _entry(None, note="undefined: all 4 known test images have label 0")},
            "mean_auroc": _entry(0.71, 0.6, 0.8), "n_images": 4, "n_patients": 2}
    if RUNS[run]["mode"] == "multiclass":
        test["accuracy"] = _entry(0.75, 0.5, 1.0)
    return {"labels": ["nodule", "malignant"], "test": test}


def table():
    metrics = {run: (finetune_metrics(run), f"{run}.json") for run in RUNS}
    return radiograph_finetune_table(metrics, RUNS, "radiographs rendered from the phantom CT")


def test_one_row_per_run_with_intervals_the_seeds_number_and_its_protocol():
    result = table()
    text = result.text.set_index("Run")
    row = text.loc["`cxr_linear_barlow_twins`"]
    assert row["Network; images"] == "linear head on `barlow_twins`, whole network; as given"
    assert row["mean AUROC"] == "0.710 [0.600, 0.800]" and row["Test images / patients"] == "4 / 2"
    assert row["AUROC malignant"].startswith("n/a[^radiograph-finetune-")
    assert row["Seed's number (other data)"].startswith("seed 001: 97.4 test accuracy (%)")
    assert text.loc["`cxr_densenet121`", "Seed's number (other data)"].startswith("seed 002: 0.8110 mean AUROC")
    aligned = text.loc["`cxr_densenet121_aligned`"]
    assert aligned["Seed's number (other data)"].startswith("seed 002: 0.8124 mean AUROC")
    assert aligned["Network; images"] == "DenseNet-121 from scratch; STN-aligned" and aligned["Accuracy"] == "0.750 [0.500, 1.000]"
    assert text.loc["`cxr_densenet121`", "Accuracy"] == "—"  # several labels per image: no accuracy
    markdown = result.markdown()
    assert "COVID-19 Radiography Database" in markdown and "ChestX-ray14" in markdown
    assert "the numbers are not comparable" in markdown
    assert any("`cxr_densenet121`, AUROC malignant: undefined" in note for note in result.cell_notes)
    numbers = result.numbers.set_index("run")
    assert numbers.loc["cxr_densenet121", "mean_auroc_ci_low"] == 0.6


def test_metrics_without_test_results_name_the_stage_to_rerun():
    with pytest.raises(KeyError, match=r"old.json: no `test` metrics .* rerun finetune_radiographs@cxr_densenet121"):
        radiograph_finetune_table({"cxr_densenet121": ({"labels": []}, "old.json")}, RUNS, "rendered")
