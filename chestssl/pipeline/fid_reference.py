"""Stage ``fid_reference``: the FID feature network's features of every real test slice.

Every ``evaluate_latent_diffusion@<name>`` stage compares its samples with the same real
test slices on the same features (``fid``): the frozen encoder of a ``methods`` entry
(``fid.features``, globally pooled) or the TorchScript network ``fid.network`` (hash-checked;
e.g. Inception-v3, as seed 000 used: nothing is downloaded). This stage embeds those slices
once (the default run's test split holds thousands) into :data:`chestssl.paths.FID_REFERENCE`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from chestssl import paths
from chestssl.errors import UserError
from chestssl.io import write_npz
from chestssl.model_files import load_model_file

#: Images per forward pass of the feature network.
EMBED_BATCH = 64


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


def reference_slices(params: Mapping[str, Any], processed_dir: str | Path):
    """Every test slice as the 2D autoencoders see them (the ``pretrain`` slice view)."""
    from chestssl.data.datasets import SliceDataset, slice_options

    return SliceDataset(Path(processed_dir), "test", task="pretrain", seed=params["seed"],
                        **slice_options(params["slices"]))


def embed_reference(
    params: Mapping[str, Any],
    processed_dir: str | Path = paths.PROCESSED_DIR,
    out_path: str | Path = paths.FID_REFERENCE,
) -> dict[str, Any]:
    """Embed every test slice with the ``fid`` feature network and write ``out_path`` (npz):
    ``features`` (N, F) float32, ``patient_id`` (N,), ``slice_index`` (N,) in dataset order,
    and ``feature_network`` (what the features are). Returns a summary."""
    import torch

    from chestssl.inference import auto_device, predict_dataset

    device = auto_device()
    real = reference_slices(params, processed_dir)
    embed, described = feature_network(params["fid"], params, device)
    with torch.no_grad():
        out = predict_dataset(lambda batch: embed(batch["image"]), real, batch_size=EMBED_BATCH, device=device,
                              keep=("patient_id", "slice_index"))
    features = out["output"].reshape(len(out["output"]), -1).astype(np.float32)
    write_npz(out_path, features=features, patient_id=out["patient_id"], slice_index=out["slice_index"],
              feature_network=np.array(described))
    return {"slices": int(len(features)), "features": int(features.shape[1]),
            "patients": int(len(set(out["patient_id"].tolist()))), "feature_network": described}


def load_reference(path: str | Path = paths.FID_REFERENCE) -> dict[str, np.ndarray]:
    """The arrays :func:`embed_reference` wrote, with a clear error if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the FID reference features are written by the stage "
                                "fid_reference; run `dvc repro fid_reference`")
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
