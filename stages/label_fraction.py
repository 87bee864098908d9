"""label_fraction@<run>: the run fine-tuned again on nested shares of the training patients or images (seed 001)."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import name_from_argv, run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.pipeline.label_fraction import label_fraction

    params = load_params()  # method entries in shape only: the pretraining stages check them
    name = name_from_argv(argv, params["label_fraction"]["runs"], "label_fraction.runs")
    metrics = label_fraction(
        params, name, paths.PROCESSED_DIR, paths.finetune_model_path(name),
        report_dir=paths.ablation_report_dir("label_fraction", name),
        state_dir=paths.CHECKPOINT_DIR / "label_fraction" / name,
    )
    if metrics is not None:
        print(f"label_fraction@{name}: " + ", ".join(
            f"{key}: {entry['n_train_images']} images of {entry['n_train_patients']} patients" for key, entry in metrics["fractions"].items()))


if __name__ == "__main__":
    run_stage(main)
