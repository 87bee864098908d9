"""Stage ``evaluate_latent_diffusion@<name>``: samples of seed 000's latent diffusion, scored by FID.

The model of ``latent_diffusion@<name>`` samples ``samples`` latents, decoded to slices by its
autoencoder, and FID (:func:`chestssl.eval.fid.fid_with_interval`) compares their features
(:func:`chestssl.pipeline.fid_reference.feature_network`: ``fid.features`` or ``fid.network``)
with those of every test slice, embedded once by the stage ``fid_reference``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from chestssl import paths
from chestssl.io import write_json
from chestssl.model_files import load_model_file
from chestssl.pipeline.fid_reference import EMBED_BATCH, feature_network, load_reference
from chestssl.pipeline.latent_diffusion_entries import build_latent_diffusion, latent_diffusion_entry

#: Generated and real slices kept for the report's figure.
FIGURE_IMAGES = 16


def evaluate_latent_diffusion(
    params: Mapping[str, Any],
    name: str,
    processed_dir: str | Path = paths.PROCESSED_DIR,
    model_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    reference_path: str | Path = paths.FID_REFERENCE,
) -> dict[str, Any]:
    """Sample ``latent_diffusion.<name>``, score the samples by FID against every test slice
    (their features read from ``reference_path``, :mod:`chestssl.pipeline.fid_reference`),
    and write ``metrics.json`` and ``samples.npz`` (:data:`FIGURE_IMAGES` generated and real
    slices, the real ones evenly spaced over the test split) to ``out_dir`` (default
    :func:`chestssl.paths.evaluate_latent_diffusion_dir`). Returns the metrics."""
    import torch

    from chestssl.data.views import pretrain_view
    from chestssl.eval import save_examples
    from chestssl.eval.fid import fid_with_interval
    from chestssl.inference import auto_device

    entry, autoencoder_cfg = latent_diffusion_entry(params, name)
    processed_dir = Path(processed_dir)
    model_path = Path(model_path) if model_path is not None else paths.latent_diffusion_model_path(name)
    out_dir = Path(out_dir) if out_dir is not None else paths.evaluate_latent_diffusion_dir(name)
    saved = load_model_file(model_path, f"latent_diffusion@{name}", required=("state_dict", "scale_factor"))
    reference = load_reference(reference_path)
    real = pretrain_view(params, autoencoder_cfg, "test", processed_dir)
    if len(reference["features"]) != len(real):
        raise ValueError(f"{reference_path} holds the features of {len(reference['features'])} test slices but the "
                         f"test split has {len(real)}; rerun the stage fid_reference (`dvc repro fid_reference`)")
    model = build_latent_diffusion(params, name, None, float(saved["scale_factor"]))
    model.load_state_dict(saved["state_dict"])
    device = auto_device()
    model.to(device).eval()
    size, seed = params["slices"]["side"], params["seed"]
    generated = model.sample(entry["samples"], model.latent_shape(size), entry["sampler"], entry["sampling_steps"], seed)
    embed, described = feature_network(params["fid"], params, device)
    if described != str(reference["feature_network"]):
        raise ValueError(f"{reference_path} was embedded with {reference['feature_network']}, but `fid` now names "
                         f"{described}; rerun the stage fid_reference (`dvc repro fid_reference`)")
    with torch.no_grad():
        generated_features = torch.cat([embed(generated[i:i + EMBED_BATCH]).float().cpu().flatten(1)
                                        for i in range(0, len(generated), EMBED_BATCH)]).numpy()
    fid_cfg, cfg_eval = params["fid"], params["evaluate"]
    metrics = {
        "fid": fid_with_interval(generated_features, reference["features"],
                                 fid_cfg["bootstrap_samples"], cfg_eval["confidence"], seed),
        "feature_network": described,
        "sampler": entry["sampler"],
        "sampling_steps": entry["sampling_steps"] if entry["sampler"] == "ddim" else entry["timesteps"],
        "image_size": size,
        "n_patients": int(len(set(reference["patient_id"].tolist()))),
    }
    shown = min(FIGURE_IMAGES, len(generated), len(real))
    picks = np.linspace(0, len(real) - 1, shown).round().astype(int)
    real_images = torch.stack([real[int(i)]["image"] for i in picks]).numpy()
    save_examples(out_dir / "samples.npz", generated=generated[:shown].numpy(), real=real_images,
                  patient_id=reference["patient_id"][picks], slice_index=reference["slice_index"][picks])
    write_json(out_dir / "metrics.json", metrics)
    return metrics
