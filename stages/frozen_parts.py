"""frozen_parts@<run>: the run trained with the head only, then with more of the encoder (seed 001)."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.io import write_json
from chestssl.params import ParamsError, load_params


def main(argv: list[str]) -> None:
    import torch

    from chestssl.models.backbones import load_encoder
    from chestssl.studies.frozen_parts import frozen_parts_metrics, frozen_parts_settings
    from chestssl.studies.runner import finish_study, run_study

    params = load_params()
    study = params["frozen_parts"]
    if len(argv) != 1 or argv[0] not in study["runs"]:
        raise ParamsError([f"frozen_parts.runs: got {' '.join(argv) or 'nothing'!r} on the command line, "
                           f"expected one of {', '.join(study['runs'])}"])
    name = argv[0]
    run = params["runs"][name]
    payload = torch.load(paths.finetune_model_path(name), map_location="cpu", weights_only=False)["encoder"]
    encoder = load_encoder(payload, source=f"{paths.finetune_model_path(name)} (encoder)")
    settings = frozen_parts_settings(encoder, study["unfrozen_stages"], name)
    report_dir = paths.study_report_dir("frozen_parts", name)
    results = run_study("frozen_parts", name, params, settings, report_dir)
    if not results:  # under torchrun, rank 0 writes the outputs
        return
    metrics = frozen_parts_metrics(name, run, encoder, results)
    write_json(report_dir / "metrics.json", metrics)
    finish_study("frozen_parts", name)
    print(f"frozen_parts@{name}: " + ", ".join(
        f"{entry['label']}: {entry['trainable_parameters']} trained parameters" for entry in metrics["settings"].values()))


if __name__ == "__main__":
    run_stage(main)
