"""Report tables of the DAE's cross-modal contrastive term (seed 003; stage ``pretrain_cross_modal``).

Each DAE entry of ``cross_modal.methods`` has two encoders: ``pretrain@<entry>`` (CT
slices only, the contrastive term inactive) and ``pretrain_cross_modal@<entry>`` (CT
slices mixed with radiographs, the term active). The stage probes both the same way on
both modalities (:func:`chestssl.eval.radiograph_probe.both_modalities_probe`); here they
become two tables, one per probed modality, two rows per entry, each row with the cost
of training its encoder (``pretrain@`` or ``pretrain_cross_modal@``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from chestssl.report.probes import PROBE_LABELS, PROBE_METRICS, linear_probe_table
from chestssl.report.radiograph_figures import probe_columns
from chestssl.report.tables import Table, with_costs

#: (key of the encoder in the stage's ``probe`` results, how a row names it, the stage that trained it).
ENCODERS = (("ct_only", "{name} (CT only)", "pretrain"),
            ("cross_modal", "{name} + radiographs", "pretrain_cross_modal"))
#: The footnote of the cost columns: a row is a probe of a frozen encoder.
COST_NOTE = ("Cost columns: training the row's encoder, `pretrain@<entry>` (CT only) or "
             "`pretrain_cross_modal@<entry>` (CT + radiographs), each its stage's `cost.json`; the linear probe "
             "fitted on its frozen features is not included.")


def read_cross_modal_metrics(
    names: Sequence[str], report_dir_of: Callable[[str], Path]
) -> dict[str, tuple[Mapping[str, Any], str]]:
    """``{entry: (metrics, path)}`` of each entry's ``metrics.json`` in ``report_dir_of(entry)``."""
    sources = {name: Path(report_dir_of(name)) / "metrics.json" for name in names}
    return {name: (json.loads(source.read_text()), str(source)) for name, source in sources.items()}


def cross_modal_tables(
    crossed: Mapping[str, tuple[Mapping[str, Any], str]],
    entries: Mapping[str, Mapping[str, Any]],
    costs: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> tuple[list[Table], list[str]]:
    """(tables, skipped notes): the CT and radiograph probes of every entry's two encoders.

    Args:
        crossed: :func:`read_cross_modal_metrics` of ``cross_modal.methods``.
        entries: the validated ``methods`` entries by name.
        costs: training stage (``pretrain@<entry>``, ``pretrain_cross_modal@<entry>``) -> its
            ``cost.json`` or ``None``: each row's cost columns show the training of its
            encoder (:data:`COST_NOTE`), ``n/a`` without a file; without ``costs``, no cost
            columns.
    """
    if not crossed:
        return [], ["Cross-modal contrastive term: `cross_modal.methods` is empty."]
    by_modality: dict[str, dict[str, tuple[Mapping[str, Any], str]]] = {"ct": {}, "radiograph": {}}
    row_entries: dict[str, Mapping[str, Any]] = {}
    row_stages: dict[str, str] = {}
    for name, (metrics, source) in crossed.items():
        for key, label, stage in ENCODERS:
            row = label.format(name=name)
            row_entries[row] = entries[name]
            row_stages[row] = f"{stage}@{name}"
            for modality in by_modality:
                by_modality[modality][row] = ({"probe": metrics["probe"][key][modality],
                                               "labels": metrics.get("labels", [])}, source)
    tables = [
        linear_probe_table(by_modality["ct"], row_entries, name="cross_modal_probe_ct",
                           title="Linear probe on CT slices: DAE on CT only vs on CT + radiographs (test slices)",
                           labels=PROBE_LABELS, metrics=PROBE_METRICS),
        linear_probe_table(by_modality["radiograph"], row_entries, name="cross_modal_probe_radiographs",
                           title="Linear probe on radiographs: DAE on CT only vs on CT + radiographs (test views)",
                           **probe_columns(by_modality["radiograph"])),
    ]
    if costs is not None:
        tables = [with_costs(table, costs, [row_stages[row] for row in table.numbers["entry"]], note=COST_NOTE)
                  for table in tables]
    return tables, []


def contrastive_activity(crossed: Mapping[str, tuple[Mapping[str, Any], str]]) -> str:
    """One sentence per entry of :func:`read_cross_modal_metrics`: in how many training
    steps the term acted, and the mix it saw."""
    sentences = []
    for name, (metrics, _) in crossed.items():
        items = metrics.get("items", {}).get("train", {})
        sentences.append(
            f"`pretrain_cross_modal@{name}`: the term acted in {metrics.get('mm_con_active_steps', 0)} of "
            f"{metrics.get('steps', 0)} training steps; an epoch held {items.get('ct', '?')} CT slices and "
            f"{items.get('radiograph', '?')} radiograph items ({items.get('radiographs', '?')} distinct "
            "radiographs, repeated)."
        )
    return " ".join(sentences)
