"""Radiograph datasets over the rendered studies of the synthetic processed folder
(tests/conftest.py: six patients, two per split; p1, p3, p5 have one nodule).

The fixture's nodules are rated malignancy 4; the ``radiographs`` fixture rates them
3 (p1), 4 (p3) and 5 (p5) before rendering, so malignant labels fall on both sides of
the threshold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from chestssl.data.datasets import DatasetError
from chestssl.data.drr import render_radiographs
from chestssl.data.radiograph_datasets import (
    RadiographDataset,
    RadiographsNotFoundError,
    RadiographStudyDataset,
    collate_radiograph_studies,
    read_studies,
)
from chestssl.errors import UserError
from chestssl.eval.linear_probe import MALIGNANT_MIN_RATING, extract_features
from chestssl.models.seeding import seeded
from chestssl.xray.study_vit import encode_study, study_representation
from chestssl.models.vit import build_vit_encoder

SIZE = 32
CFG = {"size": SIZE, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]}
RATINGS = {"p1": 3.0, "p3": 4.0, "p5": 5.0}
NODULE_PATIENTS = {"p1", "p3", "p5"}
TINY_VIT = {
    "name": "vit",
    "spatial_dims": 2,
    "img_size": SIZE,
    "patch_size": 8,
    "hidden_size": 16,
    "num_layers": 2,
    "num_heads": 2,
    "mlp_dim": 32,
}


@pytest.fixture
def radiographs(synthetic_processed: Path, tmp_path: Path) -> Path:
    """The fixture's radiographs at size 32, nodules rated as :data:`RATINGS`."""
    nodules_path = synthetic_processed / "nodules.csv"
    nodules = pd.read_csv(nodules_path, dtype={"patient_id": str, "scan_id": str})
    nodules["malignancy"] = nodules["patient_id"].map(RATINGS)
    nodules.to_csv(nodules_path, index=False)
    out_dir = tmp_path / "radiographs"
    render_radiographs(synthetic_processed, out_dir, CFG)
    return out_dir


def _arrays(radiographs: Path, scan_id: str) -> dict[str, np.ndarray]:
    with np.load(radiographs / "studies" / f"{scan_id}.npz") as arrays:
        return {name: arrays[name] for name in arrays.files}


def test_items_hold_the_stored_views_with_shapes_dtypes_and_labels(radiographs):
    data = RadiographDataset(radiographs, "val", task="cls")
    assert data.size == SIZE and len(data) == 4 == len(data.frame)
    studies = read_studies(radiographs).set_index("patient_id")
    for index in range(len(data)):
        item = data[index]
        assert item["image"].shape == item["mask"].shape == (1, SIZE, SIZE)
        assert item["image"].dtype == item["mask"].dtype == torch.float32
        assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
        assert item["malignancy"].dtype == torch.float32 and item["malignancy"].ndim == 0
        assert item["study_id"] == item["scan_id"] == item["patient_id"]
        assert data.frame.loc[index, "view"] == item["view"]
        assert data.frame.loc[index, "scan_id"] == item["scan_id"]
        stored = _arrays(radiographs, item["scan_id"])
        np.testing.assert_array_equal(item["image"][0].numpy(), stored[item["view"]].astype(np.float32))
        np.testing.assert_array_equal(item["mask"][0].numpy(), (stored[f"{item['view']}_mask"] > 0).astype(np.float32))
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        has_nodule = item["patient_id"] in NODULE_PATIENTS
        assert bool(item["mask"].any()) == has_nodule  # the projected nodule is in both views
        assert int(item["label"]) == int(studies.loc[item["patient_id"], "nodule"]) == int(has_nodule)
        assert float(item["malignancy"]) == RATINGS.get(item["patient_id"], 0.0)


@pytest.mark.parametrize("task", ["pretrain", "cls"])
def test_one_item_per_study_and_view_in_study_order(radiographs, task):
    studies = read_studies(radiographs)
    for split in ("train", "val", "test"):
        data = RadiographDataset(radiographs, split, task=task)
        scan_ids = sorted(studies.loc[studies["split"] == split, "scan_id"])
        pairs = [(data[i]["scan_id"], data[i]["view"]) for i in range(len(data))]
        assert pairs == [(scan_id, view) for scan_id in scan_ids for view in ("frontal", "lateral")]


