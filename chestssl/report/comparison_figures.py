"""Figures that put several models side by side on the same test slices.

- :func:`segmentation_comparison_figure`: one row per test slice shown by every model,
  the image with its ground-truth contour, then each model's thresholded prediction.
- :func:`feature_map_figure`: encoder feature maps of several models on one slice, as
  the multi-task chest CT autoencoder study (seed 000) compared the encoder of its
  downstream segmentation model with that of its multihead model.

Figures are drawn on ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state) in the
house style of :mod:`chestssl.report.figures` and written atomically as PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from chestssl.eval.examples import SEGMENTATION_KEYS
from chestssl.report.figures import (
    _PREDICTION_COLOUR,
    _TRUTH_COLOUR,
    _image_axis,
    _new_figure,
    _single_colour_map,
    as_2d_images,
    save_figure,
)

#: Most test slices (rows) shown by :func:`segmentation_comparison_figure`.
MAX_COMPARISON_ROWS = 6
_ID_KEYS = ("patient_id", "slice_index")


def _slice_keys(label: str, arrays: Mapping[str, np.ndarray]) -> list[tuple[str, int]]:
    missing = [key for key in (*SEGMENTATION_KEYS, *_ID_KEYS) if key not in arrays]
    if missing:
        raise ValueError(
            f"segmentation examples {label!r} lack {', '.join(missing)}; the evaluate stage saves image, mask, "
            "prob, patient_id and slice_index (rerun it with the current code)"
        )
    patient_ids = np.asarray(arrays["patient_id"]).astype(str).reshape(-1)
    slice_indices = np.asarray(arrays["slice_index"]).reshape(-1).astype(np.int64)
    return list(zip(patient_ids.tolist(), slice_indices.tolist()))


def segmentation_comparison_figure(
    path: str | os.PathLike, examples: Mapping[str, Mapping[str, np.ndarray]], threshold: float = 0.5
) -> Path:
    """Test slices shown by every model: ground truth, then each model's prediction.

    Args:
        path: the PNG file.
        examples: model label (e.g. ``"scratch"``, ``"pretrained"``, ``"multihead"``) ->
            its segmentation examples as :func:`chestssl.eval.save_examples` writes them:
            ``image``, ``mask``, ``prob`` (``(K, H, W)`` or ``(K, 1, H, W)``),
            ``patient_id`` and ``slice_index`` (``(K,)``).
        threshold: predicted foreground where ``prob >= threshold`` (evaluate.seg_threshold).

    Rows are the slices present in every model's examples (matched on ``patient_id`` and
    ``slice_index``, in the first model's order, at most :data:`MAX_COMPARISON_ROWS`).
    Column 0 is the image with the ground-truth contour (green), then one column per
    model: its thresholded prediction (red) over the image, the contour kept, and the
    slice's Dice (MONAI ``DiceMetric``; 1 when target and prediction are both empty).

    Raises:
        ValueError: no examples, missing arrays, mismatched shapes, or no slice common to
            all models.
    """
    from chestssl.eval.metrics import per_image_segmentation_scores  # torch and MONAI: only when drawn

    if not examples:
        raise ValueError("no segmentation examples to compare")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    labels = list(examples)
    keys = {label: _slice_keys(label, examples[label]) for label in labels}
    shared = set.intersection(*(set(k) for k in keys.values()))
    rows = [key for key in dict.fromkeys(keys[labels[0]]) if key in shared][:MAX_COMPARISON_ROWS]
    if not rows:
        shown = "; ".join(
            f"{label}: {', '.join(f'{p} z={z}' for p, z in keys[label][:3]) or 'none'}" for label in labels
        )
        raise ValueError(
            f"the examples of {', '.join(labels)} share no test slice (patient_id, slice_index); first slices: "
            f"{shown}; save examples of the same test slices for every run"
        )

    first = examples[labels[0]]
    position = {label: {key: i for i, key in enumerate(keys[label])} for label in labels}
    reference_rows = [position[labels[0]][key] for key in rows]
    image = as_2d_images(first["image"], f"{labels[0]} image")[reference_rows]
    mask = as_2d_images(first["mask"], f"{labels[0]} mask")[reference_rows] > 0
    predictions, dice = {}, {}
    for label in labels:
        prob = as_2d_images(examples[label]["prob"], f"{label} prob")[[position[label][key] for key in rows]]
        if prob.shape != mask.shape:
            raise ValueError(
                f"{label}: prob slices of shape {prob.shape[1:]} do not match the images of {labels[0]} "
                f"({mask.shape[1:]}); compare runs evaluated at one slice size (slices.side)"
            )
        prob = np.clip(prob, 0.0, 1.0)
        predictions[label] = prob >= threshold
        dice[label] = per_image_segmentation_scores(prob[:, None], mask[:, None], threshold)["dice"]

    n_columns = 1 + len(labels)
    with sns.axes_style("white"):
        figure = _new_figure(2.1 * n_columns, 2.2 * len(rows) + 0.5)
        axes = figure.subplots(len(rows), n_columns, squeeze=False)
        for row, (patient_id, slice_index) in enumerate(rows):
            for column, label in enumerate([None, *labels]):
                ax = axes[row, column]
                ax.imshow(image[row], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                title = "image + ground truth"
                if label is not None:
                    predicted = predictions[label][row]
                    ax.imshow(
                        np.ma.masked_where(~predicted, predicted.astype(np.float32)),
                        cmap=_single_colour_map(_PREDICTION_COLOUR), vmin=0.0, vmax=1.0, alpha=0.5,
                        interpolation="nearest",
                    )
                    title = f"{label}\nDice {dice[label][row]:.2f}"
                if mask[row].any():
                    ax.contour(mask[row].astype(np.float32), levels=[0.5], colors=[_TRUTH_COLOUR], linewidths=1.0)
                ax.set_title(title, fontsize=7)
                _image_axis(ax)
                if column == 0:
                    ax.set_ylabel(f"{patient_id}\nz={slice_index}", fontsize=7)
        figure.legend(
            handles=[
                Line2D([], [], color=_TRUTH_COLOUR, label="ground truth"),
                Patch(color=_PREDICTION_COLOUR, alpha=0.5, label=f"prediction (p >= {threshold:g})"),
            ],
            loc="outside lower center", ncols=2, frameon=False,
        )
        figure.suptitle("Test slices shown by every model: ground truth and predictions")
    return save_figure(figure, path)


def _min_max(channel: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant channel becomes all zeros."""
    low, high = float(channel.min()), float(channel.max())
    if high <= low:
        return np.zeros_like(channel, dtype=np.float32)
    return ((channel - low) / (high - low)).astype(np.float32)


