"""Stages ``evaluate_pretrain@<method>`` and ``evaluate_multihead@<name>``: test-split quality of a pretrained model.

Three parts, each on the test split:

- a linear probe of the frozen encoder (one logistic regression per label, seed 004's
  protocol; :func:`chestssl.eval.linear_probe.fit_linear_probe`), fitted on the training
  split's labelled view;
- the reconstruction, for methods that reconstruct: SSIM / PSNR with one ``data_range``
  (:func:`chestssl.eval.evaluate_reconstruction`) on ``evaluate.reconstruction_slices_per_patient``
  evenly spaced items of each test patient (0: all), and evenly spaced example images;
- for multihead models, their segmentation and classification heads on the same test
  slices as the downstream runs (:func:`chestssl.eval.downstream.evaluate_predictor`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl import paths
from chestssl.io import write_json
from chestssl.model_files import load_model_file
from chestssl.params import pretrain_entry


def evaluate_pretrain(
    params: Mapping[str, Any],
    name: str,
    processed_dir: str | Path = paths.PROCESSED_DIR,
    model_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    heads_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the pretrained entry ``name`` on the test split and write its metrics and examples.

    Args:
        params: the loaded params (the entry, ``seed``, ``slices``, ``crops``, ``probe``,
            ``preprocess.min_nodule_pixels``, ``evaluate``, ``evaluate.num_examples``).
        name: an entry under ``methods`` or ``multihead``.
        processed_dir: ``data/processed``.
        model_path: the method's weights (``method.pt`` of its pretraining stage); default
            :func:`chestssl.paths.method_weights_path`.
        out_dir: receives ``metrics.json`` and ``examples.npz``; default
            :func:`chestssl.paths.evaluate_pretrain_dir`.
        heads_dir: a multihead model's head examples and per-slice scores; default
            :func:`chestssl.paths.multihead_heads_dir`.

    Returns the metrics.
    """
    import torch

    from chestssl.data.datasets import SliceDataset, slice_options
    from chestssl.data.views import evenly_per_patient, labelled_view, pretrain_view
    from chestssl.eval import evaluate_reconstruction, save_examples
    from chestssl.eval.downstream import evaluate_predictor
    from chestssl.eval.linear_probe import extract_features, fit_linear_probe
    from chestssl.inference import auto_device, predict_dataset
    from chestssl.methods import build_method

    processed_dir = Path(processed_dir)
    model_path = Path(model_path) if model_path is not None else paths.method_weights_path(name)
    out_dir = Path(out_dir) if out_dir is not None else paths.evaluate_pretrain_dir(name)
    heads_dir = Path(heads_dir) if heads_dir is not None else paths.multihead_heads_dir(name)
    _, cfg = pretrain_entry(params, name)
    seed, slices, cfg_eval = params["seed"], params["slices"], params["evaluate"]
    saved = load_model_file(model_path, paths.pretrain_stage(name, params), required=("state_dict",))
    method = build_method(name, cfg, seed)
    method.load_state_dict(saved["state_dict"])
    device = auto_device()
    method.to(device).eval()
    count = params["evaluate"]["num_examples"]
    probe = params["probe"]
    encoder = method.encoder()
    metrics = {"probe": fit_linear_probe(
        extract_features(encoder, labelled_view(params, cfg, "train", processed_dir), device),
        extract_features(encoder, labelled_view(params, cfg, "test", processed_dir), device),
        C=probe["C"], max_iter=probe["max_iter"], seed=seed,
        n_bootstrap=cfg_eval["bootstrap_samples"], confidence=cfg_eval["confidence"])}
    test = evenly_per_patient(pretrain_view(params, cfg, "test", processed_dir),
                              cfg_eval["reconstruction_slices_per_patient"])
    if not method.reconstructs:
        metrics["reconstructs"] = False
        save_examples(out_dir / "examples.npz", image=_axial_middle(test[0]["image"][None].numpy()))
    else:
        out = predict_dataset(lambda batch: method.reconstruct(batch["image"]), test, device=device)
        metrics.update(reconstructs=True, reconstruction_items_per_patient=cfg_eval["reconstruction_slices_per_patient"],
                       **evaluate_reconstruction(
            out["output"], out["image"], out["patient_id"], n_bootstrap=cfg_eval["bootstrap_samples"],
            confidence=cfg_eval["confidence"], seed=seed))
        # Evenly spaced test items, so the figure spans patients and anatomy.
        pick = torch.linspace(0, len(test) - 1, steps=min(count, len(test))).round().long().numpy()
        save_examples(out_dir / "examples.npz", image=_axial_middle(out["image"][pick]),
                      recon=_axial_middle(out["output"][pick]),
                      patient_id=out["patient_id"][pick], slice_index=out["slice_index"][pick])
    if method.heads:
        metrics.update(heads=list(method.heads), seg_beta=float(cfg["seg_beta"]), cls_weight=float(cfg["cls_weight"]))
        for task, key, predict in (("seg", "segmentation", method.predict_segmentation),
                                   ("cls", "classification", method.predict_classification)):
            if task not in method.heads:
                continue
            data = SliceDataset(processed_dir, "test", task=task, seed=seed, **slice_options(slices))
            metrics[key] = evaluate_predictor(
                task, lambda batch, predict=predict: predict(batch["image"]), data, cfg_eval,
                examples_path=heads_dir / f"{task}_examples.npz", items_path=heads_dir / f"{task}_items.npz",
                num_examples=count, seed=seed, device=device,
                feature_maps=method.encoder_feature_maps if task == "seg" else None,
            )
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _axial_middle(images):
    """(N, 1, H, W) images as they are; the middle axial slice of (N, 1, D, H, W) crops."""
    return images[:, :, images.shape[2] // 2] if images.ndim == 5 else images
