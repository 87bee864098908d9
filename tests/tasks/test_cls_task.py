"""Classification task: ResNet on the pretrained encoder's latent, or a linear head on its representation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from chestssl.methods import build_method
from chestssl.models import UNetEncoder, seeded
from chestssl.models.classifier import LinearHeadClassifier
from chestssl.tasks import CLS_ARCHS, ClassificationTask, build_task
from chestssl.tasks.cls import resolve_class_weights
from tiny_configs import CNN_ATTENTION, SWIN

BACKBONE = {"name": "unet_encoder", "spatial_dims": 2, "features": [4, 8, 8, 16, 16]}


def _run(**overrides) -> dict:
    return {**{"task": "cls", "arch": "resnet18", "init": "ae", "class_weights": [1.0, 1.0]}, **overrides}


def _payload(spatial_dims: int = 2, seed: int = 0) -> dict:
    cfg = {"method": "scratch", "backbone": {**BACKBONE, "spatial_dims": spatial_dims}}
    return build_method("scratch", cfg, seed=seed).export()


class FixedLogits(nn.Module):
    """Stands in for the classifier so metrics can be checked on known outputs."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits


@pytest.mark.parametrize("arch,spatial_dims,size", [("resnet18", 2, 64), ("resnet50", 2, 32), ("resnet18", 3, 32)])
def test_shapes_and_predict(arch, spatial_dims, size):
    task = build_task(_run(arch=arch), _payload(spatial_dims), seed=0)
    assert isinstance(task, ClassificationTask)
    image = torch.rand((2, 1) + (size,) * spatial_dims)
    assert tuple(task(image).shape) == (2, 2)
    probability = task.predict({"image": image})
    assert tuple(probability.shape) == (2,) and not probability.requires_grad
    assert bool(((probability >= 0) & (probability <= 1)).all())
    loss = task.training_step({"image": image, "label": torch.tensor([0, 1])})["loss"]
    loss.backward()
    assert task.network.encoder.conv_0_0.conv_0.conv.weight.grad is not None


def test_encoder_starts_from_the_pretrained_weights():
    payload = _payload(seed=2)
    task = build_task(_run(), payload, seed=0)
    for key, value in payload["state_dict"].items():
        assert torch.equal(task.network.encoder.state_dict()[key], value), key


def test_class_weights_change_the_loss_as_expected():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-1.0, 1.0]])
    label = torch.tensor([0, 1, 1])
    nll = F.cross_entropy(logits, label, reduction="none")
    task = build_task(_run(class_weights=[50.0, 1.0]), _payload(), seed=0)
    task.network = FixedLogits(logits)
    batch = {"image": torch.rand(3, 1, 32, 32), "label": label}
    weight = torch.tensor([50.0, 1.0, 1.0])
    torch.testing.assert_close(task.training_step(batch)["loss"], (weight * nll).sum() / weight.sum())
    plain = build_task(_run(), _payload(), seed=0)
    plain.network = FixedLogits(logits)
    torch.testing.assert_close(plain.training_step(batch)["loss"], nll.mean())


def test_explicit_class_weights_are_used_as_given_whatever_the_training_labels():
    # The shipped runs' explicit weights: the loss and the state dict are what they were.
    for weights in ([1.0, 1.0], [50.0, 1.0]):
        with_labels = build_task(_run(class_weights=weights), _payload(), seed=0, train_labels=[0, 1, 1, 1])
        without = build_task(_run(class_weights=weights), _payload(), seed=0)
        for task in (with_labels, without):
            assert task.class_weights == weights
            assert torch.equal(task.loss_fn.weight, torch.tensor(weights))
        assert [k for k in without.state_dict() if not k.startswith("network.")] == ["loss_fn.weight"]
        assert with_labels.class_counts == [1, 3] and without.class_counts is None
        for key, value in without.state_dict().items():
            assert torch.equal(with_labels.state_dict()[key], value), key


