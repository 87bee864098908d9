"""The report's figure and table of the STN alignment experiment (seed 002, stage ``align_radiographs``).

- :func:`alignment_figure`: one row per test radiograph: the misaligned input, the STN's
  output and the canonical chest it aligns to (``examples.npz`` of
  :func:`chestssl.pipeline.align_radiographs.align_radiographs`).
- :func:`alignment_table`: linear-probe AUROC per label without and with alignment, their
  difference, the radiographs as rendered for reference, and seed 002's published numbers
  (other data and model) quoted beside ours; the STN's parameter error in a footnote, and
  what training the STN cost beside every row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import seaborn as sns

from chestssl.report.figures import _image_axis, _new_figure, as_2d_images, save_figure
from chestssl.report.published import published
from chestssl.report.tables import Table, format_interval, with_costs

TABLE_NAME = "alignment"
TABLE_TITLE = "STN alignment (seed 002): linear-probe AUROC on the test radiographs, without vs with alignment"
#: The stage whose ``cost.json`` the table's cost columns show.
STAGE = "align_radiographs"
#: Seed 002's mean AUROC over 14 ChestX-ray14 labels with a fine-tuned DenseNet-121, without
#: and with alignment (records of ``published.yaml``), and on how many labels alignment helped.
SEED_AUROC = {condition: published()[f"alignment.{condition}.mean_auroc"] for condition in ("without", "with")}
SEED_LABELS_BETTER = published()["alignment.with.labels_better"]
SEED_NOTE = (
    "Seed 002's numbers: mean AUROC over 14 ChestX-ray14 labels (patient-level split) of a fine-tuned DenseNet-121, "
    f"{SEED_AUROC['without'].value} without and {SEED_AUROC['with'].value} with alignment, better on "
    f"{SEED_LABELS_BETTER.value} of 14 labels. Other data, labels and downstream model: "
    "compare the direction of the difference, not the values."
)
#: (metrics key, CSV column stem, Markdown header) of the AUROC columns.
_CONDITIONS = (
    ("without_alignment", "auroc_without", "Without alignment"),
    ("with_alignment", "auroc_with", "With alignment"),
    ("as_rendered", "auroc_as_rendered", "As rendered (reference)"),
)
_COLUMNS = ("input", "aligned", "canonical")
_COLUMN_TITLES = {"input": "input (misaligned)", "aligned": "aligned by the STN", "canonical": "canonical chest"}


# --------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------


def alignment_figure(path: str | os.PathLike, examples: Mapping[str, Any]) -> Path:
    """Rows: example test radiographs; columns: misaligned input, aligned output, canonical chest.

    ``examples``: ``input`` and ``aligned`` (K, H, W) or (K, 1, H, W), ``canonical``
    (H, W) or (1, H, W); optional ``study_id`` (K,) labels the rows, and ``before_px`` /
    ``after_px`` (K,) (corner displacement of the misalignment before / after the STN)
    title the input and aligned panels. Images are shown on one gray scale, [0, 1].
    """
    missing = [name for name in _COLUMNS if name not in examples]
    if missing:
        raise ValueError(f"alignment examples lack {', '.join(missing)}; expected the arrays of examples.npz "
                         "written by the align_radiographs stage (input, aligned, canonical)")
    inputs = as_2d_images(examples["input"], "examples['input']")
    aligned = as_2d_images(examples["aligned"], "examples['aligned']")
    canonical = np.asarray(examples["canonical"], dtype=np.float32)
    canonical = canonical[0] if canonical.ndim == 3 and canonical.shape[0] == 1 else canonical
    if canonical.ndim != 2:
        raise ValueError(f"examples['canonical']: expected (H, W) or (1, H, W), got shape {canonical.shape}")
    if len(inputs) == 0 or inputs.shape != aligned.shape:
        raise ValueError(f"examples['input'] {inputs.shape} and examples['aligned'] {aligned.shape}: expected the "
                         "same non-empty (K, H, W)")
    count = len(inputs)
    study_ids = [str(s) for s in np.asarray(examples.get("study_id", [f"example {i + 1}" for i in range(count)]))]
    before, after = examples.get("before_px"), examples.get("after_px")
    with sns.axes_style("white"):
        figure = _new_figure(2.2 * len(_COLUMNS), 2.3 * count)
        axes = figure.subplots(count, len(_COLUMNS), squeeze=False)
        for row in range(count):
            panels = {"input": inputs[row], "aligned": aligned[row], "canonical": canonical}
            for column, name in enumerate(_COLUMNS):
                ax = axes[row, column]
                ax.imshow(panels[name], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                _image_axis(ax)
                title = _COLUMN_TITLES[name] if row == 0 else ""
                if name == "input" and before is not None:
                    title = f"{title}\n{float(before[row]):.1f} px off".strip()
                elif name == "aligned" and after is not None:
                    title = f"{title}\n{float(after[row]):.1f} px off".strip()
                if title:
                    ax.set_title(title, fontsize=8)
                if column == 0:
                    ax.set_ylabel(study_ids[row], fontsize=8)
        figure.suptitle("STN alignment of test radiographs (seed 002)\n"
                        "px off: mean corner displacement from the unmoved radiograph", fontsize=9)
    return save_figure(figure, path)


# --------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------


def _signed(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def parameter_error_note(parameter_error: Mapping[str, Any]) -> str:
    """One sentence on how much of a known misalignment the STN undoes (``metrics["parameter_error"]``)."""
    moved, unmoved = parameter_error["misaligned"], parameter_error["not_misaligned"]
    return (
        f"STN parameter error on the {moved['n_images']} misaligned test radiographs: mean corner displacement "
        f"{moved['before_px']:.2f} px before and {moved['after_px']:.2f} px after alignment "
        f"({moved['fraction_undone']:.0%} of the misalignment undone); on the radiographs as rendered (not "
        f"misaligned) the STN moves the corners by {unmoved['displacement_px']:.2f} px on average."
    )


def alignment_table(metrics: Mapping[str, Any], source: str,
                    costs: Mapping[str, Mapping[str, Any] | None] | None = None) -> Table:
    """One row per probed label and one for their mean: AUROC without / with alignment, difference, seed 002.

    Args:
        metrics: ``metrics.json`` of the ``align_radiographs`` stage
            (:func:`chestssl.pipeline.align_radiographs.align_radiographs`): ``auroc`` per label
            (``without_alignment``, ``with_alignment``, ``as_rendered`` as ``{value,
            ci_low, ci_high[, note]}``, ``difference``, ``n_images``, ``n_patients``) and
            ``mean``; ``parameter_error``; ``protocol``.
        source: that file's path, named in errors.
        costs: ``align_radiographs`` -> its ``cost.json`` or ``None``: every row's cost
            columns show training the STN (``n/a`` without a file), a footnote says so;
            without ``costs``, no cost columns.

    Returns a :class:`~chestssl.report.tables.Table` named ``alignment``. Footnote 1 gives
    our protocol and seed 002's (referenced from the seed column), footnote 2 the STN's
    parameter error (referenced from the with-alignment column); cells without a value or
    interval get a footnote with the reason. The difference is that of the point estimates
    (with - without), without an interval.
    """
    for key in ("auroc", "parameter_error", "protocol"):
        if key not in metrics:
            raise KeyError(f"{source}: no {key!r}; rerun the align_radiographs stage with the current code")
    auroc = metrics["auroc"]
    labels = [label for label in auroc if label != "mean"]
    if not labels or "mean" not in auroc:
        raise KeyError(f"{source}: 'auroc' holds no per-label entries and 'mean'; rerun the align_radiographs stage")
    prefix = TABLE_NAME.replace("_", "-")
    footnotes = [f"Our protocol: {metrics['protocol']} {SEED_NOTE}", parameter_error_note(metrics["parameter_error"])]
    cell_notes: list[str] = []
    seed_header = f"Seed 002 mean AUROC, without / with (other data)[^{prefix}-1]"
    headers = {stem: header + (f"[^{prefix}-2]" if key == "with_alignment" else "")
               for key, stem, header in _CONDITIONS}

    def footnote(note: str) -> str:
        if note not in footnotes:
            footnotes.append(note)
        return f"[^{prefix}-{footnotes.index(note) + 1}]"

    number_rows, text_rows = [], []
    for label in labels:
        entry = auroc[label]
        numbers: dict[str, Any] = {"label": label}
        text: dict[str, str] = {"Label": label}
        notes = []
        for key, stem, _ in _CONDITIONS:
            interval = entry[key]
            value, low, high = interval["value"], interval["ci_low"], interval["ci_high"]
            numbers.update({stem: value, f"{stem}_ci_low": low, f"{stem}_ci_high": high})
            cell = format_interval(value, low, high)
            note = interval.get("note")
            if note:
                notes.append(f"{stem}: {note}")
                cell += footnote(note)
                if value is None or low is None:
                    cell_notes.append(f"`{label}`, {headers[stem]}: {note}")
            text[headers[stem]] = cell
        numbers["difference"] = entry["difference"]
        text["Difference (with - without)"] = _signed(entry["difference"])
        numbers.update(seed_auroc_without=None, seed_auroc_with=None, n_images=entry.get("n_images"),
                       n_patients=entry.get("n_patients"), notes="; ".join(notes))
        text[seed_header] = "—"
        text["Test images / patients"] = f"{entry.get('n_images')} / {entry.get('n_patients')}"
        number_rows.append(numbers)
        text_rows.append(text)

    mean = auroc["mean"]
    mean_note = "mean of the labels' point estimates; no interval"
    mean_numbers: dict[str, Any] = {"label": "mean"}
    mean_text: dict[str, str] = {"Label": "mean"}
    for key, stem, _ in _CONDITIONS:
        mean_numbers.update({stem: mean[key], f"{stem}_ci_low": None, f"{stem}_ci_high": None})
        mean_text[headers[stem]] = format_interval(mean[key], None, None) + footnote(mean_note)
    without, with_ = SEED_AUROC["without"], SEED_AUROC["with"]
    mean_numbers.update(difference=mean["difference"], seed_auroc_without=without.number,
                        seed_auroc_with=with_.number, n_images=None, n_patients=None, notes=mean_note)
    mean_text["Difference (with - without)"] = _signed(mean["difference"])
    mean_text[seed_header] = f"{without.value} / {with_.value} ({with_.number - without.number:+.4f})"
    mean_text["Test images / patients"] = ""
    number_rows.append(mean_numbers)
    text_rows.append(mean_text)
    table = Table(TABLE_NAME, TABLE_TITLE, pd.DataFrame(number_rows), pd.DataFrame(text_rows), footnotes, cell_notes)
    if costs is None:
        return table
    feature_method = metrics.get("feature_method", "<feature_method>")
    note = (f"Cost columns: training the STN (`{STAGE}`, its `cost.json`), the same for every row; the frozen "
            f"feature encoder was trained by `pretrain_radiographs@{feature_method}` (its cost is in the "
            "radiograph probe table), and the linear probes are not included.")
    return with_costs(table, costs, [STAGE] * len(text_rows), note=note)
