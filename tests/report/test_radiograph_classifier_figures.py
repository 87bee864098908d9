"""Figures of the classifiers fine-tuned on radiographs: Grad-CAM overlays and confusion counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from chestssl.eval.examples import save_examples
from chestssl.report.radiograph_classifier_figures import (
    CONFUSION_FILE,
    GRADCAM_FILE,
    radiograph_classifier_figures,
    radiograph_confusion_figure,
    radiograph_gradcam_figure,
)

LABELS = ["nodule", "malignant"]


def _examples(count: int = 3, size: int = 16, cam: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    probability = rng.random((count, 2)).astype(np.float32)
    arrays = {"image": rng.random((count, 1, size, size)).astype(np.float32),
              "labels": np.array([[1, 0], [1, 1], [0, 0]][:count], dtype=np.float32),
              "probability": probability, "explained": probability.argmax(axis=1),
              "view": np.array(["frontal", "lateral", "frontal"][:count])}
    if cam:
        arrays["cam"] = rng.random((count, 1, size, size)).astype(np.float16)
    else:
        arrays["cam_unavailable"] = np.full(count, "Grad-CAM needs a spatial map; not available for vit")
    return arrays


def _multilabel_metrics() -> dict:
    return {"labels": LABELS, "test": {"label_confusion": {"labels": LABELS, "threshold": 0.5, "tn": [3, 5],
                                                            "fp": [1, 0], "fn": [2, 1], "tp": [4, 4]}}}


def _multiclass_metrics() -> dict:
    names = ["covid", "normal", "pneumonia", "opacity"]
    counts = np.eye(4, dtype=int) * 5 + 1
    return {"labels": names, "test": {"confusion_matrix": {"labels": names, "counts": counts.tolist()}}}


def test_gradcam_rows_draw_maps_or_say_why_not(tmp_path):
    path = radiograph_gradcam_figure(tmp_path / "g.png", {"cxr_linear": _examples(), "cxr_vit": _examples(cam=False)},
                                     {"cxr_linear": LABELS, "cxr_vit": LABELS})
    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_gradcam_examples_that_disagree_are_named(tmp_path):
    arrays = _examples()
    arrays["explained"] = np.array([0, 1, 5])
    with pytest.raises(ValueError, match="rerun finetune_radiographs@cxr_a"):
        radiograph_gradcam_figure(tmp_path / "g.png", {"cxr_a": arrays}, {"cxr_a": LABELS})
    del arrays["probability"]
    with pytest.raises(ValueError, match="lack probability"):
        radiograph_gradcam_figure(tmp_path / "g.png", {"cxr_a": arrays}, {"cxr_a": LABELS})
    with pytest.raises(ValueError, match="empty"):
        radiograph_gradcam_figure(tmp_path / "g.png", {}, {})


def test_confusion_panels_for_multiclass_and_multilabel_runs(tmp_path):
    path = radiograph_confusion_figure(tmp_path / "c.png", {"cxr_covid": _multiclass_metrics(),
                                                            "cxr_labels": _multilabel_metrics()})
    assert path.is_file()
    with pytest.raises(ValueError, match="no test confusion_matrix or label_confusion"):
        radiograph_confusion_figure(tmp_path / "c.png", {"cxr_a": {"test": {}}})


def test_the_section_reads_each_runs_stage_files_and_lists_the_missing(tmp_path):
    reports = tmp_path / "reports"
    for run, metrics in (("cxr_a", _multilabel_metrics()), ("cxr_b", _multiclass_metrics())):
        (reports / run).mkdir(parents=True)
        (reports / run / "metrics.json").write_text(json.dumps(metrics))
        arrays = _examples()
        if run == "cxr_b":  # four classes
            arrays["labels"] = np.eye(4, dtype=np.float32)[[0, 1, 2]]
            arrays["probability"] = np.full((3, 4), 0.25, dtype=np.float32)
            arrays["explained"] = np.array([0, 1, 2])
        save_examples(reports / run / "examples.npz", **arrays)
    figures, skipped = radiograph_classifier_figures(["cxr_a", "cxr_b", "cxr_c"], lambda run: reports / run,
                                                     tmp_path / "figures")
    assert [path.name for _, path in figures] == [GRADCAM_FILE, CONFUSION_FILE]
    assert "1 x 1 on 16 px radiographs" in figures[0][0]
    assert all(path.is_file() for _, path in figures)
    assert len(skipped) == 1 and "dvc repro finetune_radiographs@cxr_c" in skipped[0]
    assert radiograph_classifier_figures(["cxr_c"], lambda run: reports / run, tmp_path / "figures")[0] == []
