"""Figures of the classification runs (``task: cls``): Grad-CAM overlays and confusion matrices.

- :func:`gradcam_figure`: per run, its example test slices with the Grad-CAM map of the
  nodule logit overlaid (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep
  Networks via Gradient-based Localization", ICCV 2017; maps made by
  :func:`chestssl.interpret.add_gradcam_to_examples` in the evaluate stage);
- :func:`confusion_matrix_figure`: per run, the 2x2 test-split confusion matrix at the
  classification threshold;
- :func:`classifier_figure_section`: both figures for the ``task: cls`` runs of
  params.yaml, from the files of their evaluate stages, with notes of what was skipped.

Figures are drawn on ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state) in the
house style of :mod:`chestssl.report.figures` and written atomically as PNG.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import seaborn as sns
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from chestssl.eval.examples import load_examples
from chestssl.report.figures import _image_axis, _new_figure, as_2d_images, save_figure

#: Most example slices (columns) per run in :func:`gradcam_figure`.
MAX_GRADCAM_COLUMNS = 8
#: Opacity of the Grad-CAM overlay on the gray slice.
GRADCAM_ALPHA = 0.45
GRADCAM_COLOURMAP = "jet"
#: Keys a classification ``examples.npz`` must hold for :func:`gradcam_figure`.
CLASSIFICATION_EXAMPLE_KEYS = ("image", "label", "score")
#: The confusion counts of ``metrics.json`` (``confusion_matrix``), in matrix order.
CONFUSION_KEYS = ("tn", "fp", "fn", "tp")
CLASS_NAMES = ("clean", "nodule")

GRADCAM_FILE = "classifier_gradcam.png"
CONFUSION_FILE = "classifier_confusion_matrices.png"


# ------------------------------------------------------------------------------ Grad-CAM


def _missing_cam_reason(run: str, arrays: Mapping[str, np.ndarray]) -> str:
    reasons = arrays.get("cam_unavailable")
    if reasons is not None and np.size(reasons):
        return str(np.asarray(reasons).reshape(-1)[0])
    return (f"no Grad-CAM maps ('cam') in its examples.npz; rerun evaluate@{run}, which adds them for "
            "classification runs")


def _gradcam_row(run: str, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Validated arrays of one run: image (K, H, W), cam (K, H, W) or a reason, label, score, titles."""
    missing = [key for key in CLASSIFICATION_EXAMPLE_KEYS if key not in arrays]
    if missing:
        raise ValueError(
            f"classification examples of {run!r} lack {', '.join(missing)} (they hold {', '.join(sorted(arrays))}); "
            f"rerun evaluate@{run}, which saves image, label, score, patient_id and slice_index"
        )
    image = as_2d_images(arrays["image"], f"{run} image")
    count = image.shape[0]
    if count == 0:
        raise ValueError(f"{run}: the examples hold no slice; rerun evaluate@{run}")
    label = np.asarray(arrays["label"]).reshape(-1)
    score = np.asarray(arrays["score"], dtype=np.float64).reshape(-1)
    if label.size != count or score.size != count:
        raise ValueError(
            f"{run}: image holds {count} examples, label {label.size} and score {score.size}; they must match"
        )
    row: dict[str, Any] = {"image": image, "label": label, "score": score, "cam": None, "reason": None}
    if "cam" in arrays:
        cam = as_2d_images(arrays["cam"], f"{run} cam")
        if cam.shape != image.shape:
            raise ValueError(
                f"{run}: cam of shape {cam.shape} does not match image {image.shape}; rerun evaluate@{run}"
            )
        if not np.all(np.isfinite(cam)):
            raise ValueError(f"{run}: cam holds NaN or infinite values; rerun evaluate@{run}")
        row["cam"] = np.clip(cam, 0.0, 1.0)
    else:
        row["reason"] = _missing_cam_reason(run, arrays)
    where = []
    if "patient_id" in arrays:
        where.append([str(p) for p in np.asarray(arrays["patient_id"]).reshape(-1)])
    if "slice_index" in arrays:
        where.append([f"z={int(z)}" for z in np.asarray(arrays["slice_index"]).reshape(-1)])
    row["where"] = [" ".join(parts) for parts in zip(*where)] if where else [""] * count
    return row


