"""Report parts of seed 001's ablations, and the downstream results by pretraining method.

- :func:`label_fraction_figure`: test metric against the share of training patients or
  images (the ablation's ``unit``, named on the axis), one line per run (its ``init``)
  with the bootstrap interval as a band; seed 001 plotted accuracy against the share of
  its training images for Barlow Twins and scratch.
- :func:`label_fraction_table` / :func:`frozen_parts_table`: the same numbers as tables,
  with seed 001's published accuracies (records of ``published.yaml``) quoted beside ours
  where they exist, and what the trainings cost (the stage's ``cost.json``, one record per
  fit: a frozen-parts row is one fit, a label-fraction row the run's fits together).
- :func:`downstream_by_method_table`: one row per pretraining entry, one column per kind
  of downstream run (task, architecture, loss) plus the linear probe, so every method is
  read on the same tasks.

The seeds' numbers come from chest radiographs (4-class COVID-19 radiography), so the
columns say so rather than invite a direct comparison.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import seaborn as sns

from chestssl.report.figures import _new_figure, save_figure
from chestssl.report.probes import NO_SEED_NUMBER, SEED_NUMBERS
from chestssl.report.published import published
from chestssl.report.tables import Column, Table, build_table, total_cost, with_costs

#: The metric each task's ablation figure and tables show first (key, shown).
ABLATION_METRICS = {"cls": (("accuracy", "accuracy"), ("auroc", "AUROC")), "seg": (("dice_global", "Dice (global)"),),
                    # on radiographs (stages *_radiographs): accuracy only where one label per image
                    "radiograph_multiclass": (("accuracy", "accuracy"), ("mean_auroc", "mean AUROC")),
                    "radiograph_multilabel": (("mean_auroc", "mean AUROC"),)}
#: The metric of each task in the by-method table.
DOWNSTREAM_METRIC = {"cls": ("auroc", "AUROC"), "seg": ("dice_global", "Dice")}
#: What a label-fraction metrics file's ``unit`` is a share of (files without one are of patients).
FRACTION_UNITS = {"patients": "training patients", "images": "training images"}


def _label_fraction_quote(method: str, what: str) -> str:
    records = published().select(seed="001", table="label_fraction", row=method)
    shares = ", ".join(f"{record.setting} {record.value}" for record in records)
    return f"seed {records[0].seed} {what}: {shares} (COVID-19 radiography)"


#: Seed 001's label-fraction accuracies (4-class COVID-19 radiography), by pretext method.
SEED_LABEL_FRACTION = {
    "barlow_twins": _label_fraction_quote("barlow_twins", "accuracy"),
    "scratch": _label_fraction_quote("scratch", "accuracy (ResNet-18 from scratch)"),
}
#: Seed 001's frozen-parts accuracies after 15 epochs, by the number of ResNet stages trained
#: with fc (the seed's name of what trained is the record's row).
SEED_FROZEN_PARTS = {
    stages: f"{row}: {published().find(seed='001', table='frozen_parts', row=row).value}%"
    for stages, row in ((0, "fc only"), (2, "layer3-4 + fc"), (4, "layer1-4 + fc"))
}
SEED_FROZEN_NOTE = "seed 001 (Barlow Twins ResNet-18, COVID-19 radiography)"


def fraction_entries(ablation: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(key, entry)`` of a label-fraction metrics file by increasing fraction (JSON keys are sorted as text)."""
    return sorted(ablation["fractions"].items(), key=lambda item: item[1]["fraction"])


def fraction_unit(ablations: Mapping[str, Mapping[str, Any]]) -> str:
    """What the fractions of the label-fraction metrics files ``{run: metrics}`` are shares of
    (``training images`` or ``training patients``).

    Raises:
        ValueError: the files hold different units (rerun label_fraction).
    """
    units = {run: ablation.get("unit", "patients") for run, ablation in ablations.items()}
    if len(set(units.values())) > 1:
        listed = ", ".join(f"{run}: {unit}" for run, unit in units.items())
        raise ValueError(f"label-fraction results of different units ({listed}); rerun label_fraction")
    unit = next(iter(units.values()), "patients")
    if unit not in FRACTION_UNITS:
        raise ValueError(f"label-fraction unit {unit!r}: expected one of {', '.join(FRACTION_UNITS)}")
    return FRACTION_UNITS[unit]


