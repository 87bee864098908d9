"""Grad-CAM and confusion-matrix figures of the classification runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from chestssl.eval.examples import save_examples
from chestssl.report import classifier_figures
from chestssl.report.classifier_figures import (
    CONFUSION_FILE,
    GRADCAM_FILE,
    MAX_GRADCAM_COLUMNS,
    classifier_figure_section,
    confusion_matrix_figure,
    gradcam_figure,
)

VIT_REASON = "Grad-CAM needs a spatial map; not available for vit"


@pytest.fixture
def drawn_figures(monkeypatch):
    """The matplotlib figures the module saves, in order (the files are still written)."""
    figures = []
    real_save = classifier_figures.save_figure

    def recording_save(figure, path):
        figures.append(figure)
        return real_save(figure, path)

    monkeypatch.setattr(classifier_figures, "save_figure", recording_save)
    return figures


def _examples(count: int = 3, size: int = 16, cam: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = dict(
        image=rng.random((count, 1, size, size)).astype(np.float32),
        label=(np.arange(count) + 1) % 2,
        score=np.linspace(0.93, 0.4, count),
        patient_id=np.array([f"LIDC-{k:04d}" for k in range(count)]),
        slice_index=np.arange(count) + 10,
    )
    if cam:
        arrays["cam"] = rng.random((count, 1, size, size)).astype(np.float16)
    else:
        arrays["cam_unavailable"] = np.full(count, VIT_REASON)
    return arrays


def _texts(figure) -> list[str]:
    texts = [text.get_text() for text in figure.findobj(lambda artist: hasattr(artist, "get_text"))]
    return [text for text in texts if text]


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


# ------------------------------------------------------------------------------ Grad-CAM


def test_gradcam_figure_overlays_each_map_and_titles_label_and_score(tmp_path, drawn_figures):
    examples = {"cls_a": _examples(3), "cls_b": _examples(2, seed=1)}
    path = gradcam_figure(tmp_path / "figs" / "gradcam.png", examples)
    assert path.exists() and _png_size(path)[0] > 200
    figure = drawn_figures[0]
    panels = [ax for ax in figure.axes if len(ax.images) == 2]
    assert len(panels) == 5
    first = panels[0]
    gray, overlay = first.images
    np.testing.assert_array_equal(gray.get_array(), examples["cls_a"]["image"][0, 0])
    np.testing.assert_allclose(overlay.get_array(), examples["cls_a"]["cam"][0, 0].astype(np.float32), atol=1e-6)
    assert overlay.get_cmap().name == "jet" and 0.0 < overlay.get_alpha() < 1.0
    assert first.get_title() == "LIDC-0000 z=10\nnodule, p=0.93"
    assert panels[1].get_title() == "LIDC-0001 z=11\nclean, p=0.67"
    assert first.get_ylabel() == "cls_a" and panels[3].get_ylabel() == "cls_b"


def test_gradcam_figure_gives_runs_without_maps_a_row_that_says_why(tmp_path, drawn_figures):
    stale = _examples(2)
    del stale["cam"]
    examples = {"cls_swin": _examples(2), "cls_vit": _examples(2, cam=False), "cls_stale": stale}
    gradcam_figure(tmp_path / "gradcam.png", examples)
    texts = "\n".join(_texts(drawn_figures[0]))
    assert f"cls_vit: Grad-CAM not shown\n{VIT_REASON}" in texts
    stale_text = "cls_stale: Grad-CAM not shown\nno Grad-CAM maps ('cam') in its examples.npz; rerun evaluate@cls_stale"
    assert stale_text in texts
    assert len([ax for ax in drawn_figures[0].axes if len(ax.images) == 2]) == 2


def test_gradcam_figure_shows_at_most_the_column_limit(tmp_path, drawn_figures):
    gradcam_figure(tmp_path / "gradcam.png", {"cls_a": _examples(MAX_GRADCAM_COLUMNS + 3)})
    assert len([ax for ax in drawn_figures[0].axes if len(ax.images) == 2]) == MAX_GRADCAM_COLUMNS


def test_gradcam_figure_refuses_bad_examples(tmp_path):
    with pytest.raises(ValueError, match="examples_by_run is empty"):
        gradcam_figure(tmp_path / "g.png", {})
    no_score = _examples()
    del no_score["score"]
    with pytest.raises(ValueError, match=r"examples of 'r' lack score .*rerun evaluate@r"):
        gradcam_figure(tmp_path / "g.png", {"r": no_score})
    wrong_cam = _examples()
    wrong_cam["cam"] = wrong_cam["cam"][:, :, :8]
    with pytest.raises(ValueError, match=r"r: cam of shape \(3, 8, 16\) does not match image \(3, 16, 16\)"):
        gradcam_figure(tmp_path / "g.png", {"r": wrong_cam})
    short_labels = _examples()
    short_labels["label"] = short_labels["label"][:2]
    with pytest.raises(ValueError, match="image holds 3 examples, label 2 and score 3"):
        gradcam_figure(tmp_path / "g.png", {"r": short_labels})
    nan_cam = _examples()
    nan_cam["cam"][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="cam holds NaN"):
        gradcam_figure(tmp_path / "g.png", {"r": nan_cam})
    assert not (tmp_path / "g.png").exists()


# --------------------------------------------------------------------- confusion matrices


def test_confusion_matrix_figure_annotates_counts_and_threshold(tmp_path, drawn_figures):
    metrics = {"confusion_matrix": {"tn": 13, "fp": 4, "fn": 3, "tp": 14}, "threshold": 0.5, "n_images": 34}
    flat = {"tn": 5, "fp": 0, "fn": 0, "tp": 0, "threshold": 0.3}
    path = confusion_matrix_figure(tmp_path / "cm.png", {"cls_a": metrics, "cls_b": flat})
    assert path.exists()
    figure = drawn_figures[0]
    panels = [ax for ax in figure.axes if ax.get_visible() and ax.images]
    assert len(panels) == 2
    first, second = panels
    assert first.get_title() == "cls_a\nthreshold 0.5, n=34"
    assert second.get_title() == "cls_b\nthreshold 0.3, n=5"
    cells = {text.get_text() for text in first.texts}
    assert cells == {"13\n(76%)", "4\n(24%)", "3\n(18%)", "14\n(82%)"}
    np.testing.assert_allclose(first.images[0].get_array(), [[13 / 17, 4 / 17], [3 / 17, 14 / 17]])
    # No nodule slice in cls_b's test split: its row says so instead of dividing by zero.
    assert {text.get_text() for text in second.texts} == {"5\n(100%)", "0\n(0%)", "0\n(no items)"}
    assert [label.get_text() for label in first.get_yticklabels()] == ["true clean", "true nodule"]
    assert [label.get_text() for label in first.get_xticklabels()] == ["pred. clean", "pred. nodule"]


def test_confusion_matrix_figure_refuses_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="counts_by_run is empty"):
        confusion_matrix_figure(tmp_path / "cm.png", {})
    with pytest.raises(ValueError, match=r"'r' lack fn, tp"):
        confusion_matrix_figure(tmp_path / "cm.png", {"r": {"tn": 1, "fp": 2}})
    with pytest.raises(ValueError, match="fp must be a non-negative integer, got -1"):
        confusion_matrix_figure(tmp_path / "cm.png", {"r": {"tn": 1, "fp": -1, "fn": 0, "tp": 0}})
    with pytest.raises(ValueError, match=r"tp must be a non-negative integer, got 2.5"):
        confusion_matrix_figure(tmp_path / "cm.png", {"r": {"tn": 1, "fp": 1, "fn": 0, "tp": 2.5}})
    with pytest.raises(ValueError, match=r"threshold of 'r' must be a number in \[0, 1\], got 1.5"):
        confusion_matrix_figure(tmp_path / "cm.png", {"r": {"tn": 1, "fp": 1, "fn": 0, "tp": 2, "threshold": 1.5}})
    assert not (tmp_path / "cm.png").exists()


# ------------------------------------------------------------------------ report section


def _write_run(root, run: str, metrics: dict | None = None, examples: dict | None = None) -> None:
    folder = root / run
    folder.mkdir(parents=True, exist_ok=True)
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if examples is not None:
        save_examples(folder / "examples.npz", **examples)


CLS_METRICS = {"confusion_matrix": {"tn": 13, "fp": 4, "fn": 3, "tp": 14}, "threshold": 0.5}


def test_section_builds_both_figures_and_notes_what_was_skipped(tmp_path):
    evaluate_root = tmp_path / "evaluate"
    runs = {
        "seg_run": {"task": "seg"},
        "cls_swin": {"task": "cls"},
        "cls_vit": {"task": "cls"},
        "cls_not_run": {"task": "cls"},
    }
    _write_run(evaluate_root, "seg_run", metrics={"dice": 0.5}, examples={"image": np.zeros((1, 1, 8, 8))})
    _write_run(evaluate_root, "cls_swin", CLS_METRICS, _examples(3))
    _write_run(evaluate_root, "cls_vit", CLS_METRICS, _examples(2, cam=False))
    figures_dir = tmp_path / "figures"
    captioned, notes = classifier_figure_section(runs, lambda run: evaluate_root / run, figures_dir)
    assert [path for _, path in captioned] == [figures_dir / GRADCAM_FILE, figures_dir / CONFUSION_FILE]
    assert all(path.exists() and _png_size(path)[0] > 100 for _, path in captioned)
    gradcam_caption, confusion_caption = (caption for caption, _ in captioned)
    assert "Grad-CAM" in gradcam_caption and "cls_swin, cls_vit" in gradcam_caption
    assert confusion_caption.endswith("cls_swin, cls_vit") and "seg_run" not in confusion_caption
    assert f"Grad-CAM of `cls_vit`: {VIT_REASON}" in "\n".join(notes)
    missing = [note for note in notes if "cls_not_run" in note]
    assert len(missing) == 2 and all("not found; run evaluate@cls_not_run" in note for note in missing)
    assert not any("seg_run" in note or "cls_swin" in note for note in notes)


def test_section_without_cls_runs_or_maps(tmp_path):
    evaluate_root = tmp_path / "evaluate"
    captioned, notes = classifier_figure_section({"s": {"task": "seg"}}, lambda run: evaluate_root / run, tmp_path)
    assert captioned == [] and notes == ["Classifier figures (Grad-CAM, confusion matrices): no `task: cls` run in "
                                         "params.yaml."]
    _write_run(evaluate_root, "cls_vit", {"threshold": 0.5}, _examples(2, cam=False))
    captioned, notes = classifier_figure_section({"cls_vit": {"task": "cls"}}, lambda run: evaluate_root / run,
                                                 tmp_path / "figures")
    assert captioned == [] and not (tmp_path / "figures").exists()
    assert any("has no confusion_matrix; rerun evaluate@cls_vit" in note for note in notes)
    assert "Grad-CAM figure: no cls run has Grad-CAM maps in its examples.npz." in notes
    assert "Confusion-matrix figure: no cls run has a metrics.json with confusion counts." in notes


def test_section_refuses_bad_input(tmp_path):
    with pytest.raises(TypeError, match=r"runs must map run names to their entries \(a mapping\)"):
        classifier_figure_section([("r", {"task": "cls"})], lambda run: tmp_path, tmp_path)
    with pytest.raises(TypeError, match="evaluate_dir must be a function"):
        classifier_figure_section({"r": {"task": "cls"}}, tmp_path, tmp_path)
    with pytest.raises(ValueError, match=r"runs\.r: expected a mapping with a 'task' key, got str"):
        classifier_figure_section({"r": "cls"}, lambda run: tmp_path, tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"metrics.json: not valid JSON .*rerun evaluate@r"):
        classifier_figure_section({"r": {"task": "cls"}}, lambda run: tmp_path / run, tmp_path / "figures")
    (tmp_path / "r" / "metrics.json").write_text(json.dumps({"confusion_matrix": {"tn": 1}, "threshold": 0.5}))
    with pytest.raises(ValueError, match=r"confusion counts of 'r' lack fp, fn, tp"):
        classifier_figure_section({"r": {"task": "cls"}}, lambda run: tmp_path / run, tmp_path / "figures")
