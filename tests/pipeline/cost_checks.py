"""What a training stage's ``cost.json`` record holds (:func:`chestssl.train.cost_probe.fit_cost`)."""

from __future__ import annotations

from typing import Any, Mapping

#: The keys of one record: the report's cost columns and what qualifies them.
COST_KEYS = {"parameters", "trainable_parameters", "steps", "epochs", "train_seconds", "peak_memory_gb",
             "memory_kind", "device", "processes"}


def check_cost_record(cost: Mapping[str, Any], steps: int) -> None:
    """``cost`` is one fit's record, of a fit of ``steps`` optimisation steps that trained."""
    assert set(cost) == COST_KEYS, sorted(cost)
    assert cost["steps"] == steps and cost["epochs"] >= 1
    assert cost["parameters"] >= cost["trainable_parameters"] > 0
    # Training time is rounded to 0.1 s, which a fit of a few tiny steps may not reach.
    assert cost["train_seconds"] >= 0.0 and cost["peak_memory_gb"] > 0
    assert cost["memory_kind"] in {"process_max_rss", "cuda_max_allocated"} and cost["processes"] == 1