def _missing(note: str) -> dict[str, Any]:
    return {"value": None, "ci_low": None, "ci_high": None, "note": note}


def label_fraction_figure(
    path: str | os.PathLike, ablations: Mapping[str, Mapping[str, Any]], task: str
) -> Path:
    """Metric vs share of training patients or images (the files' ``unit``; log axis), one
    line per run, the CI as a band.

    ``ablations``: ``{run: metrics of label_fraction@run}`` of one ``task`` and one unit.
    """
    metrics = ABLATION_METRICS[task]
    unit = fraction_unit(ablations)
    palette = sns.color_palette("deep", n_colors=max(len(ablations), 1))
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = _new_figure(max(4.2 * len(metrics), 6.4), 3.4)  # room for the two-line title over one panel
        axes = figure.subplots(1, len(metrics), squeeze=False)[0]
        for ax, (key, shown) in zip(axes, metrics):
            for colour, (run, ablation) in zip(palette, ablations.items()):
                entries = [entry for _, entry in fraction_entries(ablation)]
                x = np.array([100.0 * entry["fraction"] for entry in entries])
                value = np.array([_number(entry[key]["value"]) for entry in entries])
                low = np.array([_number(entry[key]["ci_low"]) for entry in entries])
                high = np.array([_number(entry[key]["ci_high"]) for entry in entries])
                ax.plot(x, value, "o-", color=colour, label=f"{ablation['init']} ({run})")
                ax.fill_between(x, low, high, color=colour, alpha=0.15, linewidth=0)
            ax.set_xscale("log")
            shares = sorted({100.0 * entry["fraction"] for ablation in ablations.values()
                             for entry in ablation["fractions"].values()})
            ax.set_xticks(shares, [f"{share:g}" for share in shares])
            ax.minorticks_off()
            ax.set_xlabel(f"share of {unit} (%)")
            ax.set_ylabel(f"test {shown}")
            ax.set_title(shown)
        axes[0].legend(fontsize="small", loc="best")
        figure.suptitle(f"Label-fraction ablation: test metric vs share of {unit}\n"
                        "(bands: confidence interval over test patients)")
    return save_figure(figure, path)


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _fits(costs: Mapping[str, Mapping[str, Any] | None], stage: str) -> Mapping[str, Mapping[str, Any]]:
    """The per-fit records (``{setting: cost}``) of ``stage``'s ``cost.json`` in ``costs``; none without one."""
    return (costs.get(stage) or {}).get("fits") or {}


