"""Stage pretrain_radiographs: a `methods` entry trained on the radiographs rendered from CT."""

from __future__ import annotations

import json

import pytest
import torch

from chestssl.data.drr import render_radiographs
from chestssl.model_files import load_model_file
from chestssl.params import ParamsError, validate
from chestssl.pipeline.pretrain_radiographs import pretrain_radiographs, radiograph_entry
from tests.pipeline.conftest import REPO_ROOT
from tests.pipeline.cost_checks import COST_KEYS, check_cost_record
from tests.tiny_configs import drop_radiograph_runs_of_absent_encoders, shrink_params
from tests.shipped_params import read_shipped_params

SIZE = 64


def tiny_params() -> dict:
    """params.yaml shrunk, its radiograph stages on Barlow Twins and a scratch ResNet-18, two short epochs."""
    raw = read_shipped_params()
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
    render_radiographs(synthetic_processed, out, {"side": SIZE, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]})
    return out


def test_the_entry_keeps_its_method_and_takes_the_radiograph_training_length(params):
    entry = radiograph_entry(params, "barlow_twins")
    assert entry["method"] == "barlow_twins" and entry["backbone"] == params["methods"]["barlow_twins"]["backbone"]
    assert entry["train"]["epochs"] == 2 and entry["train"]["batch_size"] == 4
    assert entry["train"]["lr"] == params["methods"]["barlow_twins"]["train"]["lr"]
    with pytest.raises(ParamsError, match="pretrain_radiographs.methods: 'mae' is not listed"):
        radiograph_entry(params, "mae")


def test_the_default_params_give_the_radiograph_entries_they_gave_before_per_entry_settings():
    """The quick profile's entries on radiographs: the entry, its train block updated by
    pretrain_radiographs.train, nothing else; so the default run trains what it trained."""
    from chestssl.methods import load_checked_params

    params = load_checked_params(REPO_ROOT / "params.yaml")
    block = params["pretrain_radiographs"]
    assert block["per_entry"] == {}
    for listed_in in ("methods", "study_methods"):
        for name in block[listed_in]:
            before = dict(params["methods"][name])
            if "train" in before:
                before["train"] = {**before["train"], **block["train"]}
            assert json.dumps(radiograph_entry(params, name, listed_in)) == json.dumps(before), name


def test_an_entry_takes_its_own_radiograph_settings_after_the_shared_ones(params):
    params["pretrain_radiographs"]["per_entry"] = {"barlow_twins": {"train": {"epochs": 3, "lr": 0.01},
                                                                    "backbone": {"block_inplanes": [4, 4, 8, 8]}}}
    entry = radiograph_entry(params, "barlow_twins")
    assert (entry["train"]["epochs"], entry["train"]["batch_size"], entry["train"]["lr"]) == (3, 4, 0.01)
    assert entry["backbone"]["block_inplanes"] == [4, 4, 8, 8]
    assert params["methods"]["barlow_twins"]["backbone"]["block_inplanes"] != [4, 4, 8, 8]  # the CT's is left
    assert radiograph_entry(params, "scratch_resnet18")["backbone"] == params["methods"]["scratch_resnet18"]["backbone"]


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
    check_cost_record(json.loads((out / "report" / "cost.json").read_text()), steps=metrics["steps"])


def test_a_scratch_entry_trains_nothing_and_is_still_probed(params, radiographs, tmp_path):
    out = tmp_path / "out"
    metrics = pretrain_radiographs(params, "scratch_resnet18", radiographs, out / "model", out / "report",
                                   out / "ckpt.pt")
    assert metrics["trained"] is False and "nodule" in metrics["probe"]
    assert (out / "report" / "live" / "plots" / "metrics").is_dir()
    cost = json.loads((out / "report" / "cost.json").read_text())  # what trains nothing costs nothing
    assert set(cost) == COST_KEYS and cost["steps"] == 0 and cost["train_seconds"] == 0.0 and cost["parameters"] > 0


def test_an_entry_not_listed_is_refused(params, radiographs, tmp_path):
    with pytest.raises(ParamsError, match="pretrain_radiographs.methods: 'mae' is not listed"):
        pretrain_radiographs(params, "mae", radiographs, tmp_path / "model", tmp_path / "report", tmp_path / "ckpt.pt")


