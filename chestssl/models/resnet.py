"""ResNet-18 / ResNet-50 backbones: MONAI's ``ResNet`` without its classifier.

ResNet: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385), in the 2D/3D form of MONAI's :class:`~monai.networks.nets.ResNet`
(Hara et al., "Can Spatiotemporal 3D CNNs Retrace the History of 2D CNNs and ImageNet?",
CVPR 2018). Seed 001 (Barlow Twins for chest X-ray) pretrains a one-channel ResNet-18
and reads its 512-d global average pool.

:class:`ResNetBackbone` *is* a MONAI ``ResNet`` built exactly as MONAI's
``ResNetFeatures`` / ``ResNetEncoder`` (the encoder of ``FlexibleUNet``) build theirs:
one input channel, 7-wide first convolution with stride 2, max-pooling, no ``fc``, and
the block type, shortcut and downsampling bias of ``monai.networks.nets.resnet.resnet_params``:

========  ==========  ============  =====================  ==================
name      block       blocks        shortcut               features (default)
========  ==========  ============  =====================  ==================
resnet18  basic       [2, 2, 2, 2]  "A" (parameter-free)   512
resnet50  bottleneck  [3, 4, 6, 3]  "B" (1x1 conv + BN)    2048 (expansion 4)
========  ==========  ============  =====================  ==================

So its ``state_dict`` loads with ``strict=True`` into
``monai.networks.nets.resnet18(n_input_channels=1, feed_forward=False, shortcut_type="A")``
(``resnet50(..., shortcut_type="B", bias_downsample=False)``) of the same widths, and,
with MONAI's default widths ``[64, 128, 256, 512]``, into
``FlexibleUNet(in_channels=1, backbone="resnet18" | "resnet50").encoder``.

One deliberate difference from MONAI: its parameter-free "A" shortcut builds the
zero-padded identity from ``x.data``, which cuts the gradient through the identity path
of every down-sampling block. Here the same values are built without ``.data``, so
outputs and weights are identical and gradients flow as in He et al.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck, resnet_params

from chestssl.checks import positive_int

#: The backbone names this module builds.
RESNET_NAMES: tuple[str, ...] = ("resnet18", "resnet50")
#: MONAI's default widths of layer1..layer4 (``monai.networks.nets.resnet.get_inplanes``).
DEFAULT_BLOCK_INPLANES: tuple[int, ...] = (64, 128, 256, 512)
#: Stride of the first convolution (MONAI's ``ResNetFeatures``), then a stride-2 max-pool.
CONV1_STRIDE = 2
CONV1_SIZE = 7
#: Down-sampling of layer4 with respect to the input: conv1, max-pool, layer2..layer4.
LATENT_STRIDE = 32
#: Down-sampling of each map of :meth:`ResNetBackbone.feature_maps`.
FEATURE_MAP_STRIDES: tuple[int, ...] = (4, 4, 8, 16, 32)


class ResNetBackbone(ResNet):
    """A one-channel MONAI ``ResNet`` (``resnet18`` or ``resnet50``) without ``fc``.

    Args:
        name: ``"resnet18"`` or ``"resnet50"``.
        spatial_dims: 2 or 3.
        block_inplanes: widths of layer1..layer4 (before the bottleneck expansion of 4),
            MONAI's default ``(64, 128, 256, 512)``.
        in_channels: image channels (1 for CT).

    With ``x`` of shape (B, in_channels, *S) and ``E`` the block expansion (1 for
    resnet18, 4 for resnet50):

    - ``forward(x)`` / :meth:`representation`: global average pool of layer4,
      (B, ``representation_dim``) with ``representation_dim = block_inplanes[3] * E``
      (512 for resnet18, 2048 for resnet50 at MONAI's widths);
    - :meth:`feature_maps`: ``[stem, layer1, layer2, layer3, layer4]``, shapes
      (B, block_inplanes[0], *S/4), (B, block_inplanes[0] * E, *S/4),
      (B, block_inplanes[1] * E, *S/8), (B, block_inplanes[2] * E, *S/16),
      (B, block_inplanes[3] * E, *S/32); "stem" is conv1/bn1/act/maxpool;
    - :meth:`latent`: the layer4 map (B, ``latent_channels``, *S / ``latent_stride``),
      e.g. (B, 512, 2, 2) for a 64x64 slice with MONAI's widths.

    Sizes that are not multiples of 32 work too: every stride-2 step rounds up.
    """

    def __init__(
        self,
        name: str,
        spatial_dims: int,
        block_inplanes: Sequence[int] = DEFAULT_BLOCK_INPLANES,
        in_channels: int = 1,
    ):
        if name not in RESNET_NAMES:
            raise ValueError(f"name: got {name!r}, expected one of {', '.join(map(repr, RESNET_NAMES))}")
        if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        is_list = isinstance(block_inplanes, Sequence) and not isinstance(block_inplanes, (str, bytes))
        if not is_list or len(block_inplanes) != 4:
            raise ValueError(
                f"block_inplanes: got {block_inplanes!r}, expected 4 positive integers "
                f"(widths of layer1..layer4; MONAI's default {list(DEFAULT_BLOCK_INPLANES)})"
            )
        widths = [positive_int(width, f"block_inplanes[{i}]") for i, width in enumerate(block_inplanes)]
        in_channels = positive_int(in_channels, "in_channels")
        block, layers, shortcut_type, bias_downsample, _ = resnet_params[name]
        super().__init__(
            block=block,
            layers=layers,
            block_inplanes=widths,
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=CONV1_SIZE,
            conv1_t_stride=CONV1_STRIDE,
            shortcut_type=shortcut_type,
            feed_forward=False,
            bias_downsample=bias_downsample,
        )
        expansion = (ResNetBlock if block == "basic" else ResNetBottleneck).expansion
        self.arch = name
        self.spatial_dims = int(spatial_dims)
        self.in_channels = in_channels
        self.block_inplanes = tuple(widths)
        self.shortcut_type = shortcut_type
        self.latent_channels = widths[3] * expansion
        self.latent_stride = LATENT_STRIDE
        self.representation_dim = self.latent_channels
        #: Channels of the :meth:`feature_maps`, shallow to deep.
        self.feature_channels = (widths[0], *(width * expansion for width in widths))

    def _downsample_basic_block(self, x: torch.Tensor, planes: int, stride: int, spatial_dims: int = 3) -> torch.Tensor:
        """MONAI's shortcut "A" (strided subsampling, zero channels appended), differentiable."""
        subsampled = x[(slice(None), slice(None)) + (slice(None, None, stride),) * spatial_dims]
        return F.pad(subsampled, [0, 0] * spatial_dims + [0, planes - subsampled.shape[1]])

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (B, in_channels, *S) with ``spatial_dims`` sizes."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNetBackbone ({self.arch}): expected input of shape (B, {self.in_channels}, *S) with "
                f"{self.spatial_dims} spatial sizes, got {tuple(x.shape)}"
            )

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1, bn1, act and max-pool: (B, in_channels, *S) -> (B, block_inplanes[0], *S/4)."""
        x = self.act(self.bn1(self.conv1(x)))
        return x if self.no_max_pool else self.maxpool(x)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[stem, layer1, layer2, layer3, layer4]``, strides 4, 4, 8, 16, 32 (see the class docstring)."""
        self.check_input(x)
        maps = [self.stem(x)]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            maps.append(layer(maps[-1]))
        return maps

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The layer4 map (B, latent_channels, *S / latent_stride)."""
        return self.feature_maps(x)[-1]

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool of layer4: (B, in_channels, *S) -> (B, representation_dim)."""
        return torch.flatten(self.avgpool(self.latent(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as MONAI's ``ResNet.forward`` without ``fc``: :meth:`representation`."""
        return self.representation(x)

    def config(self) -> dict[str, Any]:
        """The ``backbone`` params block that rebuilds this network with :func:`build_resnet_encoder`."""
        return {"name": self.arch, "spatial_dims": self.spatial_dims, "block_inplanes": list(self.block_inplanes)}

    def monai_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``monai.networks.nets.resnet18`` / ``resnet50`` for the same network."""
        return {
            "spatial_dims": self.spatial_dims,
            "n_input_channels": self.in_channels,
            "conv1_t_size": CONV1_SIZE,
            "conv1_t_stride": CONV1_STRIDE,
            "shortcut_type": self.shortcut_type,
            "bias_downsample": resnet_params[self.arch][3],
            "feed_forward": False,
        }


def build_resnet_encoder(cfg: Mapping[str, Any]) -> ResNetBackbone:
    """Build a :class:`ResNetBackbone` from a validated ``backbone`` params block.

    ``cfg``: ``{"name": "resnet18" | "resnet50", "spatial_dims": 2 | 3,
    "block_inplanes": [4 ints]}``; ``block_inplanes`` defaults to MONAI's
    ``[64, 128, 256, 512]`` when absent. Weights come from torch's global generator; wrap
    the call in :func:`chestssl.models.seeding.seeded` for a reproducible initialisation.
    """
    return ResNetBackbone(
        name=cfg["name"],
        spatial_dims=cfg["spatial_dims"],
        block_inplanes=cfg.get("block_inplanes", DEFAULT_BLOCK_INPLANES),
        in_channels=1,
    )
