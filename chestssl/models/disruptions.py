"""The low-level disruptions of Disruptive Autoencoders, on (B, 1, *S) images, 2D or 3D.

Valanarasu et al., "Disruptive Autoencoders: Leveraging Low-level Features for 3D
Medical Image Pre-training", arXiv:2307.16896 (2023) (seed 003). A Swin UNETR learns
by reconstructing the clean image from a disrupted one:

- ``denoise``: :func:`add_gaussian_noise`, ``x + N(0, variance)`` (seed 003: variance 0.1);
- ``superres``: :func:`nearest_down_up`, nearest down-sampling by ``factor`` and nearest
  up-sampling back (seed 003: 4);
- ``local`` (local disturbance): :class:`PatchEmbeddingChannelDrop`, zeroing a fraction of
  the channels of the Swin patch embedding, per sample (seed 003: 0.6);
- ``all``: the three in sequence (noise, down/up, then the local disturbance inside the
  encoder).

Every random draw comes from an explicit ``torch.Generator``, so a disruption is
reproducible (a fixed generator gives a validation set disrupted the same way every
epoch). :class:`Disruption` holds one validated configuration.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, ContextManager, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

#: The ``disruption`` param's values.
DISRUPTIONS: tuple[str, ...] = ("denoise", "superres", "local", "all")


def _check_image(image: torch.Tensor, what: str) -> None:
    if image.ndim not in (4, 5):
        raise ValueError(f"{what}: expected a (B, C, H, W) or (B, C, D, H, W) tensor, got shape {tuple(image.shape)}")


def add_gaussian_noise(image: torch.Tensor, variance: float, generator: torch.Generator) -> torch.Tensor:
    """``image + N(0, variance)``, element-wise independent, not clipped (seed 003's denoising).

    Args:
        image: (B, C, *S), 2D or 3D.
        variance: variance of the noise (its standard deviation is ``sqrt(variance)``), >= 0.
        generator: source of the noise; it is drawn on the generator's device and moved
            to the image's.

    Returns:
        (B, C, *S) tensor of the image's dtype.
    """
    _check_image(image, "add_gaussian_noise")
    if not math.isfinite(variance) or variance < 0:
        raise ValueError(f"add_gaussian_noise: variance must be a finite number >= 0, got {variance!r}")
    noise = torch.randn(image.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return image + (math.sqrt(variance) * noise).to(device=image.device, dtype=image.dtype)


def nearest_down_up(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest down-sampling by ``factor``, then nearest up-sampling to the input size.

    Seed 003's super-resolution disruption. Nearest down-sampling by an integer factor
    keeps the first voxel of every ``factor``-wide block (``x[..., ::f, ::f]``, what
    ``F.interpolate(x, scale_factor=1/f, mode="nearest")`` gives on sizes divisible by
    ``f``); nearest up-sampling repeats each kept voxel ``f`` times along every axis. So
    the result is constant on ``f x f`` (x ``f``) blocks, each equal to its block's first
    voxel; a last block cut short by the image border keeps the same rule.

    Args:
        image: (B, C, *S), 2D or 3D.
        factor: positive integer; 1 returns a copy.

    Returns:
        (B, C, *S) tensor.
    """
    _check_image(image, "nearest_down_up")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"nearest_down_up: factor must be a positive integer, got {factor!r}")
    spatial = image.shape[2:]
    kept = image[(slice(None), slice(None)) + (slice(None, None, factor),) * len(spatial)]
    out = kept
    for axis, size in enumerate(spatial, start=2):
        out = out.repeat_interleave(factor, dim=axis).narrow(axis, 0, size)
    return out.contiguous()


def channel_drop_mask(batch_size: int, channels: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(B, C) boolean mask, True on exactly ``round(fraction * C)`` channels of each row.

    The channels of each sample are drawn independently, uniformly without replacement,
    from ``generator`` (on its device).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"channel_drop_mask: fraction must be in [0, 1), got {fraction!r}")
    dropped = round(fraction * channels)
    scores = torch.rand((batch_size, channels), generator=generator, device=generator.device)
    chosen = scores.argsort(dim=1)[:, :dropped]
    mask = torch.zeros((batch_size, channels), dtype=torch.bool, device=generator.device)
    return mask.scatter_(1, chosen, True)


