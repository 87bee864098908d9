"""Stage pretrain_cross_modal: the DAE's cross-modal contrastive term on CT slices mixed with radiographs (seed 003)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils.data import DataLoader

from chestssl.data.cross_modal import CrossModalDataset
from chestssl.data.drr import render_radiographs
from chestssl.methods import build_method
from chestssl.model_files import load_model_file
from chestssl.models.supervised_contrastive import CrossModalContrastiveLoss
from chestssl.params import ParamsError, validate
from chestssl.pipeline.pretrain_cross_modal import cross_modal_entry, pretrain_cross_modal
from tests.data.test_cross_modal import ConstantImages
from tests.pipeline.cost_checks import check_cost_record
from tests.tiny_configs import shrink_params
from tests.shipped_params import read_shipped_params


@pytest.fixture
def raw_params():
    raw = read_shipped_params()
    shrink_params(raw)
    raw["methods"]["dae_all"].setdefault("train", {}).update(epochs=2, max_steps=0, batch_size=8)
    raw["evaluate"]["bootstrap_samples"] = 20
    return raw


@pytest.fixture
def radiographs(synthetic_processed, tmp_path):
    out = tmp_path / "radiographs"
    render_radiographs(synthetic_processed, out, {"side": 64, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]})
    return out


def test_a_collated_batch_turns_the_dae_contrastive_term_on(raw_params):
    data = CrossModalDataset(ConstantImages(6, 64), ConstantImages(2, 64), 0.25)
    batch = next(iter(DataLoader(data, batch_size=len(data))))
    assert batch["modality"] == ["ct"] * 6 + ["radiograph"] * 2
    assert CrossModalContrastiveLoss.informative(batch["modality"])
    method = build_method("dae_all", validate(raw_params)["methods"]["dae_all"], seed=0)
    batch["image"] = batch["image"] / 10.0
    parts = method.training_step(batch)
    assert float(parts["mm_con_active"]) == 1.0 and float(parts["mm_con_loss"]) > 0.0
    assert int(method.mm_con_active_steps) == 1
    ct_only = method.training_step({"image": batch["image"][:6]})
    assert float(ct_only["mm_con_active"]) == 0.0 and int(method.mm_con_active_steps) == 1


def test_the_stage_trains_with_the_term_active_and_probes_both_encoders_on_both_modalities(
        raw_params, synthetic_processed, radiographs, tmp_path):
    params = validate(raw_params)
    cfg = cross_modal_entry(params, "dae_all")
    # A CT-only model with every weight 0: constant features, so its probe cannot rank (AUROC 0.5).
    zeroed = {key: torch.zeros_like(value) for key, value in build_method("dae_all", cfg, seed=0).state_dict().items()}
    torch.save({"name": "dae_all", "config": cfg, "state_dict": zeroed}, tmp_path / "method.pt")
    out = tmp_path / "out"
    metrics = pretrain_cross_modal(params, "dae_all", synthetic_processed, radiographs, tmp_path / "method.pt",
                                   out / "model", out / "report", out / "ckpt.pt")
    # 2 training patients x 12 slices, a quarter of the items radiographs (8 = round(24 / 3)) from 4 views.
    assert metrics["items"]["train"] == {"ct": 24, "radiograph": 8, "radiographs": 4}
    assert metrics["trained"] and metrics["epochs"] == 2 and metrics["steps"] == 8
    assert 0 < metrics["mm_con_active_steps"] <= metrics["steps"]
    assert metrics["labels"] == ["nodule", "malignant"] and metrics["views"] == ["frontal", "lateral"]
    probes = metrics["probe"]
    for encoder in ("cross_modal", "ct_only"):
        ct, radiograph = probes[encoder]["ct"], probes[encoder]["radiograph"]
        assert ct["nodule"]["n_train"] > radiograph["nodule"]["n_train"] == 4
        assert 0.0 <= radiograph["nodule"]["auroc"]["value"] <= 1.0
    # The CT-only encoder is the saved one; the trained one separates the synthetic nodules.
    assert probes["ct_only"]["ct"]["nodule"]["auroc"]["value"] == 0.5
    assert probes["cross_modal"]["ct"]["nodule"]["auroc"]["value"] > 0.5
    assert json.loads((out / "report" / "metrics.json").read_text())["mm_con_active_steps"] == metrics["mm_con_active_steps"]
    assert (out / "report" / "live" / "plots" / "metrics" / "probe" / "mean_auroc.tsv").exists()
    assert load_model_file(out / "model" / "encoder.pt", "pretrain_cross_modal@dae_all")["backbone"]["name"] == "swin"
    assert not (out / "ckpt.pt").exists()
    check_cost_record(json.loads((out / "report" / "cost.json").read_text()), steps=8)


def test_an_entry_not_listed_is_refused(raw_params):
    params = validate(raw_params)
    with pytest.raises(ParamsError, match="cross_modal.methods: 'dae_local' is not listed"):
        cross_modal_entry(params, "dae_local")


@pytest.mark.parametrize("change, message", [
    (lambda p: p["cross_modal"].update(methods=["mae"]), "'mae' is a 'mae' entry; list `dae` entries"),
    (lambda p: p["cross_modal"].update(methods=["nope"]), "'nope' is not an entry under `methods`"),
    (lambda p: p["cross_modal"].update(methods=["dae_all", "dae_all"]), "'dae_all' is listed twice"),
    (lambda p: p["cross_modal"].update(views=[]), "cross_modal.views: empty"),
    (lambda p: p["cross_modal"].update(radiograph_fraction=1.0), "expected a share below 1"),
    (lambda p: p["backbones"][p["methods"]["dae_all"]["backbone"]].update(spatial_dims=3),
     "has a 3D backbone; radiographs are 2D"),
    (lambda p: p["methods"]["dae_all"].update(mm_con=0.0), "has mm_con 0, so the contrastive term would stay off"),
])
def test_params_name_what_is_wrong_with_the_cross_modal_block(raw_params, change, message):
    raw = copy.deepcopy(raw_params)
    change(raw)
    with pytest.raises(ParamsError, match=message):
        validate(raw)
