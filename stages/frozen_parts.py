"""frozen_parts@<run>: the run trained with the head only, then with more of the encoder (seed 001)."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import name_from_argv, run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.pipeline.frozen_parts import frozen_parts

    params = load_params()  # method entries in shape only: the pretraining stages check them
    name = name_from_argv(argv, params["frozen_parts"]["runs"], "frozen_parts.runs")
    metrics = frozen_parts(
        params, name, paths.PROCESSED_DIR, paths.finetune_model_path(name),
        report_dir=paths.ablation_report_dir("frozen_parts", name),
        state_dir=paths.CHECKPOINT_DIR / "frozen_parts" / name,
    )
    if metrics is not None:
        print(f"frozen_parts@{name}: " + ", ".join(f"{entry['label']}: {entry['trainable_parameters']} trained "
                                                   "parameters" for entry in metrics["settings"].values()))


if __name__ == "__main__":
    run_stage(main)
