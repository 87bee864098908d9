"""evaluate_pretrain@<method> and evaluate_multihead@<name>: test-split quality of a
pretrained model: a linear probe of its frozen encoder (logistic regression per label,
seed 004's protocol), its reconstruction (SSIM/PSNR, one data_range) and, for multihead
models, their segmentation and classification heads on the same test slices as the
downstream runs."""

from __future__ import annotations

import torch

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.inference import auto_device, predict_dataset
from chestssl.io import write_json
from chestssl.model_files import load_model_file
from chestssl.params import ParamsError, load_params, pretrain_entry


def main(argv: list[str]) -> None:
    from chestssl.data.datasets import SliceDataset
    from chestssl.data.views import labelled_view, pretrain_view
    from chestssl.eval import evaluate_reconstruction, save_examples
    from chestssl.eval.linear_probe import extract_features, fit_linear_probe
    from chestssl.eval.downstream import evaluate_predictor
    from chestssl.methods import build_method

    params = load_params()
    if len(argv) != 1:
        raise ParamsError([f"evaluate_pretrain: expected one entry name, got {' '.join(argv) or 'nothing'!r}"])
    name = argv[0]
    _, cfg = pretrain_entry(params, name)
    seed, slices, cfg_eval = params["seed"], params["slices"], params["evaluate"]
    saved = load_model_file(paths.method_weights_path(name), paths.pretrain_stage(name, params), required=("state_dict",))
    method = build_method(name, cfg, seed)
    method.load_state_dict(saved["state_dict"])
    device = auto_device()
    method.to(device).eval()
    out_dir = paths.evaluate_pretrain_dir(name)
    count = params["report"]["num_examples"]
    probe = params["probe"]
    encoder = method.encoder()
    metrics = {"probe": fit_linear_probe(
        extract_features(encoder, labelled_view(params, cfg, "train", paths.PROCESSED_DIR), device),
        extract_features(encoder, labelled_view(params, cfg, "test", paths.PROCESSED_DIR), device),
        C=probe["C"], max_iter=probe["max_iter"], seed=seed,
        n_bootstrap=cfg_eval["bootstrap_samples"], confidence=cfg_eval["confidence"])}
    test = pretrain_view(params, cfg, "test", paths.PROCESSED_DIR)
    if not method.reconstructs:
        metrics["reconstructs"] = False
        save_examples(out_dir / "examples.npz", image=_axial_middle(test[0]["image"][None].numpy()))
    else:
        out = predict_dataset(lambda batch: method.reconstruct(batch["image"]), test, device=device)
        metrics.update(reconstructs=True, **evaluate_reconstruction(
            out["output"], out["image"], out["patient_id"], n_bootstrap=cfg_eval["bootstrap_samples"],
            confidence=cfg_eval["confidence"], seed=seed))
        # Evenly spaced test items, so the figure spans patients and anatomy.
        pick = torch.linspace(0, len(test) - 1, steps=min(count, len(test))).round().long().numpy()
        save_examples(out_dir / "examples.npz", image=_axial_middle(out["image"][pick]),
                      recon=_axial_middle(out["output"][pick]),
                      patient_id=out["patient_id"][pick], slice_index=out["slice_index"][pick])
    if method.heads:
        metrics.update(heads=list(method.heads), seg_beta=float(cfg["seg_beta"]), cls_weight=float(cfg["cls_weight"]))
        heads_dir = paths.multihead_heads_dir(name)
        for task, key, predict in (("seg", "segmentation", method.predict_segmentation),
                                   ("cls", "classification", method.predict_classification)):
            if task not in method.heads:
                continue
            data = SliceDataset(paths.PROCESSED_DIR, "test", slices["size"], task,
                                clean_per_nodule_slice=slices["clean_per_nodule_slice"], seed=seed)
            metrics[key] = evaluate_predictor(
                task, lambda batch, predict=predict: predict(batch["image"]), data, cfg_eval,
                examples_path=heads_dir / f"{task}_examples.npz", items_path=heads_dir / f"{task}_items.npz",
                num_examples=count, seed=seed, device=device,
                feature_maps=method.encoder_feature_maps if task == "seg" else None,
            )
    write_json(out_dir / "metrics.json", metrics)
    print(f"evaluate_pretrain@{name}: {metrics}")


def _axial_middle(images):
    """(N, 1, H, W) images as they are; the middle axial slice of (N, 1, D, H, W) crops."""
    return images[:, :, images.shape[2] // 2] if images.ndim == 5 else images


if __name__ == "__main__":
    run_stage(main)
