"""Nodule-slice classification on the pretrained encoder (seed 000's task, two heads).

- ``arch: resnet18 | resnet50`` (seed 000): image -> pretrained backbone -> latent ->
  MONAI ResNet with basic blocks (He et al., CVPR 2016; seed 000's "ResNet18" [2,2,2,2]
  and "ResNet50" [3,4,6,3]) -> two logits;
- ``arch: linear`` (seed 001's downstream head): image -> pretrained backbone ->
  ``representation`` (global average pool) -> one linear layer -> two logits.

Two logits (clean, nodule); class-weighted cross-entropy. The whole network, encoder
included, is trained. ``class_weights`` is a list (clean, nodule), or ``balanced``:
computed from the class counts of the run's own training set
(:func:`resolve_class_weights`). Seed 000 weighed the classes [50, 1] for its own data;
the clean slices drawn here (``slices.clean_per_nodule_slice`` per nodule slice) give
other class counts, so ``balanced`` derives the weights from the counts of the set
actually trained on.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import Cumulative, ROCAUCMetric
from torch import nn

from chestssl.models.classifier import RESNET_LAYERS, LatentResNetClassifier, LinearHeadClassifier
from chestssl.models.losses import balanced_class_weights, class_weight_tensor
from chestssl.models.seeding import seeded
from chestssl.params import BALANCED, CLS_ARCH_BACKBONES
from chestssl.tasks.base import TaskModel

#: Architectures of the ``cls`` task (the ``arch`` param) and the backbones each accepts:
#: a ResNet on the latent map, or a linear head on the global ``representation``.
CLS_ARCHS: dict[str, tuple[str, ...]] = CLS_ARCH_BACKBONES
#: Backbones whose latent map a ResNet head can read.
LATENT_HEAD_BACKBONES: tuple[str, ...] = CLS_ARCHS["resnet18"]
#: Backbones with a global ``representation`` for the linear head.
LINEAR_HEAD_BACKBONES: tuple[str, ...] = CLS_ARCHS["linear"]
#: The classes, in the order of the logits and of ``class_weights``.
CLASSES = ("clean", "nodule")


def class_counts(labels: Sequence[int] | torch.Tensor | np.ndarray) -> list[int]:
    """How many of ``labels`` are 0 (clean) and 1 (nodule); any other label is an error."""
    values = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).ravel()
    other = sorted(set(values.tolist()) - {0, 1})
    if other:
        raise ValueError(f"training labels: got {other[:5]}, expected 0 (clean) and 1 (nodule) only")
    return [int((values == k).sum()) for k in range(len(CLASSES))]


def resolve_class_weights(
    weights: str | Sequence[float], labels: Sequence[int] | torch.Tensor | np.ndarray | None, name: str = "run"
) -> list[float]:
    """The class weights (clean, nodule) a ``runs.<name>`` entry trains with.

    A list is returned as given (as floats). ``balanced`` (:data:`chestssl.params.BALANCED`)
    is computed from ``labels``, the labels of the run's training set (``SliceDataset.frame``):
    ``n_items / (2 * n_items_of_the_class)``, sklearn's "balanced" class weights, which
    average 1 over the training items and make both classes weigh the same in the loss.
    With one clean slice drawn per nodule slice (``slices.clean_per_nodule_slice: 1``) and
    enough clean slices, they are [1, 1].

    Raises:
        ValueError: ``balanced`` without ``labels``, or with a class that has no item.
    """
    if not isinstance(weights, str):
        return [float(w) for w in weights]
    if weights != BALANCED:
        raise ValueError(f"runs.{name}.class_weights: got {weights!r}, expected {BALANCED!r} or 2 weights")
    if labels is None:
        raise ValueError(f"runs.{name}.class_weights: {BALANCED!r} weights are computed from the training set's "
                         "labels; pass them (train_labels)")
    return balanced_class_weights(class_counts(labels), f"runs.{name}.class_weights", CLASSES)


class ClassificationTask(TaskModel):
    """:class:`LatentResNetClassifier` (``arch`` resnet18 / resnet50) or
    :class:`LinearHeadClassifier` (``arch`` linear) trained with class-weighted cross-entropy.

    ``forward(image (B, 1, *S)) -> logits (B, 2)``;
    ``predict(batch) -> probability of class 1 (nodule), (B,)``.

    Args:
        name, run_cfg, seed: see :class:`~chestssl.tasks.base.TaskModel`; ``run_cfg``
            holds ``arch`` and ``class_weights``; ``seed`` seeds the head.
        encoder: the pretrained backbone (copied into the classifier).
        train_labels: the labels of the training set, which ``class_weights: balanced``
            needs (:func:`resolve_class_weights`); an explicit list ignores them.

    ``class_weights`` holds the weights the loss uses (a list, ``balanced`` resolved) and
    ``class_counts`` the training set's (clean, nodule) counts, ``None`` without ``train_labels``.
    """

    # Every parameter gets a gradient in every step (the backbone protocol promises it for
    # ``representation``): DDP need not search for unused ones.
    ddp_find_unused_parameters = False

    def __init__(self, name: str, run_cfg: Mapping[str, Any], encoder: nn.Module, seed: int,
                 train_labels: Sequence[int] | torch.Tensor | None = None):
        super().__init__(name, run_cfg, seed)
        self.class_weights = resolve_class_weights(self.run_cfg["class_weights"], train_labels, name)
        self.class_counts = class_counts(train_labels) if train_labels is not None else None
        self.arch = self.checked_arch(CLS_ARCHS, encoder)
        with seeded(self.seed):
            if self.arch == "linear":
                self.network: nn.Module = LinearHeadClassifier(encoder, num_classes=2)
            else:
                self.network = LatentResNetClassifier(encoder, arch=self.arch, num_classes=2)
        self.loss_fn = nn.CrossEntropyLoss(weight=class_weight_tensor(self.class_weights))
        self._epoch_auroc = self.register_accumulator(ROCAUCMetric())
        self._epoch_correct = self.register_accumulator(Cumulative())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        if image.shape[0] < 2 and self.arch in RESNET_LAYERS:
            raise ValueError(
                f"runs.{self.name}: a training batch of {image.shape[0]} image cannot train the ResNet's "
                "batch norm (the latent is 1 pixel wide by its last stage); use batch_size >= 2 and "
                "drop the last incomplete batch"
            )
        logits = self(image).float()
        return {"loss": self.loss_fn(logits, batch["label"])}

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``loss`` and ``accuracy`` of the batch (argmax of the logits).

        The class-1 probabilities and labels are also accumulated, so
        :meth:`validation_epoch_end` gives the AUROC over the whole validation set.
        """
        logits = self(batch["image"]).float()
        label = batch["label"]
        correct = (logits.argmax(dim=1) == label).float()
        self._epoch_auroc(torch.softmax(logits, dim=1)[:, 1].cpu(), label.cpu())
        self._epoch_correct.extend(correct.cpu())
        return {"loss": self.loss_fn(logits, label), "accuracy": correct.mean()}

    def validation_epoch_end(self) -> dict[str, torch.Tensor]:
        """``accuracy`` and ``auroc`` over every image of the current validation pass.

        AUROC is NaN (with MONAI's warning) when only one class was seen.
        """
        if len(self._epoch_correct) == 0:
            return {}
        accuracy = self._epoch_correct.get_buffer().mean()
        auroc = torch.tensor(float(self._epoch_auroc.aggregate()))
        return {"accuracy": accuracy, "auroc": auroc}

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Probability of class 1 (nodule slice), shape (B,)."""
        return torch.softmax(self(batch["image"]).float(), dim=1)[:, 1]


def classifier_encoder(task: nn.Module) -> tuple[str, nn.Module]:
    """``(dotted name, module)`` of the pretrained backbone inside a classification task."""
    network = getattr(task, "network", None)
    encoder = getattr(network, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise TypeError(
            f"{type(task).__name__} has no network.encoder; pass a ClassificationTask (chestssl.tasks.cls, a "
            "`task: cls` run), whose network (LinearHeadClassifier or LatentResNetClassifier) holds the backbone"
        )
    return "network.encoder", encoder
