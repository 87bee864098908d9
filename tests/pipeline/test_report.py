"""Stage report: the tables, figures and README built from the other stages' outputs.

The inputs are made by the other CT stages' functions (pretrain, evaluate_pretrain,
finetune, evaluate, radiographs) on the synthetic processed folder, a few steps each, in a
working folder laid out as :mod:`chestssl.paths` says.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from chestssl import paths
from chestssl.pipeline.evaluate import evaluate
from chestssl.pipeline.evaluate_pretrain import evaluate_pretrain
from chestssl.pipeline.finetune import finetune
from chestssl.pipeline.pretrain import pretrain
from chestssl.pipeline.radiographs import radiographs
from chestssl.pipeline.report import report
from tests.pipeline.test_pretrain import stage_params

RUNS = ("seg_unetpp_scratch", "seg_unetpp_cnn_attention", "cls_linear_scratch_resnet18")


def test_the_report_holds_every_entry_and_run(synthetic_processed, tmp_path, monkeypatch):
    params = stage_params(runs=RUNS)
    monkeypatch.chdir(tmp_path)
    radiographs(params, synthetic_processed, paths.RADIOGRAPHS_DIR, progress=False)
    for name in params["methods"]:
        pretrain(params, name, synthetic_processed)
        evaluate_pretrain(params, name, synthetic_processed)
    for run in RUNS:
        finetune(params, run, synthetic_processed)
        evaluate(params, run, synthetic_processed)
    # The one `pretrain_radiographs.methods` entry (the alignment block must name one): the
    # scratch ResNet-18, untrained, with its CT probe standing in for the radiograph probe.
    probed = paths.radiograph_report_dir("scratch_resnet18")
    (probed / "live" / "plots" / "metrics").mkdir(parents=True)
    shutil.copy(paths.evaluate_pretrain_dir("scratch_resnet18") / "metrics.json", probed / "metrics.json")

    written = report(params, paths.REPORTS_DIR)

    readme = (paths.REPORTS_DIR / "README.md").read_text()
    assert paths.REPORTS_DIR / "README.md" in written
    for heading in ("Linear probe of every pretrained encoder", "Downstream results by pretraining method",
                    "Does pretraining help? (paired, pretrained - scratch)", "Radiographs rendered from CT"):
        assert heading in readme, heading
    # Every figure the README links exists and is a PNG.
    figures = [Path(link) for link in _links(readme) if link.endswith(".png")]
    for figure in figures:
        with Image.open(paths.REPORTS_DIR / figure) as image:
            assert image.format == "PNG"
    assert {"reconstructions.png", "segmentation_comparison.png", "classifier_gradcam.png",
            "radiographs.png"} <= {figure.name for figure in figures}
    # The tables hold the evaluated numbers.
    tables = paths.REPORTS_DIR / "tables"
    segmentation = pd.read_csv(tables / "segmentation.csv").set_index("run")
    for run in RUNS[:2]:
        dice = json.loads((paths.evaluate_dir(run) / "metrics.json").read_text())["dice_global"]["value"]
        assert segmentation.loc[run, "dice_global"] == pytest.approx(dice)
    # The two UNet++ runs differ only in their init: a scratch vs pretrained pair.
    paired = pd.read_csv(tables / "pretrained_vs_scratch.csv")
    assert set(zip(paired["scratch_run"], paired["pretrained_run"])) == {RUNS[:2]}
    assert set(pd.read_csv(tables / "linear_probe.csv")["entry"]) == set(params["methods"])
    # A probe row's cost is its encoder's training (pretrain@); the radiograph probe's encoder has no cost file.
    probe = pd.read_csv(tables / "linear_probe.csv").set_index("entry")
    for name in params["methods"]:
        cost = json.loads((paths.pretrain_report_dir(name) / "cost.json").read_text())
        assert probe.loc[name, "steps"] == cost["steps"] and probe.loc[name, "parameters"] == cost["parameters"]
    assert "training the row's encoder (`pretrain@<entry>` or `pretrain_multihead@<entry>`" in (
        tables / "linear_probe.md").read_text()
    assert pd.read_csv(tables / "radiograph_linear_probe.csv")["steps"].isna().all()
    assert "Label-fraction ablation: `label_fraction.runs` is empty." in readme
    # The seed tables' rows and the figures' models are the `report` params' rows, in order.
    seed_rows = pd.read_csv(tables / "seed000_pretrained_segmentation.csv")
    assert seed_rows["entry"].tolist()[:2] == list(RUNS[:2]) and seed_rows["entry"].isna().tolist()[2:] == [True, True]
    assert "Segmentation: UNet++ scratch vs UNet++ CNN-attention AE" in readme

    # A row naming an entry the params lack (params that skipped validation) is shown missing.
    absent = copy.deepcopy(params)
    absent["report"]["seed000_reconstruction"][0]["method"] = "ae_swin"
    absent["report"]["feature_maps"] = [{"label": "SwinUNETR (soft Dice)", "run": "seg_swinunetr_swin_dice"}]
    report(absent, tmp_path / "absent")
    readme = (tmp_path / "absent" / "README.md").read_text()
    assert "| swin_transformer | `ae_swin`[^seed000-reconstruction-3] | not run |" in readme
    assert "`ae_swin` has no metrics" in readme
    assert "Feature-map figure: needs `seg_swinunetr_swin_dice` in params.yaml." in readme


def test_every_training_stage_named_in_the_params_has_its_cost_file_read(tmp_path, monkeypatch):
    """stage_costs: ``<stage>@<name>`` (and ``align_radiographs``) -> its cost.json, None where absent."""
    from chestssl.io import write_json
    from chestssl.report.pipeline import stage_costs

    monkeypatch.chdir(tmp_path)
    params = stage_params(runs=RUNS)
    params["label_fraction"]["runs"] = [RUNS[2]]
    params["frozen_parts"]["runs"] = [RUNS[2]]
    params["cross_modal"]["methods"] = ["dae"]
    params["pretrain_radiographs"].update(methods=["scratch_resnet18"], study_methods=["mae"])
    fits = {"fits": {"100pct": {"steps": 4}}}
    write_json(paths.ablation_report_dir("label_fraction", RUNS[2]) / "cost.json", fits)
    write_json(paths.radiograph_study_report_dir("mae") / "cost.json", {"steps": 3})
    write_json(paths.cross_modal_report_dir("dae") / "cost.json", {"steps": 2})
    write_json(paths.ALIGNMENT_REPORT_DIR / "cost.json", {"steps": 1})
    costs = stage_costs(params)
    assert costs[f"label_fraction@{RUNS[2]}"] == fits and costs[f"frozen_parts@{RUNS[2]}"] is None
    assert costs["pretrain_radiograph_studies@mae"] == {"steps": 3} and costs["pretrain_cross_modal@dae"] == {"steps": 2}
    assert costs["align_radiographs"] == {"steps": 1} and costs["pretrain_radiographs@scratch_resnet18"] is None
    assert {f"pretrain@{name}" for name in params["methods"]} | {f"finetune@{run}" for run in RUNS} <= set(costs)


def test_a_missing_input_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="evaluate_pretrain/scratch_cnn_attention/metrics.json"):
        report(stage_params(), paths.REPORTS_DIR)


def _links(markdown: str) -> list[str]:
    import re

    return re.findall(r"\]\(([^)]+)\)", markdown)
