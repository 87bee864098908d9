"""finetune_3d@<run>: seed 003's downstream, 3D nodule segmentation with SwinUNETR 3D from a 3D encoder."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import entry_from_argv, run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.pipeline.finetune_3d import finetune_3d

    params = load_params()  # method entries in shape only: the pretraining stages check them
    name, run = entry_from_argv(argv, params, "runs_3d")
    metrics = finetune_3d(params, name, paths.PROCESSED_DIR, encoder_path=paths.encoder_path(run["init"]),
                          model_path=paths.finetune_3d_model_path(name),
                          report_dir=paths.finetune_3d_report_dir(name),
                          checkpoint_path=paths.checkpoint_path("finetune_3d", name))
    if metrics is not None:
        print(f"finetune_3d@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
