"""Random two-view augmentation of image batches for joint-embedding pretraining.

The view pipeline of seed 001 (Barlow Twins for chest X-ray; Zbontar et al., "Barlow
Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021), applied to a
(B, 1, H, W) or (B, 1, D, H, W) batch on the batch's own device. Each step acts on each
image independently with probability ``p``:

1. random resized crop: a box of ``crop_scale`` of the area (volume), aspect ratios
   within [3/4, 4/3], resampled to the full size (as torchvision's ``RandomResizedCrop``);
2. flips: each spatial axis independently;
3. histogram equalisation (MONAI's ``HistogramNormalize`` with range [0, 1], batched);
4. Gaussian blur with an isotropic sigma drawn from ``blur_sigma`` (MONAI's kernels);
5. 2D: a random perspective warp, each image corner moved inwards by up to
   ``perspective`` of the half side (torchvision's ``RandomPerspective``; MONAI has none).
   3D: a random affine warp instead, ``I + E`` with ``E`` uniform in
   ``±perspective / 3``, which moves each corner by at most ``perspective`` of the half
   side along each axis, the same bound as the 2D warp;
6. additive Gaussian noise of standard deviation ``noise_std``, clipped to [0, 1].

Every random number comes from a CPU ``torch.Generator`` (the augmenter's own, or one
passed per call), so a view is a pure function of the images and the generator's state,
the same on every device. The work is batched: one resampling per geometric step,
grouped convolutions for the blur; 32 views of 64x64 take about 10 ms on one CPU core.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import AffineTransform
from monai.networks.layers.convutils import gaussian_1d

#: torchvision's ``RandomResizedCrop`` aspect-ratio range.
CROP_ASPECT_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
#: Histogram bins of the equalisation (MONAI's ``HistogramNormalize`` default).
HISTOGRAM_BINS = 256
#: Gaussian kernels reach this many sigmas (MONAI's ``GaussianFilter`` default).
BLUR_TRUNCATED = 4.0
#: The largest corner displacement accepted, as a fraction of the half side.
MAX_PERSPECTIVE = 0.5


def _uniform(shape: Sequence[int], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(tuple(shape), generator=generator, dtype=torch.float64)


def random_resized_crop_theta(
    batch_size: int, spatial_dims: int, scale: Sequence[float], generator: torch.Generator
) -> torch.Tensor:
    """Affine matrices (B, n, n + 1) of random crop boxes in normalised coordinates.

    Row ``d`` maps output coordinate ``d`` (array-axis order, [-1, 1]) to the input:
    ``x_in = f_d * x_out + c_d``, with side fractions ``f`` whose product is the area
    (volume) fraction drawn from ``scale`` and whose ratios lie in [3/4, 4/3]; ``f`` is
    clipped to 1 (a box never leaves the image) and the centre ``c`` is uniform over the
    positions that keep the box inside.
    """
    area = _uniform((batch_size, 1), scale[0], scale[1], generator)
    half_log_ratio = 0.5 * math.log(CROP_ASPECT_RATIO[1])
    log_sides = _uniform((batch_size, spatial_dims), -half_log_ratio, half_log_ratio, generator)
    log_sides = log_sides - log_sides.mean(dim=1, keepdim=True)
    sides = (area.log() / spatial_dims + log_sides).exp().clamp(max=1.0)
    centres = _uniform((batch_size, spatial_dims), -1.0, 1.0, generator) * (1.0 - sides)
    theta = torch.zeros(batch_size, spatial_dims, spatial_dims + 1, dtype=torch.float64)
    theta[:, :, :spatial_dims] = torch.diag_embed(sides)
    theta[:, :, spatial_dims] = centres
    return theta


def random_affine_theta(
    batch_size: int, spatial_dims: int, distortion: float, generator: torch.Generator
) -> torch.Tensor:
    """Affine matrices (B, n, n + 1): ``I + E``, ``E`` uniform in ``±distortion / n``, no shift.

    In normalised coordinates each corner of the image moves by at most ``distortion``
    along each axis.
    """
    bound = distortion / spatial_dims
    theta = torch.zeros(batch_size, spatial_dims, spatial_dims + 1, dtype=torch.float64)
    theta[:, :, :spatial_dims] = torch.eye(spatial_dims, dtype=torch.float64) + _uniform(
        (batch_size, spatial_dims, spatial_dims), -bound, bound, generator
    )
    return theta


def random_homographies(batch_size: int, distortion: float, generator: torch.Generator) -> torch.Tensor:
    """Projective maps (B, 3, 3) from output to input (x, y) coordinates in [-1, 1].

    As torchvision's ``RandomPerspective``: each image corner ``s`` is moved inwards to
    ``e = s - sign(s) * u * distortion`` (``u`` uniform in [0, 1] per coordinate) and the
    map sends ``e`` back to ``s``, so the image content shrinks towards the moved corners.
    """
    start = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    start = start.expand(batch_size, 4, 2)
    end = start - start.sign() * distortion * torch.rand(batch_size, 4, 2, generator=generator, dtype=torch.float64)
    x, y = end[..., 0], end[..., 1]
    u, v = start[..., 0], start[..., 1]
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    # u = (h0 x + h1 y + h2) / (h6 x + h7 y + 1), v = (h3 x + h4 y + h5) / (h6 x + h7 y + 1)
    rows_u = torch.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], dim=-1)
    system = torch.cat([rows_u, rows_v], dim=1)
    targets = torch.cat([u, v], dim=1)
    h = torch.linalg.solve(system, targets)
    return torch.cat([h, torch.ones(batch_size, 1, dtype=torch.float64)], dim=1).reshape(batch_size, 3, 3)


def perspective_warp(images: torch.Tensor, homographies: torch.Tensor) -> torch.Tensor:
    """Warp (B, C, H, W) images with output-to-input homographies (B, 3, 3); zeros outside."""
    batch, _, height, width = images.shape
    ys = (2 * torch.arange(height, device=images.device, dtype=torch.float32) + 1) / height - 1
    xs = (2 * torch.arange(width, device=images.device, dtype=torch.float32) + 1) / width - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1).reshape(1, -1, 3)
    mapped = points @ homographies.to(images.device, torch.float32).transpose(1, 2)
    grid = (mapped[..., :2] / mapped[..., 2:]).reshape(batch, height, width, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def equalize_histogram(images: torch.Tensor, num_bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """Histogram equalisation of each image of a (B, C, *S) batch to [0, 1], batched.

    The computation of MONAI's ``HistogramNormalize(num_bins, min=0, max=1)`` (equal-width
    bins over each image's own range, cumulative histogram rescaled to [0, 1], linear
    interpolation at the bin centres), for a whole batch on its device. A constant image,
    which has no histogram to equalise, is returned unchanged.
    """
    batch = images.shape[0]
    flat = images.reshape(batch, -1).float()
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    constant = high <= low
    width = torch.where(constant, torch.ones_like(low), (high - low) / num_bins)
    position = (flat - low) / width
    bins = position.floor().long().clamp(0, num_bins - 1)
    histogram = torch.zeros(batch, num_bins, device=flat.device, dtype=flat.dtype)
    histogram.scatter_add_(1, bins, torch.ones_like(flat))
    cumulative = histogram.cumsum(dim=1)
    first, total = cumulative[:, :1], cumulative[:, -1:]
    cumulative = (cumulative - first) / (total - first).clamp(min=1.0)
    centre = position - 0.5
    left = centre.floor().clamp(0, num_bins - 2)
    fraction = (centre - left).clamp(0.0, 1.0)
    left = left.long()
    equalized = cumulative.gather(1, left) * (1 - fraction) + cumulative.gather(1, left + 1) * fraction
    equalized = torch.where(constant, flat, equalized)
    return equalized.reshape(images.shape).to(images.dtype)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur each image of a (B, C, *S) batch with its own isotropic Gaussian, sigmas (B,).

    MONAI's ``gaussian_1d`` kernels (erf approximation, truncated at 4 sigma), normalised
    to sum 1 and zero-padded to a common length, applied separably as one grouped
    convolution per axis; edges are replicated, so a blur never darkens the border.
    """
    batch, channels = images.shape[:2]
    spatial_dims = images.ndim - 2
    kernels = [gaussian_1d(torch.tensor(float(sigma)), truncated=BLUR_TRUNCATED, approx="erf") for sigma in sigmas]
    length = max(kernel.numel() for kernel in kernels)
    padded = torch.stack([F.pad(kernel, [(length - kernel.numel()) // 2] * 2) for kernel in kernels])
    padded = (padded / padded.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0).to(images)
    x = images.reshape(1, batch * channels, *images.shape[2:])
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial_dims - 1]
    radius = length // 2
    for axis in range(spatial_dims):
        shape = [batch * channels, 1] + [1] * spatial_dims
        shape[2 + axis] = length
        padding = [0, 0] * spatial_dims
        padding[2 * (spatial_dims - 1 - axis)] = padding[2 * (spatial_dims - 1 - axis) + 1] = radius
        x = conv(F.pad(x, padding, mode="replicate"), padded.reshape(shape), groups=batch * channels)
    return x.reshape(images.shape)


def _check_range(value: Any, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
        raise ValueError(f"{key}: got {value!r}, expected a number in [{low:g}, {high:g}]")
    return float(value)


def _check_interval(value: Any, key: str, low: float, high: float, low_open: bool = False) -> tuple[float, float]:
    allowed = f"[min, max] with {low:g} {'<' if low_open else '<='} min <= max <= {high:g}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{key}: got {value!r}, expected {allowed}")
    if any(isinstance(bound, bool) or not isinstance(bound, (int, float)) for bound in value):
        raise ValueError(f"{key}: got {value!r}, expected {allowed}")
    first, second = float(value[0]), float(value[1])
    if (first <= low if low_open else first < low) or first > second or second > high:
        raise ValueError(f"{key}: got {list(value)!r}, expected {allowed}")
    return first, second


class TwoViewAugment:
    """Two independent random views of an image batch (see the module docstring).

    Args:
        spatial_dims: 2 or 3.
        p: probability of each of the six steps, per image (seed 001: 0.5).
        crop_scale: [min, max] area (volume) fraction of the crop box, 0 < min <= max <= 1.
        blur_sigma: [min, max] Gaussian blur sigma in pixels (seed 001: [0.1, 2]).
        perspective: corner displacement as a fraction of the half side, in [0, 0.5]
            (seed 001: 0.15).
        noise_std: standard deviation of the additive Gaussian noise (>= 0).
        seed: seed of the augmenter's own generator.

    ``augmenter(images, generator=None) -> (view1, view2)`` and
    ``augmenter.view(images, generator=None) -> view``: ``images`` (B, 1, *S) float in
    [0, 1] on any device; views of the same shape, dtype and device, in [0, 1]. Random
    numbers come from ``generator`` (a CPU ``torch.Generator``), else from
    ``augmenter.generator``.
    """

    def __init__(
        self,
        spatial_dims: int,
        p: float = 0.5,
        crop_scale: Sequence[float] = (0.08, 1.0),
        blur_sigma: Sequence[float] = (0.1, 2.0),
        perspective: float = 0.15,
        noise_std: float = 0.05,
        seed: int = 0,
    ):
        if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = int(spatial_dims)
        self.p = _check_range(p, "p", 0.0, 1.0)
        self.crop_scale = _check_interval(crop_scale, "crop_scale", 0.0, 1.0, low_open=True)
        self.blur_sigma = _check_interval(blur_sigma, "blur_sigma", 0.0, math.inf)
        self.perspective = _check_range(perspective, "perspective", 0.0, MAX_PERSPECTIVE)
        self.noise_std = _check_range(noise_std, "noise_std", 0.0, math.inf)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._crop = AffineTransform(normalized=True, padding_mode="border", align_corners=False)
        self._affine = AffineTransform(normalized=True, padding_mode="zeros", align_corners=False)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spatial_dims: int, seed: int = 0) -> "TwoViewAugment":
        """Build from a validated params ``augment`` block: ``p``, ``crop_scale``, ``blur_sigma``,
        ``perspective``, ``noise_std``."""
        keys = ("p", "crop_scale", "blur_sigma", "perspective", "noise_std")
        return cls(spatial_dims, **{key: cfg[key] for key in keys}, seed=seed)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        generator = self._generator(generator)
        return self.view(images, generator), self.view(images, generator)

    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        generator = self.generator if generator is None else generator
        if generator.device.type != "cpu":
            raise ValueError(
                f"TwoViewAugment draws its random numbers on the CPU; got a generator on {generator.device}"
            )
        return generator

    def _chosen(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(batch, generator=generator) < self.p

    def view(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One random view (B, 1, *S) in [0, 1] of ``images`` (B, 1, *S) in [0, 1]."""
        generator = self._generator(generator)
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"TwoViewAugment: expected images of shape (B, C, *S) with {self.spatial_dims} spatial sizes, "
                f"got {tuple(images.shape)}"
            )
        batch, dims, device = images.shape[0], self.spatial_dims, images.device
        with torch.autocast(device_type=device.type, enabled=False):
            x = images.float().clone()

            crop = self._chosen(batch, generator)
            theta = random_resized_crop_theta(batch, dims, self.crop_scale, generator)
            if crop.any():
                x[crop.to(device)] = self._crop(x[crop.to(device)], theta[crop].to(device, torch.float32))

            flips = torch.rand(batch, dims, generator=generator) < self.p
            for axis in range(dims):
                chosen = flips[:, axis].to(device)
                if flips[:, axis].any():
                    x[chosen] = x[chosen].flip(2 + axis)

            equalize = self._chosen(batch, generator)
            if equalize.any():
                x[equalize.to(device)] = equalize_histogram(x[equalize.to(device)])

            blur = self._chosen(batch, generator)
            sigmas = _uniform((batch,), self.blur_sigma[0], self.blur_sigma[1], generator)
            if blur.any():
                x[blur.to(device)] = gaussian_blur(x[blur.to(device)], sigmas[blur])

            warp = self._chosen(batch, generator)
            if dims == 2:
                warps = random_homographies(batch, self.perspective, generator)
            else:
                warps = random_affine_theta(batch, dims, self.perspective, generator)
            if warp.any() and self.perspective > 0:
                chosen = warp.to(device)
                if dims == 2:
                    x[chosen] = perspective_warp(x[chosen], warps[warp])
                else:
                    x[chosen] = self._affine(x[chosen], warps[warp].to(device, torch.float32))

            noise = self._chosen(batch, generator)
            if noise.any() and self.noise_std > 0:
                chosen = noise.to(device)
                draws = torch.randn(x[chosen].shape, generator=generator)
                x[chosen] = (x[chosen] + self.noise_std * draws.to(device)).clamp(0.0, 1.0)

            x = x.clamp(0.0, 1.0)
        return x.to(images.dtype)
