"""Figures of the classifiers fine-tuned on radiographs (stage ``finetune_radiographs@<run>``).

- :func:`radiograph_gradcam_figure`: per run, its example test radiographs with the Grad-CAM
  map of each one's most probable label overlaid (Selvaraju et al., ICCV 2017; seed 001 drew
  it on ResNet-18's ``layer4`` for its COVID-19 classes; maps made by
  :func:`chestssl.pipeline.finetune_radiographs.gradcam_examples`);
- :func:`radiograph_confusion_figure`: per run, the test split's confusion matrix: the
  L x L matrix of a ``multiclass`` run (seed 001's figure), or, for a ``multilabel`` run, each
  label's counts at the threshold (rows: labels; columns: TN, FP, FN, TP);
- :func:`radiograph_classifier_figures`: both, for the runs whose stage files exist.

Figures are drawn on ``matplotlib.figure.Figure`` (no pyplot state) in the house style of
:mod:`chestssl.report.figures` and written atomically as PNG.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import seaborn as sns

from chestssl.report.classifier_figures import gradcam_grid_figure
from chestssl.report.figures import _new_figure, as_2d_images, save_figure

GRADCAM_FILE = "radiograph_gradcam.png"
CONFUSION_FILE = "radiograph_confusion_matrices.png"
#: Most example radiographs (columns) per run.
MAX_COLUMNS = 6
#: The arrays of a run's ``examples.npz`` the Grad-CAM figure reads.
EXAMPLE_KEYS = ("image", "labels", "probability", "explained")
#: The per-label counts of a multilabel run's ``label_confusion``, in the figure's column order.
LABEL_COUNT_KEYS = ("tn", "fp", "fn", "tp")


def _short(names: Sequence[str], limit: int = 2) -> str:
    if not names:
        return "no positive label"
    return ", ".join(names[:limit]) + (f" +{len(names) - limit}" if len(names) > limit else "")


def _gradcam_row(run: str, arrays: Mapping[str, np.ndarray], label_names: Sequence[str]) -> dict[str, Any]:
    missing = [key for key in EXAMPLE_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"radiograph examples of {run!r} lack {', '.join(missing)} (they hold "
                         f"{', '.join(sorted(arrays))}); rerun finetune_radiographs@{run}")
    image = as_2d_images(arrays["image"], f"{run} image")
    labels = np.asarray(arrays["labels"], dtype=np.float64)
    probability = np.asarray(arrays["probability"], dtype=np.float64)
    explained = np.asarray(arrays["explained"]).astype(int).reshape(-1)
    count = image.shape[0]
    if count == 0 or labels.shape != (count, len(label_names)) or probability.shape != labels.shape \
            or explained.shape != (count,) or not np.all((0 <= explained) & (explained < len(label_names))):
        raise ValueError(f"radiograph examples of {run!r} do not match: {count} images, labels {labels.shape}, "
                         f"probability {probability.shape}, explained {explained.shape}, {len(label_names)} label "
                         f"names; rerun finetune_radiographs@{run}")
    row: dict[str, Any] = {"image": image, "cam": None, "reason": None, "titles": []}
    if "cam" in arrays:
        cam = as_2d_images(arrays["cam"], f"{run} cam")
        if cam.shape != image.shape or not np.all(np.isfinite(cam)):
            raise ValueError(f"{run}: its Grad-CAM maps do not match its {image.shape} images or are not finite; "
                             f"rerun finetune_radiographs@{run}")
        row["cam"] = np.clip(cam, 0.0, 1.0)
    else:
        reasons = arrays.get("cam_unavailable")
        row["reason"] = (str(np.asarray(reasons).reshape(-1)[0]) if reasons is not None and np.size(reasons)
                         else f"no Grad-CAM maps in its examples.npz; rerun finetune_radiographs@{run}")
    views = [str(v) for v in np.asarray(arrays.get("view", [""] * count)).reshape(-1)]
    for k in range(count):
        positive = [label_names[j] for j in np.flatnonzero(labels[k] == 1)]
        target = label_names[explained[k]]
        row["titles"].append(f"{views[k]}; true: {_short(positive)}\nmap: {target}, p={probability[k, explained[k]]:.2f}")
    return row


def radiograph_gradcam_figure(path: str | os.PathLike, examples_by_run: Mapping[str, Mapping[str, np.ndarray]],
                              label_names: Mapping[str, Sequence[str]]) -> Path:
    """Grid of Grad-CAM overlays: one row per run, one column per example radiograph.

    Args:
        path: the PNG file.
        examples_by_run: run name -> its ``examples.npz`` arrays (:data:`EXAMPLE_KEYS`, and
            ``cam`` (K, 1, S, S) in [0, 1] or ``cam_unavailable`` (K,) saying why not).
        label_names: run name -> its label names (``metrics.json``'s ``labels``).

    Each panel is the radiograph in gray with the map of its most probable label's logit
    (:func:`~chestssl.report.classifier_figures.gradcam_grid_figure`), titled with its view, its true labels, the label
    explained and that label's probability. A run without maps gets a row saying why.

    Raises:
        ValueError: no runs, or a run's arrays that are missing or disagree in size.
    """
    if not examples_by_run:
        raise ValueError("no radiograph examples to plot: examples_by_run is empty")
    rows = {run: _gradcam_row(run, arrays, list(label_names[run])) for run, arrays in examples_by_run.items()}
    return gradcam_grid_figure(
        path, rows, MAX_COLUMNS, (2.1, 2.45), 6.5, "Grad-CAM (the explained label's logit)",
        "Grad-CAM of each test radiograph's most probable label\n"
        "(panel title: view; true labels; label explained, its probability)")


class Confusion(NamedTuple):
    """One panel of :func:`radiograph_confusion_figure`."""

    counts: np.ndarray          # (rows, columns) ints
    row_names: list[str]
    column_names: list[str]
    title: str
    multiclass: bool            # an L x L matrix; else each label's TN, FP, FN, TP


def _matrix_of(run: str, metrics: Mapping[str, Any]) -> Confusion:
    """A run's test confusion from its ``metrics.json``."""
    test = metrics.get("test", {})
    if "confusion_matrix" in test:
        names = [str(n) for n in test["confusion_matrix"]["labels"]]
        counts = np.asarray(test["confusion_matrix"]["counts"], dtype=np.int64)
        if counts.shape != (len(names), len(names)):
            raise ValueError(f"{run}: its confusion matrix is {counts.shape}, not {len(names)} x {len(names)}; "
                             f"rerun finetune_radiographs@{run}")
        return Confusion(counts, [f"true {n}" for n in names], [f"pred. {n}" for n in names],
                         f"{run}\n{len(names)} classes, n={int(counts.sum())}", True)
    if "label_confusion" in test:
        entry = test["label_confusion"]
        names = [str(n) for n in entry["labels"]]
        counts = np.asarray([entry[key] for key in LABEL_COUNT_KEYS], dtype=np.int64).T
        if counts.shape != (len(names), len(LABEL_COUNT_KEYS)):
            raise ValueError(f"{run}: its label_confusion does not hold one count per label; "
                             f"rerun finetune_radiographs@{run}")
        return Confusion(counts, names, [key.upper() for key in LABEL_COUNT_KEYS],
                         f"{run}\neach label at p >= {entry['threshold']:g}, n={int(counts[0].sum())}", False)
    raise ValueError(f"{run}: its metrics.json has no test confusion_matrix or label_confusion; "
                     f"rerun finetune_radiographs@{run}")


def _shares(counts: np.ndarray, multiclass: bool) -> np.ndarray:
    """Each cell's share of its true class: a row (multiclass), or TN/FP of the negatives and FN/TP of the positives."""
    counts = counts.astype(np.float64)
    if multiclass:
        totals = counts.sum(axis=1, keepdims=True)
    else:
        negatives = counts[:, :2].sum(axis=1, keepdims=True)
        positives = counts[:, 2:].sum(axis=1, keepdims=True)
        totals = np.concatenate([negatives, negatives, positives, positives], axis=1)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def radiograph_confusion_figure(path: str | os.PathLike, metrics_by_run: Mapping[str, Mapping[str, Any]]) -> Path:
    """One panel per run: the test confusion of a ``multiclass`` run (rows true, columns
    predicted), or each label's TN / FP / FN / TP of a ``multilabel`` run. Cells show the
    count and are coloured by their share of the true class, so runs of different sizes compare.

    Raises:
        ValueError: no runs, or a run's ``metrics.json`` without those counts.
    """
    if not metrics_by_run:
        raise ValueError("no radiograph classifiers to plot: metrics_by_run is empty")
    panels = {run: _matrix_of(run, metrics) for run, metrics in metrics_by_run.items()}
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    tallest = max(panel.counts.shape[0] for panel in panels.values())
    colours = sns.color_palette("Blues", as_cmap=True)
    with sns.axes_style("white"):
        figure = _new_figure(3.4 * columns + 0.4, (0.45 * tallest + 1.4) * rows + 0.5)
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for ax, panel in zip(axes, panels.values()):
            share = _shares(panel.counts, panel.multiclass)
            ax.imshow(share, cmap=colours, vmin=0.0, vmax=1.0, aspect="auto")
            for (i, j), count in np.ndenumerate(panel.counts):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.6 else "black")
            ax.set_xticks(range(len(panel.column_names)), panel.column_names, fontsize=7,
                          rotation=30 if panel.multiclass else 0)
            ax.set_yticks(range(len(panel.row_names)), panel.row_names, fontsize=7)
            ax.set_title(panel.title, fontsize=8)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        figure.suptitle("Test confusion of the classifiers fine-tuned on radiographs\n"
                        "(colour: share of the true class)")
    return save_figure(figure, path)


