"""Stages ``label_fraction_radiographs@<run>`` and ``frozen_parts_radiographs@<run>``: seed 001's
ablations on chest radiographs.

Seed 001 ran both of its ablations on radiographs: the Barlow Twins ResNet-18 and its
scratch twin fine-tuned on 1, 5, 10, 15, 20, 25, 50 and 100% of the training images, and
the pretrained one with only ``fc``, then ``layer4`` + ``fc``, ... down to the whole network
trained. Each stage repeats a ``radiograph_runs`` entry (:mod:`chestssl.ablations.radiographs`)
through :func:`~chestssl.ablations.runner.run_subject_ablation`: trained with the run's own
recipe and tested as ``finetune_radiographs`` tests the run (mean and per-label AUROC,
accuracy for ``multiclass``, bootstrap over patients). The label fractions are
``label_fraction.fractions`` of the training images (seed 001's unit, whatever
``label_fraction.unit`` says for CT), stratified by class; the frozen-parts settings are
``frozen_parts.unfrozen_stages``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl.io import write_json
from chestssl.params import ParamsError

#: The stages, and the key of the ``label_fraction`` / ``frozen_parts`` block that lists their runs.
LABEL_FRACTION_STAGE = "label_fraction_radiographs"
FROZEN_PARTS_STAGE = "frozen_parts_radiographs"
RUNS_KEY = "radiograph_runs"


def _listed_run(params: Mapping[str, Any], block: str, name: str) -> Mapping[str, Any]:
    listed = params[block].get(RUNS_KEY) or []
    if name not in listed:
        raise ParamsError([f"{block}.{RUNS_KEY}: {name!r} is not listed ({', '.join(listed) or 'empty'})"])
    runs = params.get("radiograph_runs") or {}
    if name not in runs:
        raise ParamsError([f"{block}.{RUNS_KEY}: {name!r} is not a `radiograph_runs` entry "
                           f"({', '.join(runs) or 'none'})"])
    return runs[name]


def _description(name: str, run: Mapping[str, Any], labels) -> dict[str, Any]:
    """What the metrics file says of the run: the radiograph task in ``task``, as the CT
    ablations' files name theirs (the report picks the metrics to show by it)."""
    return {"run": name, "task": f"radiograph_{run['mode']}", "mode": run["mode"], "init": run["init"],
            "arch": run["arch"], "aligned": run["aligned"], "views": list(run["views"]), "labels": list(labels)}


