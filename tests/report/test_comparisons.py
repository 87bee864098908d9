"""The pretrained-vs-scratch table and the side-by-side comparison figures."""

from __future__ import annotations

import numpy as np
import pytest

from chestssl.eval.paired import paired_difference
from chestssl.report.comparison_figures import feature_map_figure, segmentation_comparison_figure
from chestssl.report.comparisons import DIFFERENCE_HEADER, pretrained_vs_scratch_table, verdict_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_PARAMS = {
    "seg_scratch": {"task": "seg", "arch": "unetpp", "init": "scratch"},
    "seg_ae": {"task": "seg", "arch": "unetpp", "init": "ae"},
    "cls_scratch": {"task": "cls", "arch": "resnet18", "init": "scratch"},
    "cls_multihead": {"task": "cls", "arch": "resnet18", "init": "multihead_cls"},
}


def seg_items(intersection, pred, target, patients):
    intersection, pred, target = (np.asarray(x) for x in (intersection, pred, target))
    dice = np.where(pred + target > 0, 2 * intersection / np.maximum(pred + target, 1), 1.0)
    return {"task": "seg", "patient_id": np.asarray(patients), "scan_id": np.asarray(patients),
            "slice_index": np.arange(len(patients)), "intersection": intersection, "pred_pixels": pred,
            "target_pixels": target, "dice": dice, "jaccard": dice / (2 - dice)}


def results():
    patients = [f"p{i}" for i in range(6) for _ in range(2)]
    target = np.full(12, 10)
    scratch = seg_items(np.full(12, 4), np.full(12, 8), target, patients)
    pretrained = seg_items(np.full(12, 9), np.full(12, 10), target, patients)
    labels = np.tile([0, 1], 6)
    cls_a = {"task": "cls", "patient_id": np.asarray(patients), "scan_id": np.asarray(patients),
             "slice_index": np.arange(12), "score": np.full(12, 0.6), "label": labels}
    return {
        ("seg_scratch", "seg_ae"): paired_difference(scratch, pretrained, n_bootstrap=100, confidence=0.95, seed=0),
        ("cls_scratch", "cls_multihead"): paired_difference(cls_a, cls_a, n_bootstrap=100, confidence=0.95, seed=0),
    }


def test_table_has_one_row_per_pair_and_metric():
    table = pretrained_vs_scratch_table(results(), RUN_PARAMS)
    assert table.name == "pretrained_vs_scratch"
    numbers = table.numbers
    assert list(zip(numbers["scratch_run"], numbers["pretrained_run"], numbers["metric"])) == [
        ("cls_scratch", "cls_multihead", "accuracy"),
        ("cls_scratch", "cls_multihead", "f1"),
        ("cls_scratch", "cls_multihead", "auroc"),
        ("seg_scratch", "seg_ae", "dice_global"),
        ("seg_scratch", "seg_ae", "jaccard_global"),
        ("seg_scratch", "seg_ae", "dice_per_image"),
    ]
    dice = numbers[numbers["metric"] == "dice_global"].iloc[0]
    assert dice["scratch"] == pytest.approx(0.4444, abs=1e-4) and dice["pretrained"] == pytest.approx(0.9)
    assert dice["difference"] == pytest.approx(0.9 - 8 / 18)
    assert dice["difference_ci_low"] > 0 and dice["verdict"] == "pretrained better"
    assert dice["pretrained_init"] == "ae" and dice["n_patients"] == 6 and dice["n_items"] == 12
    assert set(numbers[numbers["task"] == "cls"]["verdict"]) == {"no clear difference"}

    text = table.text
    difference_header = next(h for h in text.columns if h.startswith(DIFFERENCE_HEADER))
    assert list(text.columns) == ["Scratch run", "Pretrained run", "Metric", "Scratch", "Pretrained",
                                  difference_header, "Verdict"]
    row = text[text["Metric"] == "Dice (global)"].iloc[0]
    assert row["Pretrained run"] == "seg_ae (init `ae`)"
    assert row[difference_header] == (
        f"+0.456 [{dice['difference_ci_low']:+.3f}, {dice['difference_ci_high']:+.3f}]"
    )
    assert text[text["Metric"] == "AUROC"].iloc[0][difference_header] == "+0.000 [+0.000, +0.000]"

    markdown = table.markdown()
    assert "[^pretrained-vs-scratch-1]: Difference = pretrained - scratch" in markdown
    assert "paired bootstrap over test patients (95% interval, 100 resamples, seed 0)" in table.footnotes[0]
    assert "first training seed" in table.footnotes[0] and "between training runs is not in it" in table.footnotes[0]
    assert table.cell_notes == []


