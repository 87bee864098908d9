"""The metrics of a fit as keys of a stage's ``metrics.json``."""

from __future__ import annotations

from typing import Any, Mapping


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``{"val/dice": t}`` -> ``{"val_dice": float(t)}`` (e.g. :attr:`FitResult.final_metrics
    <chestssl.train.loop.FitResult>`) for a metrics file."""
    return {key.replace("/", "_"): float(value) for key, value in metrics.items()}
