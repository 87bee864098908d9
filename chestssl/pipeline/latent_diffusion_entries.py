"""A ``latent_diffusion`` entry and the model it builds, shared by the stages
``latent_diffusion@<name>`` (:mod:`chestssl.pipeline.latent_diffusion`) and
``evaluate_latent_diffusion@<name>`` (:mod:`chestssl.pipeline.evaluate_latent_diffusion`)."""

from __future__ import annotations

from typing import Any, Mapping

from chestssl.params import ParamsError, pretrain_entry


def latent_diffusion_entry(params: Mapping[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(latent_diffusion.<name>, methods.<name>)``: the entry and its autoencoder's."""
    entries = params.get("latent_diffusion") or {}
    if name not in entries:
        raise ParamsError([f"latent_diffusion: {name!r} is not an entry ({', '.join(entries) or 'none'})"])
    return dict(entries[name]), pretrain_entry(params, name)[1]


def build_latent_diffusion(params: Mapping[str, Any], name: str, saved_autoencoder: Mapping[str, Any] | None,
                           scale_factor: float):
    """The :class:`~chestssl.models.latent_diffusion.LatentDiffusion` of ``latent_diffusion.<name>``:
    its autoencoder built from ``methods.<name>`` (with ``saved_autoencoder``, the method's
    state dict, if given), its UNet seeded with ``seed``."""
    from chestssl.methods import build_method
    from chestssl.models.latent_diffusion import LatentDiffusion

    entry, autoencoder_cfg = latent_diffusion_entry(params, name)
    method = build_method(name, autoencoder_cfg, params["seed"])
    if saved_autoencoder is not None:
        method.load_state_dict(saved_autoencoder)
    return LatentDiffusion(method.autoencoder, entry, scale_factor, params["seed"])
