"""Linear probing at study level (seed 004): one feature per radiograph study.

Seed 004 probes its study-level encoder on the shared CLS token of all views of a study.
Here the feature of a study is :func:`~chestssl.xray.study_vit.study_representation` (the
bottleneck CLS after the final norm, no masking) of a frozen ``ViTEncoder``; the labels are
the study's (``nodule``, and ``malignant`` from its highest malignancy rating, as the
image-level probe derives them with :func:`~chestssl.eval.linear_probe.probe_labels`).
Fitting and scoring are :func:`~chestssl.eval.linear_probe.fit_linear_probe`'s: one
balanced logistic regression per label, bootstrap intervals over patients.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from chestssl.checks import positive_int
from chestssl.data.radiograph_datasets import RadiographStudyDataset, collate_radiograph_studies
from chestssl.eval.linear_probe import LinearProbeMonitor, ProbeFeatures, fit_linear_probe, probe_labels
from chestssl.xray.study_vit import study_representation

__all__ = ["StudyProbeMonitor", "extract_study_features", "validation_scores"]


@torch.no_grad()
def extract_study_features(
    encoder: nn.Module,
    dataset: RadiographStudyDataset,
    device: torch.device | str | None = None,
    batch_size: int = 32,
) -> ProbeFeatures:
    """Frozen study features (S, D) of every study of ``dataset``, in dataset order.

    Args:
        encoder: a ``ViTEncoder`` (the ``vit`` backbone); run in eval mode without
            gradients, its previous mode restored afterwards.
        dataset: studies (items with ``images`` (V, 1, S, S), ``label``, ``malignancy``,
            ``patient_id``); V may differ between studies.
        device: where to run (the encoder is moved there); ``None``: the encoder's device.
        batch_size: studies per forward pass.

    Returns:
        :class:`~chestssl.eval.linear_probe.ProbeFeatures`, one row per study.
    """
    batch_size = positive_int(batch_size, "batch_size")
    if device is None:
        parameter = next(encoder.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    encoder.to(device)
    was_training = encoder.training
    encoder.eval()
    features, labels, malignancy, patients = [], [], [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_radiograph_studies):
            study_index = batch["study_index"].to(device)
            features.append(study_representation(encoder, batch["images"].to(device), study_index).float().cpu())
            labels.append(batch["label"])
            malignancy.append(batch["malignancy"])
            patients.extend(batch["patient_id"])
    finally:
        encoder.train(was_training)
    if not features:
        raise ValueError(f"no studies to probe in {getattr(dataset, 'split', 'the dataset')!r}")
    items = {"label": torch.cat(labels), "malignancy": torch.cat(malignancy)}
    return ProbeFeatures(
        features=torch.cat(features).numpy(), labels=probe_labels(items), patient_ids=np.asarray(patients)
    )


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


class StudyProbeMonitor(LinearProbeMonitor):
    """:class:`~chestssl.eval.linear_probe.LinearProbeMonitor` at study level.

    Every ``every_epochs`` epochs it fits the probe on the study features of ``train_data``
    and scores it on ``val_data`` (both :class:`RadiographStudyDataset`) and returns the
    same keys as the image-level monitor, so the two curves plot alike.
    """

    def __call__(self, method: nn.Module, epoch: int) -> dict[str, float]:
        if not self.due(epoch):
            return {}
        encoder = method.encoder()
        with torch.random.fork_rng(devices=[]):
            train = extract_study_features(encoder, self.train_data, self.device, self.batch_size)
            val = extract_study_features(encoder, self.val_data, self.device, self.batch_size)
        result = fit_linear_probe(
            train, val, self.C, self.max_iter, self.seed, n_bootstrap=0, confidence=0.95, params_key=self.params_key
        )
        return validation_scores(result)
