"""Seed 001's ablations on chest radiographs: a ``radiograph_runs`` entry as an ablation's subject.

Seed 001 ran its label-fraction and frozen-parts studies on radiographs (4-class COVID-19
Radiography): its Barlow Twins ResNet-18 fine-tuned with a linear head on 1 ... 100% of
the training images, and with only ``fc``, then ``layer4`` + ``fc``, and so on, trained.
:func:`radiograph_subject` makes a radiograph fine-tuning run (stage
``finetune_radiographs``) the :class:`~chestssl.ablations.runner.AblationSubject` that
:func:`~chestssl.ablations.runner.run_subject_ablation` repeats: the same images (views,
STN alignment), model (:class:`~chestssl.tasks.radiograph_cls.RadiographClassificationTask`
from the encoder of ``pretrain_radiographs@<init>``), training params and validation metric
(mean AUROC), and the same test (per-label and mean AUROC, accuracy for ``multiclass``, with
a bootstrap over patients) as the run itself.

:func:`radiograph_fraction_settings` draws the label-fraction subsets in seed 001's unit,
training images: nested, seeded, and stratified so that every subset keeps each class
(``multiclass``) or both images with and without a finding (``multilabel``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from chestssl.ablations.runner import AblationSetting, AblationSubject, interval_metrics

#: The validation metric that picks each setting's best epoch (as ``finetune_radiographs``).
MONITOR = ("val/mean_auroc", "max")


def radiograph_items_digest(frame) -> str:
    """Digest of which radiographs a training set holds (study and view of each item, in order)."""
    from chestssl.train.checkpoint import digest

    return digest([[str(study), str(view)] for study, view in zip(frame["study_id"], frame["view"])])


def stratum_of_each_image(labels: np.ndarray, mode: str) -> np.ndarray:
    """(N,) int: the class of each image (``multiclass``: the index of its one positive label)
    or whether it has any positive finding (``multilabel``), for stratified subsets.

    ``labels``: (N, L) in {0, 1, NaN}.
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (images, labels), got shape {labels.shape}")
    if mode == "multiclass":
        return np.nan_to_num(labels, nan=0.0).argmax(axis=1).astype(np.int64)
    return (np.nan_to_num(labels, nan=0.0) == 1).any(axis=1).astype(np.int64)


def radiograph_fraction_settings(
    labels: np.ndarray, mode: str, fractions: Sequence[float], seed: int
) -> tuple[list[AblationSetting], dict[float, str]]:
    """The label-fraction trainings on radiographs, in seed 001's unit (training images), and
    per fraction the key of the training that serves it
    (:func:`~chestssl.ablations.label_fraction.image_fraction_settings`, stratified by
    :func:`stratum_of_each_image`)."""
    from chestssl.ablations.label_fraction import image_fraction_settings

    return image_fraction_settings(stratum_of_each_image(labels, mode), fractions, seed, stratify=True)


def radiograph_subject(
    params: Mapping[str, Any],
    run_name: str,
    folder,
    encoder_dir: str | Path,
    stn_path: str | Path,
) -> AblationSubject:
    """The :class:`~chestssl.ablations.runner.AblationSubject` of ``radiograph_runs.<run_name>``.

    Args:
        params: the loaded params (``radiograph_runs``, ``seed``, ``evaluate``).
        run_name: an entry of ``radiograph_runs``.
        folder: ``data/radiographs`` (stage ``radiographs``), opened
            (:func:`~chestssl.data.radiograph_folder.open_radiograph_folder`).
        encoder_dir: the radiograph encoders (``<init>/encoder.pt``, stage ``pretrain_radiographs``).
        stn_path: the STN of ``align_radiographs`` (read when the run is ``aligned``).
    """
    from chestssl.eval.radiograph_classification import evaluate_radiograph_classification
    from chestssl.inference import predict_dataset
    from chestssl.model_files import load_model_file
    from chestssl.models.backbones import load_encoder
    from chestssl.models.stn import load_alignment_stn
    from chestssl.tasks.radiograph_cls import RadiographClassificationTask, radiograph_run_dataset
    from chestssl.train.checkpoint import stage_inputs

    run, seed, evaluate = params["radiograph_runs"][run_name], params["seed"], params["evaluate"]
    read = [Path(folder.path)]
    encoder_state = None
    if run["init"] is not None:
        encoder_file = Path(encoder_dir) / run["init"] / "encoder.pt"
        encoder_state = load_model_file(encoder_file, f"pretrain_radiographs@{run['init']}", required=("backbone",))
        read.append(encoder_file)
    stn = None
    if run["aligned"]:
        stn, _ = load_alignment_stn(stn_path)
        read.append(Path(stn_path))
    label_names = list(folder.label_names)
    inputs = stage_inputs({"run": run, "labels": label_names}, read)

    def dataset(split: str, patient_ids: Sequence[str] | None = None):
        return radiograph_run_dataset(run, folder, split, stn, patient_ids)

    def build(train):
        encoder = None if encoder_state is None else load_encoder(encoder_state, f"{run['init']} (encoder)")
        return RadiographClassificationTask(run_name, run, label_names, seed, encoder=encoder)

    def test(model, data, device):
        out = predict_dataset(model.predict, data, device=device, keep=("labels", "patient_id"))
        metrics = evaluate_radiograph_classification(
            out["output"], out["labels"], out["patient_id"], label_names, run["mode"],
            n_bootstrap=evaluate["bootstrap_samples"], confidence=evaluate["confidence"], seed=seed,
            threshold=evaluate["cls_threshold"])
        return {**interval_metrics(metrics), "auroc": metrics["auroc"]}

    return AblationSubject(run_name, run["train"], MONITOR, inputs, seed, evaluate, dataset, build, test,
                           items_digest=radiograph_items_digest)