def test_balanced_class_weights_follow_the_training_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-1.0, 1.0], [0.3, 0.1]])
    label = torch.tensor([0, 1, 1, 1])
    task = build_task(_run(class_weights="balanced"), _payload(), seed=0, train_labels=label)
    # sklearn's "balanced": n / (2 * count) = 4 / (2 * 1), 4 / (2 * 3); they average 1 over the items.
    assert task.class_weights == pytest.approx([2.0, 2.0 / 3.0]) and task.class_counts == [1, 3]
    assert (task.class_weights[0] * 1 + task.class_weights[1] * 3) / 4 == pytest.approx(1.0)
    task.network = FixedLogits(logits)
    nll = F.cross_entropy(logits, label, reduction="none")
    weight = torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3])
    batch = {"image": torch.rand(4, 1, 32, 32), "label": label}
    torch.testing.assert_close(task.training_step(batch)["loss"], (weight * nll).sum() / weight.sum())
    even = build_task(_run(class_weights="balanced"), _payload(), seed=0, train_labels=np.array([1, 0, 0, 1]))
    assert even.class_weights == [1.0, 1.0]  # one clean slice per nodule slice: the plain loss
    assert resolve_class_weights("balanced", pd.Series([0, 0, 0, 1]), "r") == pytest.approx([2 / 3, 2.0])


def test_balanced_class_weights_need_both_classes_and_the_labels():
    with pytest.raises(ValueError, match=r"runs.r.class_weights: 'balanced' .* training set of 3 slice\(s\) holds "
                                         r"no clean slice; give explicit weights"):
        build_task(_run(class_weights="balanced"), _payload(), seed=0, name="r", train_labels=[1, 1, 1])
    with pytest.raises(ValueError, match=r"runs.r.class_weights: .* holds no clean and no nodule slice"):
        build_task(_run(class_weights="balanced"), _payload(), seed=0, name="r", train_labels=[])
    with pytest.raises(ValueError, match=r"runs.r.class_weights: 'balanced' weights are computed from the "
                                         r"training set's labels"):
        build_task(_run(class_weights="balanced"), _payload(), seed=0, name="r")
    with pytest.raises(ValueError, match=r"training labels: got \[-1\]"):
        build_task(_run(class_weights="balanced"), _payload(), seed=0, name="r", train_labels=[0, 1, -1])


def test_validation_accuracy_and_epoch_auroc():
    task = build_task(_run(), _payload(), seed=0).eval()
    batches = [
        (torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.5]]), torch.tensor([1, 0, 0])),
        (torch.tensor([[0.0, 1.0], [3.0, 0.0]]), torch.tensor([1, 1])),
    ]
    for logits, label in batches:
        task.network = FixedLogits(logits)
        step = task.validation_step({"image": torch.rand(len(label), 1, 32, 32), "label": label})
        assert set(step) == {"loss", "accuracy"}
    assert float(step["accuracy"]) == pytest.approx(0.5)
    epoch = task.validation_epoch_end()
    logits = torch.cat([b[0] for b in batches])
    label = torch.cat([b[1] for b in batches])
    expected_auroc = roc_auc_score(label.numpy(), torch.softmax(logits, 1)[:, 1].numpy())
    assert float(epoch["auroc"]) == pytest.approx(expected_auroc)
    assert float(epoch["accuracy"]) == pytest.approx(3 / 5)
    task.train()
    task.eval()
    assert task.validation_epoch_end() == {}