def test_cells_without_an_interval_get_a_footnote():
    lone = seg_items([4, 5], [8, 8], [10, 10], ["p0", "p0"])
    result = paired_difference(lone, lone, n_bootstrap=10, confidence=0.9, seed=0)
    table = pretrained_vs_scratch_table({("seg_scratch", "seg_ae"): result}, RUN_PARAMS)
    header = next(h for h in table.text.columns if h.startswith(DIFFERENCE_HEADER))
    assert table.text[header].tolist() == ["+0.000[^pretrained-vs-scratch-2]"] * 3
    assert "one patient" in table.footnotes[1] and len(table.footnotes) == 2
    assert len(table.cell_notes) == 3 and set(table.numbers["verdict"]) == {"undefined"}


def test_a_run_named_better_at_or_below_chance_auroc_is_said_to_be():
    """Scores anti-correlated with the labels: the pretrained run's AUROC (about 0.35) beats the
    scratch run's (0) on every resample, but neither is above a random score's 0.5."""
    patients = [f"p{i}" for i in range(8) for _ in range(4)]
    labels = np.tile([0, 1, 0, 1], 8)
    scratch = {"task": "cls", "patient_id": np.asarray(patients), "scan_id": np.asarray(patients),
               "slice_index": np.arange(32), "score": np.where(labels == 1, 0.2, 0.8), "label": labels}
    # Per patient: one positive above one negative, one below both (AUROC 3/8 within each patient).
    pretrained = {**scratch, "score": np.tile([0.5, 0.6, 0.7, 0.1], 8)}
    result = paired_difference(scratch, pretrained, n_bootstrap=100, confidence=0.95, seed=0)
    assert result["auroc"]["verdict"] == "b better" and result["auroc"]["b"] < 0.5
    table = pretrained_vs_scratch_table({("cls_scratch", "cls_multihead"): result}, RUN_PARAMS)
    auroc = table.numbers[table.numbers["metric"] == "auroc"].iloc[0]
    assert auroc["verdict"] == "pretrained better, but at or below chance (0.5)"
    assert table.text[table.text["Metric"] == "AUROC"].iloc[0]["Verdict"] == auroc["verdict"]
    assert "a random score" in table.footnotes[0]
    # Above chance, or a metric without a fixed chance level, the verdict is as computed.
    assert verdict_text("b better", "auroc", 0.40, 0.62) == "pretrained better"
    assert verdict_text("a better", "auroc", 0.45, 0.30) == "scratch better, but at or below chance (0.5)"
    assert verdict_text("b better", "accuracy", 0.2, 0.3) == "pretrained better"
    assert verdict_text("no clear difference", "auroc", 0.2, 0.3) == "no clear difference"


def test_table_errors():
    with pytest.raises(ValueError, match="no pretrained-vs-scratch pairs"):
        pretrained_vs_scratch_table({}, RUN_PARAMS)
    with pytest.raises(KeyError, match=r"pass runs\.seg_other"):
        pretrained_vs_scratch_table({("seg_scratch", "seg_other"): results()[("seg_scratch", "seg_ae")]}, RUN_PARAMS)


def examples(keys, nodule_shift, size=16):
    """Segmentation examples of the slices ``keys`` (patient, slice); prediction shifted right."""
    k = len(keys)
    image = np.full((k, 1, size, size), 0.3, np.float32)
    mask = np.zeros((k, 1, size, size), np.uint8)
    mask[:, :, 5:9, 5:9] = 1
    image[mask == 1] = 0.8
    prob = np.roll(mask.astype(np.float32) * 0.9, nodule_shift, axis=-1)
    return {"image": image, "mask": mask, "prob": prob,
            "patient_id": np.array([p for p, _ in keys]), "slice_index": np.array([z for _, z in keys])}


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


