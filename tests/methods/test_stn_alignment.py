"""Seed 002's STN objective trained through the project's loop: it learns a known shift, never
touches the frozen feature network, resumes to the same weights, and draws the same
misalignments whatever the order of a batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chestssl.data.affine import IDENTITY_PARAMS, AlignmentAugmentation, affine_from_params, warp
from chestssl.data.radiograph_datasets import IndexedImages
from chestssl.eval.alignment import alignment_parameter_error
from chestssl.methods.alignment import STNAlignment
from chestssl.models.losses import AlignmentLoss
from chestssl.pipeline.align_radiographs import alignment_train_cfg
from chestssl.train.loop import fit
from tests.alignment_images import chest, feature_net, shift_params, tiny_stn

#: An ``alignment`` params block: only the keys that shape the loop's ``train`` block matter here.
ALIGNMENT = {"steps": 100, "batch_size": 1, "lr": 3e-3, "weight_decay": 1e-4}


def _train_cfg(n_images: int, **changes) -> dict:
    return {**alignment_train_cfg({**ALIGNMENT, **changes}, n_images), "device": "cpu"}


def _fit(module, train, val, cfg, tmp_path, name="run", seed=0):
    return fit(module, train, val, cfg, tmp_path / name / "live", tmp_path / name / "ckpt.pt", seed,
               monitor="val/loss", mode="min")


def test_the_train_block_runs_the_steps_with_adamw():
    cfg = alignment_train_cfg({"steps": 200, "batch_size": 8, "lr": 1e-4, "weight_decay": 1e-4}, 8, world_size=1)
    assert cfg["max_steps"] == 200 and cfg["epochs"] == 200  # a batch holds every radiograph: one step per epoch
    assert (cfg["optimizer"], cfg["betas"], cfg["scheduler"], cfg["grad_clip"]) == ("adamw", [0.9, 0.999], "none", 0)
    assert alignment_train_cfg({**ALIGNMENT, "steps": 10, "batch_size": 4}, 10, world_size=1)["epochs"] == 5
    assert alignment_train_cfg({**ALIGNMENT, "steps": 10, "batch_size": 4}, 10, world_size=2)["epochs"] == 10


def test_training_recovers_a_known_shift_and_never_updates_the_feature_net(tmp_path):
    size = 48
    image = chest(size)
    applied = shift_params(3.0, -2.0, size)  # content 3 pixels right, 2 up
    moved = warp(image, affine_from_params(applied))
    stn, features = tiny_stn(), feature_net()
    frozen = {key: value.clone() for key, value in features.state_dict().items()}
    module = STNAlignment(stn, AlignmentLoss(features), image[0], augmentation=None)
    assert not any(key.startswith("loss.") for key in module.state_dict())  # frozen: not the module's state
    result = _fit(module, IndexedImages(moved), IndexedImages(moved, {"applied": applied}), _train_cfg(1), tmp_path)
    losses = [entry["train/loss"] for entry in result.history]
    assert result.steps == 100 and len(losses) == 100 and losses[-1] < 1e-3 * losses[0]
    assert all(torch.equal(features.state_dict()[key], value) for key, value in frozen.items())
    assert all(p.grad is None for p in features.parameters())
    assert result.final_metrics["val/before_px"] == pytest.approx(math.hypot(3.0, 2.0), abs=1e-4)
    # Predict as trained: with one 48x48 image, layer4's batch norm sees 2x2 values per
    # channel, where running (unbiased) variances differ from batch ones by 4/3.
    stn.train()
    with torch.no_grad():
        aligned, params, _ = stn(moved)
    torch.testing.assert_close(params[0, :2], -applied[0, :2], rtol=0, atol=0.01)  # within 0.25 pixel
    error = alignment_parameter_error(params, applied, image_size=(size, size))
    assert float(error.before) == pytest.approx(math.hypot(3.0, 2.0), abs=1e-4)
    assert float(error.after) < 0.1 * float(error.before)
    assert error.fraction_undone > 0.9
    assert F.mse_loss(aligned, image) < 0.01 * F.mse_loss(moved, image)
    curve = tmp_path / "run" / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    assert len(curve.read_text().splitlines()) == 101  # header + one point per step


def test_training_with_the_seeds_augmentation_moves_the_stn(tmp_path):
    images = torch.cat([chest(48), chest(48).flip(-1)])
    stn = tiny_stn()
    module = STNAlignment(stn, AlignmentLoss(feature_net()), chest(48)[0], AlignmentAugmentation())
    result = _fit(module, IndexedImages(images), IndexedImages(images), _train_cfg(2, steps=3, batch_size=2), tmp_path)
    assert result.steps == 3 and all(math.isfinite(entry["train/loss"]) for entry in result.history)
    assert not torch.equal(stn.regressor.bias, torch.tensor(IDENTITY_PARAMS))


def _augmented_module(seed: int = 0) -> STNAlignment:
    return STNAlignment(tiny_stn(seed=seed), AlignmentLoss(feature_net()), chest(48)[0], AlignmentAugmentation())


def test_an_interrupted_then_resumed_training_ends_with_the_same_weights(tmp_path, monkeypatch, capsys):
    images = torch.cat([chest(48), chest(48).flip(-1), chest(48).flip(-2), chest(48).roll(3, -1)])
    train, val = IndexedImages(images), IndexedImages(images[:2])
    cfg = _train_cfg(4, steps=8, batch_size=2)  # 2 steps per epoch, 4 epochs

    reference = _augmented_module()
    _fit(reference, train, val, cfg, tmp_path, "reference")

    calls = {"count": 0}
    original = STNAlignment.training_step

    def interrupted(self, batch):
        calls["count"] += 1
        if calls["count"] == 6:  # in the third epoch, after two checkpoints
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(STNAlignment, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(_augmented_module(), train, val, cfg, tmp_path, "resumed")
    monkeypatch.setattr(STNAlignment, "training_step", original)
    resumed_module = _augmented_module()
    resumed = _fit(resumed_module, train, val, cfg, tmp_path, "resumed")
    assert resumed.resumed and "resuming from" in capsys.readouterr().err
    reference_state, resumed_state = reference.state_dict(), resumed_module.state_dict()
    assert reference_state.keys() == resumed_state.keys()
    assert all(torch.equal(reference_state[key], resumed_state[key]) for key in reference_state)
    assert not torch.equal(reference.stn.regressor.bias, torch.tensor(IDENTITY_PARAMS))


def test_the_draws_of_a_batch_do_not_depend_on_its_order():
    images = torch.cat([chest(48), chest(48).flip(-1), chest(48).flip(-2)])
    module = _augmented_module()
    module.train()
    torch.manual_seed(3)
    in_order = module.training_step({"image": images, "index": torch.tensor([0, 1, 2])})
    torch.manual_seed(3)
    shuffled = module.training_step({"image": images[[2, 0, 1]], "index": torch.tensor([2, 0, 1])})
    assert torch.equal(in_order["loss"], shuffled["loss"])


def test_the_frozen_loss_follows_the_module_and_is_never_optimised():
    module = _augmented_module()
    stn_parameters = {id(p) for p in module.stn.parameters()}
    assert {id(p) for p in module.parameters()} == stn_parameters
    module.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in module.loss.parameters())
    assert module.canonical.dtype == torch.float64
    module.train()
    assert not module.loss.feature_net.training
    with pytest.raises(ValueError, match=r"canonical chest of shape \(1, H, W\)"):
        STNAlignment(tiny_stn(), AlignmentLoss(feature_net()), torch.rand(48, 48))
