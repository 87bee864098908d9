"""Latent autoencoder of seed 000: any backbone -> (vector-quantised) latent -> VQGAN decoder.

VQGAN: Esser et al., "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021
(arXiv:2012.09841); vector quantisation: van den Oord et al., "Neural Discrete
Representation Learning", NeurIPS 2017. The encoder is a backbone of
:mod:`chestssl.models.backbones` (CNN-attention, Swin, UNet++ encoder); a latent adapter
brings its latent to the decoder's channels and resolution (seed 000's Swin AE: "transposed
convs to the latent"); an optional :class:`~chestssl.models.quantizer.VectorQuantizer`
discretises it; MONAI's ``autoencoderkl.Decoder`` (VQGAN's decoder) and a sigmoid give the
reconstruction in (0, 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from monai.networks.blocks import UpSample
from monai.networks.layers.factories import Conv
from torch import nn

from chestssl.models.cnn_attention import DEFAULT_NORM_EPS, build_cnn_attention_decoder
from chestssl.models.quantizer import QuantizerOutput, VectorQuantizer


@dataclass
class AutoencoderOutput:
    """What :class:`LatentAutoencoder` returns for images (B, C, *S).

    Attributes:
        recon: (B, out_channels, *S) reconstruction in (0, 1).
        latent: (B, latent_channels, *S / decoder_stride), the latent before quantisation.
        vq_loss: 0-d quantiser loss (codebook + beta * commitment); 0 without a quantiser.
        perplexity: 0-d code-usage perplexity, or None without a quantiser.
    """

    recon: torch.Tensor
    latent: torch.Tensor
    vq_loss: torch.Tensor
    perplexity: torch.Tensor | None


def _latent_adapter(
    spatial_dims: int,
    encoder_channels: int,
    encoder_stride: int,
    latent_channels: int,
    decoder_stride: int,
    hidden_channels: int,
    norm_num_groups: int,
) -> nn.Module:
    """Map the encoder latent (C_e, stride s_e) to the decoder latent (latent_channels, stride s_d).

    ``s_e == s_d``: a 1x1 convolution. ``s_e > s_d``: ``log2(s_e / s_d)`` stride-2
    transposed convolutions, ``C_e -> hidden -> ... -> latent_channels``, with GroupNorm
    and SiLU between them (none after the last: its output is the latent itself).
    """
    if encoder_stride == decoder_stride:
        return Conv["conv", spatial_dims](encoder_channels, latent_channels, kernel_size=1)
    ratio = encoder_stride / decoder_stride
    steps = round(math.log2(ratio)) if ratio > 1 else 0
    if ratio <= 1 or 2**steps * decoder_stride != encoder_stride:
        raise ValueError(
            f"the decoder up-samples by {decoder_stride} (2 ** (levels - 1)) but the encoder's latent has stride "
            f"{encoder_stride}; the encoder stride must equal the decoder's or be a power-of-2 multiple of it"
        )
    layers: list[nn.Module] = []
    in_channels = encoder_channels
    for step in range(steps):
        last = step == steps - 1
        out_channels = latent_channels if last else hidden_channels
        layers.append(UpSample(spatial_dims, in_channels, out_channels, scale_factor=2, mode="deconv"))
        if not last:
            layers.append(nn.GroupNorm(norm_num_groups, out_channels, eps=DEFAULT_NORM_EPS))
            layers.append(nn.SiLU())
        in_channels = out_channels
    return nn.Sequential(*layers)


class LatentAutoencoder(nn.Module):
    """image -> backbone -> latent adapter -> [VectorQuantizer] -> VQGAN decoder -> sigmoid.

    Args:
        encoder: a backbone with ``spatial_dims``, ``in_channels``, ``latent_channels``,
            ``latent_stride`` and ``latent(x)``; used as is (not copied), so training the
            autoencoder trains it.
        decoder_cfg: the ``decoder`` params block: ``{"channels": int,
            "channel_multipliers": [ints], "num_res_blocks": int, "norm_num_groups": int,
            "latent_channels": int}``. Level widths are ``channels * m``; attention at the
            lowest resolution and in the non-local middle; the decoder up-samples by
            ``decoder_stride = 2 ** (len(channel_multipliers) - 1)``.
        quantizer_cfg: the ``quantizer`` params block: ``{"enabled": bool,
            "codebook_size": int, "dim": int, "beta": float}`` (only ``enabled`` is read
            when it is false).
        out_channels: reconstruction channels (1 for CT).

    The encoder's ``latent_stride`` must equal ``decoder_stride`` or be a power-of-2
    multiple of it (see :func:`_latent_adapter`).

    ``forward(x)``: x (B, in_channels, *S), each side divisible by ``encoder.latent_stride``
    -> :class:`AutoencoderOutput` with ``recon`` (B, out_channels, *S).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_cfg: Mapping[str, Any],
        quantizer_cfg: Mapping[str, Any],
        out_channels: int = 1,
    ):
        super().__init__()
        self.encoder = encoder
        self.spatial_dims = int(encoder.spatial_dims)
        self.decoder = build_cnn_attention_decoder(
            spatial_dims=self.spatial_dims,
            latent_channels=decoder_cfg["latent_channels"],
            channels=decoder_cfg["channels"],
            channel_multipliers=decoder_cfg["channel_multipliers"],
            num_res_blocks=decoder_cfg["num_res_blocks"],
            norm_num_groups=decoder_cfg["norm_num_groups"],
            out_channels=out_channels,
        )
        self.latent_channels = int(decoder_cfg["latent_channels"])
        self.decoder_stride = 2 ** (len(decoder_cfg["channel_multipliers"]) - 1)
        self.encoder_stride = int(encoder.latent_stride)
        self.adapter = _latent_adapter(
            self.spatial_dims,
            encoder_channels=int(encoder.latent_channels),
            encoder_stride=self.encoder_stride,
            latent_channels=self.latent_channels,
            decoder_stride=self.decoder_stride,
            hidden_channels=int(decoder_cfg["channels"]) * int(decoder_cfg["channel_multipliers"][-1]),
            norm_num_groups=int(decoder_cfg["norm_num_groups"]),
        )

        self.quantizer: VectorQuantizer | None = None
        if quantizer_cfg["enabled"]:
            self.quantizer = VectorQuantizer(
                in_channels=self.latent_channels,
                codebook_size=quantizer_cfg["codebook_size"],
                dim=quantizer_cfg["dim"],
                beta=quantizer_cfg["beta"],
                spatial_dims=self.spatial_dims,
            )

    def _check_size(self, x: torch.Tensor) -> None:
        spatial = tuple(x.shape[2:])
        if len(spatial) != self.spatial_dims or any(size % self.encoder_stride for size in spatial):
            raise ValueError(
                f"LatentAutoencoder: input of spatial size {spatial} must have {self.spatial_dims} spatial dims, "
                f"each divisible by the encoder's latent stride {self.encoder_stride}"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_channels, *S) -> latent z (B, latent_channels, *S / decoder_stride)."""
        self._check_size(x)
        return self.adapter(self.encoder.latent(x))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput | None]:
        """z -> (z_q, quantiser output); ``(z, None)`` without a quantiser. Shapes kept."""
        if self.quantizer is None:
            return z, None
        quantized = self.quantizer(z)
        return quantized.quantized, quantized

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent_channels, *L) -> reconstruction (B, out_channels, *L * decoder_stride) in (0, 1)."""
        return torch.sigmoid(self.decoder(z_q))

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        self._check_size(x)
        return self.forward_from_latent(self.encoder.latent(x))

    def forward_from_latent(self, encoder_latent: torch.Tensor) -> AutoencoderOutput:
        """The autoencoder after the encoder, for models that share one encoder pass with
        other heads: ``encoder.latent(x)`` (B, C_e, *S / encoder_stride) -> output."""
        z = self.adapter(encoder_latent)
        z_q, quantized = self.quantize(z)
        recon = self.decode(z_q)
        if quantized is None:
            no_loss = z.new_zeros((), dtype=torch.float32)
            return AutoencoderOutput(recon=recon, latent=z, vq_loss=no_loss, perplexity=None)
        return AutoencoderOutput(recon=recon, latent=z, vq_loss=quantized.loss, perplexity=quantized.perplexity)

    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's final convolution (for the adaptive adversarial weight)."""
        return self.decoder.blocks[-1].conv.weight
