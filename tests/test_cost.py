"""`make cost` (chestssl.cost): scaling a sample's fits to LIDC-IDRI, and the whole mechanism
through a real `dvc repro` at tiny sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from chestssl import cost
from chestssl.params import read_raw_params, write_raw_params
from chestssl.train.loop import plan_steps

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = cost.Counts(scans=2.0, slices=200.0, annotations=4.0)
LIDC = cost.Counts(scans=800.0, slices=100_000.0, annotations=6_000.0)
STAGES = {"finetune@seg": ["stages/finetune.py", "seg"], "pretrain@dae_3d": ["stages/pretrain.py", "dae_3d"],
          "label_fraction@cls": ["stages/label_fraction.py", "cls"]}


def record(argv, dataset="SliceDataset", task="seg", items=10, batch_size=8, accumulate=1, epochs=2,
           amp=True, amp_dtype="fp16", flops=1e12):
    return {"argv": argv, "dataset": dataset, "task": task, "train_items": items, "model": "M",
            "input_shapes": {"image": [batch_size, 1, 64, 64]}, "parameters": 10, "trainable_parameters": 10,
            "train": {"epochs": epochs, "batch_size": batch_size, "max_steps": 0, "amp": amp,
                      "accumulate": accumulate, "amp_dtype": amp_dtype},
            "flops_per_batch": flops, "seconds_per_batch": 2.0, "peak_memory_bytes": 3e9,
            "memory_kind": "process_max_rss", "device": "cpu", "reused": False}


def test_fits_scale_by_the_unit_their_dataset_draws_from():
    records = [record(STAGES["finetune@seg"], items=10),
               record(STAGES["pretrain@dae_3d"], dataset="CropDataset", task=None, items=16)]
    fits = cost.full_protocol_fits(records, STAGES, SAMPLE, LIDC, label_fractions=())
    assert [(stage, items) for stage, _, _, items in fits] == [
        ("finetune@seg", 10 * 6_000 // 4),  # nodule slices: by annotations
        ("pretrain@dae_3d", 16 * 800 // 2),  # crops: by scans
    ]
    assert cost.unit_of("SliceDataset", "pretrain") == "slices"
    assert cost.unit_of("RadiographDataset", None) == "scans"


def test_2d_epochs_over_scans_scale_by_scans(synthetic_processed):
    from chestssl.data.datasets import SliceDataset
    from chestssl.data.slice_epochs import EpochSliceDataset

    slices = SliceDataset(synthetic_processed, "train", 16, "pretrain")  # 2 scans of 12 slices
    over_scans = EpochSliceDataset(slices)
    # As the training loop records a fit: its dataset's class name, `task` if it has one, and its length.
    records = [record(STAGES["pretrain@dae_3d"], dataset=type(data).__name__, task=getattr(data, "task", None),
                      items=len(data)) for data in (slices, over_scans)]
    fits = cost.full_protocol_fits(records, STAGES, SAMPLE, LIDC, label_fractions=())
    assert [items for _, _, _, items in fits] == [24 * 100_000 // 200, 2 * 800 // 2]  # slices; scans
    assert cost.unit_of("EpochSliceDataset", None) == "scans"


def test_a_label_fraction_stage_trains_once_per_fraction_of_its_whole_training_set():
    records = [record(STAGES["label_fraction@cls"], task="cls", items=items) for items in (2, 10)]
    fits = cost.full_protocol_fits(records, STAGES, SAMPLE, LIDC, label_fractions=[0.01, 0.5, 1.0])
    whole = 10 * 6_000 // 4
    assert [(setting, items) for _, setting, _, items in fits] == [
        ("fraction 0.01", math.ceil(0.01 * whole)), ("fraction 0.5", whole // 2), ("fraction 1", whole)]


def test_steps_follow_the_training_plan_and_gpu_hours_the_flops_over_the_peak():
    records = [record(STAGES["pretrain@dae_3d"], dataset="CropDataset", task=None, items=16, batch_size=2,
                      accumulate=8, epochs=3, amp=False)]
    rows = cost.estimate_rows(records, STAGES, SAMPLE, LIDC, world_size=2, gpu="A100-80GB", utilisation=0.5)
    (row,) = rows.to_dict("records")
    plan = plan_steps(6400, records[0]["train"], world_size=2)
    assert row["steps"] == plan.total_steps == 3 * 200  # 3200 crops per process, 1600 batches, 200 steps
    assert row["precision"] == "fp32" and row["gflops_per_step"] == 8 * 1e3
    assert row["seconds_per_step_here"] == 16.0
    assert row["gpu_hours"] == pytest.approx(600 * 8e12 / (19.5e12 * 0.5) * 2 / 3600)


def test_the_input_column_shows_a_full_batch_whatever_batch_was_drawn():
    studies = {**record(STAGES["pretrain@dae_3d"], batch_size=512),
               "input_shapes": {"images": [32, 1, 256, 256], "labels": [16, 2], "step": [1]}}
    assert cost.full_batch_input(studies) == "images 1024x1x256x256; labels 512x2"
    assert cost.full_batch_input(record(STAGES["finetune@seg"], batch_size=8)) == "image 8x1x64x64"


def test_a_stage_measured_again_counts_with_its_latest_records_only():
    old = [{**record(STAGES["finetune@seg"], items=10), "stage_run": "a"},
           {**record(STAGES["pretrain@dae_3d"], dataset="CropDataset", task=None), "stage_run": "b"}]
    new = [{**record(STAGES["finetune@seg"], items=20), "stage_run": "c"} for _ in range(3)]
    latest = cost.latest_stage_records([*old, *new], STAGES)
    assert [r["train_items"] for r in latest["finetune@seg"]] == [20, 20, 20]
    assert latest["pretrain@dae_3d"] == [old[1]]
    # Records written before runs were named count as one run.
    unnamed = [record(STAGES["finetune@seg"]) for _ in range(2)]
    assert len(cost.latest_stage_records(unnamed, STAGES)["finetune@seg"]) == 2


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="gpu"):
        cost.estimate(gpu="GTX", work_dir=tmp_path)
    with pytest.raises(ValueError, match="utilisation"):
        cost.estimate(utilisation=1.5, work_dir=tmp_path)
    with pytest.raises(ValueError, match="holds no earlier estimate"):
        cost.estimate(work_dir=tmp_path, update=True)


@pytest.mark.slow
def test_make_cost_measures_training_stages_through_dvc_repro(tmp_path):
    """A tiny project: its phantom sample, one training stage and its upstream trainer measured."""
    from chestssl.profiles import apply_profile
    from tests.pipeline.conftest import tiny_params

    source = tmp_path / "source"
    cost.copy_project_files(REPO_ROOT, source)
    apply_profile(source / "params" / "all-entries.yaml", source / "params.yaml")  # the entries tiny_params picks from
    raw, _ = read_raw_params(source / "params.yaml")
    write_raw_params(tiny_params(raw), source / "params.yaml")
    rows = cost.estimate(profile=None, out_dir=tmp_path / "out", source=source, scans=4, max_slices=100,
                         stages=["finetune@cls_linear_barlow_twins"], work_dir=tmp_path / "work")
    written = pd.read_csv(tmp_path / "out" / cost.CSV_NAME)
    assert list(written["stage"]) == list(rows["stage"]) == ["pretrain@barlow_twins", "finetune@cls_linear_barlow_twins"]
    assert (written["gflops_per_step"] > 0).all() and (written["steps"] > 0).all()
    assert (written["seconds_per_step_here"] > 0).all() and (written["peak_memory_gb"] > 0).all()
    text = (tmp_path / "out" / cost.MARKDOWN_NAME).read_text()
    assert "GPU-hours" in text and "| finetune@cls_linear_barlow_twins | 1 |" in text
    assert "Stages that failed" not in text
    # Nothing was trained: each fit measured its batches and stopped.
    log = (tmp_path / "work" / "dvc-repro.log").read_text()
    assert "epoch 1/" not in log

    # Updated after a change of params: DVC reruns the fine-tuning alone, now two fits (two
    # training seeds, both reusing the earlier measurement); the pretraining keeps its record.
    raw, _ = read_raw_params(source / "params.yaml")
    raw["training_seeds"] = 2
    write_raw_params(raw, source / "params.yaml")
    rows = cost.estimate(profile=None, out_dir=tmp_path / "out", source=source, scans=4, max_slices=100,
                         stages=["finetune@cls_linear_barlow_twins"], work_dir=tmp_path / "work", update=True)
    assert list(rows["stage"]) == ["pretrain@barlow_twins", *["finetune@cls_linear_barlow_twins"] * 2]
    assert list(rows["measurement_reused"]) == [False, True, True]
    assert (tmp_path / "work" / "dvc-repro.log").read_text().count("Running stage 'pretrain@barlow_twins'") == 1
