"""Stage ``latent_diffusion@<name>``: seed 000's DDPM on an autoencoder's latents.

``latent_diffusion@<name>`` trains a DDPM (:class:`~chestssl.models.latent_diffusion.LatentDiffusion`)
on the quantised latents of the trained autoencoder ``methods.<name>`` (its ``method.pt``,
frozen), over the training split's slices, validated on the validation split's, through
the one training loop (:func:`chestssl.train.loop.fit`: resume, curves, AMP, DDP); the
latents are scaled to unit standard deviation on up to :data:`SCALE_IMAGES` training slices.

Its samples are scored by ``evaluate_latent_diffusion@<name>``
(:mod:`chestssl.pipeline.evaluate_latent_diffusion`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from chestssl import paths
from chestssl.io import write_json
from chestssl.model_files import load_model_file, save_model_file
from chestssl.pipeline.latent_diffusion_entries import build_latent_diffusion, latent_diffusion_entry

#: Training slices (evenly spaced) whose latents set the scale factor (encoded 16 at a time by
#: :func:`~chestssl.models.latent_diffusion.latent_scale_factor`, so memory does not grow with it).
SCALE_IMAGES = 256


def train_latent_diffusion(
    params: Mapping[str, Any],
    name: str,
    processed_dir: str | Path = paths.PROCESSED_DIR,
    autoencoder_path: str | Path | None = None,
    model_path: str | Path | None = None,
    report_dir: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
) -> dict[str, Any] | None:
    """Train ``latent_diffusion.<name>`` and write its model, curves, metrics and cost.

    Args:
        params: the loaded params (the entry, ``methods.<name>``, ``seed``, ``slices``).
        name: an entry under ``latent_diffusion`` (and ``methods``).
        processed_dir: ``data/processed``.
        autoencoder_path: the autoencoder's ``method.pt``; default :func:`chestssl.paths.method_weights_path`.
        model_path: receives the model; default :func:`chestssl.paths.latent_diffusion_model_path`.
        report_dir: receives ``live/``, ``metrics.json`` and ``cost.json``; default
            :func:`chestssl.paths.latent_diffusion_report_dir`.
        checkpoint_path: the loop's resume checkpoint; default ``checkpoints/latent_diffusion/<name>.pt``.

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    import torch

    from chestssl.data.views import pretrain_view, view_params
    from chestssl.models.latent_diffusion import latent_scale_factor
    from chestssl.train.checkpoint import stage_inputs
    from chestssl.train.cost_probe import fit_cost
    from chestssl.train.loop import fit
    from chestssl.train.metrics import flat_metrics

    entry, autoencoder_cfg = latent_diffusion_entry(params, name)
    processed_dir = Path(processed_dir)
    autoencoder_path = Path(autoencoder_path) if autoencoder_path is not None else paths.method_weights_path(name)
    model_path = Path(model_path) if model_path is not None else paths.latent_diffusion_model_path(name)
    report_dir = Path(report_dir) if report_dir is not None else paths.latent_diffusion_report_dir(name)
    checkpoint_path = (Path(checkpoint_path) if checkpoint_path is not None
                       else paths.checkpoint_path("latent_diffusion", name))
    saved = load_model_file(autoencoder_path, paths.pretrain_stage(name, params), required=("state_dict",))
    train = pretrain_view(params, autoencoder_cfg, "train", processed_dir)
    val = pretrain_view(params, autoencoder_cfg, "val", processed_dir)
    picks = np.linspace(0, len(train) - 1, min(SCALE_IMAGES, len(train))).round().astype(int)
    images = torch.stack([train[int(i)]["image"] for i in picks])
    model = build_latent_diffusion(params, name, saved["state_dict"], 1.0)
    scale_factor = latent_scale_factor(model.autoencoder.autoencoder, images)
    model.scale_factor.fill_(scale_factor)
    inputs = stage_inputs({"entry": entry, "autoencoder": autoencoder_cfg, **view_params(params)},
                          [processed_dir, autoencoder_path])
    result = fit(model, train, val, entry["train"], report_dir / "live", checkpoint_path, params["seed"],
                 monitor="val/loss", mode="min", inputs=inputs)
    if not result.is_main:
        return None
    save_model_file(model_path, {"name": name, "config": entry, "autoencoder_config": autoencoder_cfg,
                                 "scale_factor": scale_factor, "state_dict": result.best_state})
    write_json(report_dir / "cost.json", fit_cost(model, result))
    metrics = {"epochs": result.epochs, "steps": result.steps, "best_val_loss": result.best_value,
               "scale_factor": scale_factor, **flat_metrics(result.final_metrics)}
    write_json(report_dir / "metrics.json", metrics)
    return metrics
