"""Result tables from metrics files: CSV (numbers) and Markdown (``0.812 [0.790, 0.835]``).

Each table has one row per pretraining method or fine-tuning run. The CSV keeps every
number in its own column (``<metric>``, ``<metric>_ci_low``, ``<metric>_ci_high``) for
further analysis; the Markdown shows ``value [ci_low, ci_high]`` and turns a missing
value or interval into ``n/a`` with a footnote quoting the metrics file's note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pandas as pd


@dataclass(frozen=True)
class Column:
    """A metric column: ``key`` in the metrics file, ``header`` shown, decimals shown."""

    key: str
    header: str
    digits: int = 3


RECONSTRUCTION_COLUMNS = (
    Column("ssim", "SSIM"),
    Column("psnr", "PSNR (dB)", 2),
    Column("l1", "L1", 4),
)
SEGMENTATION_COLUMNS = (
    Column("dice_global", "Dice (global)"),
    Column("dice_per_image", "Dice (per image)"),
    Column("dice_per_image_nonempty", "Dice (per nodule image)"),
    Column("jaccard_global", "Jaccard (global)"),
    Column("jaccard_per_image", "Jaccard (per image)"),
)
CLASSIFICATION_COLUMNS = (
    Column("accuracy", "Accuracy"),
    Column("precision", "Precision"),
    Column("recall", "Recall"),
    Column("f1", "F1"),
    Column("auroc", "AUROC"),
)


@dataclass
class Table:
    """One table: ``numbers`` for the CSV, ``text`` (formatted cells) and footnotes for Markdown."""

    name: str
    title: str
    numbers: pd.DataFrame
    text: pd.DataFrame
    footnotes: list[str] = field(default_factory=list)
    #: One line per cell shown without a value or without an interval, with the reason.
    cell_notes: list[str] = field(default_factory=list)

    @property
    def footnote_prefix(self) -> str:
        return self.name.replace("_", "-")

    def markdown(self) -> str:
        """A GitHub-flavoured Markdown pipe table followed by its footnotes."""
        headers = list(self.text.columns)
        lines = ["| " + " | ".join(_escape(h) for h in headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
        for _, row in self.text.iterrows():
            lines.append("| " + " | ".join(_escape(str(row[h])) for h in headers) + " |")
        if self.footnotes:
            lines.append("")
            lines.extend(
                f"[^{self.footnote_prefix}-{i}]: {_escape(note)}" for i, note in enumerate(self.footnotes, start=1)
            )
        return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def format_interval(value: float | None, low: float | None, high: float | None, digits: int = 3) -> str:
    """``0.812 [0.790, 0.835]``; ``0.812`` without an interval; ``n/a`` without a value."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    if low is not None and high is not None:
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def format_seed_spread(spread: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``0.801 ± 0.012 (3 seeds)`` from a ``training_seeds`` metric summary; ``""`` without one."""
    if not spread or spread.get("mean") is None:
        return ""
    sd = spread.get("sd")
    text = f"{spread['mean']:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")
    return f"{text} ({spread['n']} seed{'s' if spread['n'] != 1 else ''})"


def _metric(metrics: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    entry = metrics.get(key)
    if not isinstance(entry, Mapping) or not {"value", "ci_low", "ci_high"} <= set(entry):
        raise KeyError(
            f"{source}: metric {key!r} missing or not of the form {{value, ci_low, ci_high}}; "
            "rerun its evaluate stage with the current code"
        )
    return entry


def build_table(
    name: str,
    title: str,
    rows: Sequence[tuple[Mapping[str, Any], Mapping[str, Any], str]],
    columns: Sequence[Column],
    items: str = "images",
) -> Table:
    """Build a table.

    Args:
        name: file stem under ``tables/`` (also the footnote prefix).
        title: the table's heading in the README.
        rows: ``(descriptors, metrics, source)`` per row: descriptor columns shown as they
            are (e.g. run, arch, init), the metrics mapping of one metrics file, and that
            file's path for error messages.
        columns: the metrics to show.
        items: what the metrics' ``n_images`` counts, named in the last column
            (``Test <items> / patients``).
    """
    footnotes: list[str] = []
    cell_notes: list[str] = []
    number_rows, text_rows = [], []
    for descriptors, metrics, source in rows:
        numbers = dict(descriptors)
        text = {k: str(v) for k, v in descriptors.items()}
        row_label = next(iter(text.values()), source)
        notes = []
        spreads = (metrics.get("training_seeds") or {}).get("metrics") or {}
        for column in columns:
            entry = _metric(metrics, column.key, source)
            numbers[column.key] = entry["value"]
            numbers[f"{column.key}_ci_low"] = entry["ci_low"]
            numbers[f"{column.key}_ci_high"] = entry["ci_high"]
            cell = format_interval(entry["value"], entry["ci_low"], entry["ci_high"], column.digits)
            note = entry.get("note")
            if note:
                notes.append(f"{column.key}: {note}")
                if entry["value"] is None or entry["ci_low"] is None:
                    cell_notes.append(f"`{row_label}`, {column.header}: {note}")
                if note not in footnotes:
                    footnotes.append(note)
                cell += f"[^{name.replace('_', '-')}-{footnotes.index(note) + 1}]"
            elif entry["value"] is None or entry["ci_low"] is None:
                raise ValueError(f"{source}: metric {column.key!r} lacks a value or interval and gives no note why")
            if spreads:
                spread = spreads.get(column.key) or {}
                numbers[f"{column.key}_seeds_mean"] = spread.get("mean")
                numbers[f"{column.key}_seeds_sd"] = spread.get("sd")
                if format_seed_spread(spread, column.digits):
                    cell += "; " + format_seed_spread(spread, column.digits)
            text[column.header] = cell
        if spreads:
            numbers["training_seeds"] = len(metrics["training_seeds"].get("seeds") or [])
        numbers["n_images"] = metrics.get("n_images")
        numbers["n_patients"] = metrics.get("n_patients")
        numbers["notes"] = "; ".join(notes)
        text[f"Test {items} / patients"] = f"{metrics.get('n_images')} / {metrics.get('n_patients')}"
        number_rows.append(numbers)
        text_rows.append(text)
    return Table(name, title, pd.DataFrame(number_rows), pd.DataFrame(text_rows), footnotes, cell_notes)


def _with_note(entry: Mapping[str, Any], note: str) -> dict[str, Any]:
    """A copy of a metric entry with ``note`` added to any note it has."""
    earlier = entry.get("note")
    return {**entry, "note": f"{earlier}; {note}" if earlier else note}


def reconstruction_table(
    metrics_by_method: Mapping[str, tuple[Mapping[str, Any], str]], notes: Mapping[str, str] | None = None
) -> Table:
    """Reconstruction quality of each pretraining method on the test split.

    ``notes``: a caveat per method, footnoted on each of its cells (e.g. a masked
    autoencoder whose output keeps the visible input).
    """
    notes = notes or {}
    rows = []
    for method, (metrics, source) in metrics_by_method.items():
        if method in notes:
            metrics = {**metrics, **{column.key: _with_note(metrics[column.key], notes[method])
                                     for column in RECONSTRUCTION_COLUMNS if column.key in metrics}}
        rows.append(({"method": method}, metrics, source))
    return build_table("reconstruction", "Reconstruction (test split)", rows, RECONSTRUCTION_COLUMNS)


def segmentation_table(
    metrics_by_run: Mapping[str, tuple[Mapping[str, Any], str]], run_params: Mapping[str, Mapping[str, Any]]
) -> Table:
    """Nodule segmentation of each fine-tuning run on the test split."""
    rows = []
    for run, (metrics, source) in metrics_by_run.items():
        params = run_params[run]
        descriptors = {"run": run, "arch": params.get("arch", ""), "init": params.get("init", ""), "loss": params.get("loss", "")}
        rows.append((descriptors, metrics, source))
    return build_table("segmentation", "Nodule segmentation (test split)", rows, SEGMENTATION_COLUMNS)


def classification_table(
    metrics_by_run: Mapping[str, tuple[Mapping[str, Any], str]], run_params: Mapping[str, Mapping[str, Any]]
) -> Table:
    """Nodule-slice classification of each fine-tuning run on the test split."""
    rows = []
    for run, (metrics, source) in metrics_by_run.items():
        params = run_params[run]
        descriptors = {"run": run, "arch": params.get("arch", ""), "init": params.get("init", "")}
        rows.append((descriptors, metrics, source))
    return build_table("classification", "Nodule-slice classification (test split)", rows, CLASSIFICATION_COLUMNS)


#: The cost columns beside the scores (keys of a training stage's ``cost.json``).
COST_HEADERS = {"parameters": "Parameters", "steps": "Steps", "train_seconds": "Training time",
                "peak_memory_gb": "Peak memory (GB)"}


def total_cost(fits: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """What several fits of one stage cost together, in the keys of :data:`COST_HEADERS`:
    steps and training time summed, the largest parameter count and peak memory (a key no
    fit records is ``None``); ``None`` without fits."""
    if not fits:
        return None

    def known(key: str) -> list[float]:
        return [fit[key] for fit in fits if fit.get(key) is not None]

    total: dict[str, Any] = {}
    for key, combine in (("parameters", max), ("steps", sum), ("train_seconds", sum), ("peak_memory_gb", max)):
        values = known(key)
        total[key] = combine(values) if values else None
    if total["train_seconds"] is not None:
        total["train_seconds"] = round(total["train_seconds"], 1)
    total["fits"] = len(fits)
    return total


def format_count(value: float) -> str:
    """``2480000`` -> ``2.48M`` (three significant digits and k, M or G)."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:g}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def with_costs(table: Table, costs: Mapping[str, Mapping[str, Any] | None],
               keys: Sequence[str | None] | None = None, note: str | None = None) -> Table:
    """``table`` with what each row's training cost (:data:`COST_HEADERS`), looked up by the
    row's first column (a run or method name), or by ``keys`` (one per row, ``None`` for a
    row without a training stage); ``n/a`` where a row has no cost file.

    A cost is that of the row's own training stage (e.g. the fine-tuning, not the
    pretraining it started from); ``peak_memory_gb`` is the stage process's peak resident
    size on a CPU, the peak of allocated CUDA memory on a GPU. ``note``: a footnote,
    referenced from the first cost header, saying which stage's cost the columns show
    where that is not plain (e.g. a probe of a frozen encoder shows the encoder's training).
    """
    numbers, text = table.numbers.copy(), table.text.copy()
    names = [str(name) for name in text[text.columns[0]]] if keys is None else list(keys)
    if len(names) != len(text):
        raise ValueError(f"{table.name}: {len(names)} cost keys for {len(text)} rows")
    footnotes = list(table.footnotes)
    reference = ""
    if note:
        if note not in footnotes:
            footnotes.append(note)
        reference = f"[^{table.footnote_prefix}-{footnotes.index(note) + 1}]"
    for key, header in COST_HEADERS.items():
        values, cells = [], []
        for name in names:
            cost = (costs.get(name) if name is not None else None) or {}
            value = cost.get(key)
            values.append(value)
            if value is None:
                cells.append("n/a")
            elif key == "parameters":
                cells.append(format_count(float(value)))
            elif key == "steps":
                cells.append(f"{int(value):,}")
            elif key == "train_seconds":
                cells.append(_duration(float(value)))
            else:
                cells.append(f"{float(value):.2f}")
        numbers[key] = values
        text[header + (reference if key == next(iter(COST_HEADERS)) else "")] = cells
    return Table(table.name, table.title, numbers, text, footnotes, list(table.cell_notes))
