"""frozen_parts_radiographs@<run>: a `radiograph_runs` entry trained with its head only, then with
more of its pretrained encoder (seed 001's frozen-parts study, on radiographs)."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import name_from_argv, run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.pipeline.radiograph_ablations import FROZEN_PARTS_STAGE, RUNS_KEY, frozen_parts_radiographs

    params = load_params()  # method entries in shape only: the pretraining stages check them
    name = name_from_argv(argv, params["frozen_parts"][RUNS_KEY], f"frozen_parts.{RUNS_KEY}")
    metrics = frozen_parts_radiographs(
        params, name, paths.RADIOGRAPHS_DIR, paths.RADIOGRAPH_ENCODER_DIR, paths.ALIGNMENT_STN,
        report_dir=paths.ablation_report_dir(FROZEN_PARTS_STAGE, name),
        state_dir=paths.CHECKPOINT_DIR / FROZEN_PARTS_STAGE / name,
    )
    if metrics is not None:
        print(f"{FROZEN_PARTS_STAGE}@{name}: " + ", ".join(
            f"{entry['label']}: mean AUROC {entry['mean_auroc']['value']}" for entry in metrics["settings"].values()))


if __name__ == "__main__":
    run_stage(main)