def label_fraction_table(
    ablations: Mapping[str, tuple[Mapping[str, Any], str]], methods: Mapping[str, str], task: str, metric: str,
    costs: Mapping[str, Mapping[str, Any] | None] | None = None, stage: str = "label_fraction", data: str = "",
) -> Table:
    """One row per run, one column per fraction: the test ``metric`` with its interval.

    Args:
        ablations: ``{run: (metrics of label_fraction@run, path)}``, all of one ``task``,
            the same fractions and the same unit (named in the title).
        methods: pretext method (the ``method`` param) of each pretraining entry.
        costs: ``label_fraction@<run>`` -> its ``cost.json`` (``{"fits": {<setting>:
            cost}}``) or ``None``: each row's cost columns show all the run's fits together
            (:func:`~chestssl.report.tables.total_cost`: one fit per distinct share), ``n/a``
            without a file; without ``costs``, no cost columns.
        stage: the stage that wrote the metrics (``label_fraction``, or
            ``label_fraction_radiographs`` for ``radiograph_runs``).
        data: what the runs were trained and tested on, added to the title (e.g. the radiographs).
    """
    shown = dict(ABLATION_METRICS[task])[metric]
    unit = fraction_unit({run: ablation for run, (ablation, _) in ablations.items()})
    first = fraction_entries(next(iter(ablations.values()))[0])
    keys = [key for key, _ in first]
    columns = [Column(key, f"{100.0 * entry['fraction']:g}%") for key, entry in first]
    rows = []
    for run, (ablation, source) in ablations.items():
        if [key for key, _ in fraction_entries(ablation)] != keys:
            raise ValueError(f"{source}: fractions {list(ablation['fractions'])} differ from {keys}; rerun label_fraction")
        method = methods.get(ablation["init"], "")
        descriptors = {
            "run": run,
            "init": ablation["init"],
            "training patients": ", ".join(str(entry["n_train_patients"]) for _, entry in fraction_entries(ablation)),
            "training images": ", ".join(str(entry["n_train_images"]) for _, entry in fraction_entries(ablation)),
            "seed's number (other data)": SEED_LABEL_FRACTION.get(method, NO_SEED_NUMBER),
        }
        cells: dict[str, Any] = {key: dict(entry[metric]) for key, entry in ablation["fractions"].items()}
        test_counts = ablation["fractions"][keys[-1]]  # the same test split at every fraction
        cells["n_images"], cells["n_patients"] = test_counts.get("n_images"), test_counts.get("n_patients")
        rows.append((descriptors, cells, source))
    table = build_table(f"{stage}_{task}_{metric}" if stage != "label_fraction" else f"label_fraction_{task}_{metric}",
                        f"Label-fraction ablation: test {shown} by share of {unit}" + (f" ({data})" if data else ""),
                        rows, columns)
    if costs is None:
        return table
    stages = [f"{stage}@{run}" for run in ablations]
    return with_costs(table, {name: total_cost(list(_fits(costs, name).values())) for name in stages}, stages,
                      note=f"Cost columns: every training of the row's `{stage}@<run>` stage together (one per "
                           "distinct share; steps and training time summed, the largest peak memory); each "
                           f"training's own cost is in `reports/{stage}/<run>/cost.json`.")


def frozen_parts_table(
    ablations: Mapping[str, tuple[Mapping[str, Any], str]], methods: Mapping[str, str], backbones: Mapping[str, str],
    costs: Mapping[str, Mapping[str, Any] | None] | None = None, stage: str = "frozen_parts", data: str = "",
) -> Table:
    """One row per (run, setting): what trained, how many parameters, test accuracy and AUROC.

    Args:
        ablations: ``{run: (metrics of frozen_parts@run, path)}``.
        methods / backbones: pretext method and ``backbone.name`` of each pretraining entry.
        costs: ``frozen_parts@<run>`` -> its ``cost.json`` (``{"fits": {<setting>: cost}}``)
            or ``None``: each row's cost columns show its setting's fit, ``n/a`` without a
            record; without ``costs``, no cost columns.
        stage: the stage that wrote the metrics (``frozen_parts``, or ``frozen_parts_radiographs``
            for ``radiograph_runs``, whose columns are then the radiograph metrics of the runs' task).
        data: what the runs were trained and tested on, added to the title.
    """
    rows, fits = [], {}
    for run, (ablation, source) in ablations.items():
        init = ablation["init"]
        seed_applies = methods.get(init) == "barlow_twins" and backbones.get(init) == "resnet18"
        for key, entry in sorted(ablation["settings"].items(), key=lambda item: item[1]["unfrozen_stages"]):
            fits[f"{stage}@{run}/{key}"] = _fits(costs or {}, f"{stage}@{run}").get(key)
            seed = SEED_FROZEN_PARTS.get(entry["unfrozen_stages"]) if seed_applies else None
            descriptors = {
                "run": run,
                "init": ablation["init"],
                "trained": entry["label"],
                "trained parameters": entry["trainable_parameters"],
                "seed's number (other data)": f"{SEED_FROZEN_NOTE}: {seed}" if seed else NO_SEED_NUMBER,
            }
            rows.append((descriptors, entry, source))
    # CT runs: accuracy and AUROC; radiograph runs: the metrics of their task (ABLATION_METRICS).
    shown = {"accuracy": "Accuracy", "auroc": "AUROC"} if stage == "frozen_parts" else {
        key: title[0].upper() + title[1:] for task in sorted({ablation.get("task") for ablation, _ in ablations.values()})
        for key, title in ABLATION_METRICS[task]}
    columns = [Column(key, title) for key, title in shown.items()]
    table = build_table(stage, "Frozen-parts ablation: head only, then deeper encoder stages (test split)"
                        + (f" ({data})" if data else ""), rows, columns)
    if costs is None:
        return table
    return with_costs(table, fits, list(fits),
                      note=f"Cost columns: the row's own training, one of the fits of `{stage}@<run>` "
                           f"(`reports/{stage}/<run>/cost.json`); parameters count the frozen ones too.")


