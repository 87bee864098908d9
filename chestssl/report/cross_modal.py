"""Report tables of the DAE's cross-modal contrastive term (seed 003; stage ``pretrain_cross_modal``).

Each DAE entry of ``cross_modal.methods`` has two encoders: ``pretrain@<entry>`` (CT
slices only, the contrastive term inactive) and ``pretrain_cross_modal@<entry>`` (CT
slices mixed with radiographs, the term active). The stage probes both the same way on
both modalities (:func:`chestssl.xray.cross_modal.both_modalities_probe`); here they
become two tables, one per probed modality, two rows per entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from chestssl.report.probes import PROBE_LABELS, PROBE_METRICS, linear_probe_table
from chestssl.report.radiograph_figures import probe_columns
from chestssl.report.tables import Table

#: (key of the encoder in the stage's ``probe`` results, how a row names it).
ENCODERS = (("ct_only", "{name} (CT only)"), ("cross_modal", "{name} + radiographs"))


def cross_modal_tables(
    names: Sequence[str],
    entries: Mapping[str, Mapping[str, Any]],
    report_dir_of: Callable[[str], Path],
) -> tuple[list[Table], list[str]]:
    """(tables, skipped notes): the CT and radiograph probes of every entry's two encoders.

    Args:
        names: ``cross_modal.methods``.
        entries: the validated ``methods`` entries by name.
        report_dir_of: the stage's report folder of an entry (holding ``metrics.json``).
    """
    if not names:
        return [], ["Cross-modal contrastive term: `cross_modal.methods` is empty."]
    by_modality: dict[str, dict[str, tuple[Mapping[str, Any], str]]] = {"ct": {}, "radiograph": {}}
    row_entries: dict[str, Mapping[str, Any]] = {}
    for name in names:
        source = Path(report_dir_of(name)) / "metrics.json"
        metrics = json.loads(source.read_text())
        for key, label in ENCODERS:
            row = label.format(name=name)
            row_entries[row] = entries[name]
            for modality in by_modality:
                by_modality[modality][row] = ({"probe": metrics["probe"][key][modality],
                                               "labels": metrics.get("labels", [])}, str(source))
    tables = [
        linear_probe_table(by_modality["ct"], row_entries, name="cross_modal_probe_ct",
                           title="Linear probe on CT slices: DAE on CT only vs on CT + radiographs (test slices)",
                           labels=PROBE_LABELS, metrics=PROBE_METRICS),
        linear_probe_table(by_modality["radiograph"], row_entries, name="cross_modal_probe_radiographs",
                           title="Linear probe on radiographs: DAE on CT only vs on CT + radiographs (test views)",
                           **probe_columns(by_modality["radiograph"])),
    ]
    return tables, []


def contrastive_activity(names: Sequence[str], report_dir_of: Callable[[str], Path]) -> str:
    """One sentence per entry: in how many training steps the term acted, and the mix it saw."""
    sentences = []
    for name in names:
        path = Path(report_dir_of(name)) / "metrics.json"
        if not path.exists():
            continue
        metrics = json.loads(path.read_text())
        items = metrics.get("items", {}).get("train", {})
        sentences.append(
            f"`pretrain_cross_modal@{name}`: the term acted in {metrics.get('mm_con_active_steps', 0)} of "
            f"{metrics.get('steps', 0)} training steps; an epoch held {items.get('ct', '?')} CT slices and "
            f"{items.get('radiograph', '?')} radiograph items ({items.get('radiographs', '?')} distinct "
            "radiographs, repeated)."
        )
    return " ".join(sentences)
