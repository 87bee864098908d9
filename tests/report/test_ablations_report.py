"""Report parts of the label-fraction and frozen-parts ablations, and the by-method table."""

from __future__ import annotations

import pytest

from chestssl.report.ablations import (
    downstream_by_method_table,
    frozen_parts_table,
    label_fraction_figure,
    label_fraction_table,
)


def _interval(value):
    return {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.1}


def _fraction_ablation(init, values):
    fractions = {}
    for (key, fraction, patients), value in zip((("10pct", 0.1, 1), ("50pct", 0.5, 5), ("100pct", 1.0, 10)), values):
        fractions[key] = {"fraction": fraction, "trained_as": key, "n_train_patients": patients, "n_train_images": 8 * patients,
                          "best_epoch": 2, "accuracy": _interval(value), "auroc": _interval(value + 0.05),
                          "n_images": 30, "n_patients": 4}
    # As read back from JSON: keys sorted as text ("100pct" before "10pct" and "50pct").
    fractions = dict(sorted(fractions.items()))
    return {"run": f"cls_{init}", "task": "cls", "init": init, "arch": "linear", "fractions": fractions}


ABLATIONS = {"cls_barlow": (_fraction_ablation("barlow", [0.6, 0.7, 0.8]), "a.json"),
             "cls_scratch": (_fraction_ablation("scratch_resnet18", [0.5, 0.6, 0.75]), "b.json")}
METHODS = {"barlow": "barlow_twins", "scratch_resnet18": "scratch"}


def test_label_fraction_table_has_one_column_per_fraction_and_the_seed_numbers():
    table = label_fraction_table(ABLATIONS, METHODS, "cls", "accuracy")
    assert list(table.text.columns)[-4:-1] == ["10%", "50%", "100%"]
    first = table.text.iloc[0]
    assert first["10%"] == "0.600 [0.500, 0.700]" and first["training patients"] == "1, 5, 10"
    assert "86.5" in first["seed's number (other data)"]
    assert "77.0" in table.text.iloc[1]["seed's number (other data)"]
    assert table.numbers.loc[1, "100pct"] == pytest.approx(0.75)


def test_label_fraction_table_refuses_ablations_with_other_fractions():
    other = _fraction_ablation("x", [0.1, 0.2, 0.3])
    other["fractions"].pop("50pct")
    with pytest.raises(ValueError, match="differ"):
        label_fraction_table({**ABLATIONS, "cls_x": (other, "c.json")}, METHODS, "cls", "auroc")


def test_label_fraction_figure_is_written(tmp_path):
    path = label_fraction_figure(tmp_path / "f.png", {run: ablation for run, (ablation, _) in ABLATIONS.items()}, "cls")
    assert path.stat().st_size > 1000


def test_frozen_parts_table_quotes_the_seed_only_for_its_setting():
    settings = {}
    for n, label in ((0, "head"), (1, "head + layer4"), (2, "head + layer4, layer3")):
        settings[f"unfrozen_{n}"] = {"unfrozen_stages": n, "trained": label.split(", "), "label": label,
                                     "trainable_parameters": 10 + n, "accuracy": _interval(0.6), "auroc": _interval(0.7),
                                     "n_images": 30, "n_patients": 4}
    ablation = {"run": "r", "init": "barlow", "settings": settings}
    table = frozen_parts_table({"r": (ablation, "f.json")}, METHODS, {"barlow": "resnet18"})
    seeds = list(table.text["seed's number (other data)"])
    assert "80.5" in seeds[0] and seeds[1] == "—" and "94.2" in seeds[2]
    assert list(table.text["trained"]) == ["head", "head + layer4", "head + layer4, layer3"]
    other_backbone = frozen_parts_table({"r": (ablation, "f.json")}, METHODS, {"barlow": "vit"})
    assert set(other_backbone.text["seed's number (other data)"]) == {"—"}


def test_downstream_by_method_has_one_row_per_init_and_one_column_per_kind_of_run():
    entries = {"barlow": {"method": "barlow_twins", "backbone": {"name": "resnet18"}},
               "scratch_resnet18": {"method": "scratch", "backbone": {"name": "resnet18"}},
               "unused": {"method": "mae", "backbone": {"name": "vit"}}}
    runs = {"cls_barlow": {"task": "cls", "arch": "linear", "init": "barlow"},
            "cls_scratch": {"task": "cls", "arch": "linear", "init": "scratch_resnet18"},
            "seg_barlow": {"task": "seg", "arch": "swin_unetr", "loss": "ce", "init": "barlow"}}
    run_metrics = {"cls_barlow": ({"auroc": _interval(0.7)}, "1"), "cls_scratch": ({"auroc": _interval(0.8)}, "2"),
                   "seg_barlow": ({"dice_global": _interval(0.3)}, "3")}
    pretrain = {"barlow": ({"probe": {"nodule": {"auroc": _interval(0.65)}}}, "p1"),
                "scratch_resnet18": ({"probe": {"nodule": {"skipped": "one class"}}}, "p2")}
    table = downstream_by_method_table(entries, pretrain, runs, run_metrics, ABLATIONS)
    text = table.text.set_index("pretraining")
    assert list(text.index) == ["barlow", "scratch_resnet18"]
    assert text.loc["barlow", "cls linear: AUROC"] == "0.700 [0.600, 0.800]"
    assert text.loc["barlow", "seg swin_unetr (ce): Dice"] == "0.300 [0.200, 0.400]"
    assert text.loc["scratch_resnet18", "seg swin_unetr (ce): Dice"].startswith("n/a")
    assert text.loc["scratch_resnet18", "linear probe: nodule AUROC"].startswith("n/a")
    assert text.loc["barlow", "10% of labels: AUROC"].startswith("0.650")
    assert any("one class" in note for note in table.footnotes)


def test_downstream_by_method_without_runs_is_an_empty_table():
    """`runs: {}` with empty ablation lists used to crash the report with a KeyError."""
    entries = {"barlow": {"method": "barlow_twins", "backbone": {"name": "resnet18"}}}
    table = downstream_by_method_table(entries, {}, {}, {})
    assert table.text.empty
