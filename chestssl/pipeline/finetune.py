"""Stage ``finetune@<run>``: a downstream task (nodule segmentation or classification) from a pretrained encoder.

The run (a ``runs`` entry: task, architecture, initialisation, loss) is built on the
encoder its ``init`` pretraining stage exported (:func:`chestssl.tasks.build_task`) and
trained on the training split's slices (:class:`~chestssl.data.datasets.SliceDataset`),
validated on the validation split's (:func:`chestssl.train.loop.fit`); the weights of its
best validation epoch (:data:`MONITOR`) are written with the encoder they started from.

With ``training_seeds`` above 1 the run is trained again with seeds ``seed + 1``, ... on the
same data (:func:`chestssl.paths.seed_model_path`): the variation between training runs, which the
patient bootstrap of ``evaluate`` does not contain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl import paths
from chestssl.io import write_json
from chestssl.model_files import load_model_file, save_model_file
from chestssl.params import ParamsError, training_seed_values

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
            (:func:`~chestssl.train.cost_probe.fit_cost` of the first seed's fit, with
            ``training_seeds`` and ``train_seconds_all_seeds``); default
            :func:`chestssl.paths.finetune_report_dir`.
        checkpoint_path: the training loop's resume checkpoint; default
            ``checkpoints/finetune/<name>.pt``.

    A classifier's model file and metrics also record the class weights its loss used and
    the training set's class counts (:func:`class_weighting`; ``class_weights: balanced`` is
    computed from those counts).

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.data.datasets import SliceDataset, slice_options
    from chestssl.tasks import build_task
    from chestssl.train.checkpoint import stage_inputs
    from chestssl.train.cost_probe import fit_cost
    from chestssl.train.loop import discard_checkpoint, fit
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
        # The data's seed (the clean slices drawn) stays `seed` for every training seed.
        return SliceDataset(processed_dir, split, task=run["task"], seed=seed, **slice_options(slices))

    train, val = data("train"), data("val")
    monitor, mode = MONITOR[run["task"]]
    inputs = stage_inputs({"run": run, "slices": slices}, [processed_dir, encoder_file])
    seeds = training_seed_values(params)
    checkpoints = {s: checkpoint_path if s == seed else seed_checkpoint_path(checkpoint_path, s) for s in seeds}
    metrics, costs, best_values = None, {}, {}
    for training_seed in seeds:
        # A classifier's `class_weights: balanced` are computed from the training set's labels.
        model = build_task(run, encoder, training_seed, name=name, train_labels=train.labels)
        model_file = model_path if training_seed == seed else paths.seed_model_path(model_path, training_seed)
        live_dir = report_dir / "live" if training_seed == seed else model_file.parent / "live"
        # Every fit's checkpoint is kept until the stage's outputs are written, so a rerun after an
        # interruption resumes the unfinished seed and takes the finished ones as they are.
        result = fit(model, train, val, run["train"], live_dir, checkpoints[training_seed], training_seed,
                     monitor=monitor, mode=mode, inputs=inputs, keep_checkpoint=True)
        if not result.is_main:  # under torchrun, rank 0 writes the outputs
            continue
        weighting = class_weighting(model)
        save_model_file(model_file, {"run": name, "config": run, "encoder": encoder, "state_dict": result.best_state,
                                     "training_seed": training_seed, **weighting})
        costs[training_seed] = fit_cost(model, result)
        best_values[str(training_seed)] = result.best_value
        if training_seed == seed:
            metrics = {"epochs": result.epochs, "steps": result.steps,
                       f"best_{monitor.replace('/', '_')}": result.best_value,
                       **flat_metrics(result.final_metrics), **weighting}
    if metrics is None:
        return None
    if len(seeds) > 1:
        metrics[f"best_{monitor.replace('/', '_')}_by_training_seed"] = best_values
    write_json(report_dir / "cost.json", {**costs[seed], "training_seeds": len(seeds),
                                          "train_seconds_all_seeds": round(sum(c["train_seconds"] for c in costs.values()), 1)})
    write_json(report_dir / "metrics.json", metrics)
    for path in checkpoints.values():
        discard_checkpoint(path)
    return metrics


def seed_checkpoint_path(checkpoint_path: str | Path, training_seed: int) -> Path:
    """The resume checkpoint of an extra training seed, beside the first seed's."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}.seed{training_seed}{path.suffix}")


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
