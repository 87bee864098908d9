"""Seed 000's CNN-attention backbone: a VQGAN-style encoder, its decoder, and UNet++ on it.

VQGAN: Esser et al., "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021
(arXiv:2012.09841). Its encoder is a cascade of levels of residual blocks, each level but
the last followed by a stride-2 convolution; self-attention runs at the lowest resolution
and in the "non-local" middle (residual, attention, residual); a GroupNorm and a
convolution map to the latent. MONAI implements exactly this cascade as
:class:`monai.networks.nets.autoencoderkl.Encoder` / ``Decoder`` (Rombach et al.,
"High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022), so the
backbone is that class, with seed 000's layout and the backbone protocol of
:mod:`chestssl.models.backbones` on top.

Downstream, seed 000 segmented nodules with a UNet++ (Zhou et al., "UNet++: A Nested
U-Net Architecture for Medical Image Segmentation", DLMIA 2018) whose shallow encoder
levels are the pretrained CNN-attention levels: :func:`unetpp_from_cnn_attention`.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any, Mapping, Sequence

import torch
from monai.networks.nets import BasicUNetPlusPlus
from monai.networks.nets.autoencoderkl import AEKLDownsample, Decoder, Encoder
from torch import nn

from chestssl.checks import positive_int
from chestssl.models.seeding import seeded

#: BasicUNetPlusPlus has five encoder levels; the CNN-attention encoder fills at most all of them.
MAX_LEVELS = 5
#: Total down-sampling of BasicUNetPlusPlus (four 2x max-poolings).
UNETPP_STRIDE = 16
#: GroupNorm epsilon of seed 000 (and of VQGAN).
DEFAULT_NORM_EPS = 1e-6


def _level_widths(channels: Any, channel_multipliers: Any, norm_num_groups: Any) -> tuple[tuple[int, ...], int]:
    """Check the width arguments of an encoder/decoder; return (level widths, norm_num_groups)."""
    channels = positive_int(channels, "channels")
    if isinstance(channel_multipliers, (str, bytes)) or not isinstance(channel_multipliers, Sequence):
        raise ValueError(f"channel_multipliers: got {channel_multipliers!r}, expected a list of positive integers")
    if not 1 <= len(channel_multipliers) <= MAX_LEVELS:
        raise ValueError(
            f"channel_multipliers: got {list(channel_multipliers)} ({len(channel_multipliers)} levels), "
            f"expected 1 to {MAX_LEVELS} positive integers (one per level, e.g. [1, 2, 4])"
        )
    multipliers = [positive_int(m, f"channel_multipliers[{i}]") for i, m in enumerate(channel_multipliers)]
    groups = positive_int(norm_num_groups, "norm_num_groups")
    widths = tuple(channels * m for m in multipliers)
    if any(width % groups for width in widths):
        raise ValueError(
            f"norm_num_groups: {groups} does not divide every level width {list(widths)} "
            "(channels * channel_multipliers); GroupNorm needs a divisor of all of them"
        )
    return widths, groups


def _lowest_level_attention(num_levels: int) -> tuple[bool, ...]:
    """Self-attention at the lowest-resolution level only, as seed 000 (and VQGAN at 16x16)."""
    return (False,) * (num_levels - 1) + (True,)


class CNNAttentionEncoder(Encoder):
    """VQGAN-style encoder (Esser et al., CVPR 2021) as MONAI's ``autoencoderkl.Encoder``.

    Layout: 3x3 ``conv_in`` to ``widths[0]``; per level ``k`` ``num_res_blocks`` residual
    blocks (GroupNorm-SiLU-conv twice) to ``widths[k]``, each followed by a
    ``SpatialAttentionBlock`` on the last (lowest-resolution) level only; a stride-2
    convolution between levels; the non-local middle (residual, attention, residual);
    GroupNorm and a 3x3 convolution to ``latent_channels``.

    It adds no parameters to MONAI's ``Encoder``, so its ``state_dict`` loads with
    ``strict=True`` into :meth:`monai_equivalent` and vice versa.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for CT).
        channels: width of the first level.
        channel_multipliers: one per level (1 to 5 levels); level ``k`` has width
            ``channels * channel_multipliers[k]``.
        num_res_blocks: residual blocks per level.
        latent_channels: channels of the latent.
        norm_num_groups: GroupNorm groups; must divide every level width.
        norm_eps: GroupNorm epsilon.

    Shapes, for x of shape (B, in_channels, *S) with every size of S divisible by
    ``latent_stride = 2 ** (len(channel_multipliers) - 1)``:

    - ``latent(x)`` / ``forward(x)``: (B, latent_channels, *S / latent_stride);
    - ``feature_maps(x)``: ``[f0, ..., f_{L-1}]``, ``fk`` of shape (B, widths[k], *S / 2**k);
    - :meth:`representation`: global average pool of the latent, (B, ``representation_dim``)
      with ``representation_dim = latent_channels``. The latent rather than the wider
      deepest feature map, because every weight (the final GroupNorm and latent
      convolution too) then shapes it, so a head on it fine-tunes the whole encoder.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        channels: int = 32,
        channel_multipliers: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        latent_channels: int = 16,
        norm_num_groups: int = 8,
        norm_eps: float = DEFAULT_NORM_EPS,
    ):
        if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        in_channels = positive_int(in_channels, "in_channels")
        widths, norm_num_groups = _level_widths(channels, channel_multipliers, norm_num_groups)
        num_res_blocks = positive_int(num_res_blocks, "num_res_blocks")
        latent_channels = positive_int(latent_channels, "latent_channels")
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, numbers.Real) or not norm_eps > 0:
            raise ValueError(f"norm_eps: got {norm_eps!r}, expected a positive float")
        monai_kwargs: dict[str, Any] = dict(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            channels=widths,
            out_channels=latent_channels,
            num_res_blocks=(num_res_blocks,) * len(widths),
            norm_num_groups=norm_num_groups,
            norm_eps=float(norm_eps),
            attention_levels=_lowest_level_attention(len(widths)),
            with_nonlocal_attn=True,
        )
        super().__init__(**monai_kwargs)
        self._monai_kwargs = monai_kwargs
        self.widths: tuple[int, ...] = widths
        self.base_channels = int(channels)
        self.channel_multipliers: tuple[int, ...] = tuple(int(m) for m in channel_multipliers)
        self.latent_channels = latent_channels
        self.representation_dim = latent_channels
        #: One stride-2 convolution between consecutive levels.
        self.latent_stride = 2 ** (len(widths) - 1)

    def monai_equivalent(self) -> Encoder:
        """A fresh MONAI ``autoencoderkl.Encoder`` with the same arguments (its own random weights)."""
        return Encoder(**self._monai_kwargs)

    def stages(self) -> list[nn.Sequential]:
        """The encoder cut into one ``nn.Sequential`` per level, holding this encoder's own blocks.

        Stage 0 is ``conv_in`` + level-0 blocks; stage ``k`` is the stride-2 convolution
        after level ``k - 1`` + level-``k`` blocks; the last stage also holds the non-local
        middle blocks. Applied in a chain they give :meth:`feature_maps`. The final
        GroupNorm + latent convolution belong to no stage. The modules are shared, not
        copied: deep-copy the stages to train them apart from this encoder.
        """
        blocks = list(self.blocks)
        # Every level after the first begins at its stride-2 convolution; the last two
        # blocks (GroupNorm, conv to the latent) follow the deepest level.
        starts = [0] + [i for i, block in enumerate(blocks) if isinstance(block, AEKLDownsample)]
        ends = starts[1:] + [len(blocks) - 2]
        return [nn.Sequential(*blocks[start:end]) for start, end in zip(starts, ends)]

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One map per level, shallow to deep: ``fk`` (B, widths[k], *S / 2**k); the last is
        taken after the non-local middle blocks."""
        self._check_size(x)
        maps = []
        for stage in self.stages():
            x = stage(x)
            maps.append(x)
        return maps

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """MONAI ``Encoder.forward``: (B, latent_channels, *S / latent_stride)."""
        return self(x)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool of the latent: (B, in_channels, *S) -> (B, latent_channels)."""
        return self.latent(x).flatten(2).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x)
        return super().forward(x)

    def _check_size(self, x: torch.Tensor) -> None:
        spatial = tuple(x.shape[2:])
        if len(spatial) != self.spatial_dims or any(size % self.latent_stride for size in spatial):
            raise ValueError(
                f"CNNAttentionEncoder: input of spatial size {spatial} must have {self.spatial_dims} spatial "
                f"dims, each divisible by latent_stride {self.latent_stride} ({len(self.widths) - 1} stride-2 "
                "downsamplings)"
            )


