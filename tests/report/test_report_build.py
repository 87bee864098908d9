"""The report built from synthetic metrics, dvclive folders and examples."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chestssl.eval import (
    evaluate_classification,
    evaluate_reconstruction,
    evaluate_segmentation,
    save_examples,
)
from chestssl.io import write_json
from chestssl.params import load_params
from chestssl.report import build_report, format_interval, read_live_metrics
from chestssl.report.build import FEW_TEST_PATIENTS, reading_note, rows_without_entry
from tests.shipped_params import read_shipped_params

REPO = Path(__file__).resolve().parents[2]
SIZE = 24


def _write_live(live_dir: Path, curves: dict[str, list[float]]) -> None:
    """A dvclive folder as ``Live(dvcyaml=False)`` leaves it: plots/metrics/<name>.tsv."""
    for name, values in curves.items():
        tsv = live_dir / "plots" / "metrics" / f"{name}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        column = name.rsplit("/", 1)[-1]
        pd.DataFrame({"step": range(len(values)), column: values}).to_csv(tsv, sep="\t", index=False)


def _make_inputs(tmp_path: Path) -> dict:
    """Metrics, examples and dvclive folders of 2 AEs, 2 segmentation and 2 classification runs."""
    rng = np.random.default_rng(0)
    n, ids = 12, np.repeat(["p1", "p2", "p3", "p4"], 3)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = np.clip(0.3 + 0.05 * rng.standard_normal((n, 1, SIZE, SIZE)), 0, 1).astype(np.float32)
    masks = np.zeros((n, 1, SIZE, SIZE), np.uint8)
    for i in range(0, n, 2):
        masks[i, 0] = (yy - 10 - i % 5) ** 2 + (xx - 12) ** 2 <= 9
    images[masks > 0] = 0.8

    root = tmp_path / "in"
    recon = {}
    for method, noise in (("ae", 0.03), ("dae", 0.08)):
        out = np.clip(images + noise * rng.standard_normal(images.shape), 0, 1).astype(np.float32)
        write_json(root / f"pretrain_{method}.json", evaluate_reconstruction(out, images, ids, n_bootstrap=50))
        save_examples(root / f"examples_{method}.npz", image=images[:4], recon=out[:4])
        recon[method] = root / f"pretrain_{method}.json"

    runs = {
        "seg_unetpp_scratch": {"task": "seg", "arch": "unetpp", "init": "scratch", "loss": "ce"},
        "seg_unetpp_ae": {"task": "seg", "arch": "unetpp", "init": "ae", "loss": "dice"},
        "cls_resnet18_ae": {"task": "cls", "arch": "resnet18", "init": "ae"},
        "cls_one_class": {"task": "cls", "arch": "resnet50", "init": "scratch"},
    }
    evals, examples, lives = {}, {"ae": root / "examples_ae.npz", "dae": root / "examples_dae.npz"}, {}
    for run, spec in runs.items():
        path = root / f"eval_{run}.json"
        if spec["task"] == "seg":
            probs = np.clip(masks + 0.4 * rng.standard_normal(masks.shape), 0, 1).astype(np.float32)
            write_json(path, evaluate_segmentation(probs, masks, ids, threshold=0.5, n_bootstrap=50))
            save_examples(
                root / f"examples_{run}.npz", image=images[:4], mask=masks[:4], prob=probs[:4],
                patient_id=ids[:4], slice_index=np.arange(4),
            )
            examples[run] = root / f"examples_{run}.npz"
        else:
            labels = (masks.reshape(n, -1).sum(1) > 0).astype(int)
            if run == "cls_one_class":
                labels[:] = 1
            scores = np.clip(0.3 + 0.4 * labels + 0.2 * rng.standard_normal(n), 0, 1)
            write_json(path, evaluate_classification(scores, labels, ids, n_bootstrap=50))
        evals[run] = path
        lives[run] = root / "live" / run
        _write_live(lives[run], {"train/loss": [1.0, 0.6, 0.4], "val/dice": [0.1, 0.3, 0.5]})
    lives["pretrain-ae"] = root / "live" / "pretrain-ae"
    _write_live(lives["pretrain-ae"], {"train/loss": [0.9, 0.5], "train/ssim": [0.4, 0.7], "val/ssim": [0.5, 0.8]})
    return {
        "out_dir": tmp_path / "reports", "pretrain_metrics": recon, "eval_metrics": evals, "run_params": runs,
        "live_dirs": lives, "examples": examples,
    }


@pytest.fixture
def inputs(tmp_path):
    return _make_inputs(tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full report (the expensive part: ten figures) shared by the read-only tests.

    Run ``seg_unetpp_scratch`` has no examples and one dvclive folder is empty, so the
    "skipped" list has entries to check.
    """
    inputs = _make_inputs(tmp_path_factory.mktemp("report"))
    inputs["examples"].pop("seg_unetpp_scratch")
    empty_live = inputs["out_dir"].parent / "in" / "live" / "empty"
    empty_live.mkdir(parents=True)
    inputs["live_dirs"]["empty"] = empty_live
    written = build_report(
        **inputs,
        extra_sections={"Benchmarks": "Training speed: see benchmarks/."},
        params=load_params(REPO / "params.yaml"),
        not_applicable=["FID: no diffusion model in this profile."],
    )
    return inputs, written


