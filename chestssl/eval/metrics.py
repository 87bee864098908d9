"""Test-split metrics with bootstrap confidence intervals over patients.

Inputs are the items of the test split (2D slices ``(N, 1, H, W)``, or 3D crops
``(N, 1, D, H, W)``), each with its patient id. Every function returns a mapping that
:func:`chestssl.io.write_json` writes as the stage's metrics file::

    {"<metric>": {"value": float | None, "ci_low": float | None, "ci_high": float | None,
                  "note": str (only when something needs saying)},
     ..., "n_images": int, "n_patients": int, "bootstrap": {...}}

so ``dvc metrics diff`` shows flat keys such as ``dice_global.value``. A metric that is
undefined on the test split (e.g. AUROC with one class) is ``null`` with a note saying
why; JSON never holds NaN or infinity.

Segmentation (seed 000 reported Dice/Jaccard micro-averaged over all pixels; we report
that and the per-image mean):

- ``dice_global``, ``jaccard_global``: every pixel of every image pooled,
  ``2 sum(TP) / (sum(pred) + sum(target))`` and ``sum(TP) / sum(pred OR target)``.
- ``dice_per_image``, ``jaccard_per_image``: mean over all images of MONAI's
  ``DiceMetric`` / ``MeanIoU`` with ``ignore_empty=False``. Rule for an image whose target
  is empty: it scores 1 if the prediction is empty too, 0 if anything is predicted.
- ``dice_per_image_nonempty``, ``jaccard_per_image_nonempty``: mean over the images with
  a non-empty target only (MONAI's ``ignore_empty=True``), so a split rich in empty
  slices cannot inflate the score.
- ``precision``, ``recall``: pixel-level, pooled over all images.

Classification: accuracy, precision, recall (sensitivity), specificity, F1 at a score
threshold, AUROC (scikit-learn), and the confusion counts.

Reconstruction: SSIM and PSNR by MONAI's ``SSIMMetric`` / ``PSNRMetric`` with one
``data_range`` (:data:`DATA_RANGE` = 1.0; images are windowed to [0, 1] and the
reconstruction is clamped to [0, 1] first). Seed 000 used 2.0 for single-task AEs and 1.0
for its multihead model, which put their PSNRs 6 dB apart by construction. PSNR of an
exact reconstruction is infinite; each image's PSNR is capped at :data:`PSNR_CAP_DB`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, MeanIoU, PSNRMetric, SSIMMetric
from sklearn.metrics import confusion_matrix, roc_auc_score

from chestssl.eval.bootstrap import PatientBootstrap, SumMetric, metric_entry, ratio

#: The one intensity range of every SSIM / PSNR in this project: images are in [0, 1].
DATA_RANGE = 1.0
#: Per-image PSNR cap (dB): an MSE below 1e-10 (identical images up to float rounding)
#: counts as 100 dB instead of infinity, so means and intervals stay finite.
PSNR_CAP_DB = 100.0
# Items handed to MONAI at once (bounds memory on large test splits).
_CHUNK = 256

ArrayLike = np.ndarray | torch.Tensor | Sequence


def _to_numpy(array: ArrayLike) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _check_items(name: str, array: np.ndarray, n_items: int | None = None) -> None:
    if array.ndim not in (4, 5) or array.shape[1] != 1:
        raise ValueError(
            f"{name} must have shape (N, 1, H, W) or (N, 1, D, H, W), got {array.shape}; "
            "add the channel axis with array[:, None]"
        )
    if array.shape[0] == 0:
        raise ValueError(f"{name} holds no items; the test split is empty")
    if n_items is not None and array.shape[0] != n_items:
        raise ValueError(f"{name} has {array.shape[0]} items, expected {n_items}")


def _check_patient_ids(patient_ids: ArrayLike, n_items: int) -> np.ndarray:
    ids = np.asarray(patient_ids).astype(str)
    if ids.shape != (n_items,):
        raise ValueError(f"patient_ids has shape {ids.shape}, expected ({n_items},): one patient id per item")
    return ids


def _check_unit_range(name: str, array: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values; check the model outputs")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{name} must be {what} in [0, 1], got values in [{low:g}, {high:g}]")


def _finalise(metrics: dict, boot: PatientBootstrap) -> dict:
    metrics["n_images"] = boot.n_items
    metrics["n_patients"] = boot.n_patients
    metrics["bootstrap"] = boot.metadata()
    return metrics


# --------------------------------------------------------------------------- segmentation


def per_image_segmentation_scores(probs: ArrayLike, masks: ArrayLike, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Per-image pixel counts and scores of a binary segmentation.

    Args:
        probs: ``(N, 1, H, W)`` or ``(N, 1, D, H, W)`` foreground probabilities in [0, 1].
        masks: same shape; a pixel is foreground where ``mask > 0`` (labelled nodule masks
            are binarised).
        threshold: a pixel is predicted foreground where ``prob >= threshold`` (as MONAI's
            ``AsDiscrete(threshold=...)``).

    Returns:
        ``(N,)`` arrays: ``intersection``, ``pred_pixels``, ``target_pixels`` (int64) and
        ``dice``, ``jaccard`` (float64, MONAI ``DiceMetric`` / ``MeanIoU`` with
        ``ignore_empty=False``: an empty target scores 1 with an empty prediction, else 0).
    """
    probs_np = _to_numpy(probs)
    masks_np = _to_numpy(masks)
    _check_items("probs", probs_np)
    _check_items("masks", masks_np, probs_np.shape[0])
    if probs_np.shape != masks_np.shape:
        raise ValueError(f"probs {probs_np.shape} and masks {masks_np.shape} must have the same shape")
    _check_unit_range("probs", probs_np.astype(np.float32), "foreground probabilities (apply a sigmoid/softmax)")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")

    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    iou_metric = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
    spatial_axes = tuple(range(1, probs_np.ndim))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("intersection", "pred_pixels", "target_pixels", "dice", "jaccard")}
    for start in range(0, probs_np.shape[0], _CHUNK):
        pred = probs_np[start : start + _CHUNK] >= threshold
        target = masks_np[start : start + _CHUNK] > 0
        parts["intersection"].append((pred & target).sum(axis=spatial_axes, dtype=np.int64))
        parts["pred_pixels"].append(pred.sum(axis=spatial_axes, dtype=np.int64))
        parts["target_pixels"].append(target.sum(axis=spatial_axes, dtype=np.int64))
        pred_t = torch.from_numpy(pred.astype(np.float32))
        target_t = torch.from_numpy(target.astype(np.float32))
        parts["dice"].append(dice_metric(pred_t, target_t).reshape(-1).double().numpy())
        parts["jaccard"].append(iou_metric(pred_t, target_t).reshape(-1).double().numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


SEGMENTATION_METRICS: dict[str, SumMetric] = {
    "dice_global": SumMetric(
        lambda s: ratio(2 * s["intersection"], s["pred_pixels"] + s["target_pixels"]),
        "no foreground pixel in any target or prediction",
    ),
    "jaccard_global": SumMetric(
        lambda s: ratio(s["intersection"], s["pred_pixels"] + s["target_pixels"] - s["intersection"]),
        "no foreground pixel in any target or prediction",
    ),
    "dice_per_image": SumMetric(lambda s: ratio(s["dice"], s["images"]), "no images"),
    "jaccard_per_image": SumMetric(lambda s: ratio(s["jaccard"], s["images"]), "no images"),
    "dice_per_image_nonempty": SumMetric(
        lambda s: ratio(s["dice_nonempty"], s["nonempty"]), "no image with a non-empty target"
    ),
    "jaccard_per_image_nonempty": SumMetric(
        lambda s: ratio(s["jaccard_nonempty"], s["nonempty"]), "no image with a non-empty target"
    ),
    "precision": SumMetric(lambda s: ratio(s["intersection"], s["pred_pixels"]), "no predicted foreground pixel"),
    "recall": SumMetric(lambda s: ratio(s["intersection"], s["target_pixels"]), "no foreground pixel in the targets"),
}


def evaluate_segmentation(
    probs: ArrayLike,
    masks: ArrayLike,
    patient_ids: ArrayLike,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Dice, Jaccard (global and per image) and pixel precision/recall with patient CIs.

    Args:
        probs: ``(N, 1, H, W)`` (or ``(N, 1, D, H, W)``) foreground probabilities in [0, 1].
        masks: same shape, foreground where ``> 0``.
        patient_ids: ``(N,)`` patient of each item.
        threshold: foreground where ``prob >= threshold``.
        n_bootstrap, confidence, seed: see :class:`~chestssl.eval.bootstrap.PatientBootstrap`.

    Returns:
        The metrics mapping described in the module docstring, plus ``threshold`` and
        ``n_images_empty_target``.
    """
    scores = per_image_segmentation_scores(probs, masks, threshold)
    ids = _check_patient_ids(patient_ids, scores["dice"].size)
    nonempty = (scores["target_pixels"] > 0).astype(np.float64)
    items = {
        "intersection": scores["intersection"],
        "pred_pixels": scores["pred_pixels"],
        "target_pixels": scores["target_pixels"],
        "dice": scores["dice"],
        "jaccard": scores["jaccard"],
        "images": np.ones_like(nonempty),
        "nonempty": nonempty,
        "dice_nonempty": scores["dice"] * nonempty,
        "jaccard_nonempty": scores["jaccard"] * nonempty,
    }
    boot = PatientBootstrap(ids, n_bootstrap, confidence, seed)
    metrics = boot.evaluate(items, SEGMENTATION_METRICS)
    metrics["threshold"] = float(threshold)
    metrics["n_images_empty_target"] = int((nonempty == 0).sum())
    return _finalise(metrics, boot)


# ------------------------------------------------------------------------- classification


CLASSIFICATION_METRICS: dict[str, SumMetric] = {
    "accuracy": SumMetric(lambda s: ratio(s["tp"] + s["tn"], s["tp"] + s["tn"] + s["fp"] + s["fn"]), "no items"),
    "precision": SumMetric(lambda s: ratio(s["tp"], s["tp"] + s["fp"]), "no positive prediction"),
    "recall": SumMetric(lambda s: ratio(s["tp"], s["tp"] + s["fn"]), "no positive label"),
    "specificity": SumMetric(lambda s: ratio(s["tn"], s["tn"] + s["fp"]), "no negative label"),
    "f1": SumMetric(
        lambda s: ratio(2 * s["tp"], 2 * s["tp"] + s["fp"] + s["fn"]), "no positive label and no positive prediction"
    ),
}


def evaluate_classification(
    scores: ArrayLike,
    labels: ArrayLike,
    patient_ids: ArrayLike,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Binary classification metrics with patient CIs.

    Args:
        scores: ``(N,)`` probability of the positive class, in [0, 1].
        labels: ``(N,)`` in {0, 1} (drop the slices labelled -1 in ``slices.csv`` first).
        patient_ids: ``(N,)`` patient of each item.
        threshold: predicted positive where ``score >= threshold``.
        n_bootstrap, confidence, seed: see :class:`~chestssl.eval.bootstrap.PatientBootstrap`.

    Returns:
        The metrics mapping of the module docstring with ``accuracy``, ``precision``,
        ``recall``, ``specificity``, ``f1``, ``auroc``, plus ``confusion_matrix``
        (``tn``, ``fp``, ``fn``, ``tp`` counts at ``threshold``) and ``threshold``. AUROC
        is ``null`` with a note when the test labels hold one class only.
    """
    scores_np = _to_numpy(scores).astype(np.float64).reshape(-1)
    labels_np = _to_numpy(labels).reshape(-1)
    if scores_np.size == 0:
        raise ValueError("scores holds no items; the test split is empty")
    if labels_np.shape != scores_np.shape:
        raise ValueError(f"labels has {labels_np.size} items, scores {scores_np.size}; they must match")
    unexpected = sorted(set(np.unique(labels_np).tolist()) - {0, 1})
    if unexpected:
        raise ValueError(f"labels must be 0 or 1, got also {unexpected}; drop excluded slices (label -1) first")
    labels_np = labels_np.astype(np.int64)
    _check_unit_range("scores", scores_np, "positive-class probabilities (apply a sigmoid/softmax)")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    ids = _check_patient_ids(patient_ids, scores_np.size)

    predicted = (scores_np >= threshold).astype(np.int64)
    items = {
        "tp": (predicted == 1) & (labels_np == 1),
        "fp": (predicted == 1) & (labels_np == 0),
        "fn": (predicted == 0) & (labels_np == 1),
        "tn": (predicted == 0) & (labels_np == 0),
    }
    boot = PatientBootstrap(ids, n_bootstrap, confidence, seed)
    metrics = boot.evaluate(items, CLASSIFICATION_METRICS)

    classes = np.unique(labels_np)
    if classes.size < 2:
        metrics["auroc"] = metric_entry(
            None, None, None,
            f"undefined: all {labels_np.size} test items have label {int(classes[0])}; AUROC needs both classes",
        )
    else:
        auroc = float(roc_auc_score(labels_np, scores_np))
        metrics["auroc"] = boot.summarize(
            auroc, boot.auroc_samples(scores_np, labels_np), "the resampled patients hold one class only"
        )

    tn, fp, fn, tp = confusion_matrix(labels_np, predicted, labels=[0, 1]).ravel()
    metrics["confusion_matrix"] = {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}
    metrics["threshold"] = float(threshold)
    return _finalise(metrics, boot)


# ------------------------------------------------------------------------- reconstruction


def per_image_reconstruction_scores(recon: ArrayLike, images: ArrayLike) -> dict[str, np.ndarray]:
    """Per-image SSIM, PSNR (capped), L1 and MSE at :data:`DATA_RANGE`.

    Args:
        recon: ``(N, 1, H, W)`` or ``(N, 1, D, H, W)`` reconstructions; clamped to [0, 1].
        images: same shape, the inputs, in [0, 1].

    Returns:
        ``(N,)`` float64 arrays ``ssim``, ``psnr``, ``l1``, ``mse`` and bool
        ``psnr_capped`` (the image's PSNR exceeded :data:`PSNR_CAP_DB`).
    """
    images_np = _to_numpy(images).astype(np.float32)
    recon_np = _to_numpy(recon).astype(np.float32)
    _check_items("images", images_np)
    _check_items("recon", recon_np, images_np.shape[0])
    if recon_np.shape != images_np.shape:
        raise ValueError(f"recon {recon_np.shape} and images {images_np.shape} must have the same shape")
    _check_unit_range("images", images_np, "intensities windowed")
    if not np.all(np.isfinite(recon_np)):
        raise ValueError("recon holds NaN or infinite values; check the model outputs")
    spatial_dims = images_np.ndim - 2
    ssim_metric = SSIMMetric(spatial_dims=spatial_dims, data_range=DATA_RANGE, reduction="none")
    smallest = min(images_np.shape[2:])
    if smallest < ssim_metric.kernel_size[0]:
        raise ValueError(
            f"images of spatial size {images_np.shape[2:]} are smaller than the SSIM window "
            f"({ssim_metric.kernel_size[0]} pixels)"
        )
    psnr_metric = PSNRMetric(max_val=DATA_RANGE, reduction="none")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("ssim", "psnr", "l1", "mse")}
    for start in range(0, images_np.shape[0], _CHUNK):
        target = torch.from_numpy(images_np[start : start + _CHUNK])
        output = torch.from_numpy(recon_np[start : start + _CHUNK]).clamp(0.0, DATA_RANGE)
        parts["ssim"].append(ssim_metric(output, target).reshape(-1).double().numpy())
        parts["psnr"].append(psnr_metric(output, target).reshape(-1).double().numpy())
        difference = (output - target).flatten(1).double()
        parts["l1"].append(difference.abs().mean(dim=1).numpy())
        parts["mse"].append(difference.square().mean(dim=1).numpy())
    scores = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    scores["psnr_capped"] = scores["psnr"] > PSNR_CAP_DB
    scores["psnr"] = np.minimum(scores["psnr"], PSNR_CAP_DB)
    return scores


def evaluate_reconstruction(
    recon: ArrayLike,
    images: ArrayLike,
    patient_ids: ArrayLike,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Mean per-image SSIM, PSNR, L1 and MSE with patient CIs, at ``data_range`` 1.0.

    SSIM: Wang et al., "Image quality assessment: from error visibility to structural
    similarity", IEEE TIP 13(4), 2004 (MONAI ``SSIMMetric``: Gaussian window 11, sigma 1.5).

    Args:
        recon: ``(N, 1, H, W)`` or ``(N, 1, D, H, W)`` reconstructions (clamped to [0, 1]).
        images: same shape, inputs in [0, 1].
        patient_ids: ``(N,)`` patient of each item.

    Returns:
        The metrics mapping of the module docstring with ``ssim``, ``psnr`` (dB), ``l1``,
        ``mse``, plus ``data_range`` (1.0), ``psnr_cap_db`` and ``n_psnr_capped``.
    """
    scores = per_image_reconstruction_scores(recon, images)
    ids = _check_patient_ids(patient_ids, scores["ssim"].size)
    items = {name: scores[name] for name in ("ssim", "psnr", "l1", "mse")}
    items["images"] = np.ones_like(scores["ssim"])
    means = {
        name: SumMetric(lambda s, name=name: ratio(s[name], s["images"]), "no images")
        for name in ("ssim", "psnr", "l1", "mse")
    }
    boot = PatientBootstrap(ids, n_bootstrap, confidence, seed)
    metrics = boot.evaluate(items, means)
    metrics["data_range"] = DATA_RANGE
    metrics["psnr_cap_db"] = PSNR_CAP_DB
    metrics["n_psnr_capped"] = int(scores["psnr_capped"].sum())
    return _finalise(metrics, boot)
