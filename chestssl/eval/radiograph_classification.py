"""Test metrics of a fine-tuned radiograph classifier, with bootstrap intervals over patients.

- Every mode: the AUROC of each label over the images where it is known (an unknown label,
  NaN, is left out) and their mean over the labels (seed 002's headline: mean AUROC over
  ChestX-ray14's 14 labels, 0.8110 unaligned vs 0.8124 aligned; seed 004's probes report
  the same), each with a percentile interval from one set of patient resamples
  (:class:`~chestssl.eval.bootstrap.PatientBootstrap`), so the mean's interval is joint
  over labels.
- ``multiclass`` (seed 001: 4-class COVID-19 Radiography, 97.4% accuracy): the accuracy
  of the most probable class, with its interval, and the confusion matrix (rows: true
  class, columns: predicted, in label order).
- ``multilabel``: each label's 2x2 confusion counts at a probability threshold (``label_confusion``),
  over the images where the label is known.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from chestssl.eval.bootstrap import PatientBootstrap, SumMetric, metric_entry, ratio, weighted_auroc

#: The accuracy of a multi-class classifier, from per-image (correct, 1) sums.
ACCURACY = SumMetric(lambda s: ratio(s["correct"], s["images"]), "no test image")


def evaluate_radiograph_classification(
    probabilities: np.ndarray,
    labels: np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
    label_names: Sequence[str],
    mode: str,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict:
    """Metrics of ``probabilities`` (N, L) against ``labels`` (N, L) in {0, 1, NaN}.

    Args:
        probabilities: softmax (``multiclass``) or per-label sigmoid (``multilabel``) outputs.
        labels: the images' labels, NaN where unknown; one-hot rows for ``multiclass``.
        patient_ids: (N,) the patient of each image (the bootstrap's unit).
        label_names: the L label names, in column order.
        mode: ``multiclass`` or ``multilabel``.
        n_bootstrap, confidence, seed: see :class:`~chestssl.eval.bootstrap.PatientBootstrap`.
        threshold: ``multilabel``: a label is predicted where its probability is at least this.

    Returns:
        ``{"auroc": {label: record}, "mean_auroc": record, "n_images", "n_patients",
        "bootstrap"}`` plus, for ``multiclass``, ``accuracy`` and ``confusion_matrix``
        (``{"labels": [...], "counts": [[...]]}``), for ``multilabel``, ``label_confusion``
        (``{"labels", "threshold", "tn", "fp", "fn", "tp"}``, one count per label). A record is ``{value, ci_low, ci_high[, note]}``;
        a label whose known test images hold one class has ``value: null`` and a note, and is
        left out of the mean.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    names = list(label_names)
    if probabilities.ndim != 2 or probabilities.shape != labels.shape or probabilities.shape[1] != len(names):
        raise ValueError(f"probabilities {probabilities.shape} and labels {labels.shape} must both be "
                         f"(images, {len(names)} labels)")
    if probabilities.shape[0] == 0:
        raise ValueError("no test images to evaluate")
    if not np.isfinite(probabilities).all():
        bad = int(np.sum(~np.isfinite(probabilities).all(axis=1)))
        raise ValueError(f"the classifier's outputs are NaN or infinite for {bad} of {probabilities.shape[0]} test "
                         "images: its weights diverged or a layer saw too little to normalise (BatchNorm on a "
                         "1 x 1 map of a batch of 1); lower train.lr or raise radiographs.side / train.batch_size")
    if mode not in ("multiclass", "multilabel"):
        raise ValueError(f"mode: got {mode!r}, expected 'multiclass' or 'multilabel'")
    from sklearn.metrics import roc_auc_score

    boot = PatientBootstrap(np.asarray(patient_ids).astype(str), n_bootstrap, confidence, seed)
    per_label: dict[str, dict] = {}
    values, samples = [], []
    for j, name in enumerate(names):
        known = ~np.isnan(labels[:, j])
        truth = labels[known, j]
        if np.unique(truth).size < 2:
            seen = "no test image" if truth.size == 0 else f"all {truth.size} known test images have label {truth[0]:g}"
            per_label[name] = metric_entry(None, None, None, f"undefined: {seen}; AUROC needs both classes")
            continue
        value = float(roc_auc_score(truth, probabilities[known, j]))
        # Images with the label unknown (NaN) count as neither positive nor negative.
        resampled = boot.histogram_statistic_samples(probabilities[:, j], labels[:, j], weighted_auroc,
                                                     descending=False)
        per_label[name] = boot.summarize(value, resampled, "the resampled patients hold one class of this label")
        values.append(value)
        samples.append(resampled)
    metrics: dict = {"auroc": per_label}
    if values:
        # A resample where any scored label lacks a class has no mean over the same labels: NaN.
        mean_samples = np.mean(np.stack(samples), axis=0) if n_bootstrap else np.empty(0)
        metrics["mean_auroc"] = boot.summarize(float(np.mean(values)), mean_samples,
                                               "a resample holds one class of some label")
        metrics["mean_auroc"]["labels"] = len(values)
    else:
        metrics["mean_auroc"] = metric_entry(None, None, None, "undefined: no label has both classes among the "
                                                               "test images")
    if mode == "multiclass":
        if np.isnan(labels).any() or not np.all(labels.sum(axis=1) == 1):
            raise ValueError("mode multiclass needs one-hot labels (exactly one 1 per image, no unknown)")
        truth, predicted = labels.argmax(axis=1), probabilities.argmax(axis=1)
        item_values = {"correct": (truth == predicted).astype(np.float64), "images": np.ones(len(truth))}
        metrics.update(boot.evaluate(item_values, {"accuracy": ACCURACY}))
        counts = np.zeros((len(names), len(names)), dtype=np.int64)
        np.add.at(counts, (truth, predicted), 1)
        metrics["confusion_matrix"] = {"labels": names, "counts": counts.tolist()}
    else:
        metrics["label_confusion"] = label_confusion(probabilities, labels, names, threshold)
    metrics["n_images"] = boot.n_items
    metrics["n_patients"] = boot.n_patients
    metrics["bootstrap"] = boot.metadata()
    return metrics


def label_confusion(probabilities: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
                    threshold: float) -> dict:
    """Each label's confusion counts: predicted where ``probabilities`` (N, L) >= ``threshold``,
    against ``labels`` (N, L) in {0, 1, NaN}, over the images where the label is known.

    Returns ``{"labels", "threshold", "tn", "fp", "fn", "tp"}``, the counts as lists of L ints.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: got {threshold}, expected a probability in [0, 1]")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    known = ~np.isnan(labels)
    predicted = probabilities >= threshold
    truth = np.where(known, labels, 0.0) == 1

    def count(pred: bool, true: bool) -> list[int]:
        return [int(n) for n in np.sum(known & (predicted == pred) & (truth == true), axis=0)]

    return {"labels": list(label_names), "threshold": float(threshold), "tn": count(False, False),
            "fp": count(True, False), "fn": count(False, True), "tp": count(True, True)}
