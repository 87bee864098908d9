"""Radiograph fine-tuning task: one finding per image (softmax) or several (sigmoids), linear head or DenseNet121."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from chestssl.methods import build_method
from chestssl.models.backbones import load_encoder
from chestssl.tasks.radiograph_cls import RadiographClassificationTask, class_targets, masked_bce, per_label_auroc

LABELS = ["normal", "covid", "pneumonia", "opacity"]


def _encoder():
    from tiny_configs import CNN_ATTENTION

    payload = build_method("scratch", {"method": "scratch", "backbone": CNN_ATTENTION}, seed=0).export()
    return load_encoder(payload)


def _one_hot(classes, count=len(LABELS)) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(classes), count).float()


def test_class_targets_need_exactly_one_positive_label():
    assert class_targets(_one_hot([2, 0])).tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"image 1 of the batch has labels \[1.0, 1.0, 0.0, 0.0\]; use mode: multilabel"):
        class_targets(torch.tensor([[0.0, 1, 0, 0], [1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="image 0 of the batch"):
        class_targets(torch.tensor([[float("nan"), 1, 0, 0]]))


def test_masked_bce_leaves_unknown_labels_out():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    loss = masked_bce(logits, labels)
    known = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, 0.5, 3.0]), torch.tensor([1.0, 0.0, 1.0]))
    assert loss.item() == pytest.approx(known.item())
    loss.backward()
    assert logits.grad[0, 1] == 0  # the unknown entry gets no gradient
    none_known = masked_bce(logits, torch.full((2, 2), float("nan")))
    assert none_known.item() == 0 and none_known.requires_grad


def test_per_label_auroc_is_sklearns_over_the_known_images():
    probs = np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.4], [0.3, 0.6]])
    labels = np.array([[1, np.nan], [0, 1], [1, 1], [0, 1]])
    out = per_label_auroc(probs, labels)
    assert out[0] == roc_auc_score([1, 0, 1, 0], probs[:, 0])
    assert math.isnan(out[1])  # its known images are all positive


@pytest.mark.parametrize("mode", ["multiclass", "multilabel"])
def test_a_linear_head_fine_tunes_the_whole_encoder(mode):
    torch.manual_seed(0)
    task = RadiographClassificationTask("r", {"mode": mode, "arch": "linear"}, LABELS, seed=0, encoder=_encoder())
    images = torch.rand(8, 1, 32, 32)
    labels = _one_hot([0, 1, 2, 3, 0, 1, 2, 3]) if mode == "multiclass" else torch.tensor(
        [[1, 0, float("nan"), 1]] * 4 + [[0, 1, 1, 0]] * 4)
    before = [p.detach().clone() for p in task.network.encoder.parameters()]
    optimiser = torch.optim.SGD(task.parameters(), lr=0.1)
    loss = task.training_step({"image": images, "labels": labels})["loss"]
    loss.backward()
    optimiser.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, task.network.encoder.parameters()))
    probabilities = task.predict({"image": images})
    assert probabilities.shape == (8, 4) and 0 <= probabilities.min() and probabilities.max() <= 1
    if mode == "multiclass":
        torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(8))
    task.eval()
    step = task.validation_step({"image": images, "labels": labels})
    assert ("accuracy" in step) == (mode == "multiclass")
    epoch = task.validation_epoch_end()
    expected = np.nanmean(per_label_auroc(probabilities.numpy(), labels.numpy()))
    assert epoch["mean_auroc"].item() == pytest.approx(expected, abs=1e-6)
    task.train()
    task.eval()
    assert task.validation_epoch_end() == {}  # a new validation pass starts empty


def test_densenet121_is_built_from_scratch_seeded_and_wants_no_encoder():
    run = {"mode": "multilabel", "arch": "densenet121"}
    first = RadiographClassificationTask("r", run, LABELS[:2], seed=3)
    second = RadiographClassificationTask("r", run, LABELS[:2], seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    first.eval()
    assert first.predict({"image": torch.rand(2, 1, 32, 32)}).shape == (2, 2)
    with pytest.raises(ValueError, match="arch 'densenet121' takes no pretrained encoder"):
        RadiographClassificationTask("r", run, LABELS, seed=0, encoder=_encoder())
    with pytest.raises(ValueError, match="arch 'linear' needs a pretrained encoder"):
        RadiographClassificationTask("r", {"mode": "multiclass", "arch": "linear"}, LABELS, seed=0)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="r: unknown mode 'ordinal'; known: multiclass, multilabel"):
        RadiographClassificationTask("r", {"mode": "ordinal", "arch": "densenet121"}, LABELS, seed=0)
    with pytest.raises(ValueError, match="r: unknown arch 'vgg'"):
        RadiographClassificationTask("r", {"mode": "multilabel", "arch": "vgg"}, LABELS, seed=0)
    with pytest.raises(ValueError, match="mode multiclass needs at least 2 labels, the dataset has 1"):
        RadiographClassificationTask("r", {"mode": "multiclass", "arch": "densenet121"}, ["nodule"], seed=0)