def test_splits_are_patient_level_disjoint_and_follow_splits_json(radiographs, synthetic_processed):
    splits = json.loads((synthetic_processed / "splits.json").read_text())
    patients = {}
    for split in ("train", "val", "test"):
        image_level = {item["patient_id"] for item in RadiographDataset(radiographs, split)}
        study_level = {item["patient_id"] for item in RadiographStudyDataset(radiographs, split)}
        assert image_level == study_level == set(splits[split])
        patients[split] = image_level
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert set().union(*patients.values()) == set(read_studies(radiographs)["patient_id"])


def test_view_selection_and_order(radiographs):
    lateral = RadiographDataset(radiographs, "test", views=("lateral",))
    assert len(lateral) == 2 and {item["view"] for item in lateral} == {"lateral"}
    stored_lateral = _arrays(radiographs, "p4")["lateral"].astype(np.float32)
    np.testing.assert_array_equal(lateral[0]["image"][0].numpy(), stored_lateral)
    assert [item["view"] for item in RadiographDataset(radiographs, "test", views="frontal")] == ["frontal"] * 2

    reversed_views = RadiographStudyDataset(radiographs, "test", views=("lateral", "frontal"))
    study = reversed_views[1]
    stored = _arrays(radiographs, study["study_id"])
    assert study["images"].shape == (2, 1, SIZE, SIZE) and study["views"] == ("lateral", "frontal")
    np.testing.assert_array_equal(study["images"][0, 0].numpy(), stored["lateral"].astype(np.float32))
    np.testing.assert_array_equal(study["images"][1, 0].numpy(), stored["frontal"].astype(np.float32))
    # the frontal and lateral projections of one CT differ
    assert not torch.equal(study["images"][0], study["images"][1])


def test_patient_ids_restrict_both_datasets(radiographs):
    data = RadiographDataset(radiographs, "train", patient_ids=["p1"])
    assert len(data) == 2 and {item["patient_id"] for item in data} == {"p1"}
    assert [item["label"].item() for item in data] == [1, 1]
    studies = RadiographStudyDataset(radiographs, "train", patient_ids=["p0"])
    assert len(studies) == 1 and studies[0]["patient_id"] == "p0" and studies[0]["label"].item() == 0
    with pytest.raises(DatasetError, match=r"patient_ids: p2 not in split 'train'"):
        RadiographDataset(radiographs, "train", patient_ids=["p1", "p2"])
    with pytest.raises(DatasetError, match=r"patient_ids: got an empty list"):
        RadiographStudyDataset(radiographs, "train", patient_ids=[])


def test_malignant_labels_use_the_linear_probe_threshold(radiographs):
    assert MALIGNANT_MIN_RATING == 4.0
    expected = {"p0": 0, "p1": 0, "p2": 0, "p3": 1, "p4": 0, "p5": 1}  # p1 is rated 3, below the threshold
    for split in ("train", "val", "test"):
        malignant = RadiographDataset(radiographs, split, task="cls", label="malignant")
        nodule = RadiographDataset(radiographs, split, task="cls", label="nodule")
        for a, b in zip(malignant, nodule, strict=True):
            assert a["label"].item() == expected[a["patient_id"]]
            assert b["label"].item() == int(b["patient_id"] in NODULE_PATIENTS)
            assert torch.equal(a["image"], b["image"])
        studies = RadiographStudyDataset(radiographs, split, label="malignant")
        study_labels = {study["patient_id"]: study["label"].item() for study in studies}
        assert study_labels == {p: expected[p] for p in study_labels}


def test_the_linear_probe_reads_nodule_and_malignant_labels_from_the_items(radiographs):
    with seeded(0):
        encoder = build_vit_encoder(TINY_VIT)
    for split in ("train", "val"):
        data = RadiographDataset(radiographs, split, task="cls")
        features = extract_features(encoder, data, device="cpu", batch_size=3)
        assert features.features.shape == (len(data), TINY_VIT["hidden_size"])
        assert features.patient_ids.tolist() == data.frame["patient_id"].tolist()
        assert features.labels["nodule"].tolist() == [item["label"].item() for item in data]
        malignant = RadiographDataset(radiographs, split, task="cls", label="malignant")
        assert features.labels["malignant"].tolist() == [item["label"].item() for item in malignant]