def _run_kind(run: Mapping[str, Any]) -> str:
    kind = f"{run['task']} {run['arch']}"
    return f"{kind} ({run['loss']})" if run["task"] == "seg" else kind


def downstream_by_method_table(
    entries: Mapping[str, Mapping[str, Any]],
    pretrain_metrics: Mapping[str, tuple[Mapping[str, Any], str]],
    runs: Mapping[str, Mapping[str, Any]],
    run_metrics: Mapping[str, tuple[Mapping[str, Any], str]],
    label_fraction: Mapping[str, tuple[Mapping[str, Any], str]] | None = None,
) -> Table:
    """One row per pretraining entry that some run starts from; one column per kind of run.

    Args:
        entries: the validated ``methods`` and ``multihead`` entries by name.
        pretrain_metrics: ``{entry: (metrics of evaluate_pretrain, path)}`` (for the probe).
        runs: the validated ``runs`` block; run_metrics: ``{run: (test metrics, path)}``.
        label_fraction: ``{run: (metrics of label_fraction@run, path)}``; adds the metric at
            the smallest fraction for the runs it holds.
    """
    label_fraction = label_fraction or {}
    kinds: dict[str, str] = {}
    for run in runs.values():
        task_metric = DOWNSTREAM_METRIC[run["task"]]
        kinds.setdefault(_run_kind(run), f"{_run_kind(run)}: {task_metric[1]}")
    smallest = None
    if label_fraction:
        smallest = fraction_entries(next(iter(label_fraction.values()))[0])[0][1]
        unit = fraction_unit({run: ablation for run, (ablation, _) in label_fraction.items()})
    columns = [Column("probe_nodule_auroc", "linear probe: nodule AUROC")]
    columns += [Column(kind, header) for kind, header in kinds.items()]
    if smallest is not None:
        columns.append(Column("fraction_auroc", f"{100 * smallest['fraction']:g}% of {unit}: AUROC"))
    inits = [name for name in entries if any(run["init"] == name for run in runs.values())]
    rows = []
    for name in inits:
        entry = entries[name]
        metrics_file, source = pretrain_metrics.get(name, ({}, f"reports/evaluate_pretrain/{name}/metrics.json"))
        probe = (metrics_file.get("probe") or {}).get("nodule")
        cells: dict[str, Any] = {}
        if isinstance(probe, Mapping) and "auroc" in probe:
            cells["probe_nodule_auroc"] = dict(probe["auroc"])
        else:
            cells["probe_nodule_auroc"] = _missing(str((probe or {}).get("skipped", "no linear probe of this entry")))
        for kind in kinds:
            cells[kind] = _missing("no run of this kind starts from this entry")
        for run_name, run in runs.items():
            if run["init"] != name:
                continue
            metric = DOWNSTREAM_METRIC[run["task"]][0]
            kind = _run_kind(run)
            if cells[kind].get("value") is None and run_name in run_metrics:
                cells[kind] = dict(run_metrics[run_name][0][metric])
            if smallest is not None and run_name in label_fraction:
                cells["fraction_auroc"] = dict(fraction_entries(label_fraction[run_name][0])[0][1]["auroc"])
        if smallest is not None:
            cells.setdefault("fraction_auroc", _missing("no label-fraction ablation of a run from this entry"))
        descriptors = {
            "pretraining": name,
            "method": entry["method"],
            "backbone": entry["backbone"]["name"],
            "seed's number (other data)": SEED_NUMBERS.get(entry["method"], NO_SEED_NUMBER),
        }
        rows.append((descriptors, {**cells, "n_images": None, "n_patients": None}, source))
    table = build_table("downstream_by_method", "Downstream results by pretraining method (test split)", rows, columns)
    table.text = table.text.drop(columns=["Test images / patients"], errors="ignore")  # absent without rows
    return table
