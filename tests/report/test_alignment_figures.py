"""The report's figure and table of the STN alignment experiment (seed 002)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from chestssl.report.alignment_figures import alignment_figure, alignment_table


def _examples(count: int, aligned_value: float) -> dict:
    return {
        "input": np.ones((count, 1, 16, 16), np.float32),
        "aligned": np.full((count, 16, 16), aligned_value, np.float32),
        "canonical": np.full((1, 16, 16), 0.5, np.float32),
        "study_id": np.array([f"p{i}" for i in range(count)]),
        "before_px": np.full(count, 2.5, np.float32),
        "after_px": np.full(count, 1.0, np.float32),
    }


def _black_pixels(path) -> int:
    with Image.open(path) as image:
        return int((np.asarray(image.convert("L")) < 10).sum())


def test_figure_draws_one_row_per_example_from_the_arrays(tmp_path):
    one = alignment_figure(tmp_path / "one.png", _examples(1, 0.0))
    three = alignment_figure(tmp_path / "three.png", _examples(3, 0.0))
    with Image.open(one) as small, Image.open(three) as large:
        assert large.size[0] == small.size[0] and large.size[1] > 2 * small.size[1]
    # The aligned panels are black here; drawn white instead, the black area goes away.
    black_aligned = _black_pixels(three)
    white_aligned = _black_pixels(alignment_figure(tmp_path / "white.png", _examples(3, 1.0)))
    assert black_aligned > white_aligned + 3 * 100  # three panels of at least 10 x 10 black pixels
    with pytest.raises(ValueError, match="lack canonical"):
        alignment_figure(tmp_path / "bad.png", {"input": np.zeros((1, 8, 8)), "aligned": np.zeros((1, 8, 8))})
    with pytest.raises(ValueError, match="same non-empty"):
        alignment_figure(tmp_path / "bad.png", {**_examples(2, 0.0), "aligned": np.zeros((1, 16, 16))})


def _interval(value, note=None):
    entry = {"value": value, "ci_low": value - 0.1, "ci_high": min(value + 0.1, 1.0)}
    return {**entry, "note": note} if note else entry


def _metrics() -> dict:
    skipped = {"value": None, "ci_low": None, "ci_high": None, "note": "all 4 test items have 'malignant' = 0"}
    return {
        "protocol": "linear probe of a frozen encoder; seed 002 fine-tuned a DenseNet-121.",
        "parameter_error": {
            "misaligned": {"before_px": 2.5, "after_px": 1.0, "fraction_undone": 0.6, "n_images": 4},
            "not_misaligned": {"displacement_px": 0.3, "n_images": 4},
        },
        "auroc": {
            "nodule": {"without_alignment": _interval(0.7), "with_alignment": _interval(0.75),
                       "as_rendered": _interval(0.8), "difference": 0.05, "n_images": 4, "n_patients": 4},
            "malignant": {"without_alignment": skipped, "with_alignment": skipped, "as_rendered": skipped,
                          "difference": None, "n_images": None, "n_patients": None},
            "mean": {"without_alignment": 0.7, "with_alignment": 0.75, "as_rendered": 0.8, "difference": 0.05,
                     "labels": ["nodule"]},
        },
    }


def test_table_has_a_row_per_label_and_the_mean_with_the_seeds_numbers_quoted():
    table = alignment_table(_metrics(), "reports/alignment/metrics.json")
    assert list(table.numbers["label"]) == ["nodule", "malignant", "mean"]
    nodule, malignant, mean = (table.text.iloc[i] for i in range(3))
    with_header = "With alignment[^alignment-2]"
    seed_header = "Seed 002 mean AUROC, without / with (other data)[^alignment-1]"
    assert nodule["Without alignment"] == "0.700 [0.600, 0.800]" and nodule[with_header] == "0.750 [0.650, 0.850]"
    assert nodule["Difference (with - without)"] == "+0.050" and nodule["Test images / patients"] == "4 / 4"
    assert nodule[seed_header] == "—"
    assert malignant["Without alignment"].startswith("n/a[^alignment-3]")
    assert malignant["Difference (with - without)"] == "n/a"
    assert mean[seed_header] == "0.8110 / 0.8124 (+0.0014)"
    assert mean["Difference (with - without)"] == "+0.050"
    assert table.numbers.loc[0, "auroc_with_ci_low"] == pytest.approx(0.65)
    assert table.numbers.loc[2, "seed_auroc_with"] == 0.8124
    assert "DenseNet-121" in table.footnotes[0] and "0.8110" in table.footnotes[0]
    assert "2.50 px before and 1.00 px after" in table.footnotes[1] and "60%" in table.footnotes[1]
    assert "0.30 px" in table.footnotes[1]
    assert any("'malignant' = 0" in note for note in table.cell_notes)
    markdown = table.markdown()
    assert "[^alignment-1]: Our protocol: linear probe of a frozen encoder" in markdown
    assert "| nodule | 0.700 [0.600, 0.800] |" in markdown
    with pytest.raises(KeyError, match="no 'parameter_error'"):
        alignment_table({k: v for k, v in _metrics().items() if k != "parameter_error"}, "m.json")


def test_every_row_shows_the_cost_of_training_the_stn():
    cost = {"parameters": 180_000, "trainable_parameters": 180_000, "steps": 250, "train_seconds": 42.0,
            "peak_memory_gb": 0.9}
    metrics = {**_metrics(), "feature_method": "barlow_twins"}
    table = alignment_table(metrics, "reports/alignment/metrics.json", {"align_radiographs": cost})
    assert table.numbers["steps"].tolist() == [250, 250, 250]
    number = len(alignment_table(metrics, "m.json").footnotes) + 1  # after the table's own footnotes
    header = f"Parameters[^alignment-{number}]"
    assert table.text[header].tolist() == ["180k"] * 3 and table.text["Training time"].tolist() == ["42 s"] * 3
    assert table.footnotes[number - 1].startswith("Cost columns: training the STN (`align_radiographs`")
    assert "`pretrain_radiographs@barlow_twins`" in table.footnotes[number - 1]
    assert f"[^alignment-{number}]: Cost columns" in table.markdown()
    missing = alignment_table(metrics, "m.json", {"align_radiographs": None})
    assert missing.text["Steps"].tolist() == ["n/a"] * 3
    assert "steps" not in alignment_table(metrics, "m.json").numbers
