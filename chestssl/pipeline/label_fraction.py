"""Stage ``label_fraction@<run>``: the run fine-tuned again on nested shares of its training data (seed 001).

Seed 001 fine-tunes on 1%, 5%, 10%, 15%, 20%, 25%, 50% and 100% of its labelled training
images to show how many labels pretraining saves. :func:`label_fraction` draws nested
subsets (:mod:`chestssl.ablations.label_fraction`) of the training patients with nodule
slices or, with ``label_fraction.unit: images`` (the seed's unit), of the run's training
images, trains the run on each and tests it (:func:`chestssl.ablations.runner.run_ablation`),
and writes one entry per fraction to ``metrics.json``, with the unit and each fraction's
training images and patients, and what each training cost to ``cost.json``. With
``slices.clean_source: nodule_free_patients`` (seed 000's clean slices), each subset of
patients also takes the same share of the training patients without nodules
(:func:`with_nodule_free_patients`), where its clean slices come from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from chestssl.io import write_json
from chestssl.params import ParamsError

if TYPE_CHECKING:
    from chestssl.ablations.runner import AblationSetting

#: The stage, and the ``params`` block that lists its runs.
STAGE = "label_fraction"


def label_fraction(
    params: Mapping[str, Any],
    name: str,
    processed_dir: str | Path,
    model_path: str | Path,
    report_dir: str | Path,
    state_dir: str | Path,
) -> dict[str, Any] | None:
    """Fine-tune ``runs.<name>`` on each share of ``label_fraction.fractions`` and test it.

    Args:
        params: the loaded params (``label_fraction``, ``runs``, ``seed``, ``slices``,
            ``evaluate``); ``label_fraction.unit`` (``patients`` when absent) says what
            the fractions are shares of.
        name: a run listed in ``label_fraction.runs``.
        processed_dir: ``data/processed``.
        model_path: the run's ``models/finetune/<run>/model.pt`` (its pretrained encoder).
        report_dir: receives ``metrics.json``, ``live/<setting>/`` (curves) and ``cost.json``:
            ``{"fits": {<setting>: <cost>}}``, what each training cost
            (:func:`~chestssl.train.cost_probe.fit_cost`), keyed as the fractions'
            ``trained_as`` in ``metrics.json`` (fractions with the same subset share one fit).
        state_dir: finished settings and the resume checkpoint, removed once the metrics
            are written.

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.ablations.label_fraction import (
        DEFAULT_UNIT,
        image_fraction_settings,
        label_fraction_metrics,
        label_fraction_settings,
        labelled_patients,
    )
    from chestssl.ablations.runner import (
        ablation_costs,
        finish_ablation,
        run_ablation,
        run_dataset,
        run_encoder_payload,
    )
    from chestssl.data.processed import read_splits

    block = params[STAGE]
    if name not in block["runs"]:
        raise ParamsError([f"{STAGE}.runs: {name!r} is not listed ({', '.join(block['runs']) or 'empty'})"])
    unit = block.get("unit", DEFAULT_UNIT)  # validated with the params (chestssl.params.LabelFraction)
    run = params["runs"][name]
    report_dir = Path(report_dir)
    split_patients = read_splits(processed_dir)["train"]
    patients = labelled_patients(processed_dir, "train")
    train_items = None
    if unit == "images":
        # Seed 001's unit: shares of the items finetune trains the run on, both classes kept.
        train_items = run_dataset(params, name, processed_dir, "train")
        settings, served_by = image_fraction_settings(train_items.frame["label"].to_numpy(), block["fractions"],
                                                      params["seed"], stratify=run["task"] == "cls")
    else:
        settings, served_by = label_fraction_settings(patients, block["fractions"], params["seed"])
        if run["task"] == "cls" and params["slices"]["clean_source"] == "nodule_free_patients":
            from chestssl.data.datasets import nodule_free_patients

            settings = with_nodule_free_patients(settings, patients, nodule_free_patients(processed_dir, "train"),
                                                 params["seed"])
    results = run_ablation(STAGE, name, params, run_encoder_payload(model_path, name), settings,
                           processed_dir=processed_dir, model_path=model_path, report_dir=report_dir,
                           state_dir=state_dir, train_items=train_items)
    if not results:  # under torchrun, rank 0 writes the outputs
        return None
    metrics = label_fraction_metrics(name, run, len(split_patients), len(patients), served_by, results, unit=unit,
                                     n_labelled_images=None if train_items is None else len(train_items))
    write_json(report_dir / "cost.json", ablation_costs(results))
    write_json(report_dir / "metrics.json", metrics)
    finish_ablation(state_dir)
    return metrics


def with_nodule_free_patients(settings: Sequence["AblationSetting"], labelled: Sequence[str],
                              nodule_free: Sequence[str], seed: int) -> list["AblationSetting"]:
    """``settings`` (subsets of the ``labelled`` patients, those with nodule slices), each
    with the same share of the ``nodule_free`` patients added (at least one; nested, one
    seeded order as :func:`~chestssl.ablations.label_fraction.patient_subsets` draws).

    With ``slices.clean_source: nodule_free_patients`` (seed 000), a classifier's clean
    slices come from patients without any annotation, which the labelled patients never
    are: without them a subset would hold no clean slice. The clean slices drawn still
    number ``slices.clean_per_nodule_slice`` per nodule slice of the subset. No nodule-free
    patient: ``settings`` as they are (building the training set then raises an error that
    says so).
    """
    from dataclasses import replace

    from chestssl.ablations.label_fraction import patient_subsets

    if not nodule_free:
        return list(settings)
    shares = {setting.key: len(setting.patient_ids) / len(labelled) for setting in settings}
    subsets = patient_subsets(nodule_free, sorted(set(shares.values())), seed)
    return [replace(setting, patient_ids=tuple(setting.patient_ids) + subsets[shares[setting.key]])
            for setting in settings]
