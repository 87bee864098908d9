"""Downstream tasks (nodule segmentation and classification) built on a pretrained encoder.

Adding a task is one module here, one entry in :data:`TASKS` and one config in
``chestssl.params.RunEntry`` (``SegRun``, ``ClsRun``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from chestssl.models.backbones import load_encoder
from chestssl.models.losses import SEG_LOSSES
from chestssl.tasks.base import TaskModel
from chestssl.tasks.cls import CLS_ARCHS, ClassificationTask
from chestssl.tasks.seg import SEG_ARCHS, SegmentationTask

#: Task classes keyed by the ``task`` param of a ``runs`` entry.
TASKS: dict[str, type[TaskModel]] = {
    "seg": SegmentationTask,
    "cls": ClassificationTask,
}


def build_task(
    run_cfg: Mapping[str, Any], encoder_payload: Mapping[str, Any], seed: int, name: str = "run",
    train_labels: Sequence[int] | None = None,
) -> TaskModel:
    """The model of the validated run entry ``runs.<name>`` (``run_cfg``).

    ``encoder_payload`` is what the ``init`` method's pretrain stage exported
    (:func:`chestssl.models.export_encoder`); ``seed`` seeds the new parts.
    ``train_labels``: the labels of the training set, from which a ``cls`` run with
    ``class_weights: balanced`` computes its weights (:func:`chestssl.tasks.cls.resolve_class_weights`).
    """
    kind = run_cfg.get("task")
    if kind not in TASKS:
        raise ValueError(f"runs.{name}.task: got {kind!r}, expected one of {', '.join(map(repr, TASKS))}")
    encoder = load_encoder(encoder_payload, source=f"encoder of runs.{name}.init ({run_cfg.get('init')!r})")
    extra = {"train_labels": train_labels} if kind == "cls" else {}
    return TASKS[kind](name, run_cfg, encoder, seed, **extra)


__all__ = [
    "CLS_ARCHS",
    "SEG_ARCHS",
    "SEG_LOSSES",
    "TASKS",
    "ClassificationTask",
    "SegmentationTask",
    "TaskModel",
    "build_task",
]
