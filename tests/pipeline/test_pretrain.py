"""Stage pretrain@<method>: a pretext method trained on the training slices, its encoder exported.

:func:`stage_params` (the quick profile shrunk to a few entries and steps) is shared by the
tests of the other CT stages.
"""

from __future__ import annotations

import json

import pytest

from chestssl.data.views import labelled_view, pretrain_view
from chestssl.model_files import load_model_file
from chestssl.params import ParamsError, validate
from chestssl.pipeline.pretrain import pretrain
from tests.tiny_configs import drop_radiograph_runs_of_absent_encoders, shrink_params
from tests.shipped_params import read_shipped_params


def stage_params(methods=("scratch_cnn_attention", "ae_cnn_attention"), runs=(), multihead=(),
                 slice_size: int = 32) -> dict:
    """The params files shrunk to ``methods``, ``runs`` and ``multihead`` entries of a few
    steps each (and the ``latent_diffusion`` entries of those methods, FID on ``barlow_twins``
    if kept, else ``scratch_resnet18``), slices of ``slice_size``, 20 bootstrap resamples and 2 examples; the
    studies, cross-modal and radiograph lists emptied (but for one scratch ResNet-18, which
    the alignment block must name)."""
    raw = read_shipped_params()
    methods = [*methods, *(["scratch_resnet18"] if "scratch_resnet18" not in methods else [])]
    raw["methods"] = {name: raw["methods"][name] for name in methods}
    raw["multihead"] = {name: raw["multihead"][name] for name in multihead}
    raw["runs"] = {name: raw["runs"][name] for name in runs}
    raw["runs_3d"] = {name: entry for name, entry in raw["runs_3d"].items() if entry["init"] in methods}
    for entry in raw["runs_3d"].values():
        if entry.get("baseline") not in raw["runs_3d"]:
            entry["baseline"] = None
    raw["latent_diffusion"] = {name: entry for name, entry in raw["latent_diffusion"].items() if name in methods}
    if raw["fid"]["features"] not in methods:
        raw["fid"]["features"] = "scratch_resnet18"
    raw["label_fraction"]["runs"] = []
    raw["frozen_parts"]["runs"] = []
    raw["cross_modal"]["methods"] = []
    raw["pretrain_radiographs"].update(methods=["scratch_resnet18"], study_methods=[])
    raw["alignment"]["feature_method"] = "scratch_resnet18"
    drop_radiograph_runs_of_absent_encoders(raw)
    raw["slices"]["side"] = slice_size
    raw["evaluate"]["bootstrap_samples"] = 20
    raw["evaluate"]["num_examples"] = 2
    shrink_params(raw)
    return validate(raw)


@pytest.fixture
def params():
    return stage_params()


def _where(tmp_path) -> dict:
    return {"model_dir": tmp_path / "models", "report_dir": tmp_path / "reports",
            "checkpoint_path": tmp_path / "checkpoints" / "ckpt.pt"}


def test_training_writes_the_encoder_the_method_the_curves_and_the_metrics(params, synthetic_processed, tmp_path):
    where = _where(tmp_path)
    metrics = pretrain(params, "ae_cnn_attention", synthetic_processed, **where)
    # 24 training slices (2 patients x 12), batch 8, at most 3 steps.
    assert metrics["trained"] is True and metrics["epochs"] == 1 and metrics["steps"] == 3
    assert any(key.startswith("best_val_") for key in metrics)
    assert json.loads((where["report_dir"] / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    encoder = load_model_file(where["model_dir"] / "encoder.pt", "pretrain@test")
    assert encoder["backbone"]["name"] == "cnn_attention"
    method = load_model_file(where["model_dir"] / "method.pt", "pretrain@test", required=("state_dict",))
    assert method["name"] == "ae_cnn_attention" and method["config"] == params["methods"]["ae_cnn_attention"]
    curves = where["report_dir"] / "live" / "plots" / "metrics"
    assert (curves / "train" / "loss.tsv").is_file()
    # probe.every_epochs is 1: the linear probe of the encoder is logged once per epoch.
    assert len((curves / "probe" / "mean_auroc.tsv").read_text().splitlines()) == 2
    assert not where["checkpoint_path"].exists()  # removed once the fit is done
    cost = json.loads((where["report_dir"] / "cost.json").read_text())
    assert cost["steps"] == 3 and cost["train_seconds"] > 0 and cost["trainable_parameters"] > 0


def test_the_same_params_give_the_same_weights(params, synthetic_processed, tmp_path):
    first, second = _where(tmp_path / "a"), _where(tmp_path / "b")
    assert pretrain(params, "ae_cnn_attention", synthetic_processed, **first) == pretrain(
        params, "ae_cnn_attention", synthetic_processed, **second)
    assert (first["model_dir"] / "encoder.pt").read_bytes() == (second["model_dir"] / "encoder.pt").read_bytes()


def test_a_scratch_entry_trains_nothing_and_still_exports(params, synthetic_processed, tmp_path):
    where = _where(tmp_path)
    assert pretrain(params, "scratch_cnn_attention", synthetic_processed, **where) == {"trained": False}
    assert (where["model_dir"] / "encoder.pt").is_file() and (where["model_dir"] / "method.pt").is_file()
    assert (where["report_dir"] / "live" / "plots" / "metrics").is_dir()
    cost = json.loads((where["report_dir"] / "cost.json").read_text())
    assert cost["steps"] == 0 and cost["parameters"] > 0 and cost["peak_memory_gb"] is None


def test_an_unknown_entry_is_refused_before_any_output(params, synthetic_processed, tmp_path):
    where = _where(tmp_path)
    with pytest.raises(ParamsError, match="'nope' is not an entry under `methods` or `multihead`"):
        pretrain(params, "nope", synthetic_processed, **where)
    assert not any(path.exists() for path in where.values())


def test_the_views_are_slices_for_a_2d_backbone_and_crops_for_a_3d_one(params, synthetic_processed):
    entry = params["methods"]["ae_cnn_attention"]
    train = pretrain_view(params, entry, "train", synthetic_processed)
    assert len(train) == 24 and tuple(train[0]["image"].shape) == (1, 32, 32)
    labelled = labelled_view(params, entry, "test", synthetic_processed)
    assert {int(labelled[i]["label"]) for i in range(len(labelled))} == {0, 1}
    params = {**params, "crops": {**params["crops"], "side": 16, "per_scan": 2}}
    entry_3d = {**entry, "backbone": {**entry["backbone"], "spatial_dims": 3}}
    crops = pretrain_view(params, entry_3d, "val", synthetic_processed)
    assert len(crops) == 4 and tuple(crops[0]["image"].shape) == (1, 16, 16, 16)


def test_a_multihead_cls_head_records_the_weights_balanced_to_its_training_slices(synthetic_processed, tmp_path):
    params = stage_params(multihead=("multihead_cls",), slice_size=64)
    assert params["multihead"]["multihead_cls"]["cls_class_weights"] == "balanced"
    where = _where(tmp_path)
    metrics = pretrain(params, "multihead_cls", synthetic_processed, **where)
    counts = metrics["cls_train_class_counts"]
    total = counts["clean"] + counts["nodule"]
    assert counts["clean"] > counts["nodule"] > 0
    assert metrics["cls_class_weights"] == pytest.approx({k: total / (2 * v) for k, v in counts.items()}, rel=1e-3)
    method = load_model_file(where["model_dir"] / "method.pt", "pretrain@test", required=("state_dict",))
    assert method["state_dict"]["cls_class_weights"].tolist() == pytest.approx(
        [metrics["cls_class_weights"]["clean"], metrics["cls_class_weights"]["nodule"]])
