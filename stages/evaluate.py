"""evaluate@<run>: test-split metrics of a fine-tuned model, with bootstrap CIs over patients.

For classification runs the example slices also get their Grad-CAM maps (chestssl.interpret).
"""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import entry_from_argv, run_stage
from chestssl.inference import auto_device
from chestssl.io import write_json
from chestssl.model_files import load_model_file
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.data.datasets import SliceDataset
    from chestssl.eval.downstream import evaluate_predictor
    from chestssl.interpret import add_gradcam_to_examples
    from chestssl.tasks import build_task

    params = load_params()
    name, run = entry_from_argv(argv, params, "runs")
    seed, slices = params["seed"], params["slices"]
    saved = load_model_file(paths.finetune_model_path(name), f"finetune@{name}", required=("encoder", "state_dict"))
    device = auto_device()
    model = build_task(run, saved["encoder"], seed, name=name)
    model.load_state_dict(saved["state_dict"])
    model.to(device).eval()
    test = SliceDataset(paths.PROCESSED_DIR, "test", slices["size"], run["task"],
                        clean_per_nodule_slice=slices["clean_per_nodule_slice"], seed=seed)
    out_dir = paths.evaluate_dir(name)
    metrics = evaluate_predictor(
        run["task"], model.predict, test, params["evaluate"], examples_path=out_dir / "examples.npz",
        items_path=out_dir / "items.npz", num_examples=params["report"]["num_examples"], seed=seed, device=device,
        feature_maps=getattr(model, "encoder_feature_maps", None),
    )
    if run["task"] == "cls":
        # Grad-CAM of the nodule logit on the saved example slices, for the report's figure.
        add_gradcam_to_examples(model, out_dir / "examples.npz")
    write_json(out_dir / "metrics.json", metrics)
    print(f"evaluate@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
