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


def _fraction_ablation(init, values, unit=None):
    fractions = {}
    for (key, fraction, patients), value in zip((("10pct", 0.1, 1), ("50pct", 0.5, 5), ("100pct", 1.0, 10)), values):
        fractions[key] = {"fraction": fraction, "trained_as": key, "n_train_patients": patients, "n_train_images": 8 * patients,
                          "best_epoch": 2, "accuracy": _interval(value), "auroc": _interval(value + 0.05),
                          "n_images": 30, "n_patients": 4}
    # As read back from JSON: keys sorted as text ("100pct" before "10pct" and "50pct").
    fractions = dict(sorted(fractions.items()))
    ablation = {"run": f"cls_{init}", "task": "cls", "init": init, "arch": "linear", "fractions": fractions}
    if unit is not None:  # files written before the unit was recorded have none: patients
        ablation["unit"] = unit
    return ablation


ABLATIONS = {"cls_barlow": (_fraction_ablation("barlow", [0.6, 0.7, 0.8]), "a.json"),
             "cls_scratch": (_fraction_ablation("scratch_resnet18", [0.5, 0.6, 0.75]), "b.json")}
METHODS = {"barlow": "barlow_twins", "scratch_resnet18": "scratch"}


def test_label_fraction_table_has_one_column_per_fraction_and_the_seed_numbers():
    table = label_fraction_table(ABLATIONS, METHODS, "cls", "accuracy")
    assert list(table.text.columns)[-4:-1] == ["10%", "50%", "100%"]
    first = table.text.iloc[0]
    assert first["10%"] == "0.600 [0.500, 0.700]" and first["training patients"] == "1, 5, 10"
    assert first["training images"] == "8, 40, 80"
    assert table.title == "Label-fraction ablation: test accuracy by share of training patients"
    assert "86.5" in first["seed's number (other data)"]
    assert "77.0" in table.text.iloc[1]["seed's number (other data)"]
    assert table.numbers.loc[1, "100pct"] == pytest.approx(0.75)


def test_label_fraction_table_refuses_ablations_with_other_fractions():
    other = _fraction_ablation("x", [0.1, 0.2, 0.3])
    other["fractions"].pop("50pct")
    with pytest.raises(ValueError, match="differ"):
        label_fraction_table({**ABLATIONS, "cls_x": (other, "c.json")}, METHODS, "cls", "auroc")


IMAGE_ABLATIONS = {"cls_barlow": (_fraction_ablation("barlow", [0.6, 0.7, 0.8], unit="images"), "a.json"),
                   "cls_scratch": (_fraction_ablation("scratch_resnet18", [0.5, 0.6, 0.75], unit="images"), "b.json")}


def test_label_fraction_table_names_the_unit_of_the_shares():
    table = label_fraction_table(IMAGE_ABLATIONS, METHODS, "cls", "auroc")
    assert table.title == "Label-fraction ablation: test AUROC by share of training images"
    assert table.text.iloc[0]["training images"] == "8, 40, 80"
    explicit = {run: (_fraction_ablation(ablation["init"], [0.6, 0.7, 0.8], unit="patients"), source)
                for run, (ablation, source) in ABLATIONS.items()}
    assert label_fraction_table(explicit, METHODS, "cls", "auroc").title.endswith("share of training patients")
    mixed = {"cls_barlow": IMAGE_ABLATIONS["cls_barlow"], "cls_scratch": ABLATIONS["cls_scratch"]}
    with pytest.raises(ValueError, match="different units"):
        label_fraction_table(mixed, METHODS, "cls", "auroc")


@pytest.mark.parametrize("ablations, unit", [(ABLATIONS, "training patients"), (IMAGE_ABLATIONS, "training images")])
def test_label_fraction_figure_names_the_unit(tmp_path, monkeypatch, ablations, unit):
    import chestssl.report.ablations as report_ablations

    drawn = []
    save = report_ablations.save_figure
    monkeypatch.setattr(report_ablations, "save_figure", lambda figure, path: drawn.append(figure) or save(figure, path))
    path = label_fraction_figure(tmp_path / "f.png", {run: ablation for run, (ablation, _) in ablations.items()}, "cls")
    assert path.stat().st_size > 1000
    (figure,) = drawn
    assert [ax.get_xlabel() for ax in figure.axes] == [f"share of {unit} (%)"] * 2
    assert f"share of {unit}" in figure._suptitle.get_text()


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
    assert text.loc["barlow", "10% of training patients: AUROC"].startswith("0.650")
    assert any("one class" in note for note in table.footnotes)


def test_downstream_by_method_without_runs_is_an_empty_table():
    """`runs: {}` with empty ablation lists used to crash the report with a KeyError."""
    entries = {"barlow": {"method": "barlow_twins", "backbone": {"name": "resnet18"}}}
    table = downstream_by_method_table(entries, {}, {}, {})
    assert table.text.empty


def _cost(parameters, steps, seconds, memory):
    return {"parameters": parameters, "trainable_parameters": parameters, "steps": steps, "epochs": 1,
            "train_seconds": seconds, "peak_memory_gb": memory, "memory_kind": "process_max_rss", "device": "cpu",
            "processes": 1}


