"""Fine-tuning on chest radiographs: one finding per image, or several (seeds 001, 002, 004).

Two protocols, chosen by ``mode``:

- ``multiclass`` (seed 001 on COVID-19 Radiography, 4 classes): each image has exactly one
  of the ``L`` labels; softmax cross-entropy over ``L`` logits; accuracy and the confusion
  matrix.
- ``multilabel`` (seed 002 on ChestX-ray14, seed 004 on CheXpert / MIMIC-CXR, 14 labels):
  any number of labels per image; one sigmoid per label, binary cross-entropy; the mean
  AUROC over labels. A label unknown for an image (NaN in the dataset's ``labels``, e.g.
  CheXpert's uncertain ones when ``data.cxr.uncertain: ignore``) is left out of that
  label's loss and AUROC.

Two architectures, chosen by ``arch``:

- ``linear`` (seed 001's downstream head): the pretrained encoder's global
  ``representation`` -> one linear layer (:class:`~chestssl.models.classifier.LinearHeadClassifier`);
- ``densenet121`` (seed 002's classifier): MONAI ``DenseNet121`` (Huang et al., CVPR 2017)
  on one-channel images, randomly initialised (seeded).

The whole network is trained. Items are the radiograph datasets' dicts
(:mod:`chestssl.data.radiograph_datasets`): ``image`` (B, 1, S, S) and ``labels`` (B, L)
float in {0, 1, NaN}.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import Cumulative
from torch import nn

from chestssl.models.classifier import LinearHeadClassifier
from chestssl.models.seeding import seeded
from chestssl.tasks.base import TaskModel

#: The ``mode`` of a radiograph fine-tuning run.
MODES = ("multiclass", "multilabel")
#: The ``arch`` of a radiograph fine-tuning run: a head on a pretrained encoder, or a whole network.
ARCHS = ("linear", "densenet121")


def class_targets(labels: torch.Tensor) -> torch.Tensor:
    """The class index of each image (B,) int64 from one-hot ``labels`` (B, L).

    Raises:
        ValueError: a row that is not exactly one-hot (no label, several, or unknown ones):
            such a dataset is multi-label; use ``mode: multilabel``.
    """
    known = ~torch.isnan(labels)
    one_hot = known.all(dim=1) & ((labels == 1).sum(dim=1) == 1) & ((labels == 0) | (labels == 1)).all(dim=1)
    if not bool(one_hot.all()):
        bad = int((~one_hot).nonzero()[0, 0])
        raise ValueError(
            f"mode multiclass needs exactly one positive label per image; image {bad} of the batch has labels "
            f"{labels[bad].tolist()}; use mode: multilabel for a dataset with several (or no) findings per image"
        )
    return labels.argmax(dim=1)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits (B, L) against ``labels`` (B, L) in {0, 1, NaN},
    averaged over the known entries only (0 when none is known)."""
    known = ~torch.isnan(labels)
    if not bool(known.any()):
        return logits.sum() * 0.0  # keeps the graph, so every parameter still gets a (zero) gradient
    targets = torch.where(known, labels, torch.zeros_like(labels))
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return losses[known].mean()


