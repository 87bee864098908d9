"""Segmentation task: UNet++ on the pretrained encoder, its losses and metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chestssl.methods import build_method
from chestssl.models import ENCODER_BLOCKS
from chestssl.tasks import SegmentationTask, build_task
from chestssl.tasks.seg import build_seg_loss

BACKBONE = {"name": "unet_encoder", "spatial_dims": 2, "features": [4, 8, 8, 16, 16]}


def _run(**overrides) -> dict:
    run = {
        "task": "seg", "arch": "unetpp", "init": "ae", "loss": "ce", "class_weights": [1.0, 50.0],
        "focal_gamma": 2.0, "focal_alpha": 0.25,
    }
    return {**run, **overrides}


def _payload(spatial_dims: int = 2, seed: int = 0) -> dict:
    cfg = {"method": "ae", "backbone": {**BACKBONE, "spatial_dims": spatial_dims}, "loss": {"l1": 1.0, "ssim": 1.0}}
    return build_method("ae", cfg, seed=seed).export()


def _mask(size: int = 32, n: int = 2) -> torch.Tensor:
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 10:18, 12:20] = 1.0
    return mask


def _logits_for(prediction: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Two-channel logits whose softmax[:, 1] is ~`prediction` (binary (B, 1, *S))."""
    return torch.cat([-scale * (2 * prediction - 1), scale * (2 * prediction - 1)], dim=1) / 2