def build_cnn_attention_encoder(cfg: Mapping[str, Any]) -> CNNAttentionEncoder:
    """Build the encoder from a validated ``backbone`` params block.

    ``cfg``: ``{"name": "cnn_attention", "spatial_dims": 2 | 3, "channels": int,
    "channel_multipliers": [ints], "num_res_blocks": int, "latent_channels": int,
    "norm_num_groups": int}``. Weights come from torch's global generator; wrap the call
    in :func:`chestssl.models.seeding.seeded` for a reproducible initialisation.
    """
    return CNNAttentionEncoder(
        spatial_dims=cfg["spatial_dims"],
        in_channels=1,
        channels=cfg["channels"],
        channel_multipliers=cfg["channel_multipliers"],
        num_res_blocks=cfg["num_res_blocks"],
        latent_channels=cfg["latent_channels"],
        norm_num_groups=cfg["norm_num_groups"],
    )


def unetpp_from_cnn_attention(encoder: CNNAttentionEncoder, out_channels: int = 2, seed: int = 0) -> BasicUNetPlusPlus:
    """A MONAI ``BasicUNetPlusPlus`` whose shallow encoder levels are ``encoder``'s stages.

    With the encoder's ``L`` level widths ``w0 .. w_{L-1}``, the UNet++ has features
    ``(w0, ..., w_{L-1}, ..., w4, w0)``: levels beyond ``L`` keep doubling the last width,
    e.g. widths (16, 32, 64) -> (16, 32, 64, 128, 256, 16). It is built from ``seed``
    (decoder and the new deeper ``Down`` blocks, with BasicUNetPlusPlus's default
    LeakyReLU / instance norm), then ``conv_0_0 ... conv_{L-1}_0`` are replaced by deep
    copies of :meth:`CNNAttentionEncoder.stages`, so the pretrained weights are in the
    network and training it never changes ``encoder``. BasicUNetPlusPlus calls these
    blocks in a chain (``x_{k}_0 = conv_{k}_0(x_{k-1}_0)``), the order the stages need.
    The encoder's final GroupNorm and latent convolution are not used.

    ``forward(x)``: x (B, in_channels, *S) -> ``[logits]``, logits (B, out_channels, *S).
    Every size of S must be divisible by 16 (BasicUNetPlusPlus pools 4 times) and by the
    encoder's ``latent_stride``, and be >= 32 so the 1/16 level keeps more than one
    element for instance norm.
    """
    widths = tuple(encoder.widths)
    deeper = tuple(widths[-1] * 2 ** (j + 1) for j in range(MAX_LEVELS - len(widths)))
    features = (*widths, *deeper, widths[0])
    with seeded(seed):
        network = BasicUNetPlusPlus(
            spatial_dims=encoder.spatial_dims,
            in_channels=encoder.in_channels,
            out_channels=out_channels,
            features=features,
            deep_supervision=False,
        )
    for level, stage in enumerate(copy.deepcopy(encoder).stages()):
        setattr(network, f"conv_{level}_0", stage)
    return network


