"""Stage align_radiographs (seed 002's STN alignment experiment) on rendered radiographs:
training through the loop (with resume), parameter error, probe, outputs, unusable inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from chestssl.data.drr import render_radiographs
from chestssl.data.radiograph_datasets import RadiographDataset, capped
from chestssl.io import save_torch, write_npz
from chestssl.methods import build_method
from chestssl.models.stn import apply_stn, load_alignment_stn
from chestssl.params import ParamsError, validate
from chestssl.pipeline.align_radiographs import align_radiographs
from tests.pipeline.cost_checks import check_cost_record
from tests.tiny_configs import shrink_params
from tests.shipped_params import read_shipped_params

SIZE = 32
FEATURE_METHOD = "scratch_resnet18"
ALIGNMENT = {
    "feature_method": FEATURE_METHOD,
    "block_inplanes": [4, 8, 8, 16],
    "steps": 250,
    "batch_size": 4,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "pixel_weight": 15.0,
    "max_shift": 0.1,
    "max_scale": 0.0,
    "max_rotation_deg": 0.0,
    "max_brightness": 0.1,
    "max_contrast": 0.1,
    "num_examples": 2,
    "max_images": 0,
}


def _smooth_chests(processed) -> None:
    """Replace the fixture's scans (uniform noise, whose radiographs hold no anatomy to align
    by) with smooth chests: an elliptic body, two lungs narrowing towards the apex, a spine;
    slightly different per patient; the nodule voxels kept. z spacing 4 mm makes the frontal
    view 48 x 72 mm, so the chest sits in a band with air above and below, as in a real render.
    The validation patients join the training split, so the STN learns from four chests."""
    for index, path in enumerate(sorted((processed / "scans").glob("*.npz"))):
        with np.load(path) as arrays:
            mask, origin = arrays["mask"], arrays["origin_index"]
        rng = np.random.default_rng(index)
        depth, rows, cols = mask.shape
        z = np.linspace(0.0, 1.0, depth)[:, None, None]
        y = np.linspace(-1.0, 1.0, rows)[None, :, None]
        x = np.linspace(-1.0, 1.0, cols)[None, None, :]
        wobble = 1.0 + 0.05 * rng.standard_normal(3)
        body = (y / (0.7 * wobble[0])) ** 2 + (x / (0.85 * wobble[1])) ** 2 <= 1.0
        lung_radius = np.maximum(0.28 * wobble[2] * np.clip(1.5 - 1.2 * z, 0.0, 1.0), 1e-3)
        lungs = (((np.abs(x) - 0.4) / lung_radius) ** 2 + ((y + 0.05) / 0.45) ** 2 <= 1.0) & (z > 0.2)
        spine = x**2 + (y - 0.5) ** 2 <= 0.12**2
        image = np.where(lungs & body, 0.1, np.where(body, 0.7, 0.0))
        image = np.where(spine, 1.0, image) + 0.01 * rng.standard_normal(mask.shape)
        image[mask > 0] = 0.8
        write_npz(path, image=np.clip(image, 0, 1).astype(np.float16), mask=mask,
                  spacing=np.array([4.0, 1.5, 1.5], np.float32), origin_index=origin,
                  lung_box=np.array([0, mask.shape[1], 0, mask.shape[2]], np.int32))
    for table in ("slices.csv", "nodules.csv"):
        frame = pd.read_csv(processed / table, dtype={"patient_id": str, "scan_id": str})
        frame.loc[frame["split"] == "val", "split"] = "train"
        frame.to_csv(processed / table, index=False)
    splits = json.loads((processed / "splits.json").read_text())
    splits["train"], splits["val"] = splits["train"] + splits["val"], []
    (processed / "splits.json").write_text(json.dumps(splits))


@pytest.fixture
def params():
    raw = read_shipped_params()
    shrink_params(raw)
    raw["evaluate"]["bootstrap_samples"] = 20
    validated = validate(raw)
    # Pinned: the test split holds two radiographs, each moved by one seeded shift, so the
    # measured fraction undone depends on the draws (about 0.47 at this seed).
    validated["seed"] = 42
    validated["alignment"] = dict(ALIGNMENT)
    return validated


@pytest.fixture
def study_inputs(synthetic_processed, params, tmp_path):
    """(radiographs folder, encoder.pt of a tiny scratch ResNet-18)."""
    _smooth_chests(synthetic_processed)
    radiographs = tmp_path / "radiographs"
    render_radiographs(synthetic_processed, radiographs,
                       {"side": SIZE, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]})
    encoder_path = tmp_path / "encoder" / "encoder.pt"
    save_torch(encoder_path, build_method(FEATURE_METHOD, params["methods"][FEATURE_METHOD], 0).export())
    return radiographs, encoder_path


def _run(params, radiographs, encoder_path, out):
    return align_radiographs(params, radiographs, encoder_path, out / "model", out / "report", out / "ckpt.pt")


def test_the_stn_learns_to_undo_shifts_and_writes_its_outputs(params, study_inputs, tmp_path):
    radiographs, encoder_path = study_inputs
    metrics = _run(params, radiographs, encoder_path, tmp_path)

    assert json.loads((tmp_path / "report" / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert "frozen encoder of pretrain_radiographs@scratch_resnet18" in metrics["protocol"]
    assert "DenseNet-121" in metrics["protocol"]
    training = metrics["training"]
    assert training["steps"] == 250 and training["epochs"] == 250 and metrics["canonical"]["n_images"] == 4
    # No validation radiographs in this folder: each epoch is validated on the training ones, moved.
    assert training["validation"] == {"split": "train", "n_images": 4}
    assert training["val_after_px"] < training["val_before_px"] and training["final_loss"] < training["first_loss"]
    curve = tmp_path / "report" / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    assert len(curve.read_text().splitlines()) == 251  # header + one point per step
    cost = json.loads((tmp_path / "report" / "cost.json").read_text())
    check_cost_record(cost, steps=250)
    # The STN's parameters, all trained; the loss's frozen feature encoder is not among them.
    stn_parameters = sum(p.numel() for p in load_alignment_stn(tmp_path / "model" / "stn.pt")[0].parameters())
    assert cost["parameters"] == cost["trainable_parameters"] == stn_parameters
    assert not (tmp_path / "ckpt.pt").exists()
    error = metrics["parameter_error"]["misaligned"]
    assert error["n_images"] == 2 and error["before_px"] > 1.0
    # The STN learnt something: it removes part of the misalignment of unseen radiographs.
    assert error["after_px"] < error["before_px"] and error["fraction_undone"] > 0
    assert error["fraction_undone"] == pytest.approx(1 - error["after_px"] / error["before_px"])
    assert metrics["parameter_error"]["not_misaligned"]["displacement_px"] >= 0
    for label in ("nodule", "malignant"):
        entry = metrics["auroc"][label]
        for condition in ("without_alignment", "with_alignment", "as_rendered"):
            assert 0.0 <= entry[condition]["value"] <= 1.0 and {"ci_low", "ci_high"} <= set(entry[condition])
        expected = entry["with_alignment"]["value"] - entry["without_alignment"]["value"]
        assert entry["difference"] == pytest.approx(expected)
        assert metrics["probe"]["aligned"][label]["n_train"] == 4
    assert metrics["auroc"]["mean"]["labels"] == ["nodule", "malignant"]

    with np.load(tmp_path / "report" / "examples.npz") as examples:
        arrays = {name: examples[name] for name in examples.files}
    assert arrays["input"].shape == arrays["aligned"].shape == arrays["original"].shape == (2, SIZE, SIZE)
    assert list(arrays["study_id"]) == ["p4", "p5"]
    # The canonical chest is the mean of the four training frontal radiographs, whole (no lung crop).
    train = RadiographDataset(radiographs, "train", ("frontal",))
    mean = torch.stack([train[i]["image"] for i in range(len(train))]).mean(0)[0].numpy()
    np.testing.assert_allclose(arrays["canonical"], mean, atol=1e-6)

    # stn.pt rebuilds the trained STN: it maps the example inputs onto the saved outputs.
    stn, canonical = load_alignment_stn(tmp_path / "model" / "stn.pt")
    np.testing.assert_allclose(canonical[0].numpy(), arrays["canonical"], atol=1e-6)
    aligned, _ = apply_stn(stn, torch.from_numpy(arrays["input"])[:, None])
    np.testing.assert_allclose(aligned[:, 0].numpy(), arrays["aligned"], atol=1e-5)
    assert not np.allclose(arrays["aligned"], arrays["input"], atol=1e-3)


def test_an_stn_that_cannot_move_leaves_images_and_probe_unchanged(params, study_inputs, tmp_path):
    # One step at a vanishing learning rate: the STN stays at its identity initialisation.
    params["alignment"].update(steps=1, lr=1e-12)
    radiographs, encoder_path = study_inputs
    metrics = _run(params, radiographs, encoder_path, tmp_path)
    with np.load(tmp_path / "report" / "examples.npz") as examples:
        np.testing.assert_allclose(examples["aligned"], examples["input"], atol=1e-5)
        assert not np.allclose(examples["input"], examples["original"], atol=1e-3)  # it was misaligned
    error = metrics["parameter_error"]
    assert error["misaligned"]["after_px"] == pytest.approx(error["misaligned"]["before_px"], abs=1e-4)
    assert error["misaligned"]["fraction_undone"] == pytest.approx(0.0, abs=1e-4)
    assert error["not_misaligned"]["displacement_px"] < 1e-4
    for label in ("nodule", "malignant"):
        aligned, misaligned = metrics["probe"]["aligned"][label], metrics["probe"]["misaligned"][label]
        assert aligned["auroc"] == misaligned["auroc"] and aligned["auprc"] == misaligned["auprc"]
        assert metrics["auroc"][label]["difference"] == 0.0


def test_unusable_inputs_are_named(params, study_inputs, tmp_path):
    radiographs, encoder_path = study_inputs
    params["alignment"]["batch_size"] = 5
    with pytest.raises(ParamsError, match="alignment.batch_size: got 5, expected at most 4"):
        _run(params, radiographs, encoder_path, tmp_path)
    params["alignment"]["batch_size"] = 1
    with pytest.raises(ParamsError, match="alignment.batch_size: got 1, expected >= 2 for 32x32"):
        _run(params, radiographs, encoder_path, tmp_path)
    params["alignment"]["batch_size"] = 2
    with pytest.raises(FileNotFoundError, match="pretrain_radiographs@scratch_resnet18"):
        _run(params, radiographs, tmp_path / "none.pt", tmp_path)
    assert not (tmp_path / "report").exists()


def test_max_images_keeps_whole_patients_drawn_by_the_seed(study_inputs):
    radiographs, _ = study_inputs
    train = RadiographDataset(radiographs, "train", ("frontal",))
    assert capped(train, 0, seed=0) is train and capped(train, len(train), seed=0) is train
    small = capped(train, 2, seed=0)
    assert len(small) == 2 and set(small.frame["patient_id"]) < set(train.frame["patient_id"])
    assert capped(train, 2, seed=0).frame["patient_id"].tolist() == small.frame["patient_id"].tolist()
    drawn = {tuple(capped(train, 1, seed=seed).frame["patient_id"]) for seed in range(8)}
    assert len(drawn) > 1  # the seed picks the patients


def test_an_interrupted_study_resumes_to_the_same_stn_and_outputs(params, study_inputs, tmp_path, monkeypatch):
    params["alignment"].update(steps=6, batch_size=2)  # 4 training radiographs: 2 steps per epoch, 3 epochs
    radiographs, encoder_path = study_inputs
    reference = _run(params, radiographs, encoder_path, tmp_path / "reference")

    from chestssl.methods.alignment import STNAlignment

    original, calls = STNAlignment.training_step, {"count": 0}

    def interrupted(self, batch):
        calls["count"] += 1
        if calls["count"] == 5:  # in the third epoch
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(STNAlignment, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(params, radiographs, encoder_path, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "ckpt.pt").exists()
    monkeypatch.setattr(STNAlignment, "training_step", original)
    resumed = _run(params, radiographs, encoder_path, tmp_path / "resumed")

    first = torch.load(tmp_path / "reference" / "model" / "stn.pt", weights_only=True)["state_dict"]
    second = torch.load(tmp_path / "resumed" / "model" / "stn.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert resumed["parameter_error"] == reference["parameter_error"] and resumed["auroc"] == reference["auroc"]
    assert resumed["training"] == reference["training"]
