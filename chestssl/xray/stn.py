"""Spatial transformer network (STN) that aligns chest radiographs to a canonical chest (seed 002).

Spatial transformer: Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015
(arXiv:1506.02025). Seed 002 (chest X-ray alignment with an STN) uses it as follows:

- the *canonical chest* is the mean of training radiographs, each cropped to its lungs
  and resized to one size (:func:`canonical_chest`);
- a ResNet-18 regresses five parameters ``(tx, ty, sx, sy, angle)`` through
  FC 512 -> 256 -> ReLU -> FC 256 -> 5, whose last layer starts at zero weights and bias
  ``(0, 0, 1, 1, 0)``, so the network starts as the identity (:class:`AlignmentSTN`);
- the radiograph is resampled with the affine ``theta`` of those parameters
  (:func:`affine_from_params`, :func:`warp`);
- loss = 15 * MSE(aligned, canonical) + MSE(f(aligned), f(canonical)) with a frozen
  feature network ``f`` (:class:`AlignmentLoss`);
- training images are the radiographs shifted/scaled by up to 5%, rotated by up to 10
  degrees and jittered in brightness and contrast (:class:`AlignmentAugmentation`),
  AdamW with lr 1e-4 and weight decay 1e-4 (:func:`train_alignment`).

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
``theta_a`` predicts ``theta_b = inverse(theta_a)`` (:func:`invert_affine`,
:func:`alignment_parameter_error`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import AffineTransform
from monai.transforms import Resize
from monai.transforms.utils import generate_spatial_bounding_box
from torch import nn

from chestssl.checks import positive_int
from chestssl.models.resnet import DEFAULT_BLOCK_INPLANES, ResNetBackbone

#: Names of the five regressed parameters, in order.
PARAM_NAMES: tuple[str, ...] = ("tx", "ty", "sx", "sy", "angle")
#: The parameters of the identity transform: the bias of the last layer at initialisation.
IDENTITY_PARAMS: tuple[float, ...] = (0.0, 0.0, 1.0, 1.0, 0.0)
#: Hidden width of the regression head (seed 002: FC 512 -> 256 -> ReLU -> FC 256 -> 5).
DEFAULT_HIDDEN_DIM = 256
#: Weight of the pixel MSE against the feature MSE (seed 002).
DEFAULT_PIXEL_WEIGHT = 15.0
#: AdamW learning rate and weight decay of seed 002.
DEFAULT_LR = 1e-4
DEFAULT_WEIGHT_DECAY = 1e-4
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


def _check_padding_mode(padding_mode: str) -> str:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode: got {padding_mode!r}, expected one of {', '.join(map(repr, PADDING_MODES))}")
    return padding_mode


def _pair(size: int | Sequence[int], key: str) -> tuple[int, int]:
    """``size`` as (H, W): one positive int for both, or two."""
    sizes = [size, size] if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else list(size)
    if len(sizes) != 2:
        raise ValueError(f"{key}: got {size!r}, expected one positive integer or (height, width)")
    return positive_int(sizes[0], f"{key}[0] (height)"), positive_int(sizes[1], f"{key}[1] (width)")


def _affine_transform(output_size: tuple[int, int] | None, padding_mode: str) -> AffineTransform:
    # normalized=True + reverse_indexing=False hands theta to affine_grid unchanged (torch's
    # x = width convention); align_corners=False makes the normalised frame resolution-free.
    return AffineTransform(
        spatial_size=output_size,
        normalized=True,
        mode="bilinear",
        padding_mode=_check_padding_mode(padding_mode),
        align_corners=False,
        reverse_indexing=False,
    )


def _check_images(images: torch.Tensor, key: str) -> None:
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
    _check_images(images, "warp images")
    size = None if output_size is None else _pair(output_size, "output_size")
    if theta.shape != (images.shape[0], 2, 3):
        raise ValueError(f"warp: expected theta of shape ({images.shape[0]}, 2, 3), got {tuple(theta.shape)}")
    return _affine_transform(size, padding_mode)(images, theta.to(images.dtype))


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------


class STNOutput(NamedTuple):
    """What :class:`AlignmentSTN` returns."""

    #: The input resampled to the canonical frame, (B, 1, H', W').
    aligned: torch.Tensor
    #: The regressed ``(tx, ty, sx, sy, angle)``, (B, 5).
    params: torch.Tensor
    #: Their affine (:func:`affine_from_params`), (B, 2, 3).
    theta: torch.Tensor


class AlignmentSTN(nn.Module):
    """Seed 002's STN: ResNet-18 features -> FC -> ReLU -> FC(5) -> affine -> resample.

    Args:
        output_size: (H', W') of the aligned image (seed 002: 320 x 256, the canonical
            chest's size); None keeps the input's size.
        block_inplanes: widths of the ResNet-18 layers 1..4 (MONAI's default
            ``(64, 128, 256, 512)``, giving the seed's 512 features); smaller for tests.
        hidden_dim: width of the hidden FC layer (seed: 256).
        padding_mode: what points outside the input read, ``"zeros"`` as in the seed.

    The trunk is the project's one-channel MONAI ResNet-18
    (:class:`chestssl.models.resnet.ResNetBackbone`, global-average-pooled layer4). The
    last FC layer is zero-initialised with bias ``(0, 0, 1, 1, 0)``, so at initialisation
    ``params`` is exactly the identity and the output is the input resampled to
    ``output_size``.

    ``forward(x)``: x (B, 1, H, W) -> :class:`STNOutput` ``(aligned (B, 1, H', W'),
    params (B, 5), theta (B, 2, 3))``. In training mode the trunk's batch norm needs more
    than one value per channel at layer4 (stride 32): a batch of two, or H, W > 32.
    """

    def __init__(
        self,
        output_size: int | Sequence[int] | None = None,
        block_inplanes: Sequence[int] = DEFAULT_BLOCK_INPLANES,
        hidden_dim: int = DEFAULT_HIDDEN_DIM,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        self.output_size = None if output_size is None else _pair(output_size, "stn.output_size")
        self.padding_mode = _check_padding_mode(padding_mode)
        hidden_dim = positive_int(hidden_dim, "stn.hidden_dim")
        self.features = ResNetBackbone("resnet18", spatial_dims=2, block_inplanes=block_inplanes, in_channels=1)
        self.head = nn.Sequential(
            nn.Linear(self.features.representation_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, len(PARAM_NAMES)),
        )
        self.reset_to_identity()
        self.transform = _affine_transform(self.output_size, self.padding_mode)

    @property
    def regressor(self) -> nn.Linear:
        """The last FC layer, hidden_dim -> 5."""
        return self.head[-1]

    def reset_to_identity(self) -> None:
        """Zero the last layer's weights and set its bias to :data:`IDENTITY_PARAMS` (seed 002)."""
        with torch.no_grad():
            self.regressor.weight.zero_()
            self.regressor.bias.copy_(torch.tensor(IDENTITY_PARAMS))

    def predict_params(self, x: torch.Tensor) -> torch.Tensor:
        """The regressed ``(tx, ty, sx, sy, angle)``: (B, 1, H, W) -> (B, 5)."""
        _check_images(x, "AlignmentSTN input")
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> STNOutput:
        """(B, 1, H, W) -> (aligned (B, 1, H', W'), params (B, 5), theta (B, 2, 3))."""
        params = self.predict_params(x)
        theta = affine_from_params(params)
        return STNOutput(self.transform(x, theta.to(x.dtype)), params, theta)


# --------------------------------------------------------------------------------------
# Known misalignments and how much of them the STN undoes
# --------------------------------------------------------------------------------------


def _uniform(count: int, half_width: float, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` draws from U(-half_width, half_width), float32 on the generator's device (CPU if none)."""
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
    from ``generator`` in the order tx, ty, s, angle.
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
    _check_images(images, "misalign images")
    params = random_misalignment_params(images.shape[0], max_shift, max_scale, max_rotation_deg, generator)
    params = params.to(device=images.device, dtype=images.dtype)
    return warp(images, affine_from_params(params), padding_mode=padding_mode), params


@dataclass(frozen=True)
class AlignmentError:
    """Mean corner displacement of a misalignment before and after the STN, per image.

    ``before`` (B,): how far the applied transform moves the image corners; ``after``
    (B,): how far the applied transform chained with the predicted one moves them (0 when
    the prediction undoes it exactly). In pixels when an image size was given, else in
    normalised units.
    """

    before: torch.Tensor
    after: torch.Tensor

    @property
    def fraction_undone(self) -> float:
        """``1 - mean(after) / mean(before)``: 1 when undone exactly, 0 when not at all, < 0 when worse."""
        before = float(self.before.mean())
        if before == 0:
            raise ValueError("fraction_undone: the applied transform is the identity, there is nothing to undo")
        return 1.0 - float(self.after.mean()) / before


def _as_theta(transform: torch.Tensor, key: str) -> torch.Tensor:
    if transform.ndim == 2 and transform.shape[1] == len(PARAM_NAMES):
        return affine_from_params(transform)
    if transform.ndim == 3 and tuple(transform.shape[1:]) == (2, 3):
        return transform
    raise ValueError(f"{key}: expected params (B, 5) or theta (B, 2, 3), got {tuple(transform.shape)}")


def mean_corner_displacement(theta: torch.Tensor, image_size: Sequence[int] | None = None) -> torch.Tensor:
    """Mean distance by which theta (B, 2, 3) moves the four image corners ``(+-1, +-1)`` -> (B,).

    In pixels of an (H, W) image when ``image_size`` is given (a normalised unit is W/2
    pixels along x, H/2 along y), else in normalised units.
    """
    theta = _as_theta(theta, "theta")
    corners = theta.new_tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    moved = corners @ theta.transpose(1, 2)  # (B, 4, 2): where each output corner samples
    displacement = moved - corners[:, :2]
    if image_size is not None:
        height, width = _pair(tuple(image_size), "image_size")
        displacement = displacement * displacement.new_tensor([width / 2, height / 2])
    return displacement.norm(dim=-1).mean(dim=-1)


def alignment_parameter_error(
    predicted: torch.Tensor, applied: torch.Tensor, image_size: Sequence[int] | None = None
) -> AlignmentError:
    """How much of an applied misalignment the predicted transform undoes.

    ``applied``: the transform that moved the images (params (B, 5) or theta (B, 2, 3),
    e.g. from :func:`misalign`); ``predicted``: what the STN predicted on the moved images
    (same forms). The aligned image is the original warped with ``chain_affines(applied,
    predicted)``; :class:`AlignmentError` holds the mean corner displacement of
    ``applied`` (before) and of that chain (after), in pixels of ``image_size`` (H, W)
    when given. ``error.fraction_undone`` is the share of the misalignment removed.
    """
    applied_theta = _as_theta(applied, "applied").detach()
    predicted_theta = _as_theta(predicted, "predicted").detach().to(applied_theta)
    if predicted_theta.shape[0] != applied_theta.shape[0]:
        raise ValueError(
            f"alignment_parameter_error: {predicted_theta.shape[0]} predicted and {applied_theta.shape[0]} "
            "applied transforms; expected one of each per image"
        )
    return AlignmentError(
        before=mean_corner_displacement(applied_theta, image_size),
        after=mean_corner_displacement(chain_affines(applied_theta, predicted_theta), image_size),
    )


# --------------------------------------------------------------------------------------
# Canonical chest
# --------------------------------------------------------------------------------------


def _as_2d_list(items: torch.Tensor | np.ndarray | Sequence, key: str) -> list[torch.Tensor]:
    """A batch (N, 1, H, W) / (N, H, W) or a sequence of (1, H, W) / (H, W) -> N float (H, W) tensors."""
    if isinstance(items, (torch.Tensor, np.ndarray)):
        array = torch.as_tensor(items)
        if array.ndim == 4 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 3:
            raise ValueError(f"{key}: expected shape (N, 1, H, W) or (N, H, W), got {tuple(array.shape)}")
        items = list(array)
    result = []
    for index, item in enumerate(items):
        image = torch.as_tensor(item)
        if image.ndim == 3 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 2:
            raise ValueError(f"{key}[{index}]: expected shape (1, H, W) or (H, W), got {tuple(image.shape)}")
        result.append(image)
    if not result:
        raise ValueError(f"{key}: no radiographs given; the canonical chest is a mean over at least one")
    return result


def lung_bounding_box(mask: torch.Tensor) -> tuple[slice, slice] | None:
    """(rows, columns) slices of the non-zero pixels of an (H, W) mask; None when it is empty."""
    start, end = generate_spatial_bounding_box(torch.as_tensor(mask)[None], select_fn=lambda m: m > 0)
    if any(stop <= begin for begin, stop in zip(start, end)):
        return None
    return slice(start[0], end[0]), slice(start[1], end[1])


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) -> (1, H', W') with MONAI's ``Resize``, one axis at a time: area averaging where
    an axis shrinks (anti-aliased), bilinear where it grows.

    MONAI's ``anti_aliasing`` option smooths with zero padding, which darkens the border
    of every crop; area averaging does not.
    """
    resized = image[None]
    for axis, target in enumerate(size, start=1):
        current = resized.shape[axis]
        if current == target:
            continue
        shape = list(resized.shape[1:])
        shape[axis - 1] = target
        if target < current:
            resized = Resize(shape, mode="area")(resized)
        else:
            resized = Resize(shape, mode="bilinear", align_corners=False)(resized)
    return torch.as_tensor(resized).to(torch.float32)


def canonical_chest(
    images: torch.Tensor | np.ndarray | Sequence,
    lung_masks: torch.Tensor | np.ndarray | Sequence | None = None,
    *,
    size: int | Sequence[int],
) -> torch.Tensor:
    """Seed 002's canonical chest: the mean of radiographs cropped to the lungs and resized.

    Args:
        images: N radiographs, a batch (N, 1, H, W) / (N, H, W) or a sequence of
            (1, H_i, W_i) / (H_i, W_i) arrays (sizes may differ).
        lung_masks: the lung masks of the same radiographs in the same forms (non-zero =
            lung); each radiograph is cropped to its mask's bounding box. None: the whole
            radiographs are used.
        size: (H', W') of the canonical chest (seed 002: 320 x 256), or one int for both.

    Returns the mean of the crops, each resized to ``size`` (:func:`_resize`): (1, H', W')
    float32.
    """
    height, width = _pair(size, "canonical size")
    radiographs = _as_2d_list(images, "images")
    masks = None if lung_masks is None else _as_2d_list(lung_masks, "lung_masks")
    if masks is not None and len(masks) != len(radiographs):
        raise ValueError(
            f"lung_masks: {len(masks)} masks for {len(radiographs)} radiographs; expected one per radiograph"
        )
    total = torch.zeros(1, height, width, dtype=torch.float32)
    for index, radiograph in enumerate(radiographs):
        radiograph = radiograph.to(torch.float32)
        if masks is not None:
            if tuple(masks[index].shape) != tuple(radiograph.shape):
                raise ValueError(
                    f"lung_masks[{index}]: shape {tuple(masks[index].shape)} differs from its radiograph's "
                    f"{tuple(radiograph.shape)}"
                )
            box = lung_bounding_box(masks[index])
            if box is None:
                raise ValueError(
                    f"lung_masks[{index}]: no lung pixel (the mask is all zeros); expected non-zero = lung"
                )
            radiograph = radiograph[box]
        total += _resize(radiograph, (height, width))
    return total / len(radiographs)


# --------------------------------------------------------------------------------------
# Loss, augmentation and training
# --------------------------------------------------------------------------------------


def _feature_list(features: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [features] if isinstance(features, torch.Tensor) else list(features)


class AlignmentLoss(nn.Module):
    """Seed 002's loss: ``pixel_weight * MSE(aligned, canonical) + MSE(f(aligned), f(canonical))``.

    Args:
        feature_net: any module mapping (B, 1, H, W) images to features, a tensor or a
            list/tuple of tensors (in the pipeline an encoder trained earlier; nothing is
            downloaded). It is frozen: its parameters never require gradients, and it stays
            in eval mode even when a parent calls ``train()``. Gradients flow through it to
            the aligned image. With several feature maps the feature term is the mean of
            their MSEs.
        pixel_weight: weight of the pixel term (seed: 15).

    ``forward(aligned (B, 1, H, W), canonical (1, H, W) or (B, 1, H, W))`` -> dict with
    ``loss`` (optimised), ``pixel`` and ``feature`` (the unweighted terms, detached), all 0-d.
    """

    def __init__(self, feature_net: nn.Module, pixel_weight: float = DEFAULT_PIXEL_WEIGHT):
        super().__init__()
        if isinstance(pixel_weight, bool) or not isinstance(pixel_weight, (int, float)) or pixel_weight < 0:
            raise ValueError(f"pixel_weight: got {pixel_weight!r}, expected a number >= 0")
        self.pixel_weight = float(pixel_weight)
        self.feature_net = feature_net
        for parameter in self.feature_net.parameters():
            parameter.requires_grad_(False)
        self.feature_net.eval()

    def train(self, mode: bool = True) -> "AlignmentLoss":
        """Set the mode of this module; the feature network stays in eval mode."""
        super().train(mode)
        self.feature_net.eval()
        return self

    def forward(self, aligned: torch.Tensor, canonical: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 1, H, W) aligned and (1, H, W) / (B, 1, H, W) canonical -> {loss, pixel, feature}."""
        _check_images(aligned, "AlignmentLoss aligned")
        target = canonical[None] if canonical.ndim == 3 else canonical
        if target.ndim != 4 or target.shape[1] != 1 or target.shape[2:] != aligned.shape[2:]:
            raise ValueError(
                f"AlignmentLoss: canonical of shape {tuple(canonical.shape)} does not match aligned images "
                f"{tuple(aligned.shape)}; expected (1, {aligned.shape[2]}, {aligned.shape[3]}) (the STN's output_size)"
            )
        if target.shape[0] not in (1, aligned.shape[0]):
            raise ValueError(f"AlignmentLoss: {target.shape[0]} canonical images for a batch of {aligned.shape[0]}")
        target = target.to(aligned)
        pixel = F.mse_loss(aligned, target.expand_as(aligned))
        with torch.no_grad():
            target_features = _feature_list(self.feature_net(target))
        aligned_features = _feature_list(self.feature_net(aligned))
        if len(aligned_features) != len(target_features):
            raise ValueError("AlignmentLoss: the feature network returned a different number of maps per call")
        feature = torch.stack(
            [F.mse_loss(mine, theirs.expand_as(mine)) for mine, theirs in zip(aligned_features, target_features)]
        ).mean()
        return {"loss": self.pixel_weight * pixel + feature, "pixel": pixel.detach(), "feature": feature.detach()}


def jitter_intensity(
    images: torch.Tensor,
    max_brightness: float = 0.1,
    max_contrast: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random brightness and contrast per image (the ``ColorJitter`` definitions), (B, 1, H, W) -> same.

    Brightness multiplies by ``b ~ U(1 - max_brightness, 1 + max_brightness)``; contrast
    blends with the image mean, ``c x + (1 - c) mean(x)``, ``c ~ U(1 - max_contrast,
    1 + max_contrast)``. Draws b then c from ``generator``.
    """
    _check_images(images, "jitter_intensity images")
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
    """The random misalignment the STN learns to undo (seed 002).

    Shift and scale up to 5% and rotation up to 10 degrees are the seed's; its brightness
    and contrast jitter has no stated range, 10% here.
    """

    max_shift: float = 0.05
    max_scale: float = 0.05
    max_rotation_deg: float = 10.0
    max_brightness: float = 0.1
    max_contrast: float = 0.1

    def __post_init__(self) -> None:
        _fraction(self.max_shift, "augmentation.max_shift")
        _fraction(self.max_scale, "augmentation.max_scale")
        _angle_deg(self.max_rotation_deg, "augmentation.max_rotation_deg")
        _fraction(self.max_brightness, "augmentation.max_brightness")
        _fraction(self.max_contrast, "augmentation.max_contrast")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 1, H, W) -> misaligned and intensity-jittered (B, 1, H, W)."""
        moved, _ = misalign(images, self.max_shift, self.max_scale, self.max_rotation_deg, generator)
        return jitter_intensity(moved, self.max_brightness, self.max_contrast, generator)


def train_alignment(
    stn: AlignmentSTN,
    images: torch.Tensor,
    canonical: torch.Tensor,
    loss: AlignmentLoss,
    steps: int,
    lr: float = DEFAULT_LR,
    generator: torch.Generator | None = None,
    *,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    batch_size: int | None = None,
    augmentation: AlignmentAugmentation | Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = (
        AlignmentAugmentation()
    ),
) -> list[float]:
    """Train the STN to map (augmented) radiographs onto the canonical chest with AdamW (seed 002).

    Args:
        stn: the network; trained in place, left in the mode it came in.
        images: the training radiographs (N, 1, H, W), on the STN's device.
        canonical: the canonical chest (1, H', W'), H', W' the STN's output size.
        loss: :class:`AlignmentLoss`; its frozen feature network is not trained.
        steps: optimisation steps.
        lr, weight_decay: AdamW's (seed: 1e-4 both).
        generator: draws the batches and the augmentation.
        batch_size: radiographs per step, drawn without replacement; None: all N.
        augmentation: applied to every batch (default the seed's
            :class:`AlignmentAugmentation`); None trains on the images as given.

    Returns the ``loss`` value of every step.
    """
    _check_images(images, "train_alignment images")
    steps = positive_int(steps, "train_alignment steps")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"train_alignment lr: got {lr!r}, expected a number > 0")
    count = images.shape[0]
    batch_size = count if batch_size is None else positive_int(batch_size, "train_alignment batch_size")
    if batch_size > count:
        raise ValueError(f"train_alignment batch_size: got {batch_size}, expected at most the {count} images")
    trainable = [parameter for parameter in stn.parameters() if parameter.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    was_training = stn.training
    stn.train()
    loss.train()
    losses: list[float] = []
    try:
        for _ in range(steps):
            if batch_size < count:
                device = generator.device if generator is not None else torch.device("cpu")
                order = torch.randperm(count, generator=generator, device=device)[:batch_size]
                batch = images[order.to(images.device)]
            else:
                batch = images
            if augmentation is not None:
                batch = augmentation(batch, generator)
            terms = loss(stn(batch).aligned, canonical)
            optimiser.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimiser.step()
            losses.append(float(terms["loss"].detach()))
    finally:
        stn.train(was_training)
    return losses
