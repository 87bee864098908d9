"""label_fraction_radiographs@<run>: a `radiograph_runs` entry fine-tuned again on nested shares of
its training images (seed 001's label-fraction study, on radiographs)."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import name_from_argv, run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.pipeline.radiograph_ablations import LABEL_FRACTION_STAGE, RUNS_KEY, label_fraction_radiographs

    params = load_params()  # method entries in shape only: the pretraining stages check them
    name = name_from_argv(argv, params["label_fraction"][RUNS_KEY], f"label_fraction.{RUNS_KEY}")
    metrics = label_fraction_radiographs(
        params, name, paths.RADIOGRAPHS_DIR, paths.RADIOGRAPH_ENCODER_DIR, paths.ALIGNMENT_STN,
        report_dir=paths.ablation_report_dir(LABEL_FRACTION_STAGE, name),
        state_dir=paths.CHECKPOINT_DIR / LABEL_FRACTION_STAGE / name,
    )
    if metrics is not None:
        print(f"{LABEL_FRACTION_STAGE}@{name}: " + ", ".join(
            f"{key}: {entry['n_train_images']} images, mean AUROC {entry['mean_auroc']['value']}"
            for key, entry in metrics["fractions"].items()))


if __name__ == "__main__":
    run_stage(main)
