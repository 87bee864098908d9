"""Linear probing of radiograph encoders, per image and per study, on the folder's labels.

The probe is :func:`~chestssl.eval.linear_probe.fit_linear_probe` (Alain & Bengio 2016; seed
004's protocol): one class-balanced logistic regression per label on frozen features,
bootstrap intervals over patients. What this module adds is the radiograph side:

- labels: every label column of the radiographs folder (``radiographs.json``: rendered
  ``nodule`` and ``malignant``, or a dataset's findings), an unknown label (NaN) left out of
  that label's probe (:func:`probe_label_dict`);
- features per image (:func:`extract_image_features`: ``encoder.representation`` of one
  radiograph) or per study (:func:`extract_study_features`, seed 004: the bottleneck CLS of
  all views of a study after the final norm, :func:`~chestssl.models.study_vit.study_representation`);
- both modalities (:func:`both_modalities_probe`, seed 003's cross-modal pretraining): the
  CT probe of ``evaluate_pretrain`` and the radiograph probe of one encoder.

During pretraining, :class:`~chestssl.eval.linear_probe.LinearProbeMonitor` takes either
extractor as its ``features``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from chestssl.checks import positive_int
from chestssl.data.radiograph_datasets import collate_radiograph_studies
from chestssl.eval.linear_probe import NOT_PROBED, ProbeFeatures, extract_features, fit_linear_probe
from chestssl.inference import predict_dataset
from chestssl.models.study_vit import study_representation

__all__ = ["both_modalities_probe", "extract_image_features", "extract_study_features", "probe_label_dict"]


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


def both_modalities_probe(
    encoder: nn.Module,
    datasets: Mapping[str, Mapping[str, Dataset]],
    params: Mapping[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    """``{"ct": probe, "radiograph": probe}`` of a frozen encoder: fitted on train, scored on test.

    ``datasets``: ``{"ct": {split: dataset}, "radiograph": {split: dataset}}`` with the
    ``train`` and ``test`` splits. The CT probe is ``evaluate_pretrain``'s (labelled slices,
    ``nodule`` and ``malignant``; :func:`~chestssl.eval.linear_probe.extract_features`); the
    radiograph probe is ``pretrain_radiographs``'s
    (:class:`~chestssl.data.radiograph_datasets.RadiographDataset`, the folder's labels;
    :func:`extract_image_features`). ``params``: ``probe`` (``C``, ``max_iter``),
    ``evaluate`` (``bootstrap_samples``, ``confidence``) and ``seed``.
    """
    probe, evaluate, seed = params["probe"], params["evaluate"], params["seed"]
    settings = dict(C=probe["C"], max_iter=probe["max_iter"], seed=seed,
                    n_bootstrap=evaluate["bootstrap_samples"], confidence=evaluate["confidence"])
    # The modality names of chestssl.data.cross_modal.
    extractors = {"ct": extract_features, "radiograph": extract_image_features}
    return {
        modality: fit_linear_probe(extract(encoder, datasets[modality]["train"], device),
                                   extract(encoder, datasets[modality]["test"], device), **settings)
        for modality, extract in extractors.items()
    }
