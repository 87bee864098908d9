"""Tiny configurations of seed 000's backbones, decoder, quantiser and loss, shared by unit tests.

The Swin one needs slices of at least 64 (SwinUNETR divides by 32 and its deepest
instance norm needs more than one element); the CNN-attention one works from 32.
"""


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
