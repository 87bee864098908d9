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


def test_pretraining_section_tables_the_probe_and_plots_its_curves(tmp_path):
    from chestssl.report.radiograph_figures import radiograph_pretraining_section

    def write(name, curve):
        report = tmp_path / "reports" / name
        metrics_dir = report / "live" / "plots" / "metrics" / "probe"
        metrics_dir.mkdir(parents=True)
        if curve:
            (metrics_dir / "mean_auroc.tsv").write_text("step\tmean_auroc\n1\t0.55\n2\t0.61\n")
        interval = {"value": 0.6, "ci_low": 0.4, "ci_high": 0.8}
        probe = {"nodule": {"auroc": interval, "auprc": interval, "f1": interval, "n_images": 8, "n_patients": 2},
                 "malignant": {"skipped": "one class in the training views"}, "mean": {"auroc": 0.6}}
        (report / "metrics.json").write_text(__import__("json").dumps({"probe": probe}))

    write("mae", curve=True)
    write("scratch_vit", curve=False)
    entries = {name: {"method": "mae" if name == "mae" else "scratch",
                      "backbone": {"name": "vit", "spatial_dims": 2}} for name in ("mae", "scratch_vit")}
    tables, captioned, skipped = radiograph_pretraining_section(
        ["mae", "scratch_vit"], lambda name: tmp_path / "reports" / name, entries, tmp_path / "figures")
    (table,) = tables
    assert table.name == "radiograph_linear_probe" and len(table.numbers) == 2
    ((_, path),) = captioned
    assert path.exists()
    assert len(skipped) == 1 and "scratch_vit" in skipped[0]
    assert radiograph_pretraining_section([], None, {}, tmp_path)[2] == [
        "Pretraining on radiographs: `pretrain_radiographs.methods` is empty."]
