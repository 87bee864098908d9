"""2D affine geometry of radiographs: seed 002's five-parameter affine, warping, random misalignment.

Seed 002 (chest X-ray alignment with a spatial transformer; Jaderberg et al., "Spatial
Transformer Networks", NeurIPS 2015, arXiv:1506.02025) parameterises an alignment by
five numbers ``(tx, ty, sx, sy, angle)`` (:func:`affine_from_params`), resamples the
radiograph with that affine (:func:`warp`), and trains on radiographs moved by a random,
known affine and jittered in brightness and contrast (:func:`misalign`,
:func:`jitter_intensity`, :class:`AlignmentAugmentation`). The network that regresses the
parameters is :class:`chestssl.models.stn.AlignmentSTN`; how much of a known misalignment
it undoes is measured by :mod:`chestssl.eval.alignment`.

Coordinate convention (the one of ``torch.nn.functional.affine_grid``, used through
MONAI's :class:`~monai.networks.layers.AffineTransform` with ``normalized=True``,
``reverse_indexing=False``, ``align_corners=False``):

- a point is ``(x, y)`` in normalised coordinates, ``x`` along the **width** (last axis,
  columns, -1 = left edge, +1 = right edge) and ``y`` along the **height** (rows, -1 = top
  edge, +1 = bottom edge); the edges are the outer edges of the border pixels, so pixel
  column ``j`` of a width-``W`` image is at ``x = (2 j + 1) / W - 1``;
- ``theta`` (2x3) *pulls*: the output at ``p = (x, y)`` is the input sampled at
  ``theta @ (x, y, 1)``. Hence ``tx > 0`` moves the content **left** by ``tx * W / 2``
  pixels, ``ty > 0`` moves it **up** by ``ty * H / 2`` pixels, ``sx, sy > 1`` shrink it
  (zoom out) about the image centre, and ``angle > 0`` (radians) rotates it
  **counter-clockwise as displayed** (row 0 at the top) about the image centre; with
  ``angle = pi / 2`` a square image becomes ``torch.rot90(image, 1, dims=(-2, -1))``;
- rotation acts on normalised coordinates, as in the seed, so on a non-square image it
  is a rotation combined with an anisotropic stretch in pixels.

Warping with ``theta_a`` and then ``theta_b`` equals one warp with ``theta_a @ theta_b``
(as 3x3 matrices; :func:`chain_affines`), so an STN that undoes a known misalignment
``theta_a`` predicts ``theta_b = inverse(theta_a)`` (:func:`invert_affine`).

Shapes: images (B, 1, H, W); params (B, 5); theta (B, 2, 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.networks.layers import AffineTransform

from chestssl.checks import positive_int

#: Names of the five parameters, in order.
PARAM_NAMES: tuple[str, ...] = ("tx", "ty", "sx", "sy", "angle")
#: The parameters of the identity transform.
IDENTITY_PARAMS: tuple[float, ...] = (0.0, 0.0, 1.0, 1.0, 0.0)
#: Padding modes of ``grid_sample`` accepted by :func:`warp`.
PADDING_MODES: tuple[str, ...] = ("zeros", "border", "reflection")


# --------------------------------------------------------------------------------------
# Affine parameterisation
# --------------------------------------------------------------------------------------


def affine_from_params(params: torch.Tensor) -> torch.Tensor:
    """Seed 002's affine of five parameters: (B, 5) ``(tx, ty, sx, sy, angle)`` -> theta (B, 2, 3).

    ``theta = [[sx cos a, -sy sin a, tx], [sx sin a, sy cos a, ty]]``, i.e. rotation
    ``R(a)`` times ``diag(sx, sy)`` plus the translation, in normalised coordinates
    (``x`` = width axis; ``angle`` in radians; see the module docstring for directions).
    Differentiable in ``params``.
    """
    if params.ndim != 2 or params.shape[1] != len(PARAM_NAMES):
        raise ValueError(
            f"affine_from_params: expected params of shape (B, 5) holding {PARAM_NAMES}, got {tuple(params.shape)}"
        )
    tx, ty, sx, sy, angle = params.unbind(dim=1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    row_x = torch.stack([sx * cos, -sy * sin, tx], dim=1)
    row_y = torch.stack([sx * sin, sy * cos, ty], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def as_theta(transform: torch.Tensor, key: str) -> torch.Tensor:
    """Params (B, 5) or theta (B, 2, 3) -> theta (B, 2, 3); ``key`` names the argument in errors."""
    if transform.ndim == 2 and transform.shape[1] == len(PARAM_NAMES):
        return affine_from_params(transform)
    if transform.ndim == 3 and tuple(transform.shape[1:]) == (2, 3):
        return transform
    raise ValueError(f"{key}: expected params (B, 5) or theta (B, 2, 3), got {tuple(transform.shape)}")


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) -> (B, 3, 3) with the row ``(0, 0, 1)`` appended."""
    if theta.ndim != 3 or tuple(theta.shape[1:]) != (2, 3):
        raise ValueError(f"expected 2D affines theta of shape (B, 2, 3), got {tuple(theta.shape)}")
    last_row = theta.new_tensor([0.0, 0.0, 1.0]).expand(theta.shape[0], 1, 3)
    return torch.cat([theta, last_row], dim=1)


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """The inverse transform: (B, 2, 3) -> (B, 2, 3), so that ``chain_affines(theta, inverse)`` is the identity."""
    return torch.linalg.inv(_homogeneous(theta))[:, :2]


