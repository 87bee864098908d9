"""benchmarks/nodule_scale.py: the median nodule in slice pixels by size and field of view."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.test_reproduce_cost import _load

nodule_scale = _load("nodule_scale")


def test_the_lung_box_makes_the_nodules_larger_and_the_table_is_written(synthetic_processed, tmp_path, capsys):
    out = tmp_path / "nodule_scale.json"
    report = nodule_scale.main(["--processed", str(synthetic_processed), "--sizes", "48", "96", "--pixel-mm", "0.5",
                                "--out", str(out)])
    rows = {(row["size"], row["field_of_view"]): row for row in report["rows"]}
    # windows of 0.5 mm pixels: 16 and 32 voxels of 1.5 mm resized to 48 and 96, at any size
    assert rows[48, "window"]["mm_per_pixel"] == rows[96, "window"]["mm_per_pixel"] == pytest.approx(0.5)
    assert rows[96, "window"]["pixel_mm"] == 0.5 and rows[96, "lungs"]["pixel_mm"] is None
    # 48 x 48 slices of 1.5 mm; the lung box is 36 px wide: 72 mm over 48 px, then 54 mm.
    assert rows[48, "body"]["mm_per_pixel"] == pytest.approx(1.5)
    assert rows[48, "lungs"]["mm_per_pixel"] == pytest.approx(36 * 1.5 / 48, abs=0.01)
    assert rows[96, "lungs"]["nodule_pixels"] == pytest.approx(2 * rows[48, "lungs"]["nodule_pixels"], rel=0.01)
    assert rows[96, "body"]["compute_vs_64px"] == 2.25
    assert json.loads(out.read_text()) == report
    assert "nodule px" in capsys.readouterr().out


def test_a_folder_without_processed_scans_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no processed scans with nodules"):
        nodule_scale.main(["--processed", str(tmp_path), "--out", str(tmp_path / "x.json")])
