"""Test-split evaluation of a segmentation or classification predictor, shared by the
``evaluate@<run>`` stages and the heads of multihead models (``evaluate_multihead``).

Writes, under the given names:

- the metrics (returned; the caller writes them with its other metrics);
- example arrays for the figures (:func:`chestssl.eval.save_examples`): for segmentation
  the slices with the largest nodules, spread over patients, with the prediction and,
  when the model exposes them, ``features`` (the first :data:`FEATURE_CHANNELS`
  channels of encoder level :data:`FEATURE_LEVEL`); for classification the
  highest-scoring slices;
- per-slice scores (:func:`chestssl.eval.paired.save_item_scores`) for paired
  comparisons between models evaluated on the same test slices.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from chestssl.eval.examples import choose_example_indices, save_examples
from chestssl.eval.metrics import evaluate_classification, evaluate_segmentation
from chestssl.eval.paired import save_item_scores, segmentation_item_scores
from chestssl.inference import predict_dataset

#: Encoder level and channels kept for the feature-map figure (seed 000 compared the
#: encoder features of the downstream segmentation model and the multihead model).
FEATURE_LEVEL = 1
FEATURE_CHANNELS = 8

PathLike = str | os.PathLike


def evaluate_predictor(
    task: str,
    predict: Callable[[dict], torch.Tensor],
    dataset: Dataset,
    evaluate_cfg: Mapping[str, Any],
    *,
    examples_path: PathLike,
    items_path: PathLike,
    num_examples: int,
    seed: int,
    device: torch.device,
    feature_maps: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
) -> dict:
    """Metrics with patient-bootstrap CIs of ``predict`` on ``dataset``; writes examples and items.

    Args:
        task: ``seg`` (``predict`` gives nodule probabilities (B, 1, *S)) or ``cls``
            (probabilities of class 1, (B,)).
        evaluate_cfg: the validated ``evaluate`` block of params.yaml.
        feature_maps: for ``seg``, an optional function image (B, 1, *S) -> encoder maps.
    """
    out = predict_dataset(predict, dataset, device=device)
    metrics = score_predictions(task, out, evaluate_cfg, seed=seed)
    ids = dict(patient_id=out["patient_id"], scan_id=out["scan_id"], slice_index=out["slice_index"])
    if task == "seg":
        threshold = evaluate_cfg["seg_threshold"]
        save_item_scores(items_path, task="seg", **ids, **segmentation_item_scores(out["output"], out["mask"], threshold))
        # Show the slices with the largest nodules: the figure is about what the model finds.
        pick = choose_example_indices(out["patient_id"], out["mask"].reshape(len(out["mask"]), -1).sum(1), num_examples)
        arrays = dict(image=out["image"][pick], mask=out["mask"][pick], prob=out["output"][pick],
                      patient_id=out["patient_id"][pick], slice_index=out["slice_index"][pick])
        if feature_maps is not None:
            arrays["features"] = _features(feature_maps, out["image"][pick], device)
        save_examples(examples_path, **arrays)
    else:
        save_item_scores(items_path, task="cls", **ids, score=out["output"], label=out["label"])
        pick = choose_example_indices(out["patient_id"], out["output"], num_examples)
        save_examples(examples_path, image=out["image"][pick], label=out["label"][pick], score=out["output"][pick],
                      patient_id=out["patient_id"][pick], slice_index=out["slice_index"][pick])
    return metrics


def score_predictions(task: str, out: Mapping[str, np.ndarray], evaluate_cfg: Mapping[str, Any], *, seed: int) -> dict:
    """Metrics with patient-bootstrap CIs of the arrays :func:`predict_dataset` returned.

    ``out["output"]`` holds nodule probabilities (N, 1, *S) for ``seg``, scored against
    ``out["mask"]``, or probabilities of class 1 (N,) for ``cls``, scored against
    ``out["label"]``; ``out["patient_id"]`` (N,) is the bootstrap's resampling unit.
    """
    bootstrap = dict(n_bootstrap=evaluate_cfg["bootstrap_samples"], confidence=evaluate_cfg["confidence"], seed=seed)
    if task == "seg":
        return evaluate_segmentation(out["output"], out["mask"], out["patient_id"],
                                     threshold=evaluate_cfg["seg_threshold"], **bootstrap)
    if task == "cls":
        return evaluate_classification(out["output"], out["label"], out["patient_id"],
                                       threshold=evaluate_cfg["cls_threshold"], **bootstrap)
    raise ValueError(f"task: got {task!r}, expected 'seg' or 'cls'")


@torch.no_grad()
def _features(feature_maps: Callable[[torch.Tensor], list[torch.Tensor]], images: np.ndarray,
              device: torch.device) -> np.ndarray:
    """(K, FEATURE_CHANNELS, h, w) float16 maps of encoder level FEATURE_LEVEL for K images."""
    maps = feature_maps(torch.as_tensor(images, dtype=torch.float32, device=device))
    level = maps[min(FEATURE_LEVEL, len(maps) - 1)]
    return level[:, :FEATURE_CHANNELS].float().cpu().numpy().astype(np.float16)


def spread_over_training_seeds(metrics_by_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The variation between training runs of one downstream run, from each training
    seed's metrics (:func:`score_predictions` on the same test split).

    Returns ``{"seeds": [...], "metrics": {key: {"values", "mean", "sd", "n"}}}`` for every
    metric of the form ``{"value": ...}``: ``values`` in seed order (``None`` where a seed's
    value is undefined), ``mean`` and ``sd`` (sample standard deviation, ``ddof=1``) over the
    defined values, ``n`` their count; ``sd`` is ``None`` below two values.
    """
    seeds = list(metrics_by_seed)
    keys = [key for key, entry in metrics_by_seed[seeds[0]].items() if isinstance(entry, Mapping) and "value" in entry]
    summary: dict[str, Any] = {}
    for key in keys:
        values = [metrics_by_seed[s].get(key, {}).get("value") for s in seeds]
        defined = np.array([v for v in values if v is not None], dtype=np.float64)
        summary[key] = {
            "values": values,
            "mean": float(defined.mean()) if defined.size else None,
            "sd": float(defined.std(ddof=1)) if defined.size > 1 else None,
            "n": int(defined.size),
        }
    return {"seeds": [int(s) for s in seeds], "metrics": summary}
