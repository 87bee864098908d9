"""Stage ``finetune@<run>``: a downstream task (nodule segmentation or classification) from a pretrained encoder.

The run (a ``runs`` entry: task, architecture, initialisation, loss) is built on the
encoder its ``init`` pretraining stage exported (:func:`chestssl.tasks.build_task`) and
trained on the training split's slices (:class:`~chestssl.data.datasets.SliceDataset`),
validated on the validation split's (:func:`chestssl.train.loop.fit`); the weights of its
best validation epoch (:data:`MONITOR`) are written with the encoder they started from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl import paths
from chestssl.io import write_json
from chestssl.model_files import load_model_file, save_model_file
from chestssl.params import ParamsError

#: The validation metric that picks the best epoch of each task.
MONITOR = {"seg": ("val/dice", "max"), "cls": ("val/loss", "min")}


def finetune(
    params: Mapping[str, Any],
    name: str,
    processed_dir: str | Path = paths.PROCESSED_DIR,
    encoder_path: str | Path | None = None,
    model_path: str | Path | None = None,
    report_dir: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
) -> dict[str, Any] | None:
    """Fine-tune ``runs.<name>`` and write its model and metrics.

    Args:
        params: the loaded params (the run, ``seed``, ``slices``).
        name: an entry under ``runs``.
        processed_dir: ``data/processed``.
        encoder_path: the encoder of the run's ``init`` entry; default
            :func:`chestssl.paths.encoder_path`.
        model_path: receives the fine-tuned model; default :func:`chestssl.paths.finetune_model_path`.
        report_dir: receives ``live/`` (curves), ``metrics.json`` and ``cost.json``
            (:func:`~chestssl.train.cost_probe.fit_cost`); default
            :func:`chestssl.paths.finetune_report_dir`.
        checkpoint_path: the training loop's resume checkpoint; default
            ``checkpoints/finetune/<name>.pt``.

    A classifier's model file and metrics also record the class weights its loss used and
    the training set's class counts (:func:`class_weighting`; ``class_weights: balanced`` is
    computed from those counts).

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.data.datasets import SliceDataset
    from chestssl.tasks import build_task
    from chestssl.train.checkpoint import stage_inputs
    from chestssl.train.cost_probe import fit_cost
    from chestssl.train.loop import fit
    from chestssl.train.metrics import flat_metrics

    if name not in params["runs"]:
        raise ParamsError([f"runs: {name!r} is not an entry ({', '.join(params['runs']) or 'none'})"])
    run = params["runs"][name]
    seed, slices = params["seed"], params["slices"]
    processed_dir = Path(processed_dir)
    encoder_file = Path(encoder_path) if encoder_path is not None else paths.encoder_path(run["init"])
    model_path = Path(model_path) if model_path is not None else paths.finetune_model_path(name)
    report_dir = Path(report_dir) if report_dir is not None else paths.finetune_report_dir(name)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else paths.checkpoint_path("finetune", name)
    encoder = load_model_file(encoder_file, paths.pretrain_stage(run["init"], params))

    def data(split: str) -> SliceDataset:
        return SliceDataset(processed_dir, split, slices["size"], run["task"],
                            clean_per_nodule_slice=slices["clean_per_nodule_slice"], seed=seed,
                            clean_source=slices["clean_source"])

    train = data("train")
    # A classifier's `class_weights: balanced` are computed from the training set's labels.
    model = build_task(run, encoder, seed, name=name, train_labels=train.labels)
    monitor, mode = MONITOR[run["task"]]
    inputs = stage_inputs({"run": run, "slices": slices}, [processed_dir, encoder_file])
    result = fit(model, train, data("val"), run["train"], report_dir / "live", checkpoint_path, seed,
                 monitor=monitor, mode=mode, inputs=inputs)
    if not result.is_main:  # under torchrun, rank 0 writes the outputs
        return None
    weighting = class_weighting(model)
    save_model_file(model_path, {"run": name, "config": run, "encoder": encoder, "state_dict": result.best_state,
                                 **weighting})
    write_json(report_dir / "cost.json", fit_cost(model, result))
    metrics = {"epochs": result.epochs, "steps": result.steps, f"best_{monitor.replace('/', '_')}": result.best_value,
               **flat_metrics(result.final_metrics), **weighting}
    write_json(report_dir / "metrics.json", metrics)
    return metrics


def class_weighting(model: Any) -> dict[str, Any]:
    """What a classifier's loss weighed, for its model file and ``metrics.json``:
    ``class_weights`` (the weights used, ``balanced`` resolved) and ``train_class_counts``
    (the training set's slices), each ``{"clean": ..., "nodule": ...}``; empty for other tasks."""
    from chestssl.tasks.cls import CLASSES, ClassificationTask

    if not isinstance(model, ClassificationTask):
        return {}
    recorded = {"class_weights": dict(zip(CLASSES, model.class_weights))}
    if model.class_counts is not None:
        recorded["train_class_counts"] = dict(zip(CLASSES, model.class_counts))
    return recorded
