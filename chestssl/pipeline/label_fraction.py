"""Stage ``label_fraction@<run>``: the run fine-tuned again on nested shares of the training patients (seed 001).

Seed 001 fine-tunes on 1%, 5%, 10%, ... 100% of its labelled training data to show how
many labels pretraining saves. :func:`label_fraction` draws nested subsets of the training
patients with nodule slices (:mod:`chestssl.ablations.label_fraction`), trains the run
on each and tests it (:func:`chestssl.ablations.runner.run_ablation`), and writes one
entry per fraction to ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl.io import write_json
from chestssl.params import ParamsError

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
            ``evaluate``).
        name: a run listed in ``label_fraction.runs``.
        processed_dir: ``data/processed``.
        model_path: the run's ``models/finetune/<run>/model.pt`` (its pretrained encoder).
        report_dir: receives ``metrics.json`` and ``live/<setting>/`` (curves).
        state_dir: finished settings and the resume checkpoint, removed once the metrics
            are written.

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.ablations.label_fraction import (
        label_fraction_metrics,
        label_fraction_settings,
        labelled_patients,
    )
    from chestssl.ablations.runner import finish_ablation, run_ablation, run_encoder_payload
    from chestssl.data.processed import read_splits

    block = params[STAGE]
    if name not in block["runs"]:
        raise ParamsError([f"{STAGE}.runs: {name!r} is not listed ({', '.join(block['runs']) or 'empty'})"])
    run = params["runs"][name]
    report_dir = Path(report_dir)
    split_patients = read_splits(processed_dir)["train"]
    patients = labelled_patients(processed_dir, "train")
    settings, served_by = label_fraction_settings(patients, block["fractions"], params["seed"])
    results = run_ablation(STAGE, name, params, run_encoder_payload(model_path, name), settings,
                           processed_dir=processed_dir, model_path=model_path, report_dir=report_dir,
                           state_dir=state_dir)
    if not results:  # under torchrun, rank 0 writes the outputs
        return None
    metrics = label_fraction_metrics(name, run, len(split_patients), len(patients), served_by, results)
    write_json(report_dir / "metrics.json", metrics)
    finish_ablation(state_dir)
    return metrics