def label_fraction_radiographs(
    params: Mapping[str, Any],
    name: str,
    radiographs_dir: str | Path,
    encoder_dir: str | Path,
    stn_path: str | Path,
    report_dir: str | Path,
    state_dir: str | Path,
) -> dict[str, Any] | None:
    """Fine-tune ``radiograph_runs.<name>`` on each share of ``label_fraction.fractions`` of its
    training images, and test it.

    Args:
        params: the loaded params (``label_fraction``, ``radiograph_runs``, ``seed``, ``evaluate``).
        name: a run listed in ``label_fraction.radiograph_runs``.
        radiographs_dir: ``data/radiographs`` (stage ``radiographs``).
        encoder_dir, stn_path: see :func:`~chestssl.ablations.radiographs.radiograph_subject`.
        report_dir: receives ``metrics.json`` (one entry per fraction, in the keys of the CT
            ablation's, :func:`~chestssl.ablations.label_fraction.label_fraction_metrics`),
            ``live/<setting>/`` (curves) and ``cost.json`` (``{"fits": {<setting>: <cost>}}``).
        state_dir: finished settings and the resume checkpoint, removed once the metrics
            are written.

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.ablations.label_fraction import fraction_key
    from chestssl.ablations.radiographs import radiograph_fraction_settings, radiograph_subject
    from chestssl.ablations.runner import ablation_costs, finish_ablation, run_subject_ablation
    from chestssl.data.radiograph_folder import open_radiograph_folder

    run = _listed_run(params, "label_fraction", name)
    folder = open_radiograph_folder(radiographs_dir)
    subject = radiograph_subject(params, name, folder, encoder_dir, stn_path)
    train = subject.dataset("train", None)
    try:
        # the labels of the training images from the folder's tables, without reading the images
        settings, served_by = radiograph_fraction_settings(folder.label_matrix(train.frame), run["mode"],
                                                           params["label_fraction"]["fractions"], params["seed"])
    except ValueError as exc:
        raise ParamsError([f"label_fraction.{RUNS_KEY}: {name}: {exc}"]) from exc
    results = run_subject_ablation(LABEL_FRACTION_STAGE, subject, settings, report_dir=report_dir,
                                   state_dir=state_dir, train_items=train)
    if not results:  # under torchrun, rank 0 writes the outputs
        return None
    fractions = {}
    for fraction in sorted(served_by):
        result = results[served_by[fraction]]
        fractions[fraction_key(fraction)] = {
            "fraction": fraction, "trained_as": served_by[fraction], "n_train_patients": result["n_train_patients"],
            "n_train_images": result["n_train_images"], "best_epoch": result["best_epoch"], **result["test"]}
    metrics = {**_description(name, run, folder.label_names), "unit": "images",
               "n_split_patients": int(train.frame["patient_id"].nunique()), "n_labelled_images": len(train),
               "fractions": fractions}
    report_dir = Path(report_dir)
    write_json(report_dir / "cost.json", ablation_costs(results))
    write_json(report_dir / "metrics.json", metrics)
    finish_ablation(state_dir)
    return metrics


def frozen_parts_radiographs(
    params: Mapping[str, Any],
    name: str,
    radiographs_dir: str | Path,
    encoder_dir: str | Path,
    stn_path: str | Path,
    report_dir: str | Path,
    state_dir: str | Path,
) -> dict[str, Any] | None:
    """Train ``radiograph_runs.<name>`` (a linear head on a pretrained encoder) with its head
    and the N deepest encoder stages, for each N of ``frozen_parts.unfrozen_stages``, and test it.

    Args: as :func:`label_fraction_radiographs`; ``name`` listed in
    ``frozen_parts.radiograph_runs``; ``metrics.json`` holds one entry per setting, naming
    the stages it trained (the CT ablation's keys,
    :func:`~chestssl.ablations.frozen_parts.frozen_parts_metrics`).

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.ablations.frozen_parts import frozen_parts_metrics, frozen_parts_settings
    from chestssl.ablations.radiographs import radiograph_subject
    from chestssl.ablations.runner import ablation_costs, finish_ablation, run_subject_ablation
    from chestssl.data.radiograph_folder import open_radiograph_folder
    from chestssl.model_files import load_model_file
    from chestssl.models.backbones import load_encoder

    run = _listed_run(params, "frozen_parts", name)
    if run["arch"] != "linear" or run["init"] is None:
        raise ParamsError([f"frozen_parts.{RUNS_KEY}: {name!r} is a {run['arch']} run without a pretrained encoder; "
                           "the frozen-parts ablation freezes stages of a pretrained encoder (list runs with "
                           "arch: linear)"])
    encoder_file = Path(encoder_dir) / run["init"] / "encoder.pt"
    encoder = load_encoder(load_model_file(encoder_file, f"pretrain_radiographs@{run['init']}",
                                           required=("backbone",)), str(encoder_file))
    try:
        settings = frozen_parts_settings(encoder, params["frozen_parts"]["unfrozen_stages"], name)
    except ValueError as exc:  # the counts a backbone allows are known only once its encoder is built
        raise ParamsError([f"frozen_parts.unfrozen_stages: {exc}"]) from exc
    folder = open_radiograph_folder(radiographs_dir)
    subject = radiograph_subject(params, name, folder, encoder_dir, stn_path)
    results = run_subject_ablation(FROZEN_PARTS_STAGE, subject, settings, report_dir=report_dir,
                                   state_dir=state_dir)
    if not results:  # under torchrun, rank 0 writes the outputs
        return None
    described = _description(name, run, folder.label_names)
    metrics = {**frozen_parts_metrics(name, {**run, "task": described["task"]}, encoder, results), **described}
    report_dir = Path(report_dir)
    write_json(report_dir / "cost.json", ablation_costs(results))
    write_json(report_dir / "metrics.json", metrics)
    finish_ablation(state_dir)
    return metrics
