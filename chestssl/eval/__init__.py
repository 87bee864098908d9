"""Evaluation: test-split metrics with bootstrap confidence intervals over patients.

The names below are imported from their modules on first use (PEP 562), so importing one
module of the package (e.g. :mod:`chestssl.eval.examples`, which needs only numpy) does
not load torch and MONAI, which :mod:`chestssl.eval.metrics` imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chestssl.eval.bootstrap import PatientBootstrap, SumMetric, metric_entry, weighted_auroc
    from chestssl.eval.examples import choose_example_indices, example_kind, load_examples, save_examples
    from chestssl.eval.metrics import (
        DATA_RANGE,
        PSNR_CAP_DB,
        evaluate_classification,
        evaluate_reconstruction,
        evaluate_segmentation,
        per_image_reconstruction_scores,
        per_image_segmentation_scores,
    )

#: The module of each name re-exported here.
_SOURCES = {
    "PatientBootstrap": "bootstrap",
    "SumMetric": "bootstrap",
    "metric_entry": "bootstrap",
    "weighted_auroc": "bootstrap",
    "choose_example_indices": "examples",
    "example_kind": "examples",
    "load_examples": "examples",
    "save_examples": "examples",
    "DATA_RANGE": "metrics",
    "PSNR_CAP_DB": "metrics",
    "evaluate_classification": "metrics",
    "evaluate_reconstruction": "metrics",
    "evaluate_segmentation": "metrics",
    "per_image_reconstruction_scores": "metrics",
    "per_image_segmentation_scores": "metrics",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
