"""finetune_radiographs@<run>: a `radiograph_runs` entry fine-tuned on the radiographs (seeds
001, 002) and tested on the test split's: AUROC per label, accuracy for one label per image."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import name_from_argv, run_stage


def main(argv: list[str]) -> None:
    from chestssl.params import load_params
    from chestssl.pipeline.finetune_radiographs import finetune_radiographs

    params = load_params()  # method entries in shape only: the pretraining stages check them
    name = name_from_argv(argv, params["radiograph_runs"], "radiograph_runs")
    metrics = finetune_radiographs(params, name, paths.RADIOGRAPHS_DIR)
    if metrics is not None:
        print(f"finetune_radiographs@{name}: mean test AUROC {metrics['test']['mean_auroc']}")


if __name__ == "__main__":
    run_stage(main)
