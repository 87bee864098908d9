"""Percentile bootstrap confidence intervals over patients.

The slices of one patient are correlated (same scanner, same anatomy, often the same
nodule on neighbouring slices), so resampling slices would understate the uncertainty.
The resampling unit here is the patient (the cluster bootstrap, Field & Welsh,
"Bootstrapping clustered data", JRSS-B 69(3), 2007): each resample draws as many patients
as the test split holds, with replacement, and every metric is recomputed from all items
(slices) of the drawn patients, a patient drawn twice counting twice. The interval is the
percentile interval of Efron & Tibshirani, "An Introduction to the Bootstrap" (1993),
ch. 13.

Every metric of one evaluation uses the same resamples (a paired bootstrap), and the
resamples are a ``(B, P)`` matrix of draw counts, so a metric that is a function of sums
of per-item statistics (intersections, pixel counts, per-image scores, confusion counts)
is recomputed for all ``B`` resamples with one matrix product over per-patient sums.
AUROC, which depends on the ranking of the items, is recomputed from per-patient
histograms over the distinct scores (see :meth:`PatientBootstrap.auroc_samples`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

#: A metric computed from summed item statistics: maps ``{name: sums}`` with arrays of
#: any shape (0-d for the point estimate, ``(B,)`` for the resamples) to an array of
#: the same shape. NaN marks a resample (or a point estimate) where it is undefined.
SumFunction = Callable[[Mapping[str, np.ndarray]], np.ndarray]

# Upper bound on the floats held at once when AUROC is bootstrapped in blocks.
_HISTOGRAM_BLOCK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class SumMetric:
    """A metric that is a function of sums of per-item statistics.

    ``compute`` receives the sums over the items of a sample and returns the metric;
    ``undefined_when`` says, for a reader of the metrics file, when it returns NaN
    (e.g. "no predicted foreground pixels" for pixel precision).
    """

    compute: SumFunction
    undefined_when: str


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` with NaN (no warning) where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator != 0, numerator / np.where(denominator != 0, denominator, 1.0), np.nan)


def metric_entry(value: float | None, ci_low: float | None, ci_high: float | None, note: str | None = None) -> dict:
    """The metrics-file record of one metric; non-finite numbers become ``None`` (JSON null)."""

    def clean(x: float | None) -> float | None:
        return float(x) if x is not None and np.isfinite(x) else None

    entry: dict = {"value": clean(value), "ci_low": clean(ci_low), "ci_high": clean(ci_high)}
    if note:
        entry["note"] = note
    return entry


class PatientBootstrap:
    """Bootstrap resamples of the patients of one test split.

    Args:
        patient_ids: ``(N,)`` the patient of each item (slice); items of one patient need
            not be contiguous.
        n_bootstrap: number of resamples ``B`` (0: no interval is computed).
        confidence: coverage of the percentile interval, in (0, 1), e.g. 0.95.
        seed: seed of the ``numpy.random.Generator`` that draws the resamples; the same
            seed and patients give the same resamples.

    Attributes:
        patients: ``(P,)`` the distinct patient ids, sorted.
        item_patient: ``(N,)`` index into ``patients`` of each item.
        counts: ``(B, P)`` float64, how many times each patient is drawn in each resample
            (every row sums to ``P``).
    """

    def __init__(self, patient_ids: Sequence[str] | np.ndarray, n_bootstrap: int, confidence: float, seed: int):
        ids = np.asarray(patient_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"patient_ids must be a non-empty 1-D sequence, got shape {ids.shape}")
        if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
        if not 0.0 < float(confidence) < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
        self.n_bootstrap = int(n_bootstrap)
        self.confidence = float(confidence)
        self.seed = int(seed)
        self.patients, self.item_patient = np.unique(ids.astype(str), return_inverse=True)
        n_patients = len(self.patients)
        draws = np.random.default_rng(self.seed).integers(0, n_patients, size=(self.n_bootstrap, n_patients))
        flat = (np.arange(self.n_bootstrap)[:, None] * n_patients + draws).ravel()
        self.counts = (
            np.bincount(flat, minlength=self.n_bootstrap * n_patients)
            .reshape(self.n_bootstrap, n_patients)
            .astype(np.float64)
        )

    @property
    def n_items(self) -> int:
        return int(self.item_patient.size)

    @property
    def n_patients(self) -> int:
        return int(self.patients.size)

    def interval_unavailable_reason(self) -> str | None:
        """Why no interval can be computed for this split, or ``None`` when one can."""
        if self.n_bootstrap == 0:
            return "evaluate.bootstrap_samples is 0, so no confidence interval was computed"
        if self.n_patients < 2:
            return (
                f"the test split holds one patient ({self.patients[0]}): a bootstrap over patients cannot "
                "estimate between-patient variability, so no confidence interval is given"
            )
        return None

    def metadata(self) -> dict:
        """Settings recorded beside the metrics (flat numbers, so ``dvc metrics diff`` shows them)."""
        return {"n_resamples": self.n_bootstrap, "confidence": self.confidence, "seed": self.seed}

    def patient_sums(self, item_values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Sum each ``(N,)`` per-item statistic over the items of each patient -> ``(P,)``."""
        sums = {}
        for name, values in item_values.items():
            values = np.asarray(values, dtype=np.float64)
            if values.shape != (self.n_items,):
                raise ValueError(f"item statistic {name!r} has shape {values.shape}, expected ({self.n_items},)")
            sums[name] = np.bincount(self.item_patient, weights=values, minlength=self.n_patients)
        return sums

    def evaluate(self, item_values: Mapping[str, np.ndarray], metrics: Mapping[str, SumMetric]) -> dict[str, dict]:
        """Point estimate and interval of every metric computed from summed item statistics.

        The point estimate uses every item once; resample ``b`` weights patient ``p``'s
        sums by ``counts[b, p]``.
        """
        sums = self.patient_sums(item_values)
        totals = {name: np.asarray(s.sum()) for name, s in sums.items()}
        resampled = {name: self.counts @ s for name, s in sums.items()}
        out = {}
        with np.errstate(divide="ignore", invalid="ignore"):
            for name, metric in metrics.items():
                value = float(metric.compute(totals))
                samples = np.asarray(metric.compute(resampled), dtype=np.float64).reshape(self.n_bootstrap)
                out[name] = self.summarize(value, samples, metric.undefined_when)
        return out

    def summarize(self, value: float | None, samples: np.ndarray, undefined_when: str) -> dict:
        """The metrics-file record for a point estimate and its ``(B,)`` resampled values.

        An undefined point estimate gives ``value: null`` with the reason. Resamples where
        the metric is undefined (NaN) are left out of the percentile interval, and the
        record says how many were left out.
        """
        if value is None or not np.isfinite(value):
            return metric_entry(None, None, None, f"undefined: {undefined_when}")
        reason = self.interval_unavailable_reason()
        if reason is not None:
            return metric_entry(value, None, None, reason)
        samples = np.asarray(samples, dtype=np.float64)
        valid = samples[np.isfinite(samples)]
        if valid.size == 0:
            return metric_entry(value, None, None, f"undefined in every bootstrap resample: {undefined_when}")
        tail = 100.0 * (1.0 - self.confidence) / 2.0
        low, high = np.percentile(valid, [tail, 100.0 - tail])
        note = None
        if valid.size < samples.size:
            note = (
                f"{samples.size - valid.size} of {samples.size} bootstrap resamples left out of the interval "
                f"(undefined: {undefined_when})"
            )
        return metric_entry(value, low, high, note)

    def auroc_samples(self, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """AUROC of every resample, ``(B,)``; NaN where a resample holds one class only.

        AUROC equals the Mann-Whitney statistic P(score of a positive > score of a
        negative) + 0.5 P(tie) (Hanley & McNeil, Radiology 143(1), 1982). With items
        weighted by their patient's draw count and the distinct scores sorted, it is
        ``sum_u pos_u (neg_below_u + neg_u / 2) / (sum pos * sum neg)`` where ``pos_u`` and
        ``neg_u`` are the weighted counts of positives and negatives scoring the u-th
        distinct score; these come from ``counts @ per-patient histograms``.

        Args:
            scores: ``(N,)`` real scores. labels: ``(N,)`` in {0, 1}.
        """
        return self.histogram_statistic_samples(scores, labels, weighted_auroc, descending=False)

    def histogram_statistic_samples(
        self,
        scores: np.ndarray,
        labels: np.ndarray,
        statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
        descending: bool,
    ) -> np.ndarray:
        """``statistic(pos, neg)`` of every resample, ``(B,)``, from weighted class histograms.

        ``pos``/``neg`` are ``(b, U)`` weighted counts of positives / negatives at each of
        the ``U`` distinct scores (ascending, or highest first with ``descending``), for a
        block of ``b`` resamples: ``counts @ per-patient histograms``. Ranking statistics
        (AUROC, average precision) need nothing else.

        Args:
            scores: ``(N,)`` real scores. labels: ``(N,)`` in {0, 1}.
        """
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels).reshape(-1)
        if scores.shape != (self.n_items,) or labels.shape != (self.n_items,):
            raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be ({self.n_items},)")
        distinct, score_index = np.unique(scores, return_inverse=True)
        n_distinct = distinct.size
        order = n_distinct - 1 - score_index.reshape(-1) if descending else score_index.reshape(-1)
        cell = self.item_patient * n_distinct + order
        size = self.n_patients * n_distinct
        positives = np.bincount(cell, weights=(labels == 1).astype(np.float64), minlength=size)
        negatives = np.bincount(cell, weights=(labels == 0).astype(np.float64), minlength=size)
        positives = positives.reshape(self.n_patients, n_distinct)
        negatives = negatives.reshape(self.n_patients, n_distinct)
        block = max(1, _HISTOGRAM_BLOCK_ELEMENTS // max(1, n_distinct))
        samples = np.empty(self.n_bootstrap, dtype=np.float64)
        for start in range(0, self.n_bootstrap, block):
            counts = self.counts[start : start + block]
            samples[start : start + block] = statistic(counts @ positives, counts @ negatives)
        return samples


def weighted_auroc(positive_weight: np.ndarray, negative_weight: np.ndarray) -> np.ndarray:
    """AUROC from weighted class histograms over distinct scores sorted ascending.

    Args:
        positive_weight, negative_weight: ``(..., U)`` total weight of positive / negative
            items at each of the ``U`` distinct scores.

    Returns:
        ``(...)`` AUROC, ties counted one half; NaN where either class has zero weight.
    """
    negative_below = np.cumsum(negative_weight, axis=-1) - negative_weight
    wins = (positive_weight * (negative_below + 0.5 * negative_weight)).sum(axis=-1)
    return ratio(wins, positive_weight.sum(axis=-1) * negative_weight.sum(axis=-1))
