"""Evaluation: test-split metrics with bootstrap confidence intervals over patients."""

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

__all__ = [
    "DATA_RANGE",
    "PSNR_CAP_DB",
    "PatientBootstrap",
    "SumMetric",
    "choose_example_indices",
    "evaluate_classification",
    "evaluate_reconstruction",
    "evaluate_segmentation",
    "example_kind",
    "load_examples",
    "metric_entry",
    "per_image_reconstruction_scores",
    "per_image_segmentation_scores",
    "save_examples",
    "weighted_auroc",
]
