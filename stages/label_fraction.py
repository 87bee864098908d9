"""label_fraction@<run>: the run fine-tuned again on nested shares of the training patients (seed 001)."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import name_from_argv, run_stage
from chestssl.io import write_json
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.data.processed import read_splits
    from chestssl.studies.label_fraction import label_fraction_metrics, label_fraction_settings, labelled_patients
    from chestssl.studies.runner import finish_study, run_encoder_payload, run_study

    params = load_params()
    study = params["label_fraction"]
    name = name_from_argv(argv, study["runs"], "label_fraction.runs")
    run = params["runs"][name]
    split_patients = read_splits(paths.PROCESSED_DIR)["train"]
    patients = labelled_patients(paths.PROCESSED_DIR, "train")
    settings, served_by = label_fraction_settings(patients, study["fractions"], params["seed"])
    report_dir = paths.study_report_dir("label_fraction", name)
    results = run_study("label_fraction", name, params, run_encoder_payload(name), settings, report_dir)
    if not results:  # under torchrun, rank 0 writes the outputs
        return
    metrics = label_fraction_metrics(name, run, len(split_patients), len(patients), served_by, results)
    write_json(report_dir / "metrics.json", metrics)
    finish_study("label_fraction", name)
    print(f"label_fraction@{name}: " + ", ".join(
        f"{key}: {entry['n_train_patients']} patients" for key, entry in metrics["fractions"].items()))


if __name__ == "__main__":
    run_stage(main)