def _label_name(label: Any) -> str:
    value = int(label)
    return CLASS_NAMES[value] if value in (0, 1) else str(value)


def gradcam_figure(path: str | os.PathLike, examples_by_run: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """Grid of Grad-CAM overlays: one row per run, one column per example slice.

    Args:
        path: the PNG file.
        examples_by_run: run name -> its classification examples as the evaluate stage
            writes them (:func:`chestssl.eval.load_examples`): ``image`` (K, 1, H, W),
            ``label`` (K,) (1 = nodule), ``score`` (K,) (nodule probability), optionally
            ``patient_id`` and ``slice_index`` (K,), and ``cam`` (K, 1, H, W) in [0, 1]
            (:func:`chestssl.interpret.gradcam_maps`); without ``cam``, ``cam_unavailable``
            (K,) may say why.

    Each panel is the slice in gray with the map overlaid (jet, alpha
    :data:`GRADCAM_ALPHA`), titled with where it is from, its true label and its score;
    at most :data:`MAX_GRADCAM_COLUMNS` slices per run. A run without ``cam`` gets a row
    that says why (the ``cam_unavailable`` reason, or that evaluate must be rerun).

    Raises:
        ValueError: no runs, a run without ``image`` / ``label`` / ``score``, arrays that
            disagree on the number of slices, or a ``cam`` that does not match its images.
    """
    if not examples_by_run:
        raise ValueError("no classification examples to plot: examples_by_run is empty")
    rows = {run: _gradcam_row(run, arrays) for run, arrays in examples_by_run.items()}
    for row in rows.values():
        row["titles"] = [f"{where}\n{_label_name(label)}, p={score:.2f}" if where else f"{_label_name(label)}, p={score:.2f}"
                         for where, label, score in zip(row["where"], row["label"], row["score"])]
    return gradcam_grid_figure(
        path, rows, MAX_GRADCAM_COLUMNS, (1.9, 2.15), 7, "Grad-CAM (nodule logit)",
        "Grad-CAM of the nodule logit on test slices\n(panel title: true label, p = nodule score)")


def gradcam_grid_figure(path: str | os.PathLike, rows: Mapping[str, Mapping[str, Any]], max_columns: int,
                        panel: tuple[float, float], title_size: float, colourbar_label: str, title: str) -> Path:
    """Grad-CAM overlays, one row per run (name -> ``image`` (K, H, W), ``cam`` (K, H, W) in [0, 1]
    or ``None`` with a ``reason``, and ``titles`` (K,)), at most ``max_columns`` panels a row.

    Each panel is the image in gray with the map overlaid (jet, alpha :data:`GRADCAM_ALPHA`);
    a run without maps gets a third-height row that says why. ``panel``: (width, height) in
    inches of one panel.
    """
    n_columns = min(max_columns, max(row["image"].shape[0] for row in rows.values()))
    norm = Normalize(vmin=0.0, vmax=1.0)
    with sns.axes_style("white"):
        # A row that only says why it has no maps needs a third of an image row's height.
        heights = [1.0 if row["cam"] is not None else 0.35 for row in rows.values()]
        figure = _new_figure(panel[0] * n_columns + 0.9, panel[1] * sum(heights) + 0.5)
        grid = figure.add_gridspec(len(rows), n_columns, height_ratios=heights)
        image_axes = []
        for index, (run, row) in enumerate(rows.items()):
            if row["cam"] is None:
                ax = figure.add_subplot(grid[index, :])
                _image_axis(ax)
                ax.text(0.5, 0.5, f"{run}: Grad-CAM not shown\n{row['reason']}", ha="center", va="center",
                        fontsize=8, color="dimgray", wrap=True, transform=ax.transAxes)
                continue
            for column in range(min(n_columns, row["image"].shape[0])):
                ax = figure.add_subplot(grid[index, column])
                ax.imshow(row["image"][column], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.imshow(row["cam"][column], cmap=GRADCAM_COLOURMAP, norm=norm, alpha=GRADCAM_ALPHA,
                          interpolation="bilinear")
                ax.set_title(row["titles"][column], fontsize=title_size)
                _image_axis(ax)
                if column == 0:
                    ax.set_ylabel(run, fontsize=8)
                image_axes.append(ax)
        if image_axes:
            colourbar = figure.colorbar(ScalarMappable(norm=norm, cmap=GRADCAM_COLOURMAP), ax=image_axes,
                                        shrink=0.8, aspect=30)
            colourbar.set_label(colourbar_label, fontsize=7)
            colourbar.ax.tick_params(labelsize=7)
        figure.suptitle(title)
    return save_figure(figure, path)


# --------------------------------------------------------------------- confusion matrices


def _confusion_entry(run: str, entry: Mapping[str, Any]) -> tuple[np.ndarray, float | None]:
    """(2x2 int matrix [[tn, fp], [fn, tp]], threshold or None) from flat counts or a metrics.json dict."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"confusion counts of {run!r}: expected a mapping, got {type(entry).__name__}")
    counts = entry.get("confusion_matrix", entry)
    if not isinstance(counts, Mapping):
        raise ValueError(f"confusion counts of {run!r}: 'confusion_matrix' must be a mapping of tn, fp, fn, tp")
    missing = [key for key in CONFUSION_KEYS if key not in counts]
    if missing:
        raise ValueError(
            f"confusion counts of {run!r} lack {', '.join(missing)}; expected tn, fp, fn, tp (the "
            "'confusion_matrix' of a cls run's metrics.json)"
        )
    values = []
    for key in CONFUSION_KEYS:
        value = counts[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"confusion counts of {run!r}: {key} must be a non-negative integer, got {value!r}")
        values.append(int(value))
    threshold = entry.get("threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold of {run!r} must be a number in [0, 1], got {threshold!r}")
        threshold = float(threshold)
    return np.asarray(values, dtype=np.int64).reshape(2, 2), threshold


def confusion_matrix_figure(path: str | os.PathLike, counts_by_run: Mapping[str, Mapping[str, Any]]) -> Path:
    """One 2x2 test-split confusion matrix per run.

    Args:
        path: the PNG file.
        counts_by_run: run name -> either a cls run's ``metrics.json`` (its
            ``confusion_matrix`` {tn, fp, fn, tp} and ``threshold``) or the flat counts
            ``{"tn", "fp", "fn", "tp"}`` with an optional ``"threshold"``.

    Rows are the true class (clean, nodule), columns the predicted one (score >=
    threshold is nodule). Each cell shows its count and its share of the true class; the
    colour is that share, so runs with different test sizes compare. The threshold is in
    each panel's title.

    Raises:
        ValueError: no runs, missing or negative / non-integer counts, or a threshold
            outside [0, 1].
    """
    if not counts_by_run:
        raise ValueError("no confusion counts to plot: counts_by_run is empty")
    matrices = {run: _confusion_entry(run, entry) for run, entry in counts_by_run.items()}
    n_columns = min(4, len(matrices))
    n_rows = math.ceil(len(matrices) / n_columns)
    colours = sns.color_palette("Blues", as_cmap=True)
    with sns.axes_style("white"):
        figure = _new_figure(2.9 * n_columns + 0.6, 2.7 * n_rows + 0.4)
        axes = figure.subplots(n_rows, n_columns, squeeze=False).ravel()
        for ax, (run, (matrix, threshold)) in zip(axes, matrices.items()):
            true_totals = matrix.sum(axis=1, keepdims=True)
            share = np.divide(matrix, true_totals, out=np.zeros(matrix.shape), where=true_totals > 0)
            ax.imshow(share, cmap=colours, vmin=0.0, vmax=1.0)
            for (row, column), count in np.ndenumerate(matrix):
                text = f"{count}\n({share[row, column]:.0%})" if true_totals[row, 0] else f"{count}\n(no items)"
                ax.text(column, row, text, ha="center", va="center", fontsize=8,
                        color="white" if share[row, column] > 0.6 else "black")
            ax.set_xticks([0, 1], [f"pred. {name}" for name in CLASS_NAMES], fontsize=7)
            ax.set_yticks([0, 1], [f"true {name}" for name in CLASS_NAMES], fontsize=7)
            threshold_text = f"threshold {threshold:g}" if threshold is not None else "threshold not recorded"
            ax.set_title(f"{run}\n{threshold_text}, n={int(matrix.sum())}", fontsize=8)
        for ax in axes[len(matrices):]:
            ax.set_visible(False)
        figure.suptitle("Test-split confusion matrices\n(count and share of the true class)")
    return save_figure(figure, path)


# ------------------------------------------------------------------------ report section


def _read_metrics(path: Path, run: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); rerun evaluate@{run}") from error


def classifier_figure_section(
    runs: Mapping[str, Mapping[str, Any]],
    evaluate_dir: Callable[[str], Path],
    figures_dir: Path,
) -> tuple[list[tuple[str, Path]], list[str]]:
    """Grad-CAM and confusion-matrix figures of the ``task: cls`` runs, from their evaluate files.

    Args:
        runs: the ``runs`` block of params.yaml (run name -> entry with ``task``).
        evaluate_dir: run name -> the folder of its evaluate stage (e.g.
            :func:`chestssl.paths.evaluate_dir`), holding ``metrics.json`` and ``examples.npz``.
        figures_dir: where the PNG files go (:data:`GRADCAM_FILE`, :data:`CONFUSION_FILE`).

    Returns:
        ``(captioned, notes)``: ``[(caption, path)]`` of the figures written (none, one or
        both), and one line per thing skipped and why (no cls runs, a missing file, a run
        without Grad-CAM maps, no run with maps at all).

    Raises:
        TypeError: ``runs`` is not a mapping or ``evaluate_dir`` is not callable.
        ValueError: a run entry is not a mapping, or an evaluate file holds bad data
            (invalid JSON, bad counts, examples without image / label / score).
    """
    if not isinstance(runs, Mapping):
        raise TypeError(f"runs must map run names to their entries (a mapping), got {type(runs).__name__}")
    if not callable(evaluate_dir):
        raise TypeError("evaluate_dir must be a function run name -> folder, e.g. chestssl.paths.evaluate_dir")
    for run, entry in runs.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"runs.{run}: expected a mapping with a 'task' key, got {type(entry).__name__}")
    cls_runs = [run for run, entry in runs.items() if entry.get("task") == "cls"]
    if not cls_runs:
        return [], ["Classifier figures (Grad-CAM, confusion matrices): no `task: cls` run in params.yaml."]

    notes: list[str] = []
    counts: dict[str, dict[str, Any]] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    for run in cls_runs:
        folder = Path(evaluate_dir(run))
        metrics_path = folder / "metrics.json"
        if not metrics_path.exists():
            notes.append(f"Confusion matrix of `{run}`: {metrics_path} not found; run evaluate@{run} (dvc repro).")
        else:
            metrics = _read_metrics(metrics_path, run)
            if "confusion_matrix" in metrics:
                counts[run] = metrics
            else:
                notes.append(f"Confusion matrix of `{run}`: {metrics_path} has no confusion_matrix; "
                             f"rerun evaluate@{run} with the current code.")
        examples_path = folder / "examples.npz"
        if not examples_path.exists():
            notes.append(f"Grad-CAM of `{run}`: {examples_path} not found; run evaluate@{run} (dvc repro).")
            continue
        arrays = load_examples(examples_path)
        examples[run] = arrays
        if "cam" not in arrays:
            notes.append(f"Grad-CAM of `{run}`: {_missing_cam_reason(run, arrays)}.")

    captioned: list[tuple[str, Path]] = []
    with_maps = [run for run, arrays in examples.items() if "cam" in arrays]
    if with_maps:
        path = gradcam_figure(Path(figures_dir) / GRADCAM_FILE, examples)
        captioned.append((
            "Grad-CAM (Selvaraju et al., ICCV 2017) of the nodule logit on the encoder's deepest spatial map, "
            "on the highest-scoring test slices: " + ", ".join(examples),
            path,
        ))
    elif examples:
        notes.append("Grad-CAM figure: no cls run has Grad-CAM maps in its examples.npz.")
    if counts:
        path = confusion_matrix_figure(Path(figures_dir) / CONFUSION_FILE, counts)
        captioned.append(("Test-split confusion matrices at the classification threshold: " + ", ".join(counts), path))
    else:
        notes.append("Confusion-matrix figure: no cls run has a metrics.json with confusion counts.")
    return captioned, notes
