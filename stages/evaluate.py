"""evaluate@<run>: test-split metrics of a fine-tuned model, with bootstrap CIs over patients."""

from __future__ import annotations

import torch

from chestssl import paths
from chestssl.cli import entry_from_argv, run_stage
from chestssl.inference import auto_device, predict_dataset
from chestssl.io import write_json
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.data.datasets import SliceDataset
    from chestssl.eval import choose_example_indices, evaluate_classification, evaluate_segmentation, save_examples
    from chestssl.tasks import build_task

    params = load_params()
    name, run = entry_from_argv(argv, params, "runs")
    seed, slices, cfg = params["seed"], params["slices"], params["evaluate"]
    saved = torch.load(paths.finetune_model_path(name), map_location="cpu", weights_only=False)
    device = auto_device()
    model = build_task(run, saved["encoder"], seed, name=name)
    model.load_state_dict(saved["state_dict"])
    model.to(device).eval()
    test = SliceDataset(paths.PROCESSED_DIR, "test", slices["size"], run["task"],
                        clean_per_nodule_slice=slices["clean_per_nodule_slice"], seed=seed)
    out = predict_dataset(model.predict, test, device=device)
    bootstrap = dict(n_bootstrap=cfg["bootstrap_samples"], confidence=cfg["confidence"], seed=seed)
    count = params["report"]["num_examples"]
    out_dir = paths.evaluate_dir(name)
    if run["task"] == "seg":
        metrics = evaluate_segmentation(out["output"], out["mask"], out["patient_id"],
                                        threshold=cfg["seg_threshold"], **bootstrap)
        # Show the slices with the largest nodules: the figure is about what the model finds.
        pick = choose_example_indices(out["patient_id"], out["mask"].reshape(len(out["mask"]), -1).sum(1), count)
        save_examples(out_dir / "examples.npz", image=out["image"][pick], mask=out["mask"][pick],
                      prob=out["output"][pick], patient_id=out["patient_id"][pick],
                      slice_index=out["slice_index"][pick])
    else:
        metrics = evaluate_classification(out["output"], out["label"], out["patient_id"],
                                          threshold=cfg["cls_threshold"], **bootstrap)
        pick = choose_example_indices(out["patient_id"], out["output"], count)
        save_examples(out_dir / "examples.npz", image=out["image"][pick], label=out["label"][pick],
                      score=out["output"][pick], patient_id=out["patient_id"][pick],
                      slice_index=out["slice_index"][pick])
    write_json(out_dir / "metrics.json", metrics)
    print(f"evaluate@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