def per_label_auroc(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each label (L,) over the images where it is known; NaN for a label whose
    known images hold one class only."""
    from sklearn.metrics import roc_auc_score

    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    out = np.full(labels.shape[1], np.nan)
    for j in range(labels.shape[1]):
        known = ~np.isnan(labels[:, j])
        truth = labels[known, j]
        if known.any() and np.unique(truth).size == 2:
            out[j] = roc_auc_score(truth, probabilities[known, j])
    return out


class RadiographClassificationTask(TaskModel):
    """A radiograph classifier of ``len(label_names)`` outputs (module docstring).

    ``forward(image (B, 1, S, S)) -> logits (B, L)``; ``predict(batch) -> probabilities
    (B, L)``: softmax over the labels (``multiclass``) or one sigmoid each (``multilabel``).

    Args:
        name, run_cfg, seed: see :class:`~chestssl.tasks.base.TaskModel`; ``run_cfg``
            holds ``mode`` (:data:`MODES`) and ``arch`` (:data:`ARCHS`).
        label_names: the dataset's labels, in the order of its ``labels`` vectors.
        encoder: the pretrained backbone for ``arch: linear`` (copied); ``None`` for
            ``densenet121``.
    """

    ddp_find_unused_parameters = False

    def __init__(self, name: str, run_cfg: Mapping[str, Any], label_names: Sequence[str], seed: int,
                 encoder: nn.Module | None = None):
        super().__init__(name, run_cfg, seed)
        self.mode, self.arch = self.run_cfg["mode"], self.run_cfg["arch"]
        if self.mode not in MODES:
            raise ValueError(f"{name}: unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.arch not in ARCHS:
            raise ValueError(f"{name}: unknown arch {self.arch!r}; known: {', '.join(ARCHS)}")
        self.label_names = list(label_names)
        count = len(self.label_names)
        if count < 2 and self.mode == "multiclass":
            raise ValueError(f"{name}: mode multiclass needs at least 2 labels, the dataset has {count}")
        if count < 1:
            raise ValueError(f"{name}: the dataset has no labels to fine-tune on")
        if (encoder is None) != (self.arch == "densenet121"):
            raise ValueError(f"{name}: arch {self.arch!r} " + ("takes no pretrained encoder" if encoder is not None
                                                              else "needs a pretrained encoder"))
        with seeded(self.seed):
            if self.arch == "linear":
                self.network: nn.Module = LinearHeadClassifier(encoder, num_classes=count)
            else:
                from monai.networks.nets import DenseNet121

                self.network = DenseNet121(spatial_dims=2, in_channels=1, out_channels=count)
        self._probabilities = self.register_accumulator(Cumulative())
        self._labels = self.register_accumulator(Cumulative())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mode == "multiclass":
            return F.cross_entropy(logits, class_targets(labels))
        return masked_bce(logits, labels)

    def _probabilities_of(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1) if self.mode == "multiclass" else torch.sigmoid(logits)

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": self._loss(self(batch["image"]).float(), batch["labels"].float())}

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``loss`` of the batch (and ``accuracy`` for ``multiclass``); the probabilities
        and labels are kept for :meth:`validation_epoch_end`."""
        logits, labels = self(batch["image"]).float(), batch["labels"].float()
        self._probabilities.extend(self._probabilities_of(logits).cpu())
        self._labels.extend(labels.cpu())
        out = {"loss": self._loss(logits, labels)}
        if self.mode == "multiclass":
            out["accuracy"] = (logits.argmax(dim=1) == class_targets(labels)).float().mean()
        return out

    def validation_epoch_end(self) -> dict[str, torch.Tensor]:
        """``mean_auroc`` over the labels with both classes among the validation images
        (NaN when none has), and ``accuracy`` over every image for ``multiclass``."""
        if len(self._labels) == 0:
            return {}
        probabilities = self._probabilities.get_buffer().numpy()
        labels = self._labels.get_buffer().numpy()
        aurocs = per_label_auroc(probabilities, labels)
        out = {"mean_auroc": torch.tensor(float(np.nanmean(aurocs)) if np.isfinite(aurocs).any() else float("nan"))}
        if self.mode == "multiclass":
            out["accuracy"] = torch.tensor(float((probabilities.argmax(axis=1) == labels.argmax(axis=1)).mean()))
        return out

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Probabilities (B, L): softmax (``multiclass``) or sigmoid per label (``multilabel``)."""
        return self._probabilities_of(self(batch["image"]).float())


class AlignedRadiographs:
    """The items of a radiograph dataset with each ``image`` replaced by its STN-aligned one.

    ``images``: (N, 1, H', W') the aligned images, in the dataset's item order. The
    projected-nodule ``mask`` of rendered radiographs is dropped (it is in the unaligned
    frame). ``frame`` and ``label_names`` are the dataset's.
    """

    def __init__(self, base, images):
        if len(images) != len(base):
            raise ValueError(f"{len(images)} aligned images for {len(base)} radiographs; they must match")
        self.base, self.images = base, images
        self.label_names = base.label_names
        self.frame = base.frame

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {key: value for key, value in self.base[index].items() if key != "mask"}
        item["image"] = self.images[index]
        return item


def aligned_radiographs(dataset, stn: nn.Module) -> AlignedRadiographs:
    """``dataset`` with every image aligned by ``stn`` (:func:`~chestssl.models.stn.apply_stn`)."""
    from chestssl.models.stn import apply_stn

    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    aligned, _ = apply_stn(stn, images)
    return AlignedRadiographs(dataset, aligned)


def radiograph_run_dataset(run_cfg: Mapping[str, Any], folder, split: str, stn: nn.Module | None = None,
                           patient_ids: Sequence[str] | None = None):
    """The images of ``split`` a ``radiograph_runs`` entry trains or is tested on: those of its
    ``views`` in the opened radiographs ``folder`` (all patients, or ``patient_ids``), aligned
    by ``stn`` when the run is ``aligned`` (the STN of ``align_radiographs``; required then)."""
    from chestssl.data.radiograph_datasets import RadiographDataset

    dataset = RadiographDataset(folder, split, run_cfg["views"], patient_ids=patient_ids)
    if not run_cfg["aligned"]:
        return dataset
    if stn is None:
        raise ValueError("an aligned run needs the STN of align_radiographs (models/alignment/stn.pt)")
    return aligned_radiographs(dataset, stn)
