"""The table of classifiers fine-tuned on radiographs (stage ``finetune_radiographs@<run>``, seeds 001, 002).

One row per ``radiograph_runs`` entry: what was trained (a linear head on a pretrained
encoder, or DenseNet-121 from scratch; on images as given or STN-aligned), the test mean
AUROC over the labels and each label's AUROC with their patient-bootstrap intervals, the
accuracy where each image has one label, the test images and patients, and the seed's
number for the same protocol on its own data (``published.yaml``, table
``radiograph_finetune``) with the difference named in a footnote.
"""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from chestssl.report.published import published
from chestssl.report.tables import Table, format_interval

TABLE_NAME = "radiograph_finetune"


def _seed_record(run: Mapping[str, Any]):
    """The seed's published number for the run's protocol, or ``None``."""
    if run["arch"] == "linear":
        return published()["radiograph_finetune.linear.accuracy"]
    condition = "aligned" if run["aligned"] else "unaligned"
    return published()[f"radiograph_finetune.densenet121_{condition}.mean_auroc"]


def _network(run: Mapping[str, Any]) -> str:
    trained = (f"linear head on `{run['init']}`, whole network" if run["arch"] == "linear"
               else "DenseNet-121 from scratch")
    return f"{trained}; {'STN-aligned' if run['aligned'] else 'as given'}"


def radiograph_finetune_table(metrics: Mapping[str, tuple[Mapping[str, Any], str]],
                              runs: Mapping[str, Mapping[str, Any]], data_note: str) -> Table:
    """The table (module docstring) of the runs in ``metrics``.

    Args:
        metrics: run name -> (its ``metrics.json``, that file's path for errors), in row order.
        runs: the ``radiograph_runs`` params entries.
        data_note: what the radiographs are (named in the seed column's footnote), e.g.
            "radiographs rendered from the phantom CT, labels nodule and malignant".
    """
    footnotes: list[str] = []
    cell_notes: list[str] = []
    prefix = TABLE_NAME.replace("_", "-")

    def footnote(note: str) -> str:
        if note not in footnotes:
            footnotes.append(note)
        return f"[^{prefix}-{footnotes.index(note) + 1}]"

    number_rows, text_rows = [], []
    for name, (result, source) in metrics.items():
        test = result.get("test")
        if not isinstance(test, Mapping) or "mean_auroc" not in test or "auroc" not in test:
            raise KeyError(f"{source}: no `test` metrics with `mean_auroc` and `auroc`; rerun finetune_radiographs@{name}")
        run = runs[name]
        numbers: dict[str, Any] = {"run": name, "arch": run["arch"], "init": run["init"], "aligned": run["aligned"],
                                   "mode": run["mode"]}
        text: dict[str, str] = {"Run": f"`{name}`", "Network; images": _network(run)}
        cells = [("mean AUROC", "mean_auroc", test["mean_auroc"])]
        cells += [(f"AUROC {label}", f"auroc_{label}", entry) for label, entry in test["auroc"].items()]
        if "accuracy" in test:
            cells.append(("Accuracy", "accuracy", test["accuracy"]))
        for header, key, entry in cells:
            value, low, high = entry["value"], entry["ci_low"], entry["ci_high"]
            numbers.update({key: value, f"{key}_ci_low": low, f"{key}_ci_high": high})
            cell = format_interval(value, low, high)
            if entry.get("note"):
                cell += footnote(entry["note"])
                if value is None or low is None:
                    cell_notes.append(f"`{name}`, {header}: {entry['note']}")
            text[header] = cell
        numbers.update(n_images=test["n_images"], n_patients=test["n_patients"])
        text["Test images / patients"] = f"{test['n_images']} / {test['n_patients']}"
        record = _seed_record(run)
        numbers["seed_value"] = record.number
        text["Seed's number (other data)"] = (
            f"seed {record.seed}: {record.value} {record.metric}"
            + footnote(f"Seed {record.seed}, {record.row}: {record.dataset}. {record.protocol} Ours: {data_note}, "
                       f"mode {run['mode']} ({len(result.get('labels', []))} labels); the numbers are not comparable."))
        number_rows.append(numbers)
        text_rows.append(text)
    text_frame = pd.DataFrame(text_rows).fillna("—")
    return Table(TABLE_NAME, "Classifiers fine-tuned on radiographs (seeds 001, 002)", pd.DataFrame(number_rows),
                 text_frame, footnotes, cell_notes)
