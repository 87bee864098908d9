"""frozen_parts@<run>: the run trained with the head only, then with more of the encoder (seed 001)."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import name_from_argv, run_stage
from chestssl.io import write_json
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.models.backbones import load_encoder
    from chestssl.studies.frozen_parts import frozen_parts_metrics, frozen_parts_settings
    from chestssl.studies.runner import finish_study, run_encoder_payload, run_study

    params = load_params()
    study = params["frozen_parts"]
    name = name_from_argv(argv, study["runs"], "frozen_parts.runs")
    run = params["runs"][name]
    payload = run_encoder_payload(name)
    encoder = load_encoder(payload, source=f"{paths.finetune_model_path(name)} (encoder)")
    settings = frozen_parts_settings(encoder, study["unfrozen_stages"], name)
    report_dir = paths.study_report_dir("frozen_parts", name)
    results = run_study("frozen_parts", name, params, payload, settings, report_dir)
    if not results:  # under torchrun, rank 0 writes the outputs
        return
    metrics = frozen_parts_metrics(name, run, encoder, results)
    write_json(report_dir / "metrics.json", metrics)
    finish_study("frozen_parts", name)
    print(f"frozen_parts@{name}: " + ", ".join(
        f"{entry['label']}: {entry['trainable_parameters']} trained parameters" for entry in metrics["settings"].values()))


if __name__ == "__main__":
    run_stage(main)