def chain_affines(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The one affine (B, 2, 3) equal to warping with ``first`` and then with ``second`` (both (B, 2, 3)).

    ``warp(warp(x, first), second)(p) = warp(x, first)(second p) = x(first second p)``,
    so the result is the 3x3 product ``first @ second``.
    """
    if first.shape != second.shape:
        raise ValueError(f"chain_affines: shapes differ, {tuple(first.shape)} and {tuple(second.shape)}")
    return (_homogeneous(first) @ _homogeneous(second))[:, :2]


# --------------------------------------------------------------------------------------
# Warping
# --------------------------------------------------------------------------------------


def check_padding_mode(padding_mode: str) -> str:
    """``padding_mode`` if it is one of :data:`PADDING_MODES`; else a ValueError naming them."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode: got {padding_mode!r}, expected one of {', '.join(map(repr, PADDING_MODES))}")
    return padding_mode


def size_pair(size: int | Sequence[int], key: str) -> tuple[int, int]:
    """``size`` as (H, W): one positive int for both, or two; ``key`` names it in errors."""
    sizes = [size, size] if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else list(size)
    if len(sizes) != 2:
        raise ValueError(f"{key}: got {size!r}, expected one positive integer or (height, width)")
    return positive_int(sizes[0], f"{key}[0] (height)"), positive_int(sizes[1], f"{key}[1] (width)")


def affine_transform(output_size: tuple[int, int] | None, padding_mode: str) -> AffineTransform:
    """MONAI's bilinear ``AffineTransform`` in the convention of the module docstring.

    ``output_size`` (H', W'), or None for the input's size; points outside the input read
    ``padding_mode``.
    """
    # normalized=True + reverse_indexing=False hands theta to affine_grid unchanged (torch's
    # x = width convention); align_corners=False makes the normalised frame resolution-free.
    return AffineTransform(
        spatial_size=output_size,
        normalized=True,
        mode="bilinear",
        padding_mode=check_padding_mode(padding_mode),
        align_corners=False,
        reverse_indexing=False,
    )


def check_images(images: torch.Tensor, key: str) -> None:
    """Refuse anything but a floating-point (B, 1, H, W) tensor, naming ``key``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{key}: expected radiographs of shape (B, 1, H, W), got {shape}")
    if not torch.is_floating_point(images):
        raise ValueError(f"{key}: expected a floating-point tensor, got {images.dtype}")


def warp(
    images: torch.Tensor,
    theta: torch.Tensor,
    output_size: int | Sequence[int] | None = None,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Resample (B, 1, H, W) images with affines theta (B, 2, 3) -> (B, 1, H', W').

    Bilinear, through MONAI's ``AffineTransform`` in the convention of the module docstring;
    ``output_size`` (H', W') defaults to (H, W); points outside the input read
    ``padding_mode`` (zeros as in seed 002). Differentiable in ``images`` and ``theta``.
    """
    check_images(images, "warp images")
    size = None if output_size is None else size_pair(output_size, "output_size")
    if theta.shape != (images.shape[0], 2, 3):
        raise ValueError(f"warp: expected theta of shape ({images.shape[0]}, 2, 3), got {tuple(theta.shape)}")
    return affine_transform(size, padding_mode)(images, theta.to(images.dtype))


# --------------------------------------------------------------------------------------
# Random misalignment and intensity jitter
# --------------------------------------------------------------------------------------


