"""Report figures (PNG): reconstructions, segmentation overlays, training curves, intervals.

Figures are built on ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot
state, no display needed) in seaborn's ``whitegrid`` style, and written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from chestssl.io import atomic_path
from chestssl.report.tables import Column, Table

_PREDICTION_COLOUR = "#e8413c"
_TRUTH_COLOUR = "#2ee62e"
_DPI = 120


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write ``figure`` as PNG to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=_DPI)
    return path


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def as_2d_images(array: np.ndarray, name: str) -> np.ndarray:
    """``(K, H, W)`` from ``(K, H, W)``, ``(K, 1, H, W)`` or ``(K, 1, D, H, W)`` (middle slice)."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 5 and array.shape[1] == 1:
        return array[:, 0, array.shape[2] // 2]
    if array.ndim == 4 and array.shape[1] == 1:
        return array[:, 0]
    if array.ndim == 3:
        return array
    raise ValueError(f"{name}: expected (K, H, W), (K, 1, H, W) or (K, 1, D, H, W), got shape {array.shape}")


def _image_axis(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)


# ----------------------------------------------------------------------- training curves


def read_live_metrics(live_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Read a dvclive folder's step metrics: ``{"train/loss": frame(step, value), ...}``.

    dvclive writes ``<live_dir>/plots/metrics/<name>.tsv`` with a ``step`` column and one
    column named after the metric's last path component (older versions add
    ``timestamp``).
    """
    root = Path(live_dir) / "plots" / "metrics"
    curves: dict[str, pd.DataFrame] = {}
    for tsv in sorted(root.rglob("*.tsv")):
        frame = pd.read_csv(tsv, sep="\t")
        value_columns = [c for c in frame.columns if c not in ("step", "timestamp")]
        if "step" not in frame.columns or len(value_columns) != 1:
            raise ValueError(f"{tsv}: expected a dvclive metric file with columns step and one metric, got {list(frame.columns)}")
        name = tsv.relative_to(root).with_suffix("").as_posix()
        curves[name] = pd.DataFrame({"step": frame["step"], "value": frame[value_columns[0]]})
    return curves


_PROBE_PANEL = "linear probe"


def _curve_panel(name: str) -> tuple[str, str]:
    """(panel, line label) of a logged curve: ``train/X`` and ``val/X`` share panel ``X``;
    every ``probe/...`` curve goes into one linear-probe panel."""
    if name.startswith("probe/"):
        return _PROBE_PANEL, name.removeprefix("probe/").replace("/", " ")
    for split in ("train", "val"):
        if name.startswith(split + "/"):
            return name.removeprefix(split + "/"), split
    return name, ""


def _panel_order(panel: str, names: list[str]) -> tuple[int, str]:
    """The loss first, then metrics logged in training, then validation-only ones, then
    the probe and the learning rate."""
    if panel == "loss":
        return 0, panel
    if panel in (_PROBE_PANEL, "lr"):
        return 3 if panel == _PROBE_PANEL else 4, panel
    return (1 if any(n.startswith("train/") for n in names) else 2), panel


def training_curves_figure(path: str | os.PathLike, title: str, curves: Mapping[str, pd.DataFrame]) -> Path:
    """One panel per quantity, x = step: train and val of the same metric share a panel
    (train and val lines), and the linear-probe curves share one."""
    if not curves:
        raise ValueError(f"no curves to plot for {title}")
    panels: dict[str, list[str]] = {}
    for name in sorted(curves):
        panels.setdefault(_curve_panel(name)[0], []).append(name)
    order = sorted(panels, key=lambda panel: _panel_order(panel, panels[panel]))
    columns = min(3, len(order))
    rows = math.ceil(len(order) / columns)
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = _new_figure(4.0 * columns, 2.8 * rows)
        axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
        palette = sns.color_palette("deep")
        for ax, panel in zip(axes, order):
            for index, name in enumerate(panels[panel]):
                frame, label = curves[name], _curve_panel(name)[1]
                colour = {"train": palette[0], "val": palette[1]}.get(label, palette[(index + 2) % len(palette)])
                ax.plot(frame["step"], frame["value"], color=colour, label=label or None,
                        marker="o" if len(frame) < 20 else None, markersize=3)
            ax.set_title(panel)
            ax.set_xlabel("step")
            if len(panels[panel]) > 1:
                ax.legend(fontsize="small")
        for ax in axes[len(order) :]:
            ax.set_visible(False)
        figure.suptitle(title)
    return save_figure(figure, path)


# ----------------------------------------------------------------------- reconstructions


def reconstruction_figure(path: str | os.PathLike, examples: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """Rows: the input, then each method's reconstruction; columns: test slices.

    Each reconstruction is labelled with its PSNR / SSIM. Methods whose examples show
    other slices than the first method's get their own input row.
    """
    from chestssl.eval.metrics import per_image_reconstruction_scores  # torch and MONAI: only when drawn

    if not examples:
        raise ValueError("no reconstruction examples to plot")
    methods = list(examples)
    n_columns = min(len(examples[m]["image"]) for m in methods)
    rows: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    shown_input: np.ndarray | None = None
    for method in methods:
        image = as_2d_images(examples[method]["image"], f"{method} image")[:n_columns]
        recon = np.clip(as_2d_images(examples[method]["recon"], f"{method} recon")[:n_columns], 0.0, 1.0)
        if shown_input is None or shown_input.shape != image.shape or not np.allclose(shown_input, image, atol=1e-3):
            rows.append(("input" if shown_input is None else f"input ({method})", image, None))
            shown_input = image
        rows.append((method, recon, image))
    with sns.axes_style("white"):
        figure = _new_figure(1.9 * n_columns, 1.9 * len(rows))
        axes = figure.subplots(len(rows), n_columns, squeeze=False)
        for row, (label, images, reference) in enumerate(rows):
            scores = None
            if reference is not None:
                scores = per_image_reconstruction_scores(images[:, None], np.clip(reference, 0.0, 1.0)[:, None])
            for column in range(n_columns):
                ax = axes[row, column]
                ax.imshow(images[column], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                _image_axis(ax)
                if column == 0:
                    ax.set_ylabel(label, fontsize=10)
                if scores is not None:
                    ax.set_title(
                        f"{scores['psnr'][column]:.1f} dB / {scores['ssim'][column]:.3f}", fontsize=7
                    )
        figure.suptitle("Test-split reconstructions (PSNR / SSIM per slice)")
    return save_figure(figure, path)


# ------------------------------------------------------------------ segmentation overlays


def segmentation_overlay_figure(
    path: str | os.PathLike, run: str, examples: Mapping[str, np.ndarray], threshold: float = 0.5
) -> Path:
    """Each test slice with the ground-truth contour (green) and predicted mask (red).

    Args:
        examples: ``image``, ``mask``, ``prob`` (``(K, H, W)`` or ``(K, 1, H, W)``) and
            optionally ``patient_id``, ``slice_index`` (``(K,)``) for the titles.
        threshold: predicted foreground where ``prob >= threshold``.
    """
    from chestssl.eval.metrics import per_image_segmentation_scores  # torch and MONAI: only when drawn

    image = as_2d_images(examples["image"], f"{run} image")
    mask = as_2d_images(examples["mask"], f"{run} mask") > 0
    prob = as_2d_images(examples["prob"], f"{run} prob")
    if not image.shape == mask.shape == prob.shape:
        raise ValueError(f"{run}: image {image.shape}, mask {mask.shape} and prob {prob.shape} must match")
    predicted = prob >= threshold
    dice = per_image_segmentation_scores(np.clip(prob, 0.0, 1.0)[:, None], mask[:, None], threshold)["dice"]
    count = image.shape[0]
    columns = min(count, 6)
    rows = math.ceil(count / columns)
    with sns.axes_style("white"):
        figure = _new_figure(2.1 * columns, 2.3 * rows + 0.4)
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for index in range(count):
            ax = axes[index]
            ax.imshow(image[index], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.imshow(
                np.ma.masked_where(~predicted[index], predicted[index].astype(np.float32)),
                cmap=_single_colour_map(_PREDICTION_COLOUR), vmin=0.0, vmax=1.0, alpha=0.5, interpolation="nearest",
            )
            if mask[index].any():
                ax.contour(mask[index].astype(np.float32), levels=[0.5], colors=[_TRUTH_COLOUR], linewidths=1.0)
            where = []
            if "patient_id" in examples:
                where.append(str(examples["patient_id"][index]))
            if "slice_index" in examples:
                where.append(f"z={int(examples['slice_index'][index])}")
            title_lines = [" ".join(where)] if where else []
            title_lines.append(f"Dice {dice[index]:.2f}")
            ax.set_title("\n".join(title_lines), fontsize=7)
            _image_axis(ax)
        for ax in axes[count:]:
            ax.set_visible(False)
        figure.legend(
            handles=[
                Line2D([], [], color=_TRUTH_COLOUR, label="ground truth"),
                Patch(color=_PREDICTION_COLOUR, alpha=0.5, label=f"prediction (p >= {threshold:g})"),
            ],
            loc="outside lower center", ncols=2, frameon=False,
        )
        figure.suptitle(f"{run}: test-split slices")
    return save_figure(figure, path)


def _single_colour_map(colour: str):
    from matplotlib.colors import ListedColormap

    return ListedColormap([colour])


# ------------------------------------------------------------------------ interval plots


def interval_figure(path: str | os.PathLike, table: Table, columns: Sequence[Column], label_key: str) -> Path:
    """Point estimates with confidence intervals, one panel per metric, one row per entry."""
    frame = table.numbers
    labels = [str(v) for v in frame[label_key]]
    positions = np.arange(len(labels))[::-1]
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = _new_figure(3.2 * len(columns), 0.45 * len(labels) + 1.2)
        axes = figure.subplots(1, len(columns), squeeze=False, sharey=True)[0]
        colour = sns.color_palette("deep")[0]
        for ax, column in zip(axes, columns):
            for y, (_, row) in zip(positions, frame.iterrows()):
                value, low, high = row[column.key], row[f"{column.key}_ci_low"], row[f"{column.key}_ci_high"]
                if value is None or pd.isna(value):
                    ax.text(0.5, y, "n/a", transform=ax.get_yaxis_transform(), ha="center", va="center", color="grey")
                    continue
                if low is not None and high is not None and not pd.isna(low) and not pd.isna(high):
                    # A percentile interval need not contain the point estimate (skewed
                    # resamples), so draw the interval and the estimate separately.
                    ax.hlines(y, low, high, color=colour)
                    ax.vlines([low, high], y - 0.15, y + 0.15, color=colour)
                    ax.plot([value], [y], "o", color=colour)
                else:
                    ax.plot(value, y, "o", color=colour)
            ax.set_title(column.header)
            ax.set_yticks(positions, labels)
            ax.set_ylim(-0.7, len(labels) - 0.3)
        figure.suptitle(f"{table.title}: point estimate and confidence interval")
    return save_figure(figure, path)
