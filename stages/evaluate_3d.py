"""evaluate_3d@<run>: a SwinUNETR 3D on whole test scans by sliding windows, with bootstrap CIs over patients."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import entry_from_argv, run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.pipeline.evaluate_3d import evaluate_3d

    params = load_params()  # method entries in shape only: the pretraining stages check them
    name, _ = entry_from_argv(argv, params, "runs_3d")
    metrics = evaluate_3d(params, name, paths.PROCESSED_DIR, model_path=paths.finetune_3d_model_path(name),
                          out_dir=paths.evaluate_3d_dir(name))
    print(f"evaluate_3d@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