class FixedLogits(nn.Module):
    """Stands in for the UNet++ so metrics can be checked on known predictions."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [self.logits]


@pytest.mark.parametrize("spatial_dims,size", [(2, 64), (3, 32)])
def test_shapes_and_predict(spatial_dims, size):
    task = build_task(_run(), _payload(spatial_dims), seed=0)
    assert isinstance(task, SegmentationTask)
    image = torch.rand((2, 1) + (size,) * spatial_dims)
    assert tuple(task(image).shape) == (2, 2) + (size,) * spatial_dims
    probability = task.predict({"image": image})
    assert probability.shape == image.shape and not probability.requires_grad
    assert 0.0 <= float(probability.min()) and float(probability.max()) <= 1.0


def test_encoder_blocks_start_from_the_pretrained_weights():
    payload = _payload(seed=4)
    task = build_task(_run(), payload, seed=0)
    state = task.network.state_dict()
    for key, value in payload["state_dict"].items():
        assert key.startswith(ENCODER_BLOCKS) and torch.equal(state[key], value), key
    assert all(p.requires_grad for p in task.parameters())


def test_dice_loss_on_known_predictions():
    mask = _mask()
    dice = build_seg_loss(_run(loss="dice"))
    assert float(dice(_logits_for(mask), mask)) == pytest.approx(0.0, abs=1e-4)
    assert float(dice(_logits_for(1 - mask), mask)) == pytest.approx(1.0, abs=1e-4)
    # Batch-flattened: one Dice over all pixels of the batch.
    half = mask.clone()
    half[1] = 0
    expected = 1 - 2 * half.sum() / (half.sum() + mask.sum())
    assert float(dice(_logits_for(half), mask)) == pytest.approx(float(expected), abs=1e-4)


def test_ce_class_weights():
    torch.manual_seed(0)
    mask, logits = _mask(), torch.randn(2, 2, 32, 32)
    target = mask[:, 0].long()
    nll = F.cross_entropy(logits, target, reduction="none")
    weight = torch.where(target == 1, 50.0, 1.0)
    weighted = build_seg_loss(_run(loss="ce", class_weights=[1.0, 50.0]))(logits, mask)
    plain = build_seg_loss(_run(loss="ce", class_weights=[1.0, 1.0]))(logits, mask)
    torch.testing.assert_close(weighted, (weight * nll).sum() / weight.sum())
    torch.testing.assert_close(plain, nll.mean())
    only_nodule = build_seg_loss(_run(loss="ce", class_weights=[0.0, 1.0]))(logits, mask)
    torch.testing.assert_close(only_nodule, nll[target == 1].mean())


def test_focal_loss():
    torch.manual_seed(0)
    mask, logits = _mask(), torch.randn(2, 2, 32, 32)
    nll = F.cross_entropy(logits, mask[:, 0].long(), reduction="none")
    # gamma 0, alpha 0.5: half the cross-entropy, averaged over both one-hot channels.
    focal_as_ce = build_seg_loss(_run(loss="focal", focal_gamma=0.0, focal_alpha=0.5))(logits, mask)
    torch.testing.assert_close(focal_as_ce, 0.5 * nll.mean() / 2)
    # alpha weighs the nodule class, 1 - alpha the background.
    alpha = 0.8
    focal_alpha = build_seg_loss(_run(loss="focal", focal_gamma=0.0, focal_alpha=alpha))(logits, mask)
    weight = torch.where(mask[:, 0] == 1, alpha, 1 - alpha)
    torch.testing.assert_close(focal_alpha, (weight * nll).mean() / 2)
    # gamma > 0 down-weights pixels that are already right.
    confident = _logits_for(mask, scale=4.0)
    focal_g2 = build_seg_loss(_run(loss="focal", focal_gamma=2.0, focal_alpha=0.5))(confident, mask)
    focal_g0 = build_seg_loss(_run(loss="focal", focal_gamma=0.0, focal_alpha=0.5))(confident, mask)
    assert float(focal_g2) < 0.1 * float(focal_g0)


def test_validation_dice_per_batch_and_epoch():
    task = build_task(_run(), _payload(), seed=0).eval()
    mask = _mask()
    half = mask.clone()
    half[:, :, 10:14] = 0  # predicts half of each nodule
    task.network = FixedLogits(_logits_for(half))
    step = task.validation_step({"image": torch.rand(2, 1, 32, 32), "mask": mask})
    assert set(step) == {"loss", "dice", "iou"}
    assert float(step["dice"]) == pytest.approx(2 * 64 / (64 + 128))
    assert float(step["iou"]) == pytest.approx(0.5)
    # A second batch with empty truth and a false positive: the epoch Dice is global.
    false_positive = torch.zeros_like(mask)
    false_positive[:, :, :4, :4] = 1
    task.network = FixedLogits(_logits_for(false_positive))
    step = task.validation_step({"image": torch.rand(2, 1, 32, 32), "mask": torch.zeros_like(mask)})
    assert float(step["dice"]) == 0.0
    epoch = task.validation_epoch_end()
    assert float(epoch["dice"]) == pytest.approx(2 * 64 / ((64 + 32) + 128))
    assert float(epoch["iou"]) == pytest.approx(64 / (64 + 32 + 128 - 64))
    task.eval()  # already in eval mode: the pass goes on
    assert float(task.validation_epoch_end()["dice"]) == pytest.approx(float(epoch["dice"]))
    task.train()
    task.eval()  # a new validation pass
    assert task.validation_epoch_end() == {}
    # Both empty: a perfect batch.
    task.network = FixedLogits(_logits_for(torch.zeros_like(mask)))
    step = task.validation_step({"image": torch.rand(2, 1, 32, 32), "mask": torch.zeros_like(mask)})
    assert float(step["dice"]) == 1.0 and float(task.validation_epoch_end()["dice"]) == 1.0


@pytest.mark.parametrize("loss,ratio", [("ce", 0.5), ("dice", 0.8)])
def test_short_optimisation_reduces_the_loss(loss, ratio):
    task = build_task(_run(loss=loss, class_weights=[1.0, 5.0]), _payload(), seed=0).train()
    batch = {"image": 0.2 + 0.6 * _mask(), "mask": _mask()}
    optimiser = torch.optim.Adam(task.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        value = task.training_step(batch)["loss"]
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        losses.append(value.item())
    assert losses[-1] < ratio * losses[0], losses


def test_bad_run_params_are_reported():
    with pytest.raises(ValueError, match=r"unknown segmentation loss 'bce'.*'ce', 'dice', 'focal'"):
        build_task(_run(loss="bce"), _payload(), seed=0, name="r")
    with pytest.raises(ValueError, match=r"r: unknown arch 'unet'; known: 'unetpp'"):
        build_task(_run(arch="unet"), _payload(), seed=0, name="r")
    with pytest.raises(ValueError, match=r"class weights: got \[0\.0, 0\.0\]"):
        build_task(_run(class_weights=[0.0, 0.0]), _payload(), seed=0, name="r")
