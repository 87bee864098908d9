"""Tiny configurations of seed 000's backbones, decoder, quantiser and loss, shared by unit tests.

The Swin one needs slices of at least 64 (SwinUNETR divides by 32 and its deepest
instance norm needs more than one element); the CNN-attention one works from 32.
"""

from chestssl.params import REPORT_ENTRY_SECTIONS

CNN_ATTENTION = {
    "name": "cnn_attention",
    "spatial_dims": 2,
    "channels": 4,
    "channel_multipliers": [1, 2],
    "num_res_blocks": 1,
    "latent_channels": 4,
    "norm_num_groups": 2,
}

SWIN = {
    "name": "swin",
    "spatial_dims": 2,
    "feature_size": 12,
    "patch_size": 2,
    "window_size": 7,
    "depths": [1, 1, 1, 1],
    "num_heads": [3, 6, 12, 24],
}

#: A 2D ViT on 32x32 images: 16 patches, 2 blocks.
VIT = {
    "name": "vit",
    "spatial_dims": 2,
    "img_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "mlp_dim": 64,
}

#: `mae` and `diffmae` entries on :data:`VIT` with a one-block decoder and 10 diffusion steps.
MAE = {
    "method": "mae",
    "backbone": VIT,
    "mask_ratio": 0.5,
    "norm_pix_loss": True,
    "decoder_hidden_size": 16,
    "decoder_num_layers": 1,
    "decoder_num_heads": 2,
    "train": {},
}
DIFFMAE = {**MAE, "method": "diffmae", "num_steps": 10, "beta_start": 1e-4, "beta_end": 0.2}

DECODER = {"channels": 4, "channel_multipliers": [1, 2], "num_res_blocks": 1, "norm_num_groups": 2, "latent_channels": 4}

QUANTIZER = {"enabled": True, "codebook_size": 16, "dim": 4, "beta": 0.25}

LOSS = {
    "l1": 1.0,
    "ssim": 0.0,
    "perceptual": 0.0,
    "perceptual_weights": "",
    "codebook": 1.0,
    "adversarial": 0.6,
    "adaptive_weight": True,
    "disc_start": 0,
    "disc_layers": 2,
    "disc_channels": 4,
}


def shrink_backbone(backbone: dict) -> None:
    """Shrink a backbone of params.yaml in place to a few-second CPU size."""
    if backbone.get("name") == "cnn_attention":
        backbone.update(channels=4, channel_multipliers=[1, 2], num_res_blocks=1, latent_channels=4, norm_num_groups=2)
    elif backbone.get("name") == "swin":
        backbone.update(feature_size=12, depths=[1, 1, 1, 1])
    elif backbone.get("name") == "unet_encoder":
        backbone["features"] = [4, 8, 8, 16, 16]
    elif backbone.get("name") in ("resnet18", "resnet50"):
        backbone["block_inplanes"] = [4, 8, 8, 16]
    elif backbone.get("name") == "vit":
        backbone.update(patch_size=16, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)


#: The few steps of every shrunk training recipe.
TINY_TRAIN = {"epochs": 1, "max_steps": 3, "batch_size": 8, "log_every": 1}


def shrink_method_entry(entry: dict) -> None:
    """Shrink an entry of params.yaml in place to a few-second CPU size (backbone, decoder, steps).

    A resolved entry (backbone and train written out) is shrunk whole; an entry as written
    in params.yaml, naming its presets, gets its own few-step ``train`` keys and leaves
    the presets to :func:`shrink_presets`.
    """
    if isinstance(entry.get("backbone"), dict):
        shrink_backbone(entry["backbone"])
    if "projector_dim" in entry:
        entry["projector_dim"] = 16
    if "decoder_hidden_size" in entry:
        entry.update(decoder_hidden_size=8, decoder_num_layers=1, decoder_num_heads=2)
    if "num_steps" in entry:
        entry["num_steps"] = 10
    if "decoder" in entry:
        entry["decoder"].update(channels=4, channel_multipliers=[1, 2], num_res_blocks=1, norm_num_groups=2,
                                latent_channels=4)
        entry["quantizer"].update(codebook_size=16, dim=4)
        entry["loss"].update(disc_start=1, disc_channels=4)  # the adversarial path runs too
    if "train" in entry or entry.get("recipe") not in (None, "none"):
        entry.setdefault("train", {}).update(TINY_TRAIN)


def shrink_presets(raw: dict) -> None:
    """Shrink every backbone and training recipe preset of a params.yaml mapping in place."""
    for backbone in raw.get("backbones", {}).values():
        shrink_backbone(backbone)
    for name, recipe in raw.get("recipes", {}).items():
        if name != "none":
            recipe.update(TINY_TRAIN)


#: A latent diffusion entry's UNet and sampling at a few-second CPU size.
TINY_LATENT_DIFFUSION = {"channels": [8, 8], "attention_levels": [False, True], "num_res_blocks": 1,
                         "num_head_channels": 4, "norm_num_groups": 4, "timesteps": 20, "sampler": "ddim",
                         "sampling_steps": 3, "samples": 8}


def shrink_params(raw: dict) -> None:
    """Shrink a params.yaml mapping in place: its presets and every entry; the report's rows
    follow the entries kept (:func:`drop_report_rows_of_absent_entries`)."""
    shrink_presets(raw)
    for section in ("methods", "multihead", "runs", "runs_3d", "radiograph_runs"):
        for entry in raw.get(section, {}).values():
            shrink_method_entry(entry)
    drop_radiograph_runs_of_absent_encoders(raw)
    for entry in raw.get("latent_diffusion", {}).values():
        entry.update(TINY_LATENT_DIFFUSION)
        entry.setdefault("train", {}).update(TINY_TRAIN)
    if "fid" in raw:
        raw["fid"]["bootstrap_samples"] = 10
    drop_report_rows_of_absent_entries(raw)


def drop_radiograph_runs_of_absent_encoders(raw: dict) -> None:
    """Keep the ``radiograph_runs`` whose ``init`` is null or an entry of ``pretrain_radiographs.methods``,
    in ``radiograph_runs`` and in the ablations' ``radiograph_runs`` lists."""
    listed = (raw.get("pretrain_radiographs") or {}).get("methods") or []
    if "radiograph_runs" in raw:
        raw["radiograph_runs"] = {name: run for name, run in raw["radiograph_runs"].items()
                                  if run.get("init") is None or run["init"] in listed}
    # ... and from the ablations that repeat them
    for ablation in ("label_fraction", "frozen_parts"):
        block = raw.get(ablation) or {}
        if "radiograph_runs" in block:
            block["radiograph_runs"] = [name for name in block["radiograph_runs"]
                                        if name in (raw.get("radiograph_runs") or {})]


def drop_report_rows_of_absent_entries(raw: dict) -> None:
    """Point the ``report`` rows whose entry a params.yaml mapping no longer holds at no entry,
    in place: a seed 000 table's row keeps its place with a null entry (shown as not run),
    a figure's row is dropped."""
    for key, rows in (raw.get("report") or {}).items():
        if not isinstance(rows, list):
            continue
        kept = []
        for row in rows:
            entry_key = next(k for k in REPORT_ENTRY_SECTIONS if k in row)
            if row[entry_key] is None or row[entry_key] in (raw.get(REPORT_ENTRY_SECTIONS[entry_key]) or {}):
                kept.append(row)
            elif "seed_row" in row:
                kept.append({**row, entry_key: None})
        raw["report"][key] = kept
