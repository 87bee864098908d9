"""Linear probing of radiograph encoders, per image and per study, on the folder's labels.

The probe is :func:`~chestssl.eval.linear_probe.fit_linear_probe` (Alain & Bengio 2016; seed
004's protocol): one class-balanced logistic regression per label on frozen features,
bootstrap intervals over patients. What this module adds is the radiograph side:

- labels: every label column of the radiographs folder (``radiographs.json``: rendered
  ``nodule`` and ``malignant``, or a dataset's findings), an unknown label (NaN) left out of
  that label's probe (:func:`probe_label_dict`);
- features per image (:func:`extract_image_features`: ``encoder.representation`` of one
  radiograph) or per study (:func:`extract_study_features`, seed 004: the bottleneck CLS of
  all views of a study after the final norm, :func:`~chestssl.xray.study_vit.study_representation`);
- :class:`RadiographProbeMonitor`: the probe on the validation split every
  ``probe.every_epochs`` epochs, with either feature extractor.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from chestssl.checks import positive_int
from chestssl.data.radiograph_datasets import collate_radiograph_studies
from chestssl.eval.linear_probe import NOT_PROBED, LinearProbeMonitor, ProbeFeatures, fit_linear_probe
from chestssl.inference import predict_dataset
from chestssl.xray.study_vit import study_representation

__all__ = [
    "RadiographProbeMonitor",
    "extract_image_features",
    "extract_study_features",
    "probe_label_dict",
    "validation_scores",
]

FeatureExtractor = Callable[[nn.Module, Dataset, Any, int], ProbeFeatures]


def probe_label_dict(labels: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """``{name: (N,) int64}`` from (N, L) labels in {0, 1, NaN}; NaN (unknown) becomes
    :data:`~chestssl.eval.linear_probe.NOT_PROBED`."""
    labels = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    if labels.shape[1] != len(names):
        raise ValueError(f"labels have {labels.shape[1]} columns, expected one per label name ({len(names)})")
    return {name: np.where(np.isnan(labels[:, j]), NOT_PROBED, labels[:, j]).astype(np.int64)
            for j, name in enumerate(names)}


def _label_names(dataset: Dataset) -> list[str]:
    names = getattr(dataset, "label_names", None)
    if not names:
        raise ValueError(f"{type(dataset).__name__} has no label_names; probe a RadiographDataset or "
                         "RadiographStudyDataset")
    return list(names)


@contextmanager
def _frozen(encoder: nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    """``encoder`` moved to ``device`` (``None``: where it is) in eval mode; its mode is
    restored on exit. Yields the device."""
    if device is None:
        parameter = next(encoder.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    encoder.to(device)
    was_training = encoder.training
    encoder.eval()
    try:
        yield device
    finally:
        encoder.train(was_training)


@torch.no_grad()
def extract_image_features(
    encoder: nn.Module,
    dataset: Dataset,
    device: torch.device | str | None = None,
    batch_size: int = 64,
) -> ProbeFeatures:
    """Frozen ``encoder.representation`` (N, D) of every radiograph of ``dataset``, in order.

    Args:
        encoder: a backbone with ``representation(x) -> (B, D)``; run in eval mode, its
            previous mode restored afterwards.
        dataset: a :class:`~chestssl.data.radiograph_datasets.RadiographDataset` (items with
            ``image`` (1, S, S), ``labels`` (L,), ``patient_id``).
        device: where to run (the encoder is moved there); ``None``: the encoder's device.
        batch_size: images per forward pass.
    """
    names = _label_names(dataset)
    batch_size = positive_int(batch_size, "batch_size")
    with _frozen(encoder, device) as device:
        out = predict_dataset(lambda batch: encoder.representation(batch["image"]), dataset,
                              batch_size=batch_size, device=device, keep=("labels", "patient_id"))
    return ProbeFeatures(features=out["output"], labels=probe_label_dict(out["labels"], names),
                         patient_ids=out["patient_id"])


@torch.no_grad()
def extract_study_features(
    encoder: nn.Module,
    dataset: Dataset,
    device: torch.device | str | None = None,
    batch_size: int = 32,
) -> ProbeFeatures:
    """Frozen study features (B, D) of every study of ``dataset``, in order (seed 004).

    Args:
        encoder: a ``ViTEncoder`` (the ``vit`` backbone); run in eval mode without
            gradients, its previous mode restored afterwards.
        dataset: a :class:`~chestssl.data.radiograph_datasets.RadiographStudyDataset`
            (items with ``images`` (V, 1, S, S), ``labels`` (L,), ``patient_id``); V may
            differ between studies.
        device: where to run (the encoder is moved there); ``None``: the encoder's device.
        batch_size: studies per forward pass.
    """
    names = _label_names(dataset)
    batch_size = positive_int(batch_size, "batch_size")
    features, labels, patients = [], [], []
    with _frozen(encoder, device) as device:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_radiograph_studies):
            study_index = batch["study_index"].to(device)
            features.append(study_representation(encoder, batch["images"].to(device), study_index).float().cpu())
            labels.append(batch["labels"])
            patients.extend(batch["patient_id"])
    if not features:
        raise ValueError(f"no studies to probe in {getattr(dataset, 'split', 'the dataset')!r}")
    return ProbeFeatures(features=torch.cat(features).numpy(),
                         labels=probe_label_dict(torch.cat(labels).numpy(), names),
                         patient_ids=np.asarray(patients))


def validation_scores(result: dict[str, Any]) -> dict[str, float]:
    """``probe/<label>/auroc`` and ``probe/mean_auroc`` of a :func:`fit_linear_probe` result,
    for the labels it could probe (the names :class:`LinearProbeMonitor` logs)."""
    scores = {
        f"probe/{name}/auroc": result[name]["auroc"]["value"]
        for name in result["mean"]["labels"]
        if result[name]["auroc"]["value"] is not None
    }
    if result["mean"]["auroc"] is not None:
        scores["probe/mean_auroc"] = result["mean"]["auroc"]
    return scores


class RadiographProbeMonitor(LinearProbeMonitor):
    """:class:`~chestssl.eval.linear_probe.LinearProbeMonitor` on a radiographs folder's labels.

    Every ``every_epochs`` epochs it extracts ``features`` (:func:`extract_image_features`
    or :func:`extract_study_features`) of ``train_data`` and ``val_data``, fits the probe
    on the first and scores it on the second, and returns the image-level monitor's keys
    (``probe/<label>/auroc``, ``probe/mean_auroc``), so curves of both levels plot alike.
    Torch's CPU random state is left as it was.
    """

    def __init__(self, *args: Any, features: FeatureExtractor = extract_image_features, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.features = features

    def __call__(self, method: nn.Module, epoch: int) -> dict[str, float]:
        if not self.due(epoch):
            return {}
        encoder = method.encoder()
        with torch.random.fork_rng(devices=[]):
            train = self.features(encoder, self.train_data, self.device, self.batch_size)
            val = self.features(encoder, self.val_data, self.device, self.batch_size)
        result = fit_linear_probe(
            train, val, self.C, self.max_iter, self.seed, n_bootstrap=0, confidence=0.95, params_key=self.params_key
        )
        return validation_scores(result)
