"""Example arrays saved by the evaluate stages for the report's figures.

Segmentation examples hold ``image``, ``mask``, ``prob`` (``(K, H, W)`` or
``(K, 1, H, W)``), ``patient_id`` (``(K,)`` str) and ``slice_index`` (``(K,)`` int).
Reconstruction examples hold ``image`` and ``recon``. Every array has the examples on
its first axis. The file is a compressed ``.npz`` written atomically and read without
pickle (string ids are stored as fixed-width unicode).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from chestssl.io import write_npz

SEGMENTATION_KEYS = ("image", "mask", "prob")
RECONSTRUCTION_KEYS = ("image", "recon")


def save_examples(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write example arrays (same number ``K`` of examples on axis 0 of each) to ``path``."""
    if not arrays:
        raise ValueError(f"save_examples({path}): no arrays given")
    converted: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if hasattr(array, "detach"):
            array = array.detach().cpu().numpy()
        array = np.asarray(array)
        if array.dtype == object:
            if not all(isinstance(v, str) for v in array.reshape(-1)):
                raise TypeError(f"save_examples({path}): array {name!r} holds Python objects; pass numbers or str")
            array = array.astype(str)
        if array.ndim == 0:
            raise ValueError(f"save_examples({path}): array {name!r} is a scalar; examples go on axis 0")
        converted[name] = array
    lengths = {name: a.shape[0] for name, a in converted.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"save_examples({path}): arrays disagree on the number of examples (axis 0): {lengths}")
    write_npz(path, **converted)


def load_examples(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the arrays written by :func:`save_examples`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"example file {path} not found; run the evaluate stage that writes it (dvc repro)")
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def example_kind(arrays: dict[str, np.ndarray]) -> str:
    """``"segmentation"`` or ``"reconstruction"``, from the keys present."""
    keys = set(arrays)
    if set(SEGMENTATION_KEYS) <= keys:
        return "segmentation"
    if set(RECONSTRUCTION_KEYS) <= keys:
        return "reconstruction"
    raise ValueError(
        f"example arrays {sorted(keys)} are neither segmentation examples (need {', '.join(SEGMENTATION_KEYS)}) "
        f"nor reconstruction examples (need {', '.join(RECONSTRUCTION_KEYS)})"
    )


def choose_example_indices(patient_ids: np.ndarray, priority: np.ndarray, count: int) -> np.ndarray:
    """Pick up to ``count`` items, spread over patients, highest ``priority`` first.

    Patients take turns (round robin, patients ordered by their best item), each giving
    its highest-priority item not yet taken, so the figures show several patients rather
    than neighbouring slices of one. Use e.g. the number of nodule pixels as priority.

    Args:
        patient_ids: ``(N,)`` patient of each item.
        priority: ``(N,)`` numbers; ties are broken by item order.
        count: number of items wanted (>= 1).

    Returns:
        ``(min(count, N),)`` int64 item indices, in the order chosen.
    """
    ids = np.asarray(patient_ids).astype(str)
    priority = np.asarray(priority, dtype=np.float64)
    if ids.shape != priority.shape or ids.ndim != 1:
        raise ValueError(f"patient_ids {ids.shape} and priority {priority.shape} must be matching 1-D arrays")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    order = np.lexsort((np.arange(ids.size), -priority))  # by priority descending, then item order
    queues: dict[str, list[int]] = {}
    for index in order:
        queues.setdefault(ids[index], []).append(int(index))
    chosen: list[int] = []
    turn = list(queues.values())  # dict order = order of each patient's best item
    while len(chosen) < min(count, ids.size):
        for queue in turn:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return np.asarray(chosen, dtype=np.int64)
