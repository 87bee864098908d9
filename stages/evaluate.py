"""evaluate@<run>: test-split metrics of a fine-tuned model, with bootstrap CIs over patients.

For classification runs the example slices also get their Grad-CAM maps (chestssl.interpret).
"""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import entry_from_argv, run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.pipeline.evaluate import evaluate

    params = load_params()  # method entries in shape only: the pretraining stages check them
    name, _ = entry_from_argv(argv, params, "runs")
    metrics = evaluate(params, name, paths.PROCESSED_DIR, model_path=paths.finetune_model_path(name),
                       out_dir=paths.evaluate_dir(name))
    print(f"evaluate@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
