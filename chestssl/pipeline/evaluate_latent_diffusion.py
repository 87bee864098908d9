"""Stage ``evaluate_latent_diffusion@<name>``: samples of seed 000's latent diffusion, scored by FID.

The model of ``latent_diffusion@<name>`` samples ``samples`` latents, decoded to slices by its
autoencoder, and FID (:func:`chestssl.eval.fid.fid_with_interval`) compares them with every
test slice on the features of ``fid.features`` (the frozen encoder of a ``methods`` entry,
globally pooled) or of the TorchScript network ``fid.network`` (hash-checked; e.g.
Inception-v3, as seed 000 used: nothing is downloaded).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from chestssl import paths
from chestssl.errors import UserError
from chestssl.io import write_json
from chestssl.model_files import load_model_file
from chestssl.pipeline.latent_diffusion_entries import build_latent_diffusion, latent_diffusion_entry

#: Generated and real slices kept for the report's figure.
FIGURE_IMAGES = 16


class FeatureNetworkError(UserError):
    """``fid.network`` missing, with another SHA-256, or not a TorchScript feature network."""


def feature_network(fid_cfg: Mapping[str, Any], params: Mapping[str, Any], device):
    """``(embed, description)``: ``embed(images (N, 1, S, S) in [0, 1]) -> (N, F)`` features,
    and what they are, for the metrics file and the report."""
    import torch
    import torch.nn.functional as F

    from chestssl.models.backbones import load_encoder

    if fid_cfg["network"]:
        path = Path(fid_cfg["network"])
        if not path.is_file():
            raise FeatureNetworkError(f"fid.network: {path} not found; point it at a TorchScript feature network "
                                      "on disk (nothing is downloaded), or set it to \"\" to use fid.features")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != fid_cfg["network_sha256"]:
            raise FeatureNetworkError(f"fid.network: {path} has SHA-256 {digest}, but fid.network_sha256 is "
                                      f"{fid_cfg['network_sha256']}; check the file, then update the hash")
        try:
            network = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as error:
            raise FeatureNetworkError(f"fid.network: {path} is not a TorchScript file ({error}); save the network "
                                      "with torch.jit.script or torch.jit.trace") from None
        size = int(fid_cfg["network_size"])

        def embed(images):
            x = F.interpolate(images.to(device), size=(size, size), mode="bilinear", align_corners=False)
            out = network(x.repeat(1, 3, 1, 1))
            return out.flatten(1) if out.ndim > 2 else out

        return embed, f"TorchScript network {path.name} (SHA-256 {digest[:12]}), {size} px inputs"
    features = fid_cfg["features"]
    encoder_file = paths.encoder_path(features)
    payload = load_model_file(encoder_file, paths.pretrain_stage(features, params), required=("backbone",))
    encoder = load_encoder(payload, str(encoder_file)).to(device).eval()
    return (lambda images: encoder.representation(images.to(device)),
            f"the frozen `{features}` encoder ({payload['backbone']['name']}), globally pooled")


def evaluate_latent_diffusion(
    params: Mapping[str, Any],
    name: str,
    processed_dir: str | Path = paths.PROCESSED_DIR,
    model_path: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Sample ``latent_diffusion.<name>``, score the samples by FID against every test slice,
    and write ``metrics.json`` and ``samples.npz`` (:data:`FIGURE_IMAGES` generated and real
    slices, the real ones evenly spaced over the test split) to ``out_dir`` (default
    :func:`chestssl.paths.evaluate_latent_diffusion_dir`). Returns the metrics."""
    import torch

    from chestssl.data.views import pretrain_view
    from chestssl.eval import save_examples
    from chestssl.eval.fid import fid_with_interval
    from chestssl.inference import auto_device, predict_dataset

    entry, autoencoder_cfg = latent_diffusion_entry(params, name)
    processed_dir = Path(processed_dir)
    model_path = Path(model_path) if model_path is not None else paths.latent_diffusion_model_path(name)
    out_dir = Path(out_dir) if out_dir is not None else paths.evaluate_latent_diffusion_dir(name)
    saved = load_model_file(model_path, f"latent_diffusion@{name}", required=("state_dict", "scale_factor"))
    model = build_latent_diffusion(params, name, None, float(saved["scale_factor"]))
    model.load_state_dict(saved["state_dict"])
    device = auto_device()
    model.to(device).eval()
    size, seed = params["slices"]["size"], params["seed"]
    generated = model.sample(entry["samples"], model.latent_shape(size), entry["sampler"], entry["sampling_steps"], seed)
    real = pretrain_view(params, autoencoder_cfg, "test", processed_dir)
    embed, described = feature_network(params["fid"], params, device)
    with torch.no_grad():
        generated_features = torch.cat([embed(generated[i:i + 64]).float().cpu()
                                        for i in range(0, len(generated), 64)]).numpy()
        real_out = predict_dataset(lambda batch: embed(batch["image"]), real, device=device,
                                   keep=("patient_id", "slice_index"))
    fid_cfg, cfg_eval = params["fid"], params["evaluate"]
    metrics = {
        "fid": fid_with_interval(generated_features, real_out["output"].reshape(len(real_out["output"]), -1),
                                 fid_cfg["bootstrap_samples"], cfg_eval["confidence"], seed),
        "feature_network": described,
        "sampler": entry["sampler"],
        "sampling_steps": entry["sampling_steps"] if entry["sampler"] == "ddim" else entry["timesteps"],
        "image_size": size,
        "n_patients": int(len(set(real_out["patient_id"].tolist()))),
    }
    shown = min(FIGURE_IMAGES, len(generated), len(real))
    picks = np.linspace(0, len(real) - 1, shown).round().astype(int)
    real_images = torch.stack([real[int(i)]["image"] for i in picks]).numpy()
    save_examples(out_dir / "samples.npz", generated=generated[:shown].numpy(), real=real_images,
                  patient_id=real_out["patient_id"][picks], slice_index=real_out["slice_index"][picks])
    write_json(out_dir / "metrics.json", metrics)
    return metrics