VIT_SIZE = 32  # radiographs of 32 px while the CT slices (and the CT's ViT) are 64 px


def vit_params() -> dict:
    """tiny_params with `mae` also on radiographs and studies, 32 px radiographs in patches of 8."""
    raw = read_shipped_params()
    shrink_params(raw)
    raw["radiographs"]["side"] = VIT_SIZE
    raw["pretrain_radiographs"].update(methods=["mae"], study_methods=["mae"], train={"epochs": 1, "batch_size": 4},
                                       per_entry={"mae": {"backbone": {"patch_size": 8}}})
    raw["alignment"].update(feature_method="mae", steps=2, batch_size=2, max_shift=0.05, num_examples=1)
    raw["evaluate"]["bootstrap_samples"] = 20
    drop_radiograph_runs_of_absent_encoders(raw)
    from chestssl.methods import method_configs

    return validate(raw, method_configs=method_configs())


def test_a_vit_trained_on_radiographs_of_another_size_than_the_slices_serves_every_consumer(
        synthetic_processed, tmp_path):
    from chestssl.data.radiograph_datasets import RadiographDataset, RadiographStudyDataset
    from chestssl.eval.radiograph_probe import extract_image_features, extract_study_features
    from chestssl.models.backbones import load_encoder
    from chestssl.models.losses import EncoderFeatures
    from chestssl.pipeline.align_radiographs import align_radiographs, load_feature_encoder
    from chestssl.pipeline.pretrain_radiograph_studies import pretrain_radiograph_studies

    params = vit_params()
    assert params["slices"]["side"] == params["methods"]["mae"]["backbone"]["img_size"] == 64
    radiographs = tmp_path / "radiographs"
    render_radiographs(synthetic_processed, radiographs,
                       {"side": VIT_SIZE, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]})
    out = tmp_path / "image"
    metrics = pretrain_radiographs(params, "mae", radiographs, out / "model", out / "report", out / "ckpt.pt")
    assert metrics["trained"] and metrics["probe"]["nodule"]["n_train"] == 4

    # encoder.pt records the radiographs' ViT, so its readers rebuild it for 32 px radiographs.
    payload = load_model_file(out / "model" / "encoder.pt", "pretrain_radiographs@mae")
    assert (payload["backbone"]["img_size"], payload["backbone"]["patch_size"]) == (VIT_SIZE, 8)
    encoder = load_encoder(payload)
    features = extract_image_features(encoder, RadiographDataset(radiographs, "test", ("frontal", "lateral")))
    assert features.features.shape == (4, encoder.representation_dim)
    feature_encoder = load_feature_encoder(out / "model" / "encoder.pt", "mae", (VIT_SIZE, VIT_SIZE))
    maps = EncoderFeatures(feature_encoder)(torch.zeros(2, 1, VIT_SIZE, VIT_SIZE))
    assert all(m.shape[0] == 2 for m in (maps if isinstance(maps, list) else [maps]))
    with pytest.raises(ValueError, match="a ViT built for 32 x 32 px radiographs, but the radiographs are 64 x 64"):
        load_feature_encoder(out / "model" / "encoder.pt", "mae", (64, 64))
    aligned = align_radiographs(params, radiographs, out / "model" / "encoder.pt", tmp_path / "alignment" / "model",
                                tmp_path / "alignment" / "report", tmp_path / "alignment" / "ckpt.pt")
    assert aligned["feature_method"] == "mae" and aligned["training"]["steps"] == 2

    # Study level: the same backbone, one feature per study.
    out = tmp_path / "study"
    metrics = pretrain_radiograph_studies(params, "mae", radiographs, out / "model", out / "report", out / "ckpt.pt")
    assert metrics["trained"] and metrics["level"] == "study"
    encoder = load_encoder(load_model_file(out / "model" / "encoder.pt", "pretrain_radiograph_studies@mae"))
    assert encoder.img_size == VIT_SIZE
    studies = extract_study_features(encoder, RadiographStudyDataset(radiographs, "test", ("frontal", "lateral")))
    assert studies.features.shape == (2, encoder.representation_dim)