def radiograph_classifier_figures(runs: Sequence[str], report_dir, figures_dir: str | os.PathLike
                                  ) -> tuple[list[tuple[str, Path]], list[str]]:
    """Both figures for ``runs`` (``radiograph_runs`` names) from their stage folders.

    ``report_dir``: run name -> its ``reports/finetune_radiographs/<run>`` folder. Returns the
    (caption, path) of each figure drawn and a note for each run whose files are missing.
    """
    import json

    from chestssl.eval.examples import load_examples

    figures_dir = Path(figures_dir)
    metrics, examples, skipped = {}, {}, []
    for run in runs:
        folder = Path(report_dir(run))
        if not (folder / "metrics.json").exists() or not (folder / "examples.npz").exists():
            skipped.append(f"Radiograph classifier figures: {folder}/metrics.json or examples.npz is missing; run "
                           f"`dvc repro finetune_radiographs@{run}`.")
            continue
        metrics[run] = json.loads((folder / "metrics.json").read_text())
        examples[run] = load_examples(folder / "examples.npz")
    if not metrics:
        return [], skipped
    labels = {run: metrics[run].get("labels", []) for run in metrics}
    size = int(next(iter(examples.values()))["image"].shape[-1])
    side = max(1, size // 32)  # both networks halve the image 5 times before the mapped layer
    figures = [
        ("Grad-CAM of each test radiograph's most probable label: ResNet-18 on `layer4` (seed 001), "
         f"DenseNet-121 on its last dense block. Both maps are 32 times coarser than the image ({side} x {side} on "
         f"{size} px radiographs), so a map points at a region, not at a nodule",
         radiograph_gradcam_figure(figures_dir / GRADCAM_FILE, examples, labels)),
        ("Test confusion of the classifiers fine-tuned on radiographs (seed 001's confusion matrix)",
         radiograph_confusion_figure(figures_dir / CONFUSION_FILE, metrics)),
    ]
    return figures, skipped
