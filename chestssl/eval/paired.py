"""Paired comparison of two runs on the same test slices (pretrained vs scratch).

"Pretrained beats scratch" is a statement about the difference ``b - a`` of one metric
between two runs evaluated on the same test patients. Two separate intervals that
overlap say little about it (their errors are correlated: both runs see the same hard
and easy patients), so the interval here is of the difference itself: one
:class:`~chestssl.eval.bootstrap.PatientBootstrap` over the shared test patients, both
runs' metrics recomputed on every resample, the percentile interval of ``b - a``
(a paired cluster bootstrap; Efron & Tibshirani, "An Introduction to the Bootstrap",
1993, ch. 13; Field & Welsh, JRSS-B 69(3), 2007).

The evaluate stage of each run writes its per-slice statistics with
:func:`save_item_scores` (``.npz``, no pickle)::

    task          () str   "seg" or "cls"
    patient_id    (N,) str
    scan_id       (N,) str
    slice_index   (N,) int64
    seg: intersection, pred_pixels, target_pixels  (N,) int64  pixel counts at the
         evaluation threshold (evaluate.seg_threshold)
         dice, jaccard                             (N,) float64 per-slice scores
    cls: score (N,) float64, probability of class 1; label (N,) int64 in {0, 1}

The variation between training runs (another seed, another data order) is not part of
the interval: each run was trained once.
"""

from __future__ import annotations

import os
from itertools import permutations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from chestssl.eval.bootstrap import PatientBootstrap, SumMetric
from chestssl.io import write_npz

# chestssl.eval.metrics (torch, MONAI) is imported by the functions that use it, so that
# reading saved item scores (the report) does not load it.
if TYPE_CHECKING:
    from chestssl.eval.metrics import ArrayLike

#: The per-item arrays of each task, besides ``patient_id``, ``scan_id``, ``slice_index``.
ITEM_ARRAYS: dict[str, tuple[str, ...]] = {
    "seg": ("intersection", "pred_pixels", "target_pixels", "dice", "jaccard"),
    "cls": ("score", "label"),
}
#: The metrics compared by :func:`paired_difference`, in report order.
PAIRED_METRICS: dict[str, tuple[str, ...]] = {
    "seg": ("dice_global", "jaccard_global", "dice_per_image"),
    "cls": ("accuracy", "f1", "auroc"),
}
#: The verdicts of :func:`paired_difference`.
VERDICTS = ("b better", "a better", "no clear difference", "undefined")

_ID_ARRAYS = ("patient_id", "scan_id", "slice_index")
_COUNT_ARRAYS = ("intersection", "pred_pixels", "target_pixels")
_WRITER = "the evaluate stage of the run (stages/evaluate.py; `dvc repro evaluate@<run>`)"
# Items named in a mismatch error.
_SHOWN_ITEMS = 3


# ------------------------------------------------------------------------------ saving


def segmentation_item_scores(probs: ArrayLike, masks: ArrayLike, threshold: float) -> dict[str, np.ndarray]:
    """The segmentation arrays of :func:`save_item_scores` for a test split.

    Args:
        probs: ``(N, 1, H, W)`` (or ``(N, 1, D, H, W)``) foreground probabilities in [0, 1].
        masks: same shape, foreground where ``> 0``.
        threshold: foreground where ``prob >= threshold`` (evaluate.seg_threshold).

    Returns:
        ``(N,)`` arrays ``intersection``, ``pred_pixels``, ``target_pixels`` (int64) and
        ``dice``, ``jaccard`` (float64), as
        :func:`~chestssl.eval.metrics.per_image_segmentation_scores` computes them.
    """
    from chestssl.eval.metrics import per_image_segmentation_scores

    scores = per_image_segmentation_scores(probs, masks, threshold)
    return {name: scores[name] for name in ITEM_ARRAYS["seg"]}