def _uniform(count: int, half_width: float, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` draws from U(-half_width, half_width), float32 on the generator's device (the
    CPU, from torch's global generator, if none)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return (torch.rand(count, generator=generator, device=device) * 2 - 1) * half_width


def _fraction(value: float, key: str, upper: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < upper:
        raise ValueError(f"{key}: got {value!r}, expected a number in [0, {upper})")
    return float(value)


def _angle_deg(value: float, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 180:
        raise ValueError(f"{key}: got {value!r}, expected an angle in degrees in [0, 180]")
    return float(value)


def random_misalignment_params(
    batch_size: int,
    max_shift: float = 0.05,
    max_scale: float = 0.05,
    max_rotation_deg: float = 10.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random ``(tx, ty, sx, sy, angle)`` (B, 5), float32 on the generator's device.

    The content shifts by up to ``max_shift`` of the image size along each axis
    (``tx, ty ~ U(-2 max_shift, 2 max_shift)``, the normalised frame being 2 wide), is scaled
    isotropically by ``s ~ U(1 - max_scale, 1 + max_scale)`` (``sx = sy = s``, as a
    patient closer to or farther from the detector) and rotated by
    ``angle ~ U(-max_rotation_deg, max_rotation_deg)`` degrees (returned in radians). Draws
    from ``generator`` (torch's global CPU generator if None) in the order tx, ty, s, angle.
    """
    batch_size = positive_int(batch_size, "misalign batch size")
    max_shift = _fraction(max_shift, "max_shift")
    max_scale = _fraction(max_scale, "max_scale")
    max_rotation = math.radians(_angle_deg(max_rotation_deg, "max_rotation_deg"))
    tx = _uniform(batch_size, 2 * max_shift, generator)
    ty = _uniform(batch_size, 2 * max_shift, generator)
    scale = 1 + _uniform(batch_size, max_scale, generator)
    angle = _uniform(batch_size, max_rotation, generator)
    return torch.stack([tx, ty, scale, scale, angle], dim=1)


def misalign(
    images: torch.Tensor,
    max_shift: float = 0.05,
    max_scale: float = 0.05,
    max_rotation_deg: float = 10.0,
    generator: torch.Generator | None = None,
    padding_mode: str = "zeros",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a random, known affine to each radiograph (seed 002's shift/scale 5%, rotation 10 degrees).

    ``images`` (B, 1, H, W) -> ``(moved (B, 1, H, W), params (B, 5))`` with ``moved =
    warp(images, affine_from_params(params))`` and params drawn by
    :func:`random_misalignment_params`. ``warp(moved, invert_affine(theta))`` gives the
    images back wherever the moved image holds content (not padding).
    """
    check_images(images, "misalign images")
    params = random_misalignment_params(images.shape[0], max_shift, max_scale, max_rotation_deg, generator)
    params = params.to(device=images.device, dtype=images.dtype)
    return warp(images, affine_from_params(params), padding_mode=padding_mode), params


def jitter_intensity(
    images: torch.Tensor,
    max_brightness: float = 0.1,
    max_contrast: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random brightness and contrast per image (the ``ColorJitter`` definitions), (B, 1, H, W) -> same.

    Brightness multiplies by ``b ~ U(1 - max_brightness, 1 + max_brightness)``; contrast
    blends with the image mean, ``c x + (1 - c) mean(x)``, ``c ~ U(1 - max_contrast,
    1 + max_contrast)``. Draws b then c from ``generator`` (torch's global CPU generator if None).
    """
    check_images(images, "jitter_intensity images")
    count = images.shape[0]
    brightness = 1 + _uniform(count, _fraction(max_brightness, "max_brightness"), generator)
    contrast = 1 + _uniform(count, _fraction(max_contrast, "max_contrast"), generator)
    brightness = brightness.to(images).view(-1, 1, 1, 1)
    contrast = contrast.to(images).view(-1, 1, 1, 1)
    brightened = images * brightness
    mean = brightened.mean(dim=(1, 2, 3), keepdim=True)
    return contrast * brightened + (1 - contrast) * mean


@dataclass(frozen=True)
class AlignmentAugmentation:
    """The random misalignment an alignment STN learns to undo (seed 002).

    Shift and scale up to 5% and rotation up to 10 degrees are the seed's; its brightness
    and contrast jitter has no stated range, 10% here.

    ``augmentation(images, generator=None)``: (B, 1, H, W) -> misaligned (:func:`misalign`)
    and intensity-jittered (:func:`jitter_intensity`) (B, 1, H, W), drawing from
    ``generator`` (torch's global CPU generator if None).
    """

    max_shift: float = 0.05
    max_scale: float = 0.05
    max_rotation_deg: float = 10.0
    max_brightness: float = 0.1
    max_contrast: float = 0.1

    def __post_init__(self) -> None:
        _fraction(self.max_shift, "max_shift")
        _fraction(self.max_scale, "max_scale")
        _angle_deg(self.max_rotation_deg, "max_rotation_deg")
        _fraction(self.max_brightness, "max_brightness")
        _fraction(self.max_contrast, "max_contrast")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 1, H, W) -> misaligned and intensity-jittered (B, 1, H, W)."""
        moved, _ = misalign(images, self.max_shift, self.max_scale, self.max_rotation_deg, generator)
        return jitter_intensity(moved, self.max_brightness, self.max_contrast, generator)
