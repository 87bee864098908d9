"""The report's figure of the radiographs rendered from CT."""

from __future__ import annotations

import pandas as pd
from PIL import Image

from chestssl.data.drr import render_radiographs
from chestssl.report.radiograph_figures import choose_studies, radiograph_section

CFG = {"size": 32, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]}


def test_section_draws_test_studies_with_a_nodule_first_and_counts_them(synthetic_processed, tmp_path):
    out = tmp_path / "radiographs"
    studies = render_radiographs(synthetic_processed, out, CFG)
    captioned, skipped = radiograph_section(out, tmp_path / "figures", num_studies=2)
    assert skipped == []
    ((caption, path),) = captioned
    assert f"{len(studies)} two-view studies ({int(studies['nodule'].sum())} with a nodule)" in caption
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    chosen = choose_studies(pd.read_csv(out / "studies.csv", dtype={"scan_id": str}), 2)
    # The fixture's test split is p4 (no nodule) and p5 (a nodule): the nodule study comes first.
    assert list(chosen["scan_id"]) == ["p5", "p4"]


def test_section_without_rendered_radiographs_says_how_to_make_them(tmp_path):
    captioned, skipped = radiograph_section(tmp_path / "missing", tmp_path / "figures", num_studies=2)
    assert captioned == []
    assert len(skipped) == 1 and "dvc repro radiographs" in skipped[0]