def test_segmentation_comparison_figure_writes_a_png(tmp_path):
    path = segmentation_comparison_figure(
        tmp_path / "figures" / "comparison.png",
        {
            "scratch": examples([("p1", 3), ("p2", 7), ("p3", 1)], nodule_shift=2),
            "pretrained": examples([("p3", 1), ("p1", 3)], nodule_shift=0),
            "multihead": examples([("p1", 3), ("p3", 1), ("p4", 0)], nodule_shift=1),
        },
        threshold=0.5,
    )
    assert path.is_file() and is_png(path)
    assert [p.name for p in path.parent.iterdir()] == ["comparison.png"]


def test_segmentation_comparison_figure_needs_a_common_slice(tmp_path):
    with pytest.raises(ValueError, match=r"share no test slice.*scratch: p1 z=3; pretrained: p1 z=4"):
        segmentation_comparison_figure(
            tmp_path / "none.png",
            {"scratch": examples([("p1", 3)], 0), "pretrained": examples([("p1", 4)], 0)},
            threshold=0.5,
        )
    without_ids = examples([("p1", 3)], 0)
    del without_ids["slice_index"]
    with pytest.raises(ValueError, match="'scratch' lack slice_index"):
        segmentation_comparison_figure(tmp_path / "none.png", {"scratch": without_ids}, threshold=0.5)
    assert not (tmp_path / "none.png").exists()


def test_feature_map_figure_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    maps = {
        "downstream segmentation": rng.standard_normal((10, 8, 8)).astype(np.float32),
        "multihead": np.concatenate([np.zeros((1, 4, 4)), rng.standard_normal((2, 4, 4))]),  # constant channel
    }
    path = feature_map_figure(tmp_path / "features.png", maps, rng.random((1, 1, 32, 32)), channels=4)
    assert path.is_file() and is_png(path)
    with pytest.raises(ValueError, match=r"'multihead' must be \(C, h, w\).*got shape \(1, 3, 4, 4\)"):
        feature_map_figure(tmp_path / "bad.png", {"multihead": maps["multihead"][None]}, np.zeros((32, 32)))
    with pytest.raises(ValueError, match="channels must be an integer >= 1, got 0"):
        feature_map_figure(tmp_path / "bad.png", maps, np.zeros((32, 32)), channels=0)


def _spread(values):
    return {"seeds": [42, 43, 44], "metrics": {"dice_global": {"values": values}}}


def test_with_several_training_seeds_the_table_pairs_seed_k_with_seed_k_and_a_verdict_needs_every_seed():
    steady = {"seg_scratch": _spread([0.40, 0.42, 0.41]), "seg_ae": _spread([0.90, 0.88, 0.91])}
    table = pretrained_vs_scratch_table(results(), RUN_PARAMS, steady)
    dice = table.numbers[table.numbers["metric"] == "dice_global"].iloc[0]
    assert dice["seed_difference_mean"] == pytest.approx(np.mean([0.50, 0.46, 0.50]))
    assert dice["seed_difference_sd"] == pytest.approx(np.std([0.50, 0.46, 0.50], ddof=1))
    assert dice["training_seeds"] == 3 and dice["verdict"] == "pretrained better"
    row = table.text[table.text["Metric"] == "Dice (global)"].iloc[0]
    assert row["Over seeds"] == "+0.487 ± 0.023 (3 seeds)"
    # Metrics without per-seed values say so.
    assert table.text[table.text["Metric"] == "Jaccard (global)"].iloc[0]["Over seeds"] == "n/a (one seed)"

    # One seed where scratch wins: the first seeds' interval alone no longer makes a verdict.
    flipping = {"seg_scratch": _spread([0.40, 0.95, 0.41]), "seg_ae": _spread([0.90, 0.88, 0.91])}
    table = pretrained_vs_scratch_table(results(), RUN_PARAMS, flipping)
    dice = table.numbers[table.numbers["metric"] == "dice_global"].iloc[0]
    assert dice["difference_ci_low"] > 0 and dice["verdict"] == "no clear difference"