def test_study_loader_batches_feed_the_study_level_vit(radiographs):
    data = RadiographStudyDataset(radiographs, "train")
    loader = DataLoader(data, batch_size=2, shuffle=False, collate_fn=collate_radiograph_studies)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 1, SIZE, SIZE) and batch["images"].dtype == torch.float32
    assert batch["study_index"].tolist() == [0, 0, 1, 1] and batch["num_views"].tolist() == [2, 2]
    assert batch["label"].tolist() == [0, 1] and batch["label"].dtype == torch.int64
    assert batch["study_id"] == batch["patient_id"] == ["p0", "p1"]
    assert batch["view"] == ["frontal", "lateral", "frontal", "lateral"]
    assert batch["malignancy"].tolist() == [0.0, 3.0]
    torch.testing.assert_close(batch["images"][2:], data[1]["images"], rtol=0, atol=0)

    with seeded(0):
        encoder = build_vit_encoder(TINY_VIT).eval()
    with torch.no_grad():
        tokens, hidden_states = encode_study(encoder, batch["images"], batch["study_index"])
        features = study_representation(encoder, batch["images"], batch["study_index"])
    assert tokens.shape == (4, 1 + (SIZE // 8) ** 2, TINY_VIT["hidden_size"])
    assert len(hidden_states) == TINY_VIT["num_layers"]
    assert torch.equal(tokens[0, 0], tokens[1, 0]) and torch.equal(tokens[2, 0], tokens[3, 0])
    assert not torch.allclose(tokens[0, 0], tokens[2, 0])
    assert features.shape == (2, TINY_VIT["hidden_size"])


def test_missing_folder_table_or_study_names_the_path_and_the_stage(radiographs, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=r"nowhere not found.*dvc repro radiographs") as caught:
        RadiographDataset(missing, "train")
    assert isinstance(caught.value, (UserError, FileNotFoundError))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RadiographsNotFoundError, match=r"studies\.csv not found.*dvc repro radiographs"):
        RadiographStudyDataset(empty, "train")
    (radiographs / "studies" / "p3.npz").rename(tmp_path / "p3.npz")
    with pytest.raises(RadiographsNotFoundError, match=r"studies/p3\.npz not found.*dvc repro radiographs"):
        RadiographDataset(radiographs, "val")
    assert len(RadiographDataset(radiographs, "train")) == 4  # other splits do not need p3


@pytest.mark.parametrize(
    ("argument", "value", "allowed"),
    [
        ("split", "validation", "train, val, test"),
        ("views", "pa", "frontal, lateral"),
        ("label", "cancer", "nodule, malignant"),
        ("task", "seg", "pretrain, cls"),
    ],
)
def test_bad_arguments_name_the_argument_value_and_allowed(radiographs, argument, value, allowed):
    kwargs = {"split": "train", argument: value}
    with pytest.raises(ValueError, match=rf"{argument}: got '{value}', expected one of {allowed}"):
        RadiographDataset(radiographs, **kwargs)
    if argument != "task":
        with pytest.raises(ValueError, match=rf"{argument}: got '{value}'"):
            RadiographStudyDataset(radiographs, **kwargs)


def test_views_must_be_distinct_and_not_empty(radiographs):
    with pytest.raises(ValueError, match="views: .*distinct"):
        RadiographDataset(radiographs, "train", views=("frontal", "frontal"))
    with pytest.raises(ValueError, match="views: got \\(\\), expected one or more"):
        RadiographStudyDataset(radiographs, "train", views=())


def test_an_empty_split_or_mixed_patient_split_is_a_dataset_error(radiographs):
    table = radiographs / "studies.csv"
    studies = pd.read_csv(table, dtype={"scan_id": str, "patient_id": str})
    studies[studies["split"] != "val"].to_csv(table, index=False)
    with pytest.raises(DatasetError, match=r"no studies in split 'val'.*dvc repro radiographs"):
        RadiographDataset(radiographs, "val")
    with pytest.raises(DatasetError, match=r"no studies in split 'val'"):
        RadiographStudyDataset(radiographs, "val")
    assert len(RadiographStudyDataset(radiographs, "test")) == 2

    leaked = pd.concat([studies, studies[studies["patient_id"] == "p0"].assign(scan_id="p0-b", split="test")])
    leaked.to_csv(table, index=False)
    with pytest.raises(DatasetError, match=r"patients p0 are in more than one split"):
        RadiographDataset(radiographs, "train")
