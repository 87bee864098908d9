"""Stage ``finetune_radiographs@<run>``: a classifier fine-tuned and tested on chest radiographs.

The run (a ``radiograph_runs`` entry) is seed 001's protocol (a linear head on the encoder
that ``pretrain_radiographs@<init>`` trained, the whole network fine-tuned) or seed 002's
(MONAI DenseNet-121 from a seeded random start, on images first aligned by the STN of
``align_radiographs`` with ``aligned: true``), built by
:class:`~chestssl.tasks.radiograph_cls.RadiographClassificationTask`. It trains on the
training split's radiographs of ``views`` (:class:`~chestssl.data.radiograph_datasets.RadiographDataset`,
labels from ``data.cxr``: rendered, or a real dataset), validated on the validation split's
(best epoch by the mean AUROC), through the one loop (:func:`chestssl.train.loop.fit`), and
is tested on the test split's: per-label and mean AUROC, and for ``multiclass`` accuracy and
the confusion matrix (``multilabel``: each label's confusion counts at ``evaluate.cls_threshold``),
with intervals from a bootstrap over patients
(:func:`~chestssl.eval.radiograph_classification.evaluate_radiograph_classification`).
``evaluate.num_examples`` evenly spaced test images are kept with the Grad-CAM map of each
one's most probable label (seed 001 drew Grad-CAM on ``layer4``; :mod:`chestssl.interpret`),
for the report's figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl import paths
from chestssl.io import write_json
from chestssl.model_files import load_model_file, save_model_file
from chestssl.params import ParamsError

#: The validation metric that picks the best epoch.
MONITOR = ("val/mean_auroc", "max")


def gradcam_examples(model, dataset, probabilities, count: int) -> dict[str, Any]:
    """``count`` evenly spaced test images of ``dataset`` with what the report's figure shows.

    ``probabilities`` (N, L): the model's on the whole of ``dataset``. Returns the arrays of
    ``examples.npz``: ``image`` (K, 1, S, S), ``labels`` and ``probability`` (K, L),
    ``explained`` (K,) the most probable label's index (the names are ``metrics.json``'s
    ``labels``), ``patient_id``, ``study_id`` and ``view`` (K,), and ``cam`` (K, 1, S, S) float16 in [0, 1], the
    Grad-CAM map of the explained label's logit, or ``cam_unavailable`` (K,) saying why not.
    """
    import numpy as np
    import torch

    from chestssl.interpret import gradcam_maps_per_image, gradcam_unavailable_reason

    probabilities = np.asarray(probabilities, dtype=np.float32)
    picks = np.unique(np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int))
    items = [dataset[int(i)] for i in picks]
    images = torch.stack([item["image"] for item in items]).float()
    explained = probabilities[picks].argmax(axis=1)
    arrays: dict[str, Any] = {
        "image": images.numpy(), "labels": np.stack([np.asarray(item["labels"], dtype=np.float32) for item in items]),
        "probability": probabilities[picks], "explained": explained.astype(np.int64),
        "patient_id": np.array([str(item["patient_id"]) for item in items]),
        "study_id": np.array([str(item["study_id"]) for item in items]),
        "view": np.array([str(item["view"]) for item in items]),
    }
    reason = gradcam_unavailable_reason(model)
    if reason is None:
        arrays["cam"] = gradcam_maps_per_image(model, images, explained).astype(np.float16)
    else:
        arrays["cam_unavailable"] = np.full(len(picks), reason)
    return arrays


def finetune_radiographs(
    params: Mapping[str, Any],
    name: str,
    radiographs_dir: str | Path = paths.RADIOGRAPHS_DIR,
    model_dir: str | Path | None = None,
    report_dir: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
    encoder_dir: str | Path = Path("models/pretrain_radiographs"),
    stn_path: str | Path = paths.ALIGNMENT_STN,
) -> dict[str, Any] | None:
    """Fine-tune ``radiograph_runs.<name>``, test it, and write its model and metrics.

    Args:
        params: the loaded params (the run, ``seed``, ``evaluate``).
        name: an entry under ``radiograph_runs``.
        radiographs_dir: ``data/radiographs`` (stage ``radiographs``).
        model_dir: receives ``model.pt`` (the best epoch's weights); default
            ``models/finetune_radiographs/<name>``.
        report_dir: receives ``live/`` (curves), ``metrics.json`` (the test metrics and the
            training's), ``cost.json`` and ``examples.npz`` (:func:`gradcam_examples`); default
            ``reports/finetune_radiographs/<name>``.
        checkpoint_path: the loop's resume checkpoint; default
            ``checkpoints/finetune_radiographs/<name>.pt``.
        encoder_dir: the radiograph encoders (``<init>/encoder.pt``, stage ``pretrain_radiographs``).
        stn_path: the STN of ``align_radiographs`` (read when ``aligned``).

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.data.radiograph_folder import open_radiograph_folder
    from chestssl.eval.examples import save_examples
    from chestssl.eval.radiograph_classification import evaluate_radiograph_classification
    from chestssl.inference import auto_device, predict_dataset
    from chestssl.models.backbones import load_encoder
    from chestssl.models.stn import load_alignment_stn
    from chestssl.tasks.radiograph_cls import RadiographClassificationTask, radiograph_run_dataset
    from chestssl.train.checkpoint import stage_inputs
    from chestssl.train.cost_probe import fit_cost
    from chestssl.train.loop import fit
    from chestssl.train.metrics import flat_metrics

    runs = params.get("radiograph_runs") or {}
    if name not in runs:
        raise ParamsError([f"radiograph_runs: {name!r} is not an entry ({', '.join(runs) or 'none'})"])
    run, seed, evaluate = runs[name], params["seed"], params["evaluate"]
    model_dir = Path(model_dir) if model_dir is not None else paths.radiograph_finetune_model_dir(name)
    report_dir = Path(report_dir) if report_dir is not None else paths.radiograph_finetune_report_dir(name)
    checkpoint_path = (Path(checkpoint_path) if checkpoint_path is not None
                       else paths.checkpoint_path("finetune_radiographs", name))
    read = [Path(radiographs_dir)]
    encoder = None
    if run["init"] is not None:
        encoder_file = Path(encoder_dir) / run["init"] / "encoder.pt"
        encoder = load_encoder(load_model_file(encoder_file, f"pretrain_radiographs@{run['init']}",
                                               required=("backbone",)), str(encoder_file))
        read.append(encoder_file)
    folder = open_radiograph_folder(radiographs_dir)
    stn = None
    if run["aligned"]:
        stn, _ = load_alignment_stn(stn_path)
        read.append(Path(stn_path))
    splits = {split: radiograph_run_dataset(run, folder, split, stn) for split in ("train", "val", "test")}
    label_names = list(splits["train"].label_names)
    model = RadiographClassificationTask(name, run, label_names, seed, encoder=encoder)
    inputs = stage_inputs({"run": run, "labels": label_names}, read)
    result = fit(model, splits["train"], splits["val"], run["train"], report_dir / "live", checkpoint_path, seed,
                 monitor=MONITOR[0], mode=MONITOR[1], inputs=inputs)
    if not result.is_main:
        return None
    model.load_state_dict(result.best_state)
    device = auto_device()
    model.to(device).eval()
    test = predict_dataset(model.predict, splits["test"], device=device, keep=("labels", "patient_id"))
    metrics = {
        "epochs": result.epochs, "steps": result.steps, "best_val_mean_auroc": result.best_value,
        **flat_metrics(result.final_metrics),
        "labels": label_names, "views": list(run["views"]), "mode": run["mode"], "arch": run["arch"],
        "init": run["init"], "aligned": run["aligned"],
        "n_train_images": len(splits["train"]),
        "test": evaluate_radiograph_classification(
            test["output"], test["labels"], test["patient_id"], label_names, run["mode"],
            n_bootstrap=evaluate["bootstrap_samples"], confidence=evaluate["confidence"], seed=seed,
            threshold=evaluate["cls_threshold"]),
    }
    save_examples(report_dir / "examples.npz",
                  **gradcam_examples(model, splits["test"], test["output"], evaluate["num_examples"]))
    save_model_file(model_dir / "model.pt", {"run": name, "config": run, "labels": label_names,
                                             "state_dict": result.best_state})
    write_json(report_dir / "cost.json", fit_cost(model, result))
    write_json(report_dir / "metrics.json", metrics)
    return metrics