class PatchEmbeddingChannelDrop:
    """Local disturbance: zero a fraction of the patch-embedding channels of each sample.

    A context manager that puts a forward hook on ``encoder.patch_embed`` (MONAI's
    ``PatchEmbed`` inside :class:`~chestssl.models.swin.SwinEncoder`, whose output is
    (B, C, *S / patch_size) channels-first): while it is open, every call of the encoder
    sees the embedding with ``round(fraction * C)`` channels of each sample set to 0, the
    channels drawn per sample from ``generator``; the other channels are untouched. The
    encoder's own code stays MONAI's. Seed 003 zeroes 60% of the channels (one draw per
    batch there; per sample here).

    Args:
        encoder: a module with a ``patch_embed`` submodule (a :class:`SwinEncoder`).
        fraction: fraction of channels zeroed, in [0, 1).
        generator: source of the channel draws.

    After a call, :attr:`last_dropped` is the (B, C) boolean mask of the zeroed channels.
    """

    def __init__(self, encoder: nn.Module, fraction: float, generator: torch.Generator):
        if not isinstance(getattr(encoder, "patch_embed", None), nn.Module):
            raise TypeError(f"{type(encoder).__name__} has no patch_embed module to disturb (expected a SwinEncoder)")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"PatchEmbeddingChannelDrop: fraction must be in [0, 1), got {fraction!r}")
        self.encoder = encoder
        self.fraction = float(fraction)
        self.generator = generator
        self.last_dropped: torch.Tensor | None = None
        self._handle: RemovableHandle | None = None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        batch, channels = output.shape[:2]
        dropped = channel_drop_mask(batch, channels, self.fraction, self.generator).to(output.device)
        self.last_dropped = dropped
        keep = (~dropped).to(output.dtype).reshape(batch, channels, *([1] * (output.ndim - 2)))
        return output * keep

    def __enter__(self) -> "PatchEmbeddingChannelDrop":
        if self._handle is not None:
            raise RuntimeError("PatchEmbeddingChannelDrop is already open")
        self._handle = self.encoder.patch_embed.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@dataclass(frozen=True)
class Disruption:
    """One validated disruption setting of seed 003.

    Attributes:
        kind: ``denoise``, ``superres``, ``local`` or ``all``.
        noise_variance: variance of the Gaussian noise (``denoise``, ``all``).
        downsample_factor: nearest down/up-sampling factor (``superres``, ``all``).
        local_fraction: fraction of patch-embedding channels zeroed (``local``, ``all``).

    Use: ``disrupted = d.image(x, g)``, then run the encoder inside
    ``with d.in_encoder(encoder, g):``.
    """

    kind: str
    noise_variance: float
    downsample_factor: int
    local_fraction: float

    PARTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "denoise": ("noise",),
        "superres": ("downsample",),
        "local": ("local",),
        "all": ("noise", "downsample", "local"),
    }

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> "Disruption":
        """The disruption of a validated params entry: its ``disruption``, ``noise_variance``,
        ``downsample_factor`` and ``local_fraction``."""
        return cls(cfg["disruption"], float(cfg["noise_variance"]), int(cfg["downsample_factor"]),
                   float(cfg["local_fraction"]))

    @property
    def parts(self) -> tuple[str, ...]:
        """The disruptions applied, in order: ``noise``, ``downsample``, ``local``."""
        return self.PARTS[self.kind]

    def image(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The image-space part: (B, 1, *S) -> (B, 1, *S), noise then down/up as configured."""
        if "noise" in self.parts:
            image = add_gaussian_noise(image, self.noise_variance, generator)
        if "downsample" in self.parts:
            image = nearest_down_up(image, self.downsample_factor)
        return image

    def in_encoder(self, encoder: nn.Module, generator: torch.Generator) -> ContextManager[Any]:
        """The encoder-side part: a :class:`PatchEmbeddingChannelDrop` or a no-op context."""
        if "local" in self.parts and self.local_fraction > 0.0:
            return PatchEmbeddingChannelDrop(encoder, self.local_fraction, generator)
        return contextlib.nullcontext()
