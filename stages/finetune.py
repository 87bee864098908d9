"""finetune@<run>: a downstream task (nodule segmentation or classification) from a pretrained encoder."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import entry_from_argv, run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.pipeline.finetune import finetune

    params = load_params()  # method entries in shape only: the pretraining stages check them
    name, run = entry_from_argv(argv, params, "runs")
    metrics = finetune(params, name, paths.PROCESSED_DIR, encoder_path=paths.encoder_path(run["init"]),
                       model_path=paths.finetune_model_path(name), report_dir=paths.finetune_report_dir(name),
                       checkpoint_path=paths.checkpoint_path("finetune", name))
    if metrics is not None:
        print(f"finetune@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
