"""Training a pretext method and writing what every pretraining stage writes.

``pretrain@``, ``pretrain_radiographs@``, ``pretrain_radiograph_studies@`` and
``pretrain_cross_modal@`` differ in their data and in what they probe afterwards; the
training itself (:func:`chestssl.train.loop.fit` with the method's own monitor, its best
weights loaded back, the metrics file's training keys) and an untrained method's empty
curve folder are shared here.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

from torch.utils.data import Dataset

from chestssl.io import write_json
from chestssl.train.checkpoint import stage_inputs
from chestssl.train.cost_probe import fit_cost
from chestssl.train.loop import fit
from chestssl.train.metrics import flat_metrics

if TYPE_CHECKING:
    from chestssl.methods.base import PretrainMethod


#: What a stage hands :func:`train_pretext`: ``() -> (train, val, epoch_hook or None)``.
TrainingData = Callable[[], tuple[Dataset, Dataset, Optional[Callable]]]


def train_pretext(
    method: "PretrainMethod",
    data: TrainingData,
    train_cfg: Mapping[str, Any],
    live_dir: Path,
    checkpoint_path: Path,
    seed: int,
    params_read: Mapping[str, Any],
    data_paths: Iterable[str | Path],
    collate_fn: Callable | None = None,
    cost_path: Path | None = None,
) -> dict[str, Any] | None:
    """Train ``method`` if it has anything to train; returns the training metrics.

    Args:
        method: a built pretext method; on return it holds its best weights (by
            ``method.monitor`` on the validation data).
        data: builds the training and validation datasets and the epoch hook (e.g. a
            :class:`~chestssl.eval.linear_probe.LinearProbeMonitor`); called only when the
            method trains, so a ``scratch`` entry loads no data.
        train_cfg: the entry's ``train`` block.
        live_dir: where the curves go (DVCLive); for a method that trains nothing, an
            empty ``plots/metrics`` folder, so every stage has the same outputs.
        checkpoint_path, seed, collate_fn: as :func:`chestssl.train.loop.fit`.
        params_read, data_paths: the params the stage reads (its whole entry included)
            and the data files or folders it reads; both are part of the checkpoint's
            fingerprint, so a resume never continues on other params or data.
        cost_path: if given, receives what the training cost
            (:func:`~chestssl.train.cost_probe.fit_cost`; no steps for a method that trains nothing).

    Returns:
        ``{"trained", "epochs", "steps", "best_<monitor>", <final metrics>}``, ``{"trained":
        False}`` for a method with nothing to train, or ``None`` on a non-main process under
        ``torchrun`` (rank 0 writes the outputs).
    """
    if not method.trainable:
        shutil.rmtree(live_dir, ignore_errors=True)
        (live_dir / "plots" / "metrics").mkdir(parents=True)
        if cost_path is not None:
            write_json(cost_path, fit_cost(method))
        return {"trained": False}
    train, val, epoch_hook = data()
    monitor, mode = method.monitor
    result = fit(method, train, val, train_cfg, live_dir, checkpoint_path, seed,
                 monitor=monitor, mode=mode, collate_fn=collate_fn, epoch_hook=epoch_hook,
                 inputs=stage_inputs(params_read, data_paths))
    if not result.is_main:
        return None
    method.load_state_dict(result.best_state)
    if cost_path is not None:
        write_json(cost_path, fit_cost(method, result))
    return {"trained": True, "epochs": result.epochs, "steps": result.steps,
            f"best_{monitor.replace('/', '_')}": result.best_value, **flat_metrics(result.final_metrics)}
