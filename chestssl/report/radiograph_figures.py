"""The report's figure of the radiographs rendered from CT (stage ``radiographs``).

Rows: test-split studies (those with a nodule first); columns: the frontal and the
lateral view, each with the projected nodule mask outlined and the largest nodule's
projected centre marked, so a reader can check that the rendering puts the CT's
annotations where they belong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns

from chestssl.report.figures import _image_axis, _new_figure, save_figure

_VIEWS = ("frontal", "lateral")
_MASK_COLOUR = "#e8413c"


def choose_studies(studies: pd.DataFrame, count: int) -> pd.DataFrame:
    """Up to ``count`` studies of the test split (of any split if it has none), those
    with a nodule first, the larger malignancy first among them; ties by scan id."""
    pool = studies[studies["split"] == "test"]
    if pool.empty:
        pool = studies
    ranked = pool.assign(_order=-pool["nodule"].astype(int) * 10 - pool["malignancy"].fillna(0))
    return ranked.sort_values(["_order", "scan_id"]).head(count).drop(columns="_order")


def radiograph_figure(path: str | Path, radiographs_dir: str | Path, studies: pd.DataFrame) -> Path:
    """Frontal and lateral view of each row of ``studies`` (a selection of ``studies.csv``)."""
    if studies.empty:
        raise ValueError("no radiograph studies to plot")
    radiographs_dir = Path(radiographs_dir)
    with sns.axes_style("white"):
        figure = _new_figure(2.4 * len(_VIEWS), 2.5 * len(studies))
        axes = figure.subplots(len(studies), len(_VIEWS), squeeze=False)
        for row, study in enumerate(studies.itertuples(index=False)):
            with np.load(radiographs_dir / "studies" / f"{study.scan_id}.npz") as arrays:
                views = {view: (arrays[view].astype(np.float32), arrays[f"{view}_mask"]) for view in _VIEWS}
            for column, view in enumerate(_VIEWS):
                image, mask = views[view]
                ax = axes[row, column]
                ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                if mask.any():
                    ax.contour(mask > 0, levels=[0.5], colors=_MASK_COLOUR, linewidths=0.8)
                centre = (getattr(study, f"{view}_row"), getattr(study, f"{view}_col"))
                if not any(pd.isna(c) for c in centre):
                    ax.plot(centre[1], centre[0], marker="+", color=_MASK_COLOUR, markersize=9, markeredgewidth=1.2)
                _image_axis(ax)
                if row == 0:
                    ax.set_title(view, fontsize=10)
                if column == 0:
                    label = f"{study.scan_id}\nnodule" if study.nodule else f"{study.scan_id}\nno nodule"
                    ax.set_ylabel(label, fontsize=8)
        figure.suptitle("Radiographs rendered from CT\nnodules outlined, + the largest one's centre", fontsize=10)
    return save_figure(figure, path)


def radiograph_section(radiographs_dir: str | Path, figures_dir: str | Path,
                       num_studies: int) -> tuple[list[tuple[str, Path]], list[str]]:
    """(captioned figures, skipped notes) of the rendered radiographs."""
    radiographs_dir = Path(radiographs_dir)
    table = radiographs_dir / "studies.csv"
    if not table.exists():
        return [], [f"Radiographs: {table} is missing; run `dvc repro radiographs`."]
    studies = pd.read_csv(table, dtype={"scan_id": str, "patient_id": str})
    if studies.empty:
        return [], ["Radiographs: no study was rendered."]
    chosen = choose_studies(studies, num_studies)
    path = radiograph_figure(Path(figures_dir) / "radiographs.png", radiographs_dir, chosen)
    with_nodule = int(studies["nodule"].astype(bool).sum())
    caption = (f"Radiographs rendered from CT: {len(studies)} two-view studies ({with_nodule} with a nodule), "
               "test-split examples; head at the top, the patient's right on the left of the frontal view, anterior "
               "on the left of the lateral view")
    return [(caption, path)], []


# ------------------------------------------------------------ pretraining on radiographs

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


def radiograph_pretraining_section(
    levels: Sequence[ProbeLevel], entries: Mapping[str, Any], figures_dir: str | Path,
) -> tuple[list, list[tuple[str, Path]], list[str]]:
    """(tables, captioned figures, skipped notes) of radiograph pretraining at each of ``levels``.

    One probe table per level with methods, and one figure of the probe curves with a
    panel per level; ``entries`` are the validated ``methods`` entries.
    """
    from chestssl.report.figures import read_live_metrics
    from chestssl.report.probes import linear_probe_table

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
        tables.append(linear_probe_table(probed, entries, name=level.table_name, title=level.table_title,
                                         items=level.items))
        panels[level.label] = curves
    captioned = []
    if any(panels.values()):
        path = probe_curves_figure(Path(figures_dir) / "radiograph_probe_curves.png", panels,
                                   "Linear probe during pretraining on radiographs")
        captioned.append(("Pretraining on radiographs: validation linear probe vs step, "
                          + " and ".join(label for label, curves in panels.items() if curves), path))
    return tables, captioned, skipped