def test_label_fraction_rows_show_every_training_of_their_run_together():
    """A row spans the run's fits (one per distinct share): steps and time summed, the largest memory."""
    costs = {"label_fraction@cls_barlow": {"fits": {"10pct": _cost(1200, 10, 30.0, 0.5),
                                                    "50pct": _cost(1200, 40, 50.0, 0.75),
                                                    "100pct": _cost(1200, 80, 100.0, 1.25)}},
             "label_fraction@cls_scratch": None}
    table = label_fraction_table(ABLATIONS, METHODS, "cls", "accuracy", costs)
    numbers = table.numbers.set_index("run")
    assert numbers.loc["cls_barlow", ["parameters", "steps", "train_seconds", "peak_memory_gb"]].tolist() == [
        1200, 130, 180.0, 1.25]
    assert numbers.loc["cls_scratch", ["parameters", "steps"]].isna().all()
    note = next(i for i, text in enumerate(table.footnotes, start=1) if "label_fraction@<run>" in text)
    header = f"Parameters[^label-fraction-cls-accuracy-{note}]"
    assert list(table.text.columns)[-4:] == [header, "Steps", "Training time", "Peak memory (GB)"]
    barlow, scratch = table.text.iloc[0], table.text.iloc[1]
    assert [barlow[header], barlow["Steps"], barlow["Training time"], barlow["Peak memory (GB)"]] == [
        "1.2k", "130", "3.0 min", "1.25"]
    assert [scratch[header], scratch["Steps"]] == ["n/a", "n/a"]
    assert f"[^label-fraction-cls-accuracy-{note}]: Cost columns: every training" in table.markdown()
    assert "steps" not in label_fraction_table(ABLATIONS, METHODS, "cls", "accuracy").numbers  # no costs given


def _frozen_ablation():
    settings = {}
    for n, label in ((0, "head"), (1, "head + layer4"), (2, "head + layer4, layer3")):
        settings[f"unfrozen_{n}"] = {"unfrozen_stages": n, "trained": label.split(", "), "label": label,
                                     "trainable_parameters": 10 + n, "accuracy": _interval(0.6), "auroc": _interval(0.7),
                                     "n_images": 30, "n_patients": 4}
    return {"run": "r", "init": "barlow", "settings": dict(sorted(settings.items(), reverse=True))}


def test_frozen_parts_rows_show_the_cost_of_their_own_training():
    fits = {"unfrozen_0": _cost(5000, 20, 12.0, 0.3), "unfrozen_2": _cost(5000, 20, 75.0, None)}
    table = frozen_parts_table({"r": (_frozen_ablation(), "f.json")}, METHODS, {"barlow": "resnet18"},
                               {"frozen_parts@r": {"fits": fits}})
    assert list(table.text["trained"]) == ["head", "head + layer4", "head + layer4, layer3"]
    assert table.numbers["train_seconds"].tolist()[::2] == [12.0, 75.0]
    assert table.numbers["train_seconds"].isna().tolist() == [False, True, False]  # unfrozen_1: no record
    header = next(column for column in table.text.columns if column.startswith("Parameters[^frozen-parts-"))
    assert table.text[header].tolist() == ["5k", "n/a", "5k"]
    assert table.text["Training time"].tolist() == ["12 s", "n/a", "1.2 min"]
    assert table.text["Peak memory (GB)"].tolist() == ["0.30", "n/a", "n/a"]
    assert any("the row's own training, one of the fits of `frozen_parts@<run>`" in note for note in table.footnotes)
    missing = frozen_parts_table({"r": (_frozen_ablation(), "f.json")}, METHODS, {"barlow": "resnet18"},
                                 {"frozen_parts@r": None})
    assert set(missing.text["Steps"]) == {"n/a"}


def _radiograph(ablation, mode):
    """A CT ablation's file as the radiograph stages write it: mean AUROC (and accuracy for multiclass)."""
    ablation = {**ablation, "task": f"radiograph_{mode}", "unit": "images"}
    entries = ablation["fractions"] if "fractions" in ablation else ablation["settings"]
    for entry in entries.values():
        entry["mean_auroc"] = entry.pop("auroc")
        if mode == "multilabel":
            entry.pop("accuracy")
    return ablation


def test_radiograph_ablations_show_the_metrics_of_their_task_and_name_their_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ablations = {"cxr_barlow": (_radiograph(_fraction_ablation("barlow", [0.6, 0.7, 0.8]), "multilabel"), "a.json")}
    costs = {"label_fraction_radiographs@cxr_barlow": {"fits": {"10pct": _cost(1200, 10, 30.0, 0.5)}}}
    table = label_fraction_table(ablations, METHODS, "radiograph_multilabel", "mean_auroc", costs,
                                 stage="label_fraction_radiographs", data="radiographs rendered from CT")
    assert table.name == "label_fraction_radiographs_radiograph_multilabel_mean_auroc"
    assert table.title == ("Label-fraction ablation: test mean AUROC by share of training images "
                           "(radiographs rendered from CT)")
    assert table.text.iloc[0]["10%"] == "0.650 [0.550, 0.750]" and "86.5" in table.text.iloc[0][
        "seed's number (other data)"]
    assert table.numbers.loc[0, "steps"] == 10
    assert any("`label_fraction_radiographs@<run>`" in note for note in table.footnotes)
    path = label_fraction_figure(tmp_path / "f.png", {run: a for run, (a, _) in ablations.items()},
                                 "radiograph_multilabel")
    assert path.is_file()

    frozen = {"cxr_barlow": (_radiograph(_frozen_ablation(), "multiclass"), "f.json")}
    table = frozen_parts_table(frozen, METHODS, {"barlow": "resnet18"}, stage="frozen_parts_radiographs",
                               data="COVID-19 radiographs")
    assert table.name == "frozen_parts_radiographs" and table.title.endswith("(COVID-19 radiographs)")
    assert ["Accuracy", "Mean AUROC"] == [c for c in table.text.columns if c in ("Accuracy", "Mean AUROC")]
    assert "80.5" in table.text.iloc[0]["seed's number (other data)"]
