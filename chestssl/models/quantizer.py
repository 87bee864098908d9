"""Vector quantisation of a latent map with a learned codebook (the VQ-VAE bottleneck).

van den Oord et al., "Neural Discrete Representation Learning", NeurIPS 2017
(arXiv:1711.00937), as used by VQGAN (Esser et al., "Taming Transformers for
High-Resolution Image Synthesis", CVPR 2021). Each latent vector is replaced by its
nearest codebook entry; the encoder gets gradients through the straight-through
estimator, the codebook through the codebook loss and the encoder is kept close to its
codes by the commitment loss::

    loss = ||z_q - sg[z_e]||^2 + beta * ||z_e - sg[z_q]||^2

MONAI's ``VectorQuantizer`` / ``EMAQuantizer`` move the codebook by exponential moving
averages instead; seed 000 trained the codebook by gradient, as written here.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import nn

from chestssl.checks import positive_int


@dataclass
class QuantizerOutput:
    """What :class:`VectorQuantizer` returns for a latent ``z`` of shape (B, C, *S).

    Attributes:
        quantized: (B, C, *S) quantised latent with straight-through gradients to ``z``.
        loss: 0-d, ``codebook_loss + beta * commitment_loss``.
        codebook_loss: 0-d, mse(z_q, sg[z_e]); its gradient reaches only the codebook.
        commitment_loss: 0-d, mse(z_e, sg[z_q]); its gradient reaches only the encoder.
        indices: (B, *S) int64, the chosen code of every latent vector.
        perplexity: 0-d, exp of the entropy of the code usage in the batch
            (1 = one code used, ``codebook_size`` = all used equally).
    """

    quantized: torch.Tensor
    loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    indices: torch.Tensor
    perplexity: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with a gradient-trained codebook (VQ-VAE / VQGAN).

    When ``in_channels != dim`` a 1x1 convolution maps the latent to the code dimension
    before the look-up and another maps the codes back after it (VQGAN's ``quant_conv`` /
    ``post_quant_conv``); otherwise both are identities. The codebook is an
    ``nn.Embedding(codebook_size, dim)`` initialised uniform(-1/K, 1/K) as in VQGAN.
    Distances and losses are computed in float32, so the look-up is exact under autocast.

    Args:
        in_channels: channels C of the latent.
        codebook_size: number of codes K.
        dim: dimension of each code.
        beta: weight of the commitment loss (0.25 in VQ-VAE and VQGAN).
        spatial_dims: 2 or 3, for the 1x1 projections (without projections any number
            of spatial dims works).

    ``forward(z)``: z (B, C, *S) -> :class:`QuantizerOutput`, ``quantized`` of the same shape.
    """

    def __init__(self, in_channels: int, codebook_size: int, dim: int, beta: float = 0.25, spatial_dims: int = 2):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.codebook_size = positive_int(codebook_size, "codebook_size")
        self.dim = positive_int(dim, "dim")
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta >= 0:
            raise ValueError(f"beta: got {beta!r}, expected a float >= 0 (VQ-VAE uses 0.25)")
        self.beta = float(beta)
        if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims

        self.project_in: nn.Module
        self.project_out: nn.Module
        if self.in_channels != self.dim:
            self.project_in = Conv["conv", spatial_dims](self.in_channels, self.dim, kernel_size=1)
            self.project_out = Conv["conv", spatial_dims](self.dim, self.in_channels, kernel_size=1)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.codebook = nn.Embedding(self.codebook_size, self.dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / self.codebook_size, 1.0 / self.codebook_size)

    def nearest_codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean distance) of every vector.

        ``z_e``: (B, dim, *S) -> indices (B, *S) int64. Computed in float32 with autocast off.
        """
        flat = z_e.movedim(1, -1).reshape(-1, self.dim)
        with torch.autocast(device_type=flat.device.type, enabled=False):
            flat = flat.float()
            codes = self.codebook.weight.float()
            # ||z||^2 - 2 z.e + ||e||^2, without materialising the (N, K, dim) differences.
            distances = (
                flat.pow(2).sum(dim=1, keepdim=True)
                - 2.0 * flat @ codes.t()
                + codes.pow(2).sum(dim=1).unsqueeze(0)
            )
            indices = distances.argmin(dim=1)
        return indices.reshape(z_e.shape[0], *z_e.shape[2:])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.dim() < 3 or z.shape[1] != self.in_channels:
            raise ValueError(
                f"VectorQuantizer: expected a latent (B, {self.in_channels}, *S), got shape {tuple(z.shape)}"
            )
        z_e = self.project_in(z).float()
        indices = self.nearest_codes(z_e)
        # Embedding gives (B, *S, dim); move the code dimension back to channels.
        z_q = self.codebook(indices).float().movedim(-1, 1)

        codebook_loss = F.mse_loss(z_q, z_e.detach())
        commitment_loss = F.mse_loss(z_e, z_q.detach())
        loss = codebook_loss + self.beta * commitment_loss

        # Straight-through estimator: forward value z_q, gradient of the identity to z_e.
        straight_through = z_e + (z_q - z_e).detach()
        quantized = self.project_out(straight_through)

        usage = torch.bincount(indices.reshape(-1), minlength=self.codebook_size).float() / indices.numel()
        perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum())
        return QuantizerOutput(
            quantized=quantized,
            loss=loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            indices=indices,
            perplexity=perplexity,
        )
