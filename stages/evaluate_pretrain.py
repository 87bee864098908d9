"""evaluate_pretrain@<method>: test-split reconstruction quality (SSIM/PSNR, one data_range)."""

from __future__ import annotations

import torch

from chestssl import paths
from chestssl.cli import entry_from_argv, run_stage
from chestssl.inference import auto_device, predict_dataset
from chestssl.io import write_json
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.data.datasets import SliceDataset
    from chestssl.eval import evaluate_reconstruction, save_examples
    from chestssl.methods import build_method

    params = load_params()
    name, cfg = entry_from_argv(argv, params, "methods")
    seed, size = params["seed"], params["slices"]["size"]
    saved = torch.load(paths.method_weights_path(name), map_location="cpu", weights_only=False)
    method = build_method(name, cfg, seed)
    method.load_state_dict(saved["state_dict"])
    device = auto_device()
    method.to(device).eval()
    out_dir = paths.evaluate_pretrain_dir(name)
    test = SliceDataset(paths.PROCESSED_DIR, "test", size, "pretrain", seed=seed)
    if not method.reconstructs:
        metrics = {"reconstructs": False}
        save_examples(out_dir / "examples.npz", image=test[0]["image"][None].numpy())
    else:
        out = predict_dataset(lambda batch: method.reconstruct(batch["image"]), test, device=device)
        cfg_eval = params["evaluate"]
        metrics = {"reconstructs": True, **evaluate_reconstruction(
            out["output"], out["image"], out["patient_id"], n_bootstrap=cfg_eval["bootstrap_samples"],
            confidence=cfg_eval["confidence"], seed=seed)}
        # Evenly spaced test slices, so the figure spans patients and anatomy.
        count = params["report"]["num_examples"]
        pick = torch.linspace(0, len(test) - 1, steps=min(count, len(test))).round().long().numpy()
        save_examples(out_dir / "examples.npz", image=out["image"][pick], recon=out["output"][pick],
                      patient_id=out["patient_id"][pick], slice_index=out["slice_index"][pick])
    write_json(out_dir / "metrics.json", metrics)
    print(f"evaluate_pretrain@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
