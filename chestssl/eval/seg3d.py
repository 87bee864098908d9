"""Scores of 3D nodule segmentation on whole test volumes (seed 003's downstream protocol).

Each test scan is segmented by MONAI's ``sliding_window_inference`` (windows of the training
crop size; the entry's ``overlap``, 0.5 in seed 003 and the full profile) and scored per scan:

- Dice of the nodule class without the background (MONAI ``DiceMetric(include_background=False)``),
  undefined (NaN) for a scan without nodule voxels;
- voxel counts (intersection, predicted, true) for the global Dice over all scans;
- per-nodule detection: a nodule (a label ``k > 0`` of the processed scan's mask, one
  cluster of radiologists' consensus) is found when at least one of its voxels is predicted.

The intervals are the patient bootstrap of :class:`chestssl.eval.bootstrap.PatientBootstrap`
(each scan an item of its patient); :func:`paired_difference_3d` scores two runs on the same
resamples of the same patients (a paired bootstrap of their difference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from chestssl.eval.bootstrap import PatientBootstrap, SumMetric, metric_entry, ratio

#: Per-scan statistics summed over a patient's scans, as saved in ``items.npz``.
ITEM_KEYS = ("dice_sum", "dice_scored", "intersection", "predicted", "truth", "nodules", "found")

#: The metrics of a 3D segmentation run, from the summed item statistics.
METRICS_3D: dict[str, SumMetric] = {
    "dice": SumMetric(lambda s: ratio(s["dice_sum"], s["dice_scored"]),
                      "no test scan with nodule voxels (mean of per-scan Dice without background)"),
    "dice_global": SumMetric(lambda s: ratio(2.0 * s["intersection"], s["predicted"] + s["truth"]),
                             "neither predicted nor true nodule voxels"),
    "detection_rate": SumMetric(lambda s: ratio(s["found"], s["nodules"]), "no nodules in the test scans"),
}


def segment_volume(predictor: Callable[[Any], Any], image: np.ndarray, roi_size: int, overlap: float,
                   sw_batch_size: int, device: Any = "cpu") -> np.ndarray:
    """Nodule probability (Z, Y, X) float32 of one volume ``image`` (Z, Y, X) by sliding windows.

    ``predictor``: (B, 1, roi, roi, roi) -> (B, C, roi, roi, roi), the nodule in channel -1;
    windows of side ``roi_size`` with ``overlap``, blended with MONAI's constant weights; a
    volume smaller than a window is padded by MONAI and cropped back.
    """
    import torch
    from monai.inferers import sliding_window_inference

    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    with torch.no_grad():
        out = sliding_window_inference(volume, roi_size=(roi_size,) * 3, sw_batch_size=sw_batch_size,
                                       predictor=predictor, overlap=overlap, mode="constant")
    return out[0, -1].float().cpu().numpy()


def scan_statistics(prediction: np.ndarray, nodule_ids: np.ndarray) -> dict[str, float]:
    """The :data:`ITEM_KEYS` of one scan: ``prediction`` (Z, Y, X) bool, ``nodule_ids`` (Z, Y, X)
    int, 0 background and ``k > 0`` nodule ``k``. Dice by MONAI's ``DiceMetric`` without the
    background (``dice_scored`` 0 and ``dice_sum`` 0 when the scan has no nodule voxel)."""
    import torch
    from monai.metrics import DiceMetric

    prediction = np.asarray(prediction, dtype=bool)
    nodule_ids = np.asarray(nodule_ids)
    if prediction.shape != nodule_ids.shape:
        raise ValueError(f"prediction {prediction.shape} and mask {nodule_ids.shape} differ in shape")
    truth = nodule_ids > 0
    one_hot = lambda x: torch.from_numpy(np.stack([~x, x]))[None].float()  # noqa: E731  (1, 2, Z, Y, X)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    dice = float(metric(one_hot(prediction), one_hot(truth)).reshape(-1)[0])
    labels = [int(k) for k in np.unique(nodule_ids) if k > 0]
    found = sum(bool(prediction[nodule_ids == k].any()) for k in labels)
    scored = bool(truth.any()) and np.isfinite(dice)
    return {"dice_sum": dice if scored else 0.0, "dice_scored": float(scored),
            "intersection": float(np.count_nonzero(prediction & truth)), "predicted": float(np.count_nonzero(prediction)),
            "truth": float(np.count_nonzero(truth)), "nodules": float(len(labels)), "found": float(found)}


def save_items_3d(path: str | Path, patient_ids: Sequence[str], scan_ids: Sequence[str],
                  rows: Sequence[Mapping[str, float]]) -> None:
    """Write the per-scan statistics (``patient_id``, ``scan_id`` and :data:`ITEM_KEYS`) to ``path`` (npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key: np.array([row[key] for row in rows], dtype=np.float64) for key in ITEM_KEYS}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, patient_id=np.array(patient_ids, dtype=str), scan_id=np.array(scan_ids, dtype=str), **arrays)
    tmp.replace(path)


def load_items_3d(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays :func:`save_items_3d` wrote."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("patient_id", "scan_id", *ITEM_KEYS) if k not in z.files]
        if missing:
            raise ValueError(f"{path}: no array {', '.join(missing)}; rerun its evaluate_3d stage")
        return {k: z[k] for k in z.files}


def score_items_3d(items: Mapping[str, np.ndarray], n_bootstrap: int, confidence: float, seed: int) -> dict[str, Any]:
    """:data:`METRICS_3D` with patient-bootstrap intervals, and the test set's size."""
    boot = PatientBootstrap(items["patient_id"], n_bootstrap, confidence, seed)
    metrics = boot.evaluate({k: items[k] for k in ITEM_KEYS}, METRICS_3D)
    return {**metrics, "test_patients": boot.n_patients, "test_scans": boot.n_items,
            "test_nodules": int(np.sum(items["nodules"])), "bootstrap": boot.metadata()}


def paired_difference_3d(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], n_bootstrap: int,
                         confidence: float, seed: int) -> dict[str, Any]:
    """``a - b`` of every :data:`METRICS_3D` metric on the same resamples of the same patients.

    Both runs must have scored the same scans (same ``scan_id`` order); raises ``ValueError`` otherwise.
    """
    if list(a["scan_id"]) != list(b["scan_id"]) or not np.array_equal(a["truth"], b["truth"]):
        raise ValueError("the two runs did not segment the same test scans; rerun their evaluate_3d stages "
                         "with the same region and max_test_scans")
    boot = PatientBootstrap(a["patient_id"], n_bootstrap, confidence, seed)
    sums_a = boot.patient_sums({k: a[k] for k in ITEM_KEYS})
    sums_b = boot.patient_sums({k: b[k] for k in ITEM_KEYS})
    out: dict[str, Any] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, metric in METRICS_3D.items():
            value = float(metric.compute({k: np.asarray(s.sum()) for k, s in sums_a.items()})
                          - metric.compute({k: np.asarray(s.sum()) for k, s in sums_b.items()}))
            samples = (np.asarray(metric.compute({k: boot.counts @ s for k, s in sums_a.items()}), dtype=np.float64)
                       - np.asarray(metric.compute({k: boot.counts @ s for k, s in sums_b.items()}), dtype=np.float64))
            out[name] = boot.summarize(value, samples.reshape(boot.n_bootstrap), metric.undefined_when)
    out["test_patients"] = boot.n_patients
    return out