def test_report_tables_hold_the_metrics(built):
    inputs, _ = built
    tables = inputs["out_dir"] / "tables"
    seg = pd.read_csv(tables / "segmentation.csv")
    metrics = json.loads(inputs["eval_metrics"]["seg_unetpp_ae"].read_text())
    row = seg.set_index("run").loc["seg_unetpp_ae"]
    assert row["dice_global"] == pytest.approx(metrics["dice_global"]["value"])
    assert row["dice_per_image_ci_high"] == pytest.approx(metrics["dice_per_image"]["ci_high"])
    assert (row["arch"], row["init"], row["loss"]) == ("unetpp", "ae", "dice")
    markdown = (tables / "segmentation.md").read_text()
    d = metrics["dice_global"]
    assert format_interval(d["value"], d["ci_low"], d["ci_high"]) in markdown
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", markdown)

    recon = pd.read_csv(tables / "reconstruction.csv").set_index("method")
    ae = json.loads(inputs["pretrain_metrics"]["ae"].read_text())
    assert recon.loc["ae", "psnr"] == pytest.approx(ae["psnr"]["value"])
    assert recon.loc["ae", "ssim"] > recon.loc["dae", "ssim"]  # less noise, better SSIM
    assert f"{ae['psnr']['value']:.2f} [" in (tables / "reconstruction.md").read_text()

    cls = pd.read_csv(tables / "classification.csv").set_index("run")
    assert pd.isna(cls.loc["cls_one_class", "auroc"])
    assert "AUROC needs both classes" in cls.loc["cls_one_class", "notes"]
    cls_md = (tables / "classification.md").read_text()
    assert re.search(r"\| n/a\[\^classification-\d\] \|", cls_md)
    assert re.search(r"^\[\^classification-\d\]: undefined: all 12 test items have label 1", cls_md, re.M)


