"""Stage pretrain_radiographs: a `methods` entry trained on the radiographs rendered from CT."""

from __future__ import annotations

import json

import pytest

from chestssl.data.drr import render_radiographs
from chestssl.model_files import load_model_file
from chestssl.params import ParamsError, read_raw_params, validate
from chestssl.pipeline.pretrain_radiographs import pretrain_radiographs, radiograph_entry
from tests.pipeline.conftest import REPO_ROOT
from tests.tiny_configs import shrink_params

SIZE = 64


def tiny_params() -> dict:
    """params.yaml shrunk, its radiograph stages on Barlow Twins and a scratch ResNet-18, two short epochs."""
    raw = read_raw_params(REPO_ROOT / "params.yaml")[0]
    shrink_params(raw)
    raw["pretrain_radiographs"].update(methods=["barlow_twins", "scratch_resnet18"], train={"epochs": 2, "batch_size": 4})
    raw["evaluate"]["bootstrap_samples"] = 20
    return validate(raw)


@pytest.fixture
def params():
    return tiny_params()


@pytest.fixture
def radiographs(synthetic_processed, tmp_path):
    out = tmp_path / "radiographs"
    render_radiographs(synthetic_processed, out, {"size": SIZE, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]})
    return out


def test_the_entry_keeps_its_method_and_takes_the_radiograph_training_length(params):
    entry = radiograph_entry(params, "barlow_twins")
    assert entry["method"] == "barlow_twins" and entry["backbone"] == params["methods"]["barlow_twins"]["backbone"]
    assert entry["train"]["epochs"] == 2 and entry["train"]["batch_size"] == 4
    assert entry["train"]["lr"] == params["methods"]["barlow_twins"]["train"]["lr"]
    with pytest.raises(ParamsError, match="pretrain_radiographs.methods: 'mae' is not listed"):
        radiograph_entry(params, "mae")


def test_training_logs_the_probe_and_scores_it_on_the_test_views(params, radiographs, tmp_path):
    out = tmp_path / "out"
    metrics = pretrain_radiographs(params, "barlow_twins", radiographs, out / "model", out / "report", out / "ckpt.pt")
    # 2 training studies x 2 views, batch 4: one step per epoch.
    assert metrics["trained"] and metrics["epochs"] == 2 and metrics["steps"] == 2
    assert metrics["views"] == ["frontal", "lateral"]
    nodule = metrics["probe"]["nodule"]
    assert nodule["n_train"] == 4 and 0.0 <= nodule["auroc"]["value"] <= 1.0
    assert json.loads((out / "report" / "metrics.json").read_text())["probe"]["nodule"]["n_train"] == 4
    curve = out / "report" / "live" / "plots" / "metrics" / "probe" / "mean_auroc.tsv"
    assert curve.exists() and len(curve.read_text().splitlines()) == 3  # header + one point per epoch
    payload = load_model_file(out / "model" / "encoder.pt", "pretrain_radiographs@test")
    assert payload["backbone"]["name"] == "resnet18"
    assert not (out / "ckpt.pt").exists()


def test_a_scratch_entry_trains_nothing_and_is_still_probed(params, radiographs, tmp_path):
    out = tmp_path / "out"
    metrics = pretrain_radiographs(params, "scratch_resnet18", radiographs, out / "model", out / "report",
                                   out / "ckpt.pt")
    assert metrics["trained"] is False and "nodule" in metrics["probe"]
    assert (out / "report" / "live" / "plots" / "metrics").is_dir()


def test_an_entry_not_listed_is_refused(params, radiographs, tmp_path):
    with pytest.raises(ParamsError, match="pretrain_radiographs.methods: 'mae' is not listed"):
        pretrain_radiographs(params, "mae", radiographs, tmp_path / "model", tmp_path / "report", tmp_path / "ckpt.pt")
