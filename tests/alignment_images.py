"""Small images, networks and transforms shared by the tests of seed 002's alignment STN."""

from __future__ import annotations

import torch
from torch import nn

from chestssl.models.seeding import seeded
from chestssl.models.stn import AlignmentSTN

#: ResNet-18 widths of a tiny STN trunk.
SMALL = (4, 8, 8, 16)


def chest(size: int) -> torch.Tensor:
    """A smooth chest-like (1, 1, size, size) image: bright body, two dark lungs, a bright spot; ~0 at the border."""
    centres = (torch.arange(size) * 2 + 1) / size - 1
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")

    def ellipse(cy: float, cx: float, ry: float, rx: float) -> torch.Tensor:
        return torch.sigmoid((1 - torch.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)) / 0.08)

    body = 0.9 * ellipse(0.05, 0.0, 0.62, 0.55)
    lungs = 0.55 * ellipse(0.05, -0.25, 0.42, 0.17) + 0.5 * ellipse(0.1, 0.24, 0.38, 0.19)
    return (body - lungs + 0.3 * ellipse(-0.45, 0.05, 0.12, 0.1))[None, None]


def smooth(size: int, batch: int = 1) -> torch.Tensor:
    """Smooth (batch, 1, size, size) images, sums of wide Gaussians, for resampling round trips."""
    centres = (torch.arange(size) * 2 + 1) / size - 1
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    images = []
    for index in range(batch):
        shift = 0.1 * index
        image = torch.exp(-((yy - 0.2 + shift) ** 2 + (xx + 0.3) ** 2) / 0.18)
        image = image + 0.6 * torch.exp(-((yy + 0.3) ** 2 + (xx - 0.25 - shift) ** 2) / 0.12)
        images.append(image)
    return torch.stack(images)[:, None]


def tiny_stn(output_size=None, seed: int = 0) -> AlignmentSTN:
    with seeded(seed):
        return AlignmentSTN(output_size=output_size, block_inplanes=SMALL, hidden_dim=16)


def feature_net(seed: int = 1) -> nn.Module:
    """A small random conv net with batch norm (whose running statistics must not move)."""
    with seeded(seed):
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1)
        )


def shift_params(dx_pixels: float, dy_pixels: float, size: int) -> torch.Tensor:
    """Params (1, 5) that move the content of a size x size image right by dx and down by dy pixels."""
    return torch.tensor([[-2 * dx_pixels / size, -2 * dy_pixels / size, 1.0, 1.0, 0.0]])
