"""The linear-probe table: one row per pretraining entry, the same probe for every method.

Seed 004 (RadDiffusion) compares pretraining methods by a linear probe of their frozen
encoders: one class-balanced logistic regression per label on features of unmasked
inputs, scored by AUROC, AUPRC and F1 (Alain & Bengio, "Understanding intermediate
layers using linear classifier probes", 2016). ``evaluate_pretrain`` runs that probe for
every entry (:func:`chestssl.eval.linear_probe.fit_linear_probe`); this module turns the
results into one table, with the numbers a seed published for the same method quoted
beside ours. Those come from other data (chest radiographs, other labels), so the column
says so rather than invite a direct comparison.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from chestssl.report.published import published
from chestssl.report.tables import Column, Table, build_table

#: The labels probed (:func:`chestssl.eval.linear_probe.probe_labels`), as shown.
PROBE_LABELS = {"nodule": "nodule", "malignant": "malignancy >= 4"}
PROBE_METRICS = (("auroc", "AUROC"), ("auprc", "AUPRC"), ("f1", "F1"))

_SEED_PROBE = {kind: published()[f"linear_probe.{kind}.mean_auroc"] for kind in ("mae", "diffmae")}
_SEED_FINE_TUNED = published()["linear_probe.barlow_twins.accuracy"]
#: Published linear-probe or downstream numbers by pretext method (the ``method`` param),
#: from the ``linear_probe`` records of ``published.yaml``.
SEED_NUMBERS = {
    **{kind: f"seed {record.seed}: mean linear-probe AUROC {record.value} (14 CheXpert labels, MIMIC-CXR)"
       for kind, record in _SEED_PROBE.items()},
    "barlow_twins": f"seed {_SEED_FINE_TUNED.seed}: fine-tuned accuracy {_SEED_FINE_TUNED.value}% "
                    "(4-class COVID-19 radiography); no probe",
}
NO_SEED_NUMBER = "—"


def _flat_probe(
    probe: Mapping[str, Any],
    labels: Mapping[str, str] = PROBE_LABELS,
    metrics: Sequence[tuple[str, str]] = PROBE_METRICS,
) -> dict[str, Any]:
    """``{"<label>_<metric>": {value, ci_low, ci_high[, note]}}`` from a probe result."""
    flat: dict[str, Any] = {}
    for label in labels:
        result = probe.get(label)
        for metric, _ in metrics:
            key = f"{label}_{metric}"
            if not isinstance(result, Mapping):
                flat[key] = {"value": None, "ci_low": None, "ci_high": None, "note": f"label {label!r} not probed"}
            elif "skipped" in result:
                flat[key] = {"value": None, "ci_low": None, "ci_high": None, "note": str(result["skipped"])}
            else:
                flat[key] = dict(result[metric])
    probed = next((probe[label] for label in labels if isinstance(probe.get(label), Mapping)
                   and "n_images" in probe[label]), {})
    flat["n_images"] = probed.get("n_images")
    flat["n_patients"] = probed.get("n_patients")
    mean = probe.get("mean") or {}
    flat["mean_auroc"] = {"value": mean.get("auroc"), "ci_low": None, "ci_high": None,
                          "note": "mean of the labels' point estimates; no interval"}
    return flat


def linear_probe_table(
    pretrain_metrics: Mapping[str, tuple[Mapping[str, Any], str]],
    entries: Mapping[str, Mapping[str, Any]],
    *,
    name: str = "linear_probe",
    title: str = "Linear probe of each pretrained encoder (test split)",
    items: str = "images",
    labels: Mapping[str, str] = PROBE_LABELS,
    metrics: Sequence[tuple[str, str]] = PROBE_METRICS,
) -> Table:
    """The linear probe of every pretraining entry on the test split.

    Args:
        pretrain_metrics: ``{entry: (metrics of evaluate_pretrain, path)}``; entries whose
            metrics hold no ``probe`` are left out.
        entries: the validated params entries (``methods`` and ``multihead``) by name.
        name, title: the table's file name and title.
        items: what one probed item is (``images``, or ``studies`` for a study-level probe).
        labels: the probed labels, ``{name: header}`` (default: the CT probe's).
        metrics: the metrics shown per label, ``(key, header)`` pairs.
    """
    rows = []
    for entry_name, (result, source) in pretrain_metrics.items():
        if "probe" not in result:
            continue
        entry = entries[entry_name]
        kind = entry["method"]
        descriptors = {
            "entry": entry_name,
            "method": kind,
            "backbone": f"{entry['backbone']['name']} {entry['backbone']['spatial_dims']}D",
            "seed's number (other data)": SEED_NUMBERS.get(kind, NO_SEED_NUMBER),
        }
        rows.append((descriptors, _flat_probe(result["probe"], labels, metrics), source))
    columns = [Column(f"{label}_{metric}", f"{shown} {header}")
               for label, shown in labels.items() for metric, header in metrics]
    columns.append(Column("mean_auroc", "mean AUROC"))
    return build_table(name, title, rows, columns, items=items)