def test_auroc_of_one_class_is_nan():
    task = build_task(_run(), _payload(), seed=0).eval()
    task.network = FixedLogits(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    task.validation_step({"image": torch.rand(2, 1, 32, 32), "label": torch.tensor([1, 1])})
    with pytest.warns(UserWarning, match="all 1"):
        epoch = task.validation_epoch_end()
    assert math.isnan(float(epoch["auroc"])) and float(epoch["accuracy"]) == 0.5


def test_batch_of_one_is_refused_with_advice():
    task = build_task(_run(), _payload(), seed=0)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        task.training_step({"image": torch.rand(1, 1, 32, 32), "label": torch.tensor([1])})


def test_bad_run_params_are_reported():
    with pytest.raises(ValueError, match=r"r: unknown arch 'vgg'; known: 'resnet18', 'resnet50'"):
        build_task(_run(arch="vgg"), _payload(), seed=0, name="r")


def _tiny_payload(backbone: dict, seed: int = 0) -> dict:
    return build_method("scratch", {"method": "scratch", "backbone": backbone}, seed=seed).export()


RESNET18 = {"name": "resnet18", "spatial_dims": 2, "block_inplanes": [4, 4, 8, 8]}


@pytest.mark.parametrize(
    "backbone,size",
    [(BACKBONE, 32), (CNN_ATTENTION, 32), (SWIN, 64), (RESNET18, 32)],
    ids=["unet_encoder", "cnn_attention", "swin", "resnet18"],
)
def test_linear_head_on_each_backbone_trains_every_parameter(backbone, size):
    task = build_task(_run(arch="linear"), _tiny_payload(backbone), seed=0)
    assert isinstance(task.network, LinearHeadClassifier)
    encoder = task.network.encoder
    assert task.network.head.in_features == encoder.representation_dim
    image = torch.rand(2, 1, size, size)
    logits = task(image)
    assert tuple(logits.shape) == (2, 2)
    torch.testing.assert_close(logits, task.network.head(encoder.representation(image)))
    probability = task.predict({"image": image})
    assert tuple(probability.shape) == (2,) and bool(((probability >= 0) & (probability <= 1)).all())
    task.training_step({"image": image, "label": torch.tensor([0, 1])})["loss"].backward()
    # ddp_find_unused_parameters is False: every weight, encoder and head, must get a gradient.
    assert task.ddp_find_unused_parameters is False
    assert [name for name, p in task.named_parameters() if p.grad is None] == []


def test_linear_head_starts_from_the_pretrained_encoder_and_a_seeded_head():
    payload = _payload(seed=2)
    task = build_task(_run(arch="linear"), payload, seed=5)
    for key, value in payload["state_dict"].items():
        assert torch.equal(task.network.encoder.state_dict()[key], value), key
    same = build_task(_run(arch="linear"), payload, seed=5).network.head.weight
    other = build_task(_run(arch="linear"), payload, seed=6).network.head.weight
    assert torch.equal(task.network.head.weight, same) and not torch.equal(task.network.head.weight, other)


def test_linear_head_copies_the_encoder_and_needs_a_representation():
    with seeded(0):
        encoder = UNetEncoder(2, 1, BACKBONE["features"])
    before = encoder.conv_0_0.conv_0.conv.weight.clone()
    model = LinearHeadClassifier(encoder, num_classes=3)
    assert tuple(model(torch.rand(2, 1, 32, 32)).shape) == (2, 3)
    with torch.no_grad():
        model.encoder.conv_0_0.conv_0.conv.weight.add_(1.0)
    assert torch.equal(encoder.conv_0_0.conv_0.conv.weight, before)
    with pytest.raises(ValueError, match="no representation"):
        LinearHeadClassifier(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="num_classes: got 0"):
        LinearHeadClassifier(encoder, num_classes=0)


def test_cls_archs_offer_the_linear_head_on_every_backbone():
    assert set(CLS_ARCHS) == {"resnet18", "resnet50", "linear"}
    assert set(CLS_ARCHS["linear"]) == {"unet_encoder", "cnn_attention", "swin", "resnet18", "resnet50", "vit"}
    for arch in ("resnet18", "resnet50"):
        assert set(CLS_ARCHS[arch]) == {"unet_encoder", "cnn_attention", "swin"}
    with pytest.raises(ValueError, match=r"r: unknown arch 'vgg'; known: .*'linear'"):
        build_task(_run(arch="vgg"), _payload(), seed=0, name="r")
    with pytest.raises(ValueError, match=r"r: arch 'resnet50' needs a backbone of .*got a 'resnet18' encoder"):
        build_task(_run(arch="resnet50"), _tiny_payload(RESNET18), seed=0, name="r")


def test_linear_head_trains_on_a_batch_of_one():
    task = build_task(_run(arch="linear"), _payload(), seed=0)
    loss = task.training_step({"image": torch.rand(1, 1, 32, 32), "label": torch.tensor([1])})["loss"]
    assert torch.isfinite(loss)
