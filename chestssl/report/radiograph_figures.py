"""The report's figures of the radiographs folder (stage ``radiographs``) and of pretraining on it.

:func:`radiograph_figure`: rows are test-split studies (those with most positive labels
first); columns are the study's images. Rendered from CT, each view has the projected
nodule mask outlined and the largest nodule's projected centre marked, so a reader can
check that the rendering puts the CT's annotations where they belong; a real dataset's
images are shown with the study's positive labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns

from chestssl.data.radiograph_folder import RadiographFolder, RadiographsNotFoundError, open_radiograph_folder
from chestssl.report.figures import _image_axis, _new_figure, save_figure

_MASK_COLOUR = "#e8413c"
#: At most this many images of one study are shown.
MAX_IMAGES_PER_STUDY = 3


def choose_studies(studies: pd.DataFrame, labels: Sequence[str], count: int) -> pd.DataFrame:
    """Up to ``count`` studies of the test split (of any split if it has none), those with
    the most positive ``labels`` first; ties by study id."""
    pool = studies[studies["split"] == "test"]
    if pool.empty:
        pool = studies
    positives = pool[list(labels)].fillna(0).sum(axis=1) if labels else pd.Series(0, index=pool.index)
    ranked = pool.assign(_order=-positives)
    return ranked.sort_values(["_order", "study_id"], kind="stable").head(count).drop(columns="_order")


def _positive_labels(study: pd.Series, labels: Sequence[str]) -> str:
    positive = [name for name in labels if study[name] == 1]
    if not positive:
        return "no positive label"
    return ", ".join(positive[:2]) + (f" +{len(positive) - 2}" if len(positive) > 2 else "")


def radiograph_figure(path: str | Path, folder: RadiographFolder, studies: pd.DataFrame) -> Path:
    """The images of each row of ``studies`` (a selection of ``folder.studies``), one row per study."""
    if studies.empty:
        raise ValueError("no radiograph studies to plot")
    rendered = folder.source == "rendered"
    rows = [folder.images.index[folder.images["study_id"] == study_id][:MAX_IMAGES_PER_STUDY]
            for study_id in studies["study_id"]]
    columns = max(len(images) for images in rows)
    with sns.axes_style("white"):
        figure = _new_figure(2.4 * columns, 2.5 * len(studies))
        axes = figure.subplots(len(studies), columns, squeeze=False)
        for row, ((_, study), images) in enumerate(zip(studies.iterrows(), rows)):
            for column in range(columns):
                ax = axes[row, column]
                _image_axis(ax)
                if column >= len(images):
                    ax.axis("off")
                    continue
                image_row = int(images[column])
                view = folder.images.at[image_row, "view"]
                ax.imshow(np.asarray(folder.pixels[image_row], np.float32), cmap="gray", vmin=0.0, vmax=1.0,
                          interpolation="nearest")
                if folder.masks is not None and folder.masks[image_row].any():
                    ax.contour(np.asarray(folder.masks[image_row]), levels=[0.5], colors=_MASK_COLOUR, linewidths=0.8)
                centre = (study.get(f"{view}_row"), study.get(f"{view}_col"))
                if rendered and not any(c is None or pd.isna(c) for c in centre):
                    ax.plot(centre[1], centre[0], marker="+", color=_MASK_COLOUR, markersize=9, markeredgewidth=1.2)
                if row == 0 or not rendered:
                    ax.set_title(view, fontsize=9)
                if column == 0:
                    ax.set_ylabel(f"{study['study_id']}\n{_positive_labels(study, folder.label_names)}", fontsize=8)
        if rendered:
            figure.suptitle("Radiographs rendered from CT\nnodules outlined, + the largest one's centre", fontsize=10)
        else:
            figure.suptitle(f"{folder.source} radiographs (test-split studies)", fontsize=10)
    return save_figure(figure, path)


def radiograph_section(radiographs_dir: str | Path, figures_dir: str | Path,
                       num_studies: int) -> tuple[list[tuple[str, Path]], list[str], str | None]:
    """(captioned figures, skipped notes, the folder's source) of the radiographs folder;
    the source (``rendered`` or a dataset, as ``radiographs.json`` records it) is ``None``
    when there is no folder."""
    try:
        folder = open_radiograph_folder(radiographs_dir)
    except RadiographsNotFoundError as error:
        return [], [f"Radiographs: {error}"], None
    studies = folder.studies
    chosen = choose_studies(studies, folder.label_names, num_studies)
    path = radiograph_figure(Path(figures_dir) / "radiographs.png", folder, chosen)
    if folder.source == "rendered":
        with_nodule = int((studies["nodule"] == 1).sum())
        caption = (f"Radiographs rendered from CT: {len(studies)} two-view studies ({with_nodule} with a nodule), "
                   "test-split examples; head at the top, the patient's right on the left of the frontal view, "
                   "anterior on the left of the lateral view")
    else:
        skipped = int(folder.info.get("skipped_images", 0))
        caption = (f"{folder.source} radiographs: {len(studies)} studies, {len(folder.images)} images"
                   + (f" ({skipped} listed images skipped, see {Path(radiographs_dir) / 'skipped.csv'})" if skipped
                      else "")
                   + f"; test-split examples with their positive labels among {len(folder.label_names)}")
    return [(caption, path)], [], folder.source


# ------------------------------------------------------------ pretraining on radiographs

#: Up to this many labels, the probe table shows AUROC, AUPRC and F1 per label; beyond, AUROC only.
MAX_LABELS_ALL_METRICS = 4
#: The probe curve every pretraining run logs (:class:`chestssl.eval.linear_probe.LinearProbeMonitor`).
PROBE_CURVE = "probe/mean_auroc"


@dataclass(frozen=True)
class ProbeLevel:
    """One level of radiograph pretraining in the report: its stage, methods and outputs.

    ``label``: the panel title (e.g. ``image level``); ``stage``: the foreach stage
    (``pretrain_radiographs``); ``list_key``: the params list naming its methods;
    ``names``: those methods; ``report_dir_of(name)``: the stage's report folder
    (``metrics.json``, ``live/``); ``table_name``, ``table_title``: its probe table;
    ``items``: what one probed item is (``images``, ``studies``).
    """

    label: str
    stage: str
    list_key: str
    names: Sequence[str]
    report_dir_of: Callable[[str], Path]
    table_name: str
    table_title: str
    items: str = "images"


def probe_curves_figure(path: str | Path, panels: Mapping[str, Mapping[str, pd.DataFrame]], title: str) -> Path:
    """Validation linear-probe mean AUROC vs optimisation step (seed 004's plot).

    ``panels``: panel title -> {method: curve (``step``, ``value``)}; one panel per level
    (image, study), side by side on one y axis, one line per method, the same method in
    the same colour in every panel.
    """
    panels = {label: curves for label, curves in panels.items() if curves}
    if not panels:
        raise ValueError("no probe curves to plot")
    methods = list(dict.fromkeys(name for curves in panels.values() for name in curves))
    colours = dict(zip(methods, sns.color_palette("deep", len(methods))))
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = _new_figure(1.0 + 4.5 * len(panels), 3.4)
        axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        for ax, (label, curves) in zip(axes, panels.items()):
            for name, frame in curves.items():
                ax.plot(frame["step"], frame["value"], color=colours[name], label=name,
                        marker="o" if len(frame) < 30 else None, markersize=3)
            ax.set_xlabel("step")
            ax.set_title(label)
            ax.legend(fontsize="small")
        axes[0].set_ylabel("probe mean AUROC (val)")
        figure.suptitle(title)
    return save_figure(figure, path)


def probe_columns(probed: Mapping[str, tuple[Mapping[str, Any], str]]) -> dict[str, Any]:
    """The ``labels`` and ``metrics`` arguments of ``linear_probe_table`` for radiograph probes.

    The labels are those the runs record (``labels`` of their ``metrics.json``, the
    radiographs folder's); the rendered ones keep the CT probe's headers. With more than
    :data:`MAX_LABELS_ALL_METRICS` labels (a dataset's 14 findings) only AUROC is shown.
    """
    from chestssl.report.probes import PROBE_LABELS, PROBE_METRICS

    names = list(dict.fromkeys(label for metrics, _ in probed.values() for label in metrics.get("labels", [])))
    if not names or names == list(PROBE_LABELS):
        return {"labels": PROBE_LABELS, "metrics": PROBE_METRICS}
    shown = PROBE_METRICS if len(names) <= MAX_LABELS_ALL_METRICS else PROBE_METRICS[:1]
    return {"labels": {name: name for name in names}, "metrics": shown}


def probe_cost_note(*stages: str) -> str:
    """The footnote of a probe table's cost columns: a row is a linear probe of a frozen
    encoder, so its cost is the training of that encoder by one of ``stages``."""
    trained_by = " or ".join(f"`{stage}@<entry>`" for stage in stages)
    return (f"Cost columns: training the row's encoder ({trained_by}, its `cost.json`); the linear probe "
            "fitted on its frozen features is not included.")


def radiograph_pretraining_section(
    levels: Sequence[ProbeLevel], entries: Mapping[str, Any], figures_dir: str | Path,
    costs: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> tuple[list, list[tuple[str, Path]], list[str]]:
    """(tables, captioned figures, skipped notes) of radiograph pretraining at each of ``levels``.

    One probe table per level with methods, and one figure of the probe curves with a
    panel per level; ``entries`` are the validated ``methods`` entries. ``costs``:
    ``<level.stage>@<entry>`` -> that stage's ``cost.json`` or ``None``; each table's cost
    columns show the training of the row's encoder (``n/a`` without a file); without
    ``costs``, no cost columns.
    """
    from chestssl.report.figures import read_live_metrics
    from chestssl.report.probes import linear_probe_table
    from chestssl.report.tables import with_costs

    tables, panels, skipped = [], {}, []
    for level in levels:
        if not level.names:
            skipped.append(f"Pretraining on radiographs ({level.label}): `{level.list_key}` is empty.")
            continue
        probed, curves = {}, {}
        for name in level.names:
            report_dir = Path(level.report_dir_of(name))
            probed[name] = (json.loads((report_dir / "metrics.json").read_text()), str(report_dir / "metrics.json"))
            live = read_live_metrics(report_dir / "live")
            if PROBE_CURVE in live:
                curves[name] = live[PROBE_CURVE]
            else:
                skipped.append(f"Probe curve of `{level.stage}@{name}`: not logged (nothing trained, or "
                               "`probe.every_epochs` is 0).")
        table = linear_probe_table(probed, entries, name=level.table_name, title=level.table_title,
                                   items=level.items, **probe_columns(probed))
        if costs is not None:
            stages = [f"{level.stage}@{entry}" for entry in table.numbers.get("entry", [])]
            table = with_costs(table, costs, stages, note=probe_cost_note(level.stage))
        tables.append(table)
        panels[level.label] = curves
    captioned = []
    if any(panels.values()):
        path = probe_curves_figure(Path(figures_dir) / "radiograph_probe_curves.png", panels,
                                   "Linear probe during pretraining on radiographs")
        captioned.append(("Pretraining on radiographs: validation linear probe vs step, "
                          + " and ".join(label for label, curves in panels.items() if curves), path))
    return tables, captioned, skipped
