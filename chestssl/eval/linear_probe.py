"""Linear probing of a frozen encoder's representation (seed 004's protocol).

Linear probes: Alain & Bengio, "Understanding intermediate layers using linear classifier
probes", ICLR 2017 workshop (arXiv:1610.01644): how linearly a frozen representation
separates labels the encoder never saw. Seed 004 (RadDiffusion) probed its CLS features,
without masking, with one logistic regression (``class_weight="balanced"``) per CheXpert
label on a patient-level split, scored by AUROC, AUPRC and F1.

Here, per item (a slice, or a 3D crop):

- the features are ``encoder.representation(image)`` (B, D) in eval mode, without
  gradients (:func:`extract_features`);
- the probed labels (:func:`probe_labels`) are ``nodule`` (slice label 1 vs 0) and
  ``malignant`` (the highest malignancy rating of the item's nodules >= 4, LIDC's
  "moderately" or "highly suspicious", vs not); items between nodule and clean
  (slice label -1, a few nodule pixels only) are left out of both;
- per label (:func:`fit_linear_probe`) the features are standardised with the training
  split's mean and deviation, scikit-learn's ``LogisticRegression(class_weight="balanced")``
  is fitted on the training items, and its positive-class probabilities on the test items
  are scored: AUROC, AUPRC (average precision) and F1 at 0.5 (with accuracy, precision,
  recall, specificity and the confusion counts of
  :func:`chestssl.eval.metrics.evaluate_classification`), each with a percentile
  bootstrap interval over test patients (:class:`chestssl.eval.bootstrap.PatientBootstrap`),
  plus the mean over the probed labels.

:class:`LinearProbeMonitor` runs the same probe on the validation split during
pretraining and returns ``probe/<label>/auroc`` and ``probe/mean_auroc``.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import Dataset

from chestssl.checks import positive_int
from chestssl.data.labels import MALIGNANT_MIN_RATING
from chestssl.eval.bootstrap import PatientBootstrap, ratio
from chestssl.eval.metrics import evaluate_classification
from chestssl.inference import predict_dataset

#: The labels probed on every item, in report order.
PROBE_LABELS: tuple[str, ...] = ("nodule", "malignant")
#: Label value of an item left out of a probe (slice label -1 in ``slices.csv``).
NOT_PROBED = -1
#: A test item is predicted positive where the probe's probability is at least this.
DECISION_THRESHOLD = 0.5
#: The params block whose keys are named in errors.
PARAMS_KEY = "probe"
_C_MEANING = "the inverse L2 regularisation strength of the logistic regression"


@dataclass(frozen=True)
class ProbeFeatures:
    """Frozen features of one split and the labels probed on them.

    Attributes:
        features: (N, D) float32, one representation per item.
        labels: per probed label (:data:`PROBE_LABELS`), (N,) int64 in {0, 1}, or
            :data:`NOT_PROBED` for an item left out of that label's probe.
        patient_ids: (N,) str, the patient of each item (the bootstrap's unit).
    """

    features: np.ndarray
    labels: dict[str, np.ndarray]
    patient_ids: np.ndarray

    def __post_init__(self) -> None:
        features = np.asarray(self.features)
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(
                f"features must have shape (N, D) with N, D >= 1, got {features.shape}; "
                "encoder.representation(x) must return (B, representation_dim)"
            )
        if not np.all(np.isfinite(features)):
            raise ValueError("features hold NaN or infinite values; the encoder's representation is not finite")
        n_items = features.shape[0]
        ids = np.asarray(self.patient_ids).astype(str)
        if ids.shape != (n_items,):
            raise ValueError(f"patient_ids has shape {ids.shape}, expected ({n_items},): one patient id per item")
        labels = {}
        for name, values in self.labels.items():
            values = np.asarray(values)
            if values.shape != (n_items,):
                raise ValueError(f"labels[{name!r}] has shape {values.shape}, expected ({n_items},)")
            unexpected = sorted(set(np.unique(values).tolist()) - {NOT_PROBED, 0, 1})
            if unexpected:
                raise ValueError(f"labels[{name!r}] must be 0, 1 or {NOT_PROBED} (not probed), got also {unexpected}")
            labels[name] = values.astype(np.int64)
        object.__setattr__(self, "features", features.astype(np.float32, copy=False))
        object.__setattr__(self, "patient_ids", ids)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def probe_labels(items: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The labels probed per item, from the dataset's ``label`` and ``malignancy`` fields.

    Args:
        items: ``label`` (N,) int in {-1, 0, 1} (``slices.csv``: 1 nodule, 0 clean, -1 a
            few nodule pixels only) and ``malignancy`` (N,) float, the highest malignancy
            rating of the item's nodules (0 without one); numpy arrays or tensors.

    Returns:
        ``{"nodule": (N,), "malignant": (N,)}`` int64: ``nodule`` is the label;
        ``malignant`` is 1 where ``malignancy >= 4`` (:data:`MALIGNANT_MIN_RATING`), else 0;
        both are :data:`NOT_PROBED` (-1) on items whose label is -1.
    """
    missing = [key for key in ("label", "malignancy") if key not in items]
    if missing:
        raise ValueError(
            f"items have no {', '.join(map(repr, missing))}; a linear probe needs datasets whose items carry "
            "'label' and 'malignancy' (SliceDataset, CropDataset)"
        )
    label = _numpy(items["label"]).reshape(-1)
    malignancy = _numpy(items["malignancy"]).astype(np.float64).reshape(-1)
    if label.shape != malignancy.shape:
        raise ValueError(f"label has {label.size} items, malignancy {malignancy.size}; they must match")
    unexpected = sorted(set(np.unique(label).tolist()) - {-1, 0, 1})
    if unexpected:
        raise ValueError(f"label must be 1 (nodule), 0 (clean) or -1 (in between), got also {unexpected}")
    label = label.astype(np.int64)
    left_out = label == -1
    malignant = (malignancy >= MALIGNANT_MIN_RATING).astype(np.int64)
    return {
        "nodule": np.where(left_out, NOT_PROBED, label),
        "malignant": np.where(left_out, NOT_PROBED, malignant),
    }


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: Dataset,
    device: torch.device | str | None = None,
    batch_size: int = 64,
) -> ProbeFeatures:
    """Frozen ``encoder.representation`` of every item of ``dataset``, in dataset order.

    The encoder runs in eval mode without gradients; its previous mode is restored
    afterwards. Items must carry ``image`` (1, *S), ``label``, ``malignancy`` and
    ``patient_id``.

    Args:
        encoder: a backbone with ``representation(x) -> (B, D)``.
        dataset: map-style dataset of dict items (e.g. ``SliceDataset`` of task ``cls``).
        device: where to run; the encoder is moved there (``Module.to``). ``None``: the
            device the encoder's parameters are on (nothing is moved).
        batch_size: items per forward pass.

    Returns:
        :class:`ProbeFeatures` with (N, D) float32 features, the labels of
        :func:`probe_labels` and the patient ids.
    """
    if not callable(getattr(encoder, "representation", None)):
        raise ValueError(
            f"{type(encoder).__name__} has no representation(); a linear probe needs a backbone with a "
            "global feature vector (see chestssl.models.backbones)"
        )
    if device is None:
        parameter = next(encoder.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    else:
        device = torch.device(device)
        encoder.to(device)
    was_training = encoder.training
    encoder.eval()
    try:
        out = predict_dataset(
            lambda batch: encoder.representation(batch["image"]),
            dataset,
            batch_size=batch_size,
            device=device,
            keep=("label", "malignancy", "patient_id"),
        )
    finally:
        encoder.train(was_training)
    if "patient_id" not in out:
        raise ValueError("items have no 'patient_id'; the probe's bootstrap resamples patients")
    return ProbeFeatures(features=out["output"], labels=probe_labels(out), patient_ids=out["patient_id"])


def fit_linear_probe(
    train: ProbeFeatures,
    test: ProbeFeatures,
    C: float,
    max_iter: int,
    seed: int,
    n_bootstrap: int,
    confidence: float,
    *,
    params_key: str = PARAMS_KEY,
) -> dict[str, Any]:
    """Fit one balanced logistic regression per label on ``train``, score it on ``test``.

    Args:
        train, test: features of the two splits (same feature dimension ``D``).
        C: inverse L2 regularisation strength (``probe.C``).
        max_iter: lbfgs iterations at most (``probe.max_iter``).
        seed: seeds the logistic regression and the bootstrap resamples.
        n_bootstrap, confidence: see :class:`~chestssl.eval.bootstrap.PatientBootstrap`
            (0 resamples: no intervals).
        params_key: the params block named in the warning when the fit stops before converging.

    Returns:
        A JSON-ready dict: per label of ``train.labels``, either the metrics of
        :func:`~chestssl.eval.metrics.evaluate_classification` at threshold 0.5 (``auroc``,
        ``f1``, ``accuracy``, ... as ``{"value", "ci_low", "ci_high"}``) plus ``auprc``,
        ``n_train``, ``n_train_positive``, ``n_test_positive`` and ``converged`` (with a
        ``note`` when lbfgs stopped at ``max_iter``), or ``{"skipped": "<why>"}`` when the
        training or test items of that label hold one class only; ``mean``: the mean
        over the probed labels of the ``auroc``, ``auprc`` and ``f1`` point estimates and
        the ``labels`` it covers (``None`` values when every label was skipped); and
        ``n_features``, ``C``, ``max_iter``.
    """
    C = _positive_real(C, "C", _C_MEANING)
    max_iter = positive_int(max_iter, "max_iter")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed: got {seed!r}, expected an integer >= 0")
    if train.dim != test.dim:
        raise ValueError(
            f"train features have {train.dim} dimensions, test features {test.dim}; extract both with the same encoder"
        )
    missing = sorted(set(train.labels) - set(test.labels))
    if missing:
        raise ValueError(f"test features lack the labels {missing} that the training features carry")

    result: dict[str, Any] = {}
    for name, train_labels in train.labels.items():
        result[name] = _probe_label(
            name, train, train_labels, test, test.labels[name], C, max_iter, seed, n_bootstrap, confidence, params_key
        )
    probed = [name for name in train.labels if "skipped" not in result[name]]
    result["mean"] = {
        metric: _mean([result[name][metric]["value"] for name in probed]) for metric in ("auroc", "auprc", "f1")
    }
    result["mean"]["labels"] = probed
    result.update(n_features=train.dim, C=C, max_iter=max_iter)
    return result


class LinearProbeMonitor:
    """The linear probe of a pretraining method's encoder on the validation split.

    Called by the training loop after an epoch's validation, as ``monitor(method,
    epoch)`` with ``epoch`` counted from 1: every ``every_epochs`` epochs it extracts
    ``features`` of ``method.encoder()`` on ``train_data`` and ``val_data`` (features are
    cached within one call only, since the encoder changes between calls), fits
    :func:`fit_linear_probe` without bootstrap, and returns the validation AUROCs;
    other epochs return ``{}``. Torch's CPU random state is left as it was, so probing
    never changes the training run.

    Args:
        train_data, val_data: labelled datasets that ``features`` reads; for the default,
            items with ``image``, ``label``, ``malignancy``, ``patient_id`` (e.g.
            ``SliceDataset`` of task ``cls``).
        features: ``(encoder, dataset, device, batch_size) -> ProbeFeatures``; default
            :func:`extract_features` (CT slices). Radiographs use
            :func:`chestssl.eval.radiograph_probe.extract_image_features` or ``extract_study_features``.
        every_epochs: probe every this many epochs (``probe.every_epochs``, >= 1).
        C, max_iter, seed: as :func:`fit_linear_probe`.
        device: where features are extracted; ``None``: the device of the encoder.
        batch_size: items per forward pass.
        params_key: the params block named in the warning when the fit stops before converging.

    Returns of ``__call__``: ``{"probe/<label>/auroc": float, ..., "probe/mean_auroc":
    float}`` for the labels that could be probed (a label with one class in either
    split is left out), or ``{}``.
    """

    def __init__(
        self,
        train_data: Dataset,
        val_data: Dataset,
        every_epochs: int,
        C: float,
        max_iter: int,
        seed: int,
        device: torch.device | str | None = None,
        batch_size: int = 64,
        params_key: str = PARAMS_KEY,
        features: Callable[[nn.Module, Dataset, Any, int], "ProbeFeatures"] | None = None,
    ):
        self.features = extract_features if features is None else features
        self.train_data = train_data
        self.val_data = val_data
        self.every_epochs = positive_int(every_epochs, "every_epochs")
        self.C = _positive_real(C, "C", _C_MEANING)
        self.max_iter = positive_int(max_iter, "max_iter")
        self.seed = int(seed)
        self.device = None if device is None else torch.device(device)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.params_key = params_key

    def due(self, epoch: int) -> bool:
        """Whether ``epoch`` (counted from 1) is a probing epoch."""
        return epoch >= 1 and epoch % self.every_epochs == 0

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


def validation_scores(result: Mapping[str, Any]) -> dict[str, float]:
    """``probe/<label>/auroc`` and ``probe/mean_auroc`` of a :func:`fit_linear_probe` result,
    for the labels it could probe (what :class:`LinearProbeMonitor` logs)."""
    scores = {
        f"probe/{name}/auroc": result[name]["auroc"]["value"]
        for name in result["mean"]["labels"]
        if result[name]["auroc"]["value"] is not None
    }
    if result["mean"]["auroc"] is not None:
        scores["probe/mean_auroc"] = result["mean"]["auroc"]
    return scores


def average_precision_samples(boot: PatientBootstrap, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Average precision of every bootstrap resample, ``(B,)``; NaN where a resample has no positive.

    Average precision is ``sum_n (R_n - R_{n-1}) P_n`` over the distinct scores taken as
    thresholds from the highest down (scikit-learn's ``average_precision_score``). With
    items weighted by their patient's draw count it needs only the weighted counts of
    positives and negatives at each distinct score, which come from ``counts @
    per-patient histograms`` as for :meth:`PatientBootstrap.auroc_samples`.

    Args:
        boot: the resamples (over the patients of the same items).
        scores: ``(N,)`` real scores. labels: ``(N,)`` in {0, 1}.
    """
    return boot.histogram_statistic_samples(scores, labels, weighted_average_precision, descending=True)


def weighted_average_precision(positive_weight: np.ndarray, negative_weight: np.ndarray) -> np.ndarray:
    """Average precision from weighted class histograms over distinct scores sorted descending.

    Args:
        positive_weight, negative_weight: ``(..., U)`` total weight of positive / negative
            items at each of the ``U`` distinct scores, highest score first.

    Returns:
        ``(...)`` average precision; NaN where the positives have zero weight.
    """
    true_positives = np.cumsum(positive_weight, axis=-1)
    predicted = true_positives + np.cumsum(negative_weight, axis=-1)
    precision = ratio(true_positives, predicted)
    # Recall only grows at scores held by positives, where the precision is defined.
    gains = np.where(positive_weight > 0, positive_weight * np.nan_to_num(precision), 0.0)
    return ratio(gains.sum(axis=-1), np.sum(positive_weight, axis=-1))


def _probe_label(
    name: str,
    train: ProbeFeatures,
    train_labels: np.ndarray,
    test: ProbeFeatures,
    test_labels: np.ndarray,
    C: float,
    max_iter: int,
    seed: int,
    n_bootstrap: int,
    confidence: float,
    params_key: str,
) -> dict[str, Any]:
    train_rows, test_rows = train_labels != NOT_PROBED, test_labels != NOT_PROBED
    y_train, y_test = train_labels[train_rows], test_labels[test_rows]
    for split, y in (("training", y_train), ("test", y_test)):
        reason = _one_class_reason(name, split, y)
        if reason is not None:
            return {"skipped": reason}
    probe = Pipeline([
        ("standardise", StandardScaler()),
        ("logistic", LogisticRegression(class_weight="balanced", C=C, max_iter=max_iter, random_state=seed)),
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported in the result instead
        probe.fit(train.features[train_rows], y_train)
    positive_column = list(probe.classes_).index(1)
    probability = probe.predict_proba(test.features[test_rows])[:, positive_column]
    ids = test.patient_ids[test_rows]
    metrics = evaluate_classification(probability, y_test, ids, threshold=DECISION_THRESHOLD,
                                      n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
    # Same patients, resamples and seed as evaluate_classification's: a paired bootstrap.
    boot = PatientBootstrap(ids, n_bootstrap, confidence, seed)
    metrics["auprc"] = boot.summarize(
        float(average_precision_score(y_test, probability)),
        average_precision_samples(boot, probability, y_test),
        "the resampled patients hold no positive item",
    )
    iterations = int(np.max(probe.named_steps["logistic"].n_iter_))
    metrics.update(
        n_train=int(y_train.size),
        n_train_positive=int(y_train.sum()),
        n_test_positive=int(y_test.sum()),
        converged=iterations < max_iter,
    )
    if iterations >= max_iter:
        metrics["note"] = (
            f"the logistic regression stopped at {params_key}.max_iter = {max_iter} iterations before converging; "
            f"raise {params_key}.max_iter"
        )
    return metrics


def _one_class_reason(name: str, split: str, y: np.ndarray) -> str | None:
    if y.size == 0:
        return f"no {split} item has a {name!r} label"
    classes = np.unique(y)
    if classes.size < 2:
        return (
            f"all {y.size} {split} items have {name!r} = {int(classes[0])}; a probe needs both classes in the "
            "training and the test items"
        )
    return None


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _positive_real(value: Any, key: str, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{key}: got {value!r}, expected a positive number ({meaning})")
    return float(value)