def build_cnn_attention_decoder(
    spatial_dims: int,
    latent_channels: int,
    channels: int,
    channel_multipliers: Sequence[int],
    num_res_blocks: int,
    norm_num_groups: int,
    out_channels: int = 1,
) -> Decoder:
    """MONAI ``autoencoderkl.Decoder`` mirroring :class:`CNNAttentionEncoder` (VQGAN decoder).

    From the latent: 3x3 convolution to the deepest width, the non-local middle
    (residual, attention, residual), then the levels deep to shallow, each with
    ``num_res_blocks`` residual blocks (attention at the lowest resolution only) and a
    nearest 2x up-sampling + convolution between levels, GroupNorm and a 3x3 convolution
    to ``out_channels``. The output is raw (no sigmoid): the loss decides the squashing.

    Args mirror the ``decoder`` params block.

    ``forward(z)``: z (B, latent_channels, *L) -> (B, out_channels, *L * 2 ** (levels - 1)).
    """
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    widths, norm_num_groups = _level_widths(channels, channel_multipliers, norm_num_groups)
    return Decoder(
        spatial_dims=spatial_dims,
        channels=widths,
        in_channels=positive_int(latent_channels, "latent_channels"),
        out_channels=positive_int(out_channels, "out_channels"),
        num_res_blocks=(positive_int(num_res_blocks, "num_res_blocks"),) * len(widths),
        norm_num_groups=norm_num_groups,
        norm_eps=DEFAULT_NORM_EPS,
        attention_levels=_lowest_level_attention(len(widths)),
        with_nonlocal_attn=True,
    )
