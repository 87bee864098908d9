"""Stage pretrain_radiograph_studies: `mae` trained on whole radiograph studies (seed 004's bottleneck CLS)."""

from __future__ import annotations

import json

import pytest

from chestssl.data.drr import render_radiographs
from chestssl.model_files import load_model_file
from chestssl.params import ParamsError
from chestssl.pipeline.pretrain_radiograph_studies import pretrain_radiograph_studies
from chestssl.pipeline.pretrain_radiographs import radiograph_entry
from tests.pipeline.cost_checks import check_cost_record
from tests.pipeline.test_pretrain_radiographs import tiny_params


@pytest.fixture
def params():
    params = tiny_params()
    return {**params, "pretrain_radiographs": {**params["pretrain_radiographs"], "study_methods": ["mae"]}}


@pytest.fixture
def radiographs(synthetic_processed, tmp_path):
    out = tmp_path / "radiographs"
    render_radiographs(synthetic_processed, out, {"side": 64, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]})
    return out


def test_study_level_training_shares_the_cls_and_probes_one_feature_per_study(params, radiographs, tmp_path):
    out = tmp_path / "out"
    metrics = pretrain_radiograph_studies(params, "mae", radiographs, out / "model", out / "report", out / "ckpt.pt")
    # 2 training studies (2 views each), batch 4 studies: one step per epoch.
    assert metrics["trained"] and metrics["level"] == "study" and metrics["steps"] == 2
    assert metrics["probe"]["nodule"]["n_train"] == 2
    curve = out / "report" / "live" / "plots" / "metrics" / "probe" / "mean_auroc.tsv"
    assert curve.exists() and len(curve.read_text().splitlines()) == 3
    payload = load_model_file(out / "model" / "encoder.pt", "pretrain_radiographs@test")
    assert payload["backbone"]["name"] == "vit"
    assert not (out / "ckpt.pt").exists()
    check_cost_record(json.loads((out / "report" / "cost.json").read_text()), steps=2)


def test_only_listed_masked_patch_entries_train_on_studies(params, radiographs, tmp_path):
    with pytest.raises(ParamsError, match="pretrain_radiographs.study_methods: 'diffmae' is not listed"):
        radiograph_entry(params, "diffmae", listed_in="study_methods")
    listed = {**params, "pretrain_radiographs": {**params["pretrain_radiographs"], "study_methods": ["barlow_twins"]}}
    with pytest.raises(ValueError, match="has no study-level form .*those that have one: 'mae', 'diffmae'"):
        pretrain_radiograph_studies(listed, "barlow_twins", radiographs, tmp_path / "model", tmp_path / "report",
                                    tmp_path / "ckpt.pt")