def test_report_figures_are_valid_pngs_and_readme_links_resolve(built):
    inputs, written = built
    out_dir = inputs["out_dir"]
    pngs = sorted(p.relative_to(out_dir).as_posix() for p in written if p.suffix == ".png")
    assert pngs == [
        "figures/classification_intervals.png",
        "figures/curves_cls_one_class.png",
        "figures/curves_cls_resnet18_ae.png",
        "figures/curves_pretrain-ae.png",
        "figures/curves_seg_unetpp_ae.png",
        "figures/curves_seg_unetpp_scratch.png",
        "figures/overlay_seg_unetpp_ae.png",
        "figures/reconstructions.png",
        "figures/segmentation_intervals.png",
    ]
    for png in pngs:
        with Image.open(out_dir / png) as image:
            image.verify()
        with Image.open(out_dir / png) as image:
            assert image.format == "PNG" and min(image.size) > 50

    readme = (out_dir / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert set(pngs) <= set(links)
    assert "tables/segmentation.csv" in links
    for link in links:
        assert (out_dir / link).is_file(), link
    assert "## Benchmarks\n\nTraining speed: see benchmarks/." in readme
    assert not list(out_dir.rglob(".*"))  # no temporary files left


def test_readme_protocol_and_skipped_items(built):
    inputs, _ = built
    params = load_params(REPO / "params.yaml")
    readme = (inputs["out_dir"] / "README.md").read_text()
    assert "bootstrap interval over test **patients** (50 resamples" in readme
    assert "synthetic CT phantoms (`data.source: phantom`" in readme
    split = params["preprocess"]["split"]
    assert f"train / val / test = {split['train']:g} / {split['val']:g} / {split['test']:g}" in readme
    skipped = readme.split("## Skipped or not applicable")[1]
    assert "AUROC needs both classes" in readme.split("## Skipped or not applicable")[0]  # a table footnote
    assert "Nodule-slice classification (test split): cells without a value or an interval: 1" in skipped
    assert "Segmentation overlay of run `seg_unetpp_scratch`: no examples were given." in skipped
    assert "Segmentation overlay of run `seg_unetpp_ae`" not in skipped
    assert "Training curves of `empty`" in skipped
    assert "Reconstruction of method `scratch_swin` (`scratch`)" in skipped
    assert "FID: no diffusion model in this profile." in skipped
    for run in params["runs"]:
        if run not in inputs["eval_metrics"]:
            assert f"Run `{run}`: listed in params but no test metrics" in skipped


def test_report_without_classification_runs_says_so(inputs):
    for run in ("cls_resnet18_ae", "cls_one_class"):
        inputs["eval_metrics"].pop(run)
    build_report(**{**inputs, "pretrain_metrics": {}, "live_dirs": {}, "examples": {}})
    out_dir = inputs["out_dir"]
    assert not (out_dir / "tables" / "classification.csv").exists()
    assert "Classification table: no classification run was evaluated." in (out_dir / "README.md").read_text()


def test_missing_inputs_are_all_named(inputs):
    inputs["eval_metrics"]["seg_unetpp_ae"].unlink()
    missing_live = inputs["live_dirs"]["cls_resnet18_ae"].parent / "gone"
    inputs["live_dirs"]["cls_resnet18_ae"] = missing_live
    with pytest.raises(FileNotFoundError) as error:
        build_report(**inputs)
    message = str(error.value)
    assert str(inputs["eval_metrics"]["seg_unetpp_ae"]) in message and "evaluate@<run>" in message
    assert str(missing_live) in message
    assert not inputs["out_dir"].exists()  # nothing written before the inputs are checked


def test_bad_inputs_give_actionable_errors(inputs):
    run_params = dict(inputs["run_params"])
    run_params.pop("seg_unetpp_ae")
    with pytest.raises(KeyError, match="run 'seg_unetpp_ae' has a metrics file"):
        build_report(**{**inputs, "run_params": run_params})

    bad_examples = inputs["out_dir"].parent / "in" / "bad_examples.npz"
    save_examples(bad_examples, image=np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match=re.escape(str(bad_examples))):
        build_report(**{**inputs, "examples": {"ae": bad_examples}})

    seg_examples = inputs["examples"]["seg_unetpp_ae"]
    with pytest.raises(KeyError, match="keyed 'unet_run', which is not an evaluated segmentation run"):
        build_report(**{**inputs, "pretrain_metrics": {}, "live_dirs": {}, "examples": {"unet_run": seg_examples}})

    stale = inputs["eval_metrics"]["cls_resnet18_ae"]
    write_json(stale, {"accuracy": 0.9})
    with pytest.raises(KeyError, match=re.escape(str(stale))):
        build_report(**{**inputs, "pretrain_metrics": {}, "eval_metrics": {"cls_resnet18_ae": stale},
                        "live_dirs": {}, "examples": {}})


def test_read_live_metrics(inputs):
    curves = read_live_metrics(inputs["live_dirs"]["pretrain-ae"])
    assert sorted(curves) == ["train/loss", "train/ssim", "val/ssim"]
    assert curves["val/ssim"]["value"].tolist() == [0.5, 0.8]
    assert curves["train/loss"]["step"].tolist() == [0, 1]


def test_reconstruction_caveats_are_footnoted_on_every_cell_of_their_row():
    from chestssl.report.tables import reconstruction_table

    def entry(value, note=None):
        return {"value": value, "ci_low": value - 0.01, "ci_high": value + 0.01, **({"note": note} if note else {})}

    metrics = {"ssim": entry(0.6), "psnr": entry(20.0, "capped at 100 dB"), "l1": entry(0.05),
               "n_images": 10, "n_patients": 2}
    table = reconstruction_table({"ae": (metrics, "a.json"), "mae": (metrics, "m.json")},
                                 notes={"mae": "keeps the visible patches"})
    ae, mae = table.text.iloc[0], table.text.iloc[1]
    assert all("[^" in mae[header] for header in ("SSIM", "PSNR (dB)", "L1"))
    assert "[^" not in ae["SSIM"] and "[^" in ae["PSNR (dB)"]
    assert "capped at 100 dB; keeps the visible patches" in table.footnotes
    assert "keeps the visible patches" in table.footnotes
    assert "note" not in metrics["ssim"], "the caller's metrics are not changed"


def test_each_score_has_its_training_cost_beside_it(inputs):
    """A run's or method's cost.json (its own training stage) fills the cost columns; n/a without one."""
    costs = {"finetune@seg_unetpp_ae": {"parameters": 2_480_000, "steps": 1200, "train_seconds": 754.0,
                                        "peak_memory_gb": 1.234},
             "pretrain@ae": {"parameters": 900, "steps": 0, "train_seconds": 0.0, "peak_memory_gb": None},
             "finetune@seg_unetpp_scratch": None}
    build_report(**{**inputs, "live_dirs": {}, "examples": {}}, params=load_params(REPO / "params.yaml"), costs=costs)
    tables = inputs["out_dir"] / "tables"
    seg = pd.read_csv(tables / "segmentation.csv").set_index("run")
    assert seg.loc["seg_unetpp_ae", "steps"] == 1200 and seg.loc["seg_unetpp_ae", "train_seconds"] == 754.0
    assert pd.isna(seg.loc["seg_unetpp_scratch", "parameters"])
    markdown = (tables / "segmentation.md").read_text()
    assert "| Parameters | Steps | Training time | Peak memory (GB) |" in markdown
    assert "| 2.48M | 1,200 | 12.6 min | 1.23 |" in markdown
    assert "| n/a | n/a | n/a | n/a |" in markdown
    assert "| 900 | 0 | 0 s | n/a |" in (tables / "reconstruction.md").read_text()
    assert "**Cost columns:**" in (inputs["out_dir"] / "README.md").read_text()


def test_runs_trained_with_several_seeds_show_the_mean_and_sd_beside_the_interval(inputs):
    """The first seed's value and interval stay; the spread over seeds is added to each cell and the CSV."""
    from chestssl.io import write_json

    path = inputs["eval_metrics"]["seg_unetpp_ae"]
    metrics = json.loads(path.read_text())
    metrics["training_seeds"] = {"seeds": [42, 43, 44], "metrics": {
        "dice_global": {"values": [0.5, 0.6, 0.7], "mean": 0.6, "sd": 0.1, "n": 3}}}
    write_json(path, metrics)
    params = load_params(REPO / "params.yaml")
    params["training_seeds"] = 3
    build_report(**{**inputs, "live_dirs": {}, "examples": {}}, params=params)
    tables = inputs["out_dir"] / "tables"
    seg = pd.read_csv(tables / "segmentation.csv").set_index("run")
    assert seg.loc["seg_unetpp_ae", "dice_global_seeds_mean"] == pytest.approx(0.6)
    assert seg.loc["seg_unetpp_ae", "dice_global_seeds_sd"] == pytest.approx(0.1)
    assert seg.loc["seg_unetpp_ae", "training_seeds"] == 3 and pd.isna(seg.loc["seg_unetpp_scratch", "training_seeds"])
    d = metrics["dice_global"]
    assert (format_interval(d["value"], d["ci_low"], d["ci_high"]) + "; 0.600 ± 0.100 (3 seeds)"
            in (tables / "segmentation.md").read_text())
    assert "over the 3 training seeds of each fine-tuning run" in (inputs["out_dir"] / "README.md").read_text()


def test_the_report_opens_with_what_synthetic_data_and_few_test_patients_can_show(built, inputs):
    built_inputs, _ = built
    readme = (built_inputs["out_dir"] / "README.md").read_text()
    note = readme.split("## What these numbers can show")[1].split("## Protocol")[0]
    assert readme.index("## What these numbers can show") < readme.index("## Protocol")
    assert "**The data are synthetic.**" in note
    assert "**4 test patients (12 test slices in the downstream runs).**" in note and "allow no ranking" in note
    assert "params/lidc-full.yaml" in note and "`reports/cost.md`" in note

    real = load_params(REPO / "params.yaml")
    real["data"] = {**real["data"], "source": "local", "local": {"path": "data/LIDC-IDRI"}}
    # Real data but few test patients: only the patients are said.
    text = reading_note(real, 4, 12)
    assert "synthetic" not in text and "**4 test patients (12 test slices in the downstream runs).**" in text
    # Real data and enough test patients: no note, and no section.
    assert reading_note(real, FEW_TEST_PATIENTS, 500) == ""
    build_report(**{**inputs, "live_dirs": {}, "examples": {}}, params=real)
    assert "## What these numbers can show" in (inputs["out_dir"] / "README.md").read_text()  # still 4 patients
    quick = load_params(REPO / "params.yaml")
    assert reading_note(quick, 100, 5000).startswith("- **The data are synthetic.**")
    # The quick profile's seed-table rows without an entry are counted, and the profile that adds them named.
    absent = rows_without_entry(quick)
    assert absent > 0 and f"- **{absent} rows of the seed tables are not run.**" in reading_note(quick, 100, 5000)
    assert "params/all-entries.yaml" in reading_note(quick, 100, 5000)
    assert rows_without_entry(read_shipped_params()) == 0
    # Real data, enough patients, but nodules of under 3 pixels: that alone is said.
    small = {"nodules": 33, "nodule_mm": 10.4, "mm_per_pixel": 5.6, "nodule_pixels": 1.86}
    text = reading_note(real, FEW_TEST_PATIENTS, 500, scale=small)
    assert text.startswith("- **Small nodules.** At 64 x 64 pixels one pixel spans about 5.6 mm") and "1.9 pixels" in text
    assert reading_note(real, FEW_TEST_PATIENTS, 500, scale={**small, "nodule_pixels": 3.2}) == ""
    build_report(**{**inputs, "live_dirs": {}, "examples": {}}, params=real, nodule_scale=small)
    protocol = (inputs["out_dir"] / "README.md").read_text().split("## Protocol")[1]
    assert "one pixel spans about 5.6 mm, so the median nodule (10.4 mm across, 33 nodules) spans 1.9 pixels" in protocol
    # The protocol says what a slice shows.
    assert "2D axial slices of 64 x 64 pixels (windows 160 mm across in the lungs" in protocol
    real["slices"]["field_of_view"] = "body"
    build_report(**{**inputs, "live_dirs": {}, "examples": {}}, params=real)
    protocol = (inputs["out_dir"] / "README.md").read_text().split("## Protocol")[1]
    assert "64 x 64 pixels (the whole slice cropped to the body, `slices.field_of_view: body`)" in protocol


def test_failed_runs_are_said_at_the_top():
    from chestssl.report.build import failure_lines

    seg = {"a": {"dice_global": {"value": 0.012}}, "b": {"dice_global": {"value": 0.017}}}
    cls = {"c": {"confusion_matrix": {"tp": 0, "fp": 0, "tn": 65, "fn": 65}},
           "d": {"confusion_matrix": {"tp": 30, "fp": 20, "tn": 45, "fn": 35}}}
    lines = failure_lines(seg, cls)
    assert lines[0].startswith("- **No segmentation run found the nodules.** The best global Dice of the 2 runs is "
                               "0.017 (`b`)")
    assert lines[1].startswith("- **1 of 2 classifiers give every test slice one class** (`c`)")
    assert failure_lines({**seg, "e": {"dice_global": {"value": 0.4}}}, {"d": cls["d"]}) == []
    with_data = failure_lines(seg, cls, {"slices": 35, "patients": 6})[0]
    assert with_data.startswith(lines[0]) and " They learn from the training split's 35 nodule slices of 6 patients;" \
        in with_data and "measured by `benchmarks/segmentation_budget.py`" in with_data
    real = load_params(REPO / "params.yaml")
    real["data"] = {**real["data"], "source": "local", "local": {"path": "data/LIDC-IDRI"}}
    note = reading_note(real, FEW_TEST_PATIENTS, 500, failures=lines)
    assert "No segmentation run found" in note and "For a comparison that can rank methods" in note


def test_the_segmentation_training_size_counts_the_training_splits_nodule_slices(synthetic_processed):
    from chestssl.report.build import segmentation_training_size

    # synthetic_processed: p1 (train) has a nodule on slices 4..7; p0 (train) none.
    assert segmentation_training_size(synthetic_processed) == {"slices": 4, "patients": 1}
    assert segmentation_training_size(synthetic_processed / "absent") is None


def test_tables_on_fewer_scans_or_images_are_said_at_the_top():
    from chestssl.report.build import smaller_table_lines

    lines = smaller_table_lines({"scratch_3d": {"test_scans": 2}, "dae_3d": {"test_scans": 2}},
                                {"cxr_a": {"n_train_images": 8}, "cxr_b": {"n_train_images": 16}})
    assert lines[0].startswith("- **The 3D segmentation table scores 2 test scans per run**")
    assert lines[1].startswith("- **The classifiers fine-tuned on radiographs learn from 8/16 training images**")
    assert smaller_table_lines({}, {}) == []
    assert smaller_table_lines({"one": {"test_scans": 1}}, {})[0].startswith("- **The 3D segmentation table scores "
                                                                            "1 test scan per run**")
    real = load_params(REPO / "params.yaml")
    real["data"] = {**real["data"], "source": "local", "local": {"path": "data/LIDC-IDRI"}}
    # Real data and enough patients: the smaller tables alone open the report, with the way out.
    note = reading_note(real, FEW_TEST_PATIENTS, 500, smaller_tables=lines)
    assert note.startswith(lines[0]) and "For a comparison that can rank methods" in note
