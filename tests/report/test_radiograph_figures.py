"""The report's figures of the radiographs folder and of pretraining on it."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from chestssl.data.drr import render_radiographs
from chestssl.data.radiograph_folder import RadiographFolderWriter, open_radiograph_folder
from chestssl.report.radiograph_figures import choose_studies, radiograph_section

CFG = {"side": 32, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]}


def test_section_draws_test_studies_with_a_nodule_first_and_counts_them(synthetic_processed, tmp_path):
    out = tmp_path / "radiographs"
    studies = render_radiographs(synthetic_processed, out, CFG)
    captioned, skipped, source = radiograph_section(out, tmp_path / "figures", num_studies=2)
    assert skipped == [] and source == "rendered"
    ((caption, path),) = captioned
    assert f"{len(studies)} two-view studies ({int(studies['nodule'].sum())} with a nodule)" in caption
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    folder = open_radiograph_folder(out)
    chosen = choose_studies(folder.studies, folder.label_names, 2)
    # The fixture's test split is p4 (no nodule) and p5 (a nodule): the nodule study comes first.
    assert list(chosen["study_id"]) == ["p5", "p4"]


def test_section_of_a_dataset_shows_each_studys_images_and_positive_labels(tmp_path):
    out = tmp_path / "dataset"
    studies = pd.DataFrame({"study_id": ["s1", "s2", "s3"], "patient_id": ["a", "b", "c"],
                            "split": ["test", "test", "train"], "Edema": [0.0, 1.0, 1.0],
                            "Cardiomegaly": [float("nan"), 1.0, 0.0]})
    images = pd.DataFrame({"study_id": ["s1", "s2", "s2", "s2", "s3"],
                           "view": ["frontal", "frontal", "lateral", "frontal", "frontal"]})
    writer = RadiographFolderWriter(out, len(images), 32, with_masks=False, fingerprint="x")
    for index in range(len(images)):
        writer.put(index, np.random.default_rng(index).random((32, 32)))
    writer.finish({"source": "chexpert", "labels": ["Edema", "Cardiomegaly"], "skipped_images": 2}, studies, images)
    captioned, skipped, source = radiograph_section(out, tmp_path / "figures", num_studies=2)
    assert skipped == [] and source == "chexpert"
    ((caption, path),) = captioned
    assert caption.startswith("chexpert radiographs: 3 studies, 5 images (2 listed images skipped, see ")
    with Image.open(path) as image:
        assert image.size[0] > image.size[1]  # three images side by side for s2
    folder = open_radiograph_folder(out)
    assert list(choose_studies(folder.studies, folder.label_names, 2)["study_id"]) == ["s2", "s1"]


def test_section_without_radiographs_says_how_to_make_them(tmp_path):
    captioned, skipped, source = radiograph_section(tmp_path / "missing", tmp_path / "figures", num_studies=2)
    assert captioned == [] and source is None
    assert len(skipped) == 1 and "dvc repro radiographs" in skipped[0]


def _levels(root, image_names, study_names):
    from chestssl.report.radiograph_figures import ProbeLevel

    return [
        ProbeLevel("image level", "pretrain_radiographs", "pretrain_radiographs.methods", image_names,
                   lambda name: root / "image" / name, "radiograph_linear_probe", "image"),
        ProbeLevel("study level", "pretrain_radiograph_studies", "pretrain_radiographs.study_methods", study_names,
                   lambda name: root / "study" / name, "radiograph_study_linear_probe", "study", items="studies"),
    ]


def test_pretraining_section_tables_the_probe_and_plots_its_curves_per_level(tmp_path):
    import json

    from chestssl.report.radiograph_figures import radiograph_pretraining_section

    def write(folder, curve):
        metrics_dir = folder / "live" / "plots" / "metrics" / "probe"
        metrics_dir.mkdir(parents=True)
        if curve:
            (metrics_dir / "mean_auroc.tsv").write_text("step\tmean_auroc\n1\t0.55\n2\t0.61\n")
        interval = {"value": 0.6, "ci_low": 0.4, "ci_high": 0.8}
        probe = {"nodule": {"auroc": interval, "auprc": interval, "f1": interval, "n_images": 8, "n_patients": 2},
                 "malignant": {"skipped": "one class in the training views"}, "mean": {"auroc": 0.6}}
        (folder / "metrics.json").write_text(json.dumps({"probe": probe}))

    write(tmp_path / "image" / "mae", curve=True)
    write(tmp_path / "image" / "scratch_vit", curve=False)
    write(tmp_path / "study" / "mae", curve=True)
    entries = {name: {"method": "mae" if name == "mae" else "scratch",
                      "backbone": {"name": "vit", "spatial_dims": 2}} for name in ("mae", "scratch_vit")}
    tables, captioned, skipped = radiograph_pretraining_section(
        _levels(tmp_path, ["mae", "scratch_vit"], ["mae"]), entries, tmp_path / "figures")
    assert [table.name for table in tables] == ["radiograph_linear_probe", "radiograph_study_linear_probe"]
    assert [len(table.numbers) for table in tables] == [2, 1]
    assert "Test images / patients" in tables[0].text and "Test studies / patients" in tables[1].text
    ((caption, path),) = captioned
    assert path.exists() and "image level and study level" in caption
    assert len(skipped) == 1 and "pretrain_radiographs@scratch_vit" in skipped[0]


def test_each_probe_row_shows_the_cost_of_training_its_encoder_at_its_level(tmp_path):
    """A probe row's cost is its encoder's training stage: pretrain_radiographs@ or pretrain_radiograph_studies@."""
    import json

    from chestssl.report.radiograph_figures import radiograph_pretraining_section

    interval = {"value": 0.6, "ci_low": 0.4, "ci_high": 0.8}
    for folder in (tmp_path / "image" / "mae", tmp_path / "image" / "scratch_vit", tmp_path / "study" / "mae"):
        (folder / "live").mkdir(parents=True)
        probe = {"nodule": {"auroc": interval, "auprc": interval, "f1": interval, "n_images": 8, "n_patients": 2},
                 "malignant": {"skipped": "one class"}, "mean": {"auroc": 0.6}}
        (folder / "metrics.json").write_text(json.dumps({"probe": probe}))
    entries = {name: {"method": "mae", "backbone": {"name": "vit", "spatial_dims": 2}} for name in ("mae", "scratch_vit")}
    costs = {"pretrain_radiographs@mae": {"parameters": 2_000_000, "steps": 40, "train_seconds": 7200.0,
                                          "peak_memory_gb": 3.5},
             "pretrain_radiographs@scratch_vit": None,
             "pretrain_radiograph_studies@mae": {"parameters": 2_100_000, "steps": 20, "train_seconds": 90.0,
                                                 "peak_memory_gb": 4.0}}
    (image, study), _, _ = radiograph_pretraining_section(
        _levels(tmp_path, ["mae", "scratch_vit"], ["mae"]), entries, tmp_path / "figures", costs)
    assert image.numbers["steps"].tolist()[0] == 40 and image.numbers["steps"].isna().tolist() == [False, True]
    assert study.numbers["steps"].tolist() == [20] and study.numbers["parameters"].tolist() == [2_100_000]
    for table, stage in ((image, "pretrain_radiographs"), (study, "pretrain_radiograph_studies")):
        (header,) = [column for column in table.text.columns if column.startswith("Parameters")]
        number = int(header.rsplit("-", 1)[1].rstrip("]"))
        assert f"training the row's encoder (`{stage}@<entry>`" in table.footnotes[number - 1]
    assert image.text.iloc[0]["Training time"] == "2.0 h" and image.text.iloc[1]["Training time"] == "n/a"
    without, _, _ = radiograph_pretraining_section(_levels(tmp_path, ["mae"], []), entries, tmp_path / "figures")
    assert "steps" not in without[0].numbers


def test_pretraining_section_names_each_empty_list(tmp_path):
    from chestssl.report.radiograph_figures import radiograph_pretraining_section

    tables, captioned, skipped = radiograph_pretraining_section(_levels(tmp_path, [], []), {}, tmp_path)
    assert tables == [] and captioned == []
    assert skipped == ["Pretraining on radiographs (image level): `pretrain_radiographs.methods` is empty.",
                       "Pretraining on radiographs (study level): `pretrain_radiographs.study_methods` is empty."]


def test_the_curves_figure_has_a_panel_per_level_with_curves(tmp_path):
    import matplotlib.image
    import pandas as pd

    from chestssl.report.radiograph_figures import probe_curves_figure

    curve = pd.DataFrame({"step": [1, 2, 3], "value": [0.5, 0.6, 0.7]})
    one = probe_curves_figure(tmp_path / "one.png", {"image level": {"mae": curve}, "study level": {}}, "t")
    two = probe_curves_figure(tmp_path / "two.png", {"image level": {"mae": curve}, "study level": {"mae": curve}}, "t")
    assert matplotlib.image.imread(two).shape[1] > matplotlib.image.imread(one).shape[1]


def test_probe_tables_take_the_labels_the_runs_recorded():
    from chestssl.report.probes import PROBE_LABELS, PROBE_METRICS
    from chestssl.report.radiograph_figures import probe_columns

    rendered = {"mae": ({"labels": ["nodule", "malignant"]}, "m.json")}
    assert probe_columns(rendered) == {"labels": PROBE_LABELS, "metrics": PROBE_METRICS}
    few = {"mae": ({"labels": ["COVID", "Normal"]}, "m.json")}
    assert probe_columns(few) == {"labels": {"COVID": "COVID", "Normal": "Normal"}, "metrics": PROBE_METRICS}
    many = {"mae": ({"labels": [f"finding {i}" for i in range(14)]}, "m.json")}
    columns = probe_columns(many)
    assert len(columns["labels"]) == 14 and columns["metrics"] == PROBE_METRICS[:1]
