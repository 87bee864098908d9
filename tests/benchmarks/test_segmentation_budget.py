"""benchmarks/segmentation_budget.py: a 2D segmentation run at other slice sizes and lengths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.benchmarks.test_reproduce_cost import _load

segmentation_budget = _load("segmentation_budget")
REPO = Path(__file__).resolve().parents[2]


def _checkout(tmp_path: Path) -> Path:
    checkout = tmp_path / "checkout"
    (checkout / "params").mkdir(parents=True)
    for name in ["params.yaml", *(f"params/{p.name}" for p in (REPO / "params").glob("*.yaml"))]:
        (checkout / name).write_text((REPO / name).read_text())
    (checkout / "data" / "processed").mkdir(parents=True)
    (checkout / "models" / "pretrain").mkdir(parents=True)
    return checkout


def test_a_work_folder_changes_the_size_the_vit_and_the_epochs_only(tmp_path):
    checkout = _checkout(tmp_path)
    work = segmentation_budget._work_folder(tmp_path, checkout, 96, "segmentation", 30,
                                            ["runs.seg_swinunetr_scratch.loss=dice"])

    def read(root, name):
        return yaml.safe_load((root / name).read_text())

    assert read(work, "params.yaml")["slices"]["side"] == 96
    assert read(work, "params/presets.yaml")["backbones"]["vit"]["img_size"] == 96
    assert read(work, "params/presets.yaml")["recipes"]["segmentation"]["epochs"] == 30
    before, after = read(checkout, "params/presets.yaml"), read(work, "params/presets.yaml")
    before["backbones"]["vit"]["img_size"] = after["backbones"]["vit"]["img_size"]
    before["recipes"]["segmentation"]["epochs"] = after["recipes"]["segmentation"]["epochs"]
    assert before == after
    runs = read(checkout, "params/runs.yaml")
    assert read(work, "params/runs.yaml")["runs"]["seg_swinunetr_scratch"]["loss"] == "dice"
    runs["runs"]["seg_swinunetr_scratch"]["loss"] = "dice"
    assert runs == read(work, "params/runs.yaml")
    assert (work / "data" / "processed").resolve() == (checkout / "data" / "processed").resolve()
    assert (work / "models" / "pretrain").resolve() == (checkout / "models" / "pretrain").resolve()


def test_a_setting_of_an_unknown_key_is_refused(tmp_path):
    checkout = _checkout(tmp_path)
    for number, (bad, named) in enumerate([("runs.seg_swinunetr_scratch.los=dice", "runs.seg_swinunetr_scratch.los"),
                                           ("runs.segg.loss=dice", "runs.segg"),
                                           ("runs.seg_swinunetr_scratch.loss", "expected KEY=VALUE")]):
        with pytest.raises(SystemExit, match=r"^--set: ") as refused:
            segmentation_budget._work_folder(tmp_path / str(number), checkout, 64, "segmentation", 1, [bad])
        assert named in str(refused.value)


def test_a_checkout_without_outputs_is_refused_with_what_to_run(tmp_path):
    (tmp_path / "params").mkdir()
    for name in ["params.yaml", *(f"params/{p.name}" for p in (REPO / "params").glob("*.yaml"))]:
        (tmp_path / name).write_text((REPO / name).read_text())
    with pytest.raises(SystemExit, match="not found; reproduce the checkout first"):
        segmentation_budget.main(["--checkout", str(tmp_path), "--out", str(tmp_path / "out.md")])