def _as_image(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` from ``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)``."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    array = np.asarray(image, dtype=np.float32)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"image must be one slice, (H, W), (1, H, W) or (1, 1, H, W), got shape {np.shape(image)}")
    return array


def feature_map_figure(
    path: str | os.PathLike, maps: Mapping[str, np.ndarray], image: np.ndarray, channels: int = 8
) -> Path:
    """The input slice and, per model, the first ``channels`` channels of one encoder level.

    Args:
        path: the PNG file.
        maps: model label -> ``(C, h, w)`` feature maps of one encoder level on ``image``
            (e.g. ``encoder.feature_maps(x)[level][0]``); models may differ in ``C``, ``h``
            and ``w``.
        image: the input slice, ``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)``, in [0, 1].
        channels: channels shown per model (the first ones; fewer when a map has fewer).

    The input spans the first column; each model fills one row, each channel min-max
    normalised on its own (only the spatial pattern is comparable, not the magnitude).

    Raises:
        ValueError: no maps, a map not ``(C, h, w)`` or not finite, or ``channels < 1``.
    """
    if not maps:
        raise ValueError("no feature maps to plot")
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
        raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
    slice_image = _as_image(image)
    arrays = {}
    for label, feature in maps.items():
        if hasattr(feature, "detach"):
            feature = feature.detach().cpu().numpy()
        feature = np.asarray(feature, dtype=np.float32)
        if feature.ndim != 3 or feature.shape[0] == 0:
            raise ValueError(
                f"feature maps of {label!r} must be (C, h, w) for one slice, got shape {feature.shape}; "
                "take one encoder level of one item, e.g. feature_maps(x)[level][0]"
            )
        if not np.all(np.isfinite(feature)):
            raise ValueError(f"feature maps of {label!r} hold NaN or infinite values")
        arrays[label] = feature
    shown = min(int(channels), max(f.shape[0] for f in arrays.values()))

    with sns.axes_style("white"):
        figure = _new_figure(1.5 * (shown + 1.5), 1.6 * len(arrays) + 0.6)
        grid = figure.add_gridspec(len(arrays), shown + 1, width_ratios=[1.5] + [1.0] * shown)
        input_ax = figure.add_subplot(grid[:, 0])
        input_ax.imshow(np.clip(slice_image, 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        input_ax.set_title("input", fontsize=8)
        _image_axis(input_ax)
        for row, (label, feature) in enumerate(arrays.items()):
            for column in range(shown):
                ax = figure.add_subplot(grid[row, column + 1])
                _image_axis(ax)
                if column >= feature.shape[0]:
                    ax.set_visible(False)
                    continue
                ax.imshow(_min_max(feature[column]), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set_title(f"channel {column}", fontsize=7)
                if column == 0:
                    channels_text = f"{feature.shape[0]} x {feature.shape[1]} x {feature.shape[2]}"
                    ax.set_ylabel(f"{label}\n({channels_text})", fontsize=7)
        figure.suptitle(f"Encoder feature maps (first {shown} channels, each min-max normalised)")
    return save_figure(figure, path)