def save_item_scores(
    path: str | os.PathLike,
    *,
    task: str,
    patient_id: ArrayLike,
    scan_id: ArrayLike,
    slice_index: ArrayLike,
    **arrays: ArrayLike,
) -> None:
    """Write the per-slice statistics of one run's test split to ``path`` (atomic ``.npz``).

    Args:
        path: the ``.npz`` file.
        task: ``"seg"`` or ``"cls"``.
        patient_id, scan_id: ``(N,)`` strings. slice_index: ``(N,)`` integers; each
            ``(scan_id, slice_index)`` occurs once.
        **arrays: exactly the arrays of the task (:data:`ITEM_ARRAYS`), each ``(N,)``:
            for ``"seg"`` those of :func:`segmentation_item_scores`; for ``"cls"``
            ``score`` (probability of class 1, in [0, 1]) and ``label`` (0 or 1).
    """
    items = _validated(
        {"task": task, "patient_id": patient_id, "scan_id": scan_id, "slice_index": slice_index, **arrays},
        f"save_item_scores({path})",
    )
    write_npz(path, **{name: np.asarray(value) for name, value in items.items()})


def load_item_scores(path: str | os.PathLike) -> dict[str, Any]:
    """Read the file of :func:`save_item_scores`.

    Returns:
        ``task`` (str), ``source`` (the path, for messages), ``patient_id``, ``scan_id``
        (``(N,)`` str), ``slice_index`` (``(N,)`` int64) and the task's arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"item-score file {path} not found; it is written by {_WRITER}")
    with np.load(path, allow_pickle=False) as data:
        raw = {name: data[name] for name in data.files}
    if "task" in raw:
        raw["task"] = str(raw["task"])
    items = _validated(raw, f"{path} (written by {_WRITER}; rerun it with the current code)")
    items["source"] = str(path)
    return items


def _validated(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checked, normalised item scores (types as :func:`load_item_scores` returns them)."""
    task = raw.get("task")
    if task not in ITEM_ARRAYS:
        raise ValueError(f"{where}: task must be one of {', '.join(ITEM_ARRAYS)}, got {task!r}")
    expected = (*_ID_ARRAYS, *ITEM_ARRAYS[task])
    given = [name for name in raw if name not in ("task", "source")]
    missing = [name for name in expected if name not in raw]
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: task {task!r} needs the arrays {', '.join(expected)}; "
            f"missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(unexpected) or 'none'}"
        )
    arrays = {}
    for name in expected:
        value = raw[name]
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        value = np.asarray(value)
        if value.ndim != 1:
            raise ValueError(f"{where}: {name} must be 1-D (one value per test slice), got shape {value.shape}")
        arrays[name] = value
    lengths = {name: a.size for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{where}: the arrays disagree on the number of test slices: {lengths}")
    if arrays["patient_id"].size == 0:
        raise ValueError(f"{where}: no test slices; the test split is empty")

    items: dict[str, Any] = {"task": task}
    for name in ("patient_id", "scan_id"):
        if arrays[name].dtype == object and not all(isinstance(v, str) for v in arrays[name]):
            raise TypeError(f"{where}: {name} must hold strings")
        items[name] = arrays[name].astype(str)
    items["slice_index"] = _integers(arrays["slice_index"], "slice_index", where)
    keys = list(zip(items["scan_id"].tolist(), items["slice_index"].tolist()))
    if len(set(keys)) != len(keys):
        seen: set[tuple[str, int]] = set()
        for key in keys:
            if key in seen:
                repeated = key
                break
            seen.add(key)
        raise ValueError(f"{where}: test slice (scan {repeated[0]}, slice {repeated[1]}) occurs more than once")

    if task == "seg":
        for name in _COUNT_ARRAYS:
            items[name] = _integers(arrays[name], name, where)
            if (items[name] < 0).any():
                raise ValueError(f"{where}: {name} holds negative pixel counts")
        if (items["intersection"] > np.minimum(items["pred_pixels"], items["target_pixels"])).any():
            raise ValueError(f"{where}: intersection exceeds pred_pixels or target_pixels; the counts are inconsistent")
        for name in ("dice", "jaccard"):
            items[name] = _unit_floats(arrays[name], name, where)
    else:
        items["score"] = _unit_floats(arrays["score"], "score", where)
        labels = _integers(arrays["label"], "label", where)
        unexpected_labels = sorted(set(np.unique(labels).tolist()) - {0, 1})
        if unexpected_labels:
            raise ValueError(
                f"{where}: label must be 0 or 1, got also {unexpected_labels}; drop excluded slices (label -1) first"
            )
        items["label"] = labels
    return items


def _integers(array: np.ndarray, name: str, where: str) -> np.ndarray:
    if array.dtype.kind in "iub":
        return array.astype(np.int64)
    if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        return array.astype(np.int64)
    raise ValueError(f"{where}: {name} must hold integers, got dtype {array.dtype}")


def _unit_floats(array: np.ndarray, name: str, where: str) -> np.ndarray:
    if array.dtype.kind not in "iubf":
        raise ValueError(f"{where}: {name} must hold numbers, got dtype {array.dtype}")
    values = array.astype(np.float64)
    if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
        raise ValueError(f"{where}: {name} must hold finite values in [0, 1]")
    return values


# ------------------------------------------------------------------------------ pairing


def paired_difference(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    n_bootstrap: int,
    confidence: float,
    seed: int,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Metrics of runs ``a`` and ``b`` and a paired patient-bootstrap interval of ``b - a``.

    Items are matched on ``(scan_id, slice_index)``; one resample draws the shared test
    patients with replacement and recomputes both runs' metrics on the drawn patients.

    Segmentation metrics (from the summed per-slice counts, as in
    :func:`~chestssl.eval.metrics.evaluate_segmentation`): ``dice_global``,
    ``jaccard_global`` (pooled pixels) and ``dice_per_image`` (mean per-slice Dice).
    Classification: ``accuracy`` and ``f1`` at ``threshold`` and ``auroc`` (per resample
    from weighted score histograms, :meth:`PatientBootstrap.auroc_samples`).

    Args:
        a, b: item scores of the same task and test slices (:func:`load_item_scores`).
        n_bootstrap, confidence, seed: see :class:`~chestssl.eval.bootstrap.PatientBootstrap`.
        threshold: classification only: positive where ``score >= threshold``
            (evaluate.cls_threshold). Segmentation counts were taken at the evaluation
            threshold when the scores were saved.

    Returns:
        ``{metric: {"a", "b", "difference", "ci_low", "ci_high", "verdict"[, "note"]}}``
        for the metrics of :data:`PAIRED_METRICS`, plus ``task``, ``n_patients``,
        ``n_items``, ``confidence``, ``n_bootstrap``, ``seed`` (and ``threshold`` for
        classification). Numbers are ``None`` where undefined. ``verdict`` is ``"b better"``
        when the interval of ``b - a`` lies above 0, ``"a better"`` when below 0,
        ``"no clear difference"`` when it holds 0, and ``"undefined"`` (with a note) when
        the difference or its interval cannot be computed.

    Raises:
        ValueError: the tasks differ, or the runs hold different test slices (naming both
            and the first differing slices), or their ground truth differs.
    """
    from chestssl.eval.metrics import CLASSIFICATION_METRICS, SEGMENTATION_METRICS

    a_name, b_name = str(a.get("source", "run a")), str(b.get("source", "run b"))
    a = _validated(a, a_name)
    b = _validated(b, b_name)
    if a["task"] != b["task"]:
        raise ValueError(
            f"{a_name} holds {a['task']!r} scores and {b_name} {b['task']!r} scores; compare runs of one task"
        )
    task = a["task"]
    if task == "cls" and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    a_index, b_index = _aligned_indices(a, b, a_name, b_name)
    a = {k: (v[a_index] if isinstance(v, np.ndarray) else v) for k, v in a.items()}
    b = {k: (v[b_index] if isinstance(v, np.ndarray) else v) for k, v in b.items()}
    _check_same_truth(a, b, a_name, b_name)

    boot = PatientBootstrap(a["patient_id"], n_bootstrap, confidence, seed)
    if task == "seg":
        sum_metrics = {name: SEGMENTATION_METRICS[name] for name in PAIRED_METRICS["seg"]}
        a_values = _sum_metric_values(boot, _segmentation_sums(a), sum_metrics)
        b_values = _sum_metric_values(boot, _segmentation_sums(b), sum_metrics)
        undefined_when = {name: metric.undefined_when for name, metric in sum_metrics.items()}
    else:
        sum_metrics = {name: CLASSIFICATION_METRICS[name] for name in ("accuracy", "f1")}
        a_values = _sum_metric_values(boot, _confusion_items(a, threshold), sum_metrics)
        b_values = _sum_metric_values(boot, _confusion_items(b, threshold), sum_metrics)
        a_values["auroc"] = _auroc_values(boot, a["score"], a["label"])
        b_values["auroc"] = _auroc_values(boot, b["score"], b["label"])
        undefined_when = {name: metric.undefined_when for name, metric in sum_metrics.items()}
        undefined_when["auroc"] = "the test slices (or resampled patients) hold one class only"

    result: dict[str, Any] = {"task": task}
    for name in PAIRED_METRICS[task]:
        result[name] = _difference_entry(boot, a_values[name], b_values[name], undefined_when[name])
    result.update(
        n_patients=boot.n_patients, n_items=boot.n_items, confidence=boot.confidence,
        n_bootstrap=boot.n_bootstrap, seed=boot.seed,
    )
    if task == "cls":
        result["threshold"] = float(threshold)
    return result


def _aligned_indices(
    a: Mapping[str, Any], b: Mapping[str, Any], a_name: str, b_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``a`` and ``b`` that put their items in one ``(scan_id, slice_index)`` order."""
    a_keys = list(zip(a["scan_id"].tolist(), a["slice_index"].tolist()))
    b_keys = list(zip(b["scan_id"].tolist(), b["slice_index"].tolist()))
    a_set, b_set = set(a_keys), set(b_keys)
    if a_set != b_set:
        def shown(keys: set) -> str:
            listed = ", ".join(f"{scan}/{index}" for scan, index in sorted(keys)[:_SHOWN_ITEMS])
            more = f" and {len(keys) - _SHOWN_ITEMS} more" if len(keys) > _SHOWN_ITEMS else ""
            return (listed + more) or "none"

        raise ValueError(
            f"{a_name} ({len(a_keys)} test slices) and {b_name} ({len(b_keys)} test slices) hold different test "
            f"slices (scan/slice); only in the first: {shown(a_set - b_set)}; only in the second: "
            f"{shown(b_set - a_set)}; evaluate both runs on the same test split"
        )
    b_position = {key: i for i, key in enumerate(b_keys)}
    a_order = sorted(range(len(a_keys)), key=a_keys.__getitem__)
    return np.asarray(a_order, dtype=np.int64), np.asarray([b_position[a_keys[i]] for i in a_order], dtype=np.int64)


def _check_same_truth(a: Mapping[str, Any], b: Mapping[str, Any], a_name: str, b_name: str) -> None:
    """Aligned items must belong to the same patients and carry the same ground truth."""
    checks = [("patient_id", "patient")]
    checks.append(("target_pixels", "ground-truth nodule pixel count") if a["task"] == "seg" else ("label", "label"))
    for key, what in checks:
        differ = np.flatnonzero(a[key] != b[key])
        if differ.size:
            i = differ[0]
            raise ValueError(
                f"{a_name} and {b_name} disagree on the {what} of {differ.size} test slices, first scan "
                f"{a['scan_id'][i]} slice {a['slice_index'][i]}: {a[key][i]} vs {b[key][i]}; evaluate both runs on "
                "the same preprocessed data"
            )


def _segmentation_sums(items: Mapping[str, Any]) -> dict[str, np.ndarray]:
    stats = {name: items[name] for name in ("intersection", "pred_pixels", "target_pixels", "dice")}
    stats["images"] = np.ones(items["dice"].size)
    return stats


def _confusion_items(items: Mapping[str, Any], threshold: float) -> dict[str, np.ndarray]:
    predicted = items["score"] >= threshold
    positive = items["label"] == 1
    return {
        "tp": predicted & positive,
        "fp": predicted & ~positive,
        "fn": ~predicted & positive,
        "tn": ~predicted & ~positive,
    }


def _sum_metric_values(
    boot: PatientBootstrap, item_values: Mapping[str, np.ndarray], metrics: Mapping[str, SumMetric]
) -> dict[str, tuple[float, np.ndarray]]:
    """``{metric: (point estimate, (B,) resampled values)}``, NaN where undefined."""
    sums = boot.patient_sums(item_values)
    totals = {name: np.asarray(s.sum()) for name, s in sums.items()}
    resampled = {name: boot.counts @ s for name, s in sums.items()}
    values = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, metric in metrics.items():
            samples = np.asarray(metric.compute(resampled), dtype=np.float64).reshape(boot.n_bootstrap)
            values[name] = (float(metric.compute(totals)), samples)
    return values


def _auroc_values(boot: PatientBootstrap, scores: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    point = float(roc_auc_score(labels, scores)) if np.unique(labels).size == 2 else float("nan")
    return point, boot.auroc_samples(scores, labels)


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _difference_entry(
    boot: PatientBootstrap, a: tuple[float, np.ndarray], b: tuple[float, np.ndarray], undefined_when: str
) -> dict[str, Any]:
    (a_value, a_samples), (b_value, b_samples) = a, b
    # NaN in either run's resample makes the difference NaN there; summarize leaves it out.
    entry = boot.summarize(b_value - a_value, b_samples - a_samples, undefined_when)
    record: dict[str, Any] = {
        "a": _finite_or_none(a_value),
        "b": _finite_or_none(b_value),
        "difference": entry["value"],
        "ci_low": entry["ci_low"],
        "ci_high": entry["ci_high"],
    }
    if entry["value"] is None or entry["ci_low"] is None or entry["ci_high"] is None:
        record["verdict"] = "undefined"
    elif entry["ci_low"] > 0.0:
        record["verdict"] = "b better"
    elif entry["ci_high"] < 0.0:
        record["verdict"] = "a better"
    else:
        record["verdict"] = "no clear difference"
    if entry.get("note"):
        record["note"] = entry["note"]
    return record


# ------------------------------------------------------------------------------ pairs of runs


def scratch_pairs(
    run_params: Mapping[str, Mapping[str, Any]],
    method_kinds: Mapping[str, str],
    method_backbones: Mapping[str, Any],
) -> list[tuple[str, str]]:
    """``(scratch run, pretrained run)`` pairs that differ in their initial weights only.

    Two runs pair when their params other than ``init`` are identical (``task``, ``arch``,
    loss, recipe and its overrides...; nested blocks compared exactly), their ``init``
    entries have the same backbone (preset resolved: a scratch ResNet-18 never pairs with
    a pretrained ViT), and the first run's ``init`` is an entry of kind ``"scratch"`` while
    the second's is not.

    Args:
        run_params: run name -> its ``runs.<run>`` params block.
        method_kinds: entry name under ``methods`` / ``multihead`` -> its kind (the
            ``method`` key, e.g. ``{"scratch": "scratch", "ae": "vqgan",
            "multihead_seg": "multihead"}``).
        method_backbones: the same entry names -> their resolved ``backbone`` block.

    Returns:
        The pairs, sorted.
    """
    kinds = {}
    for run, params in run_params.items():
        init = params.get("init")
        if init not in method_kinds or init not in method_backbones:
            raise ValueError(
                f"runs.{run}.init: got {init!r}, expected an entry name under `methods` or `multihead`: "
                f"{', '.join(sorted(method_kinds)) or 'none given'}"
            )
        kinds[run] = method_kinds[init]
    without_init = {run: {k: v for k, v in params.items() if k != "init"} for run, params in run_params.items()}
    pairs = [
        (scratch, pretrained)
        for scratch, pretrained in permutations(run_params, 2)
        if kinds[scratch] == "scratch" and kinds[pretrained] != "scratch"
        and without_init[scratch] == without_init[pretrained]
        and method_backbones[run_params[scratch]["init"]] == method_backbones[run_params[pretrained]["init"]]
    ]
    return sorted(pairs)


def runs_without_scratch_twin(
    run_params: Mapping[str, Mapping[str, Any]],
    method_kinds: Mapping[str, str],
    pairs: Sequence[tuple[str, str]],
) -> list[str]:
    """The runs from a pretrained entry (kind other than ``"scratch"``) that are in none of
    ``pairs`` (:func:`scratch_pairs`): no scratch run shares their params and backbone,
    so nothing says whether their pretraining helped. Sorted."""
    paired = {pretrained for _, pretrained in pairs}
    return sorted(run for run, params in run_params.items()
                  if method_kinds.get(params.get("init")) != "scratch" and run not in paired)

