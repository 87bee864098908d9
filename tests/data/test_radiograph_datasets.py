"""Radiograph datasets over the radiographs folder: the rendered studies of the synthetic
processed folder (tests/conftest.py: six patients, two per split; p1, p3, p5 have one
nodule), and a folder shaped like a real dataset (studies of one to three images,
unknown labels, no masks).

The fixture's nodules are rated malignancy 4; the ``radiographs`` fixture rates them
3 (p1), 4 (p3) and 5 (p5) before rendering, so malignant labels fall on both sides of
the threshold.
"""

from __future__ import annotations

import json
import math
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
)
from chestssl.data.radiograph_folder import RadiographFolderWriter, open_radiograph_folder
from chestssl.errors import UserError
from chestssl.eval.radiograph_probe import extract_image_features, extract_study_features
from chestssl.models.seeding import seeded
from chestssl.models.study_vit import encode_study, study_representation
from chestssl.models.vit import build_vit_encoder

SIZE = 32
CFG = {"side": SIZE, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]}
RATINGS = {"p1": 3.0, "p3": 4.0, "p5": 5.0}
NODULE_PATIENTS = {"p1", "p3", "p5"}
MALIGNANT = {"p0": 0, "p1": 0, "p2": 0, "p3": 1, "p4": 0, "p5": 1}  # p1 is rated 3, below the cut
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


#: A dataset-shaped folder: (study, patient, split, views, labels (finding_a, finding_b)).
DATASET_STUDIES = [
    ("s1", "a", "train", ("frontal",), (1.0, 0.0)),
    ("s2", "a", "train", ("frontal", "lateral", "frontal"), (0.0, math.nan)),
    ("s3", "b", "train", ("lateral",), (1.0, 1.0)),
    ("s4", "c", "val", ("frontal", "lateral"), (0.0, 0.0)),
    ("s5", "d", "test", ("frontal",), (math.nan, 1.0)),
]


@pytest.fixture
def dataset_folder(tmp_path: Path) -> Path:
    """:data:`DATASET_STUDIES` written with the folder writer; image i is filled with i / 10."""
    out_dir = tmp_path / "dataset"
    studies = pd.DataFrame([(s, p, split, *labels) for s, p, split, _, labels in DATASET_STUDIES],
                           columns=["study_id", "patient_id", "split", "finding_a", "finding_b"])
    images = pd.DataFrame([(s, view) for s, _, _, views, _ in DATASET_STUDIES for view in views],
                          columns=["study_id", "view"])
    writer = RadiographFolderWriter(out_dir, len(images), SIZE, with_masks=False, fingerprint="test")
    for index in range(len(images)):
        writer.put(index, np.full((SIZE, SIZE), index / 10, np.float32))
    writer.finish({"source": "chexpert", "labels": ["finding_a", "finding_b"]}, studies, images)
    return out_dir


def _stored(radiographs: Path, study_id: str, view: str) -> tuple[np.ndarray, np.ndarray | None]:
    folder = open_radiograph_folder(radiographs)
    row = folder.images.index[(folder.images["study_id"] == study_id) & (folder.images["view"] == view)][0]
    mask = None if folder.masks is None else np.asarray(folder.masks[row], np.float32)
    return np.asarray(folder.pixels[row], np.float32), mask


def test_items_hold_the_stored_views_with_shapes_dtypes_and_labels(radiographs):
    data = RadiographDataset(radiographs, "val")
    assert data.size == SIZE and len(data) == 4 == len(data.frame)
    assert data.label_names == ["nodule", "malignant"]
    for index in range(len(data)):
        item = data[index]
        assert item["image"].shape == item["mask"].shape == (1, SIZE, SIZE)
        assert item["image"].dtype == item["mask"].dtype == item["labels"].dtype == torch.float32
        assert item["labels"].shape == (2,)
        assert item["study_id"] == item["patient_id"]
        assert data.frame.loc[index, "view"] == item["view"]
        assert data.frame.loc[index, "study_id"] == item["study_id"]
        image, mask = _stored(radiographs, item["study_id"], item["view"])
        np.testing.assert_array_equal(item["image"][0].numpy(), image)
        np.testing.assert_array_equal(item["mask"][0].numpy(), mask)
        has_nodule = item["patient_id"] in NODULE_PATIENTS
        assert bool(item["mask"].any()) == has_nodule  # the projected nodule is in both views
        assert item["labels"].tolist() == [float(has_nodule), float(MALIGNANT[item["patient_id"]])]


def test_one_item_per_study_and_view_in_study_order(radiographs):
    studies = open_radiograph_folder(radiographs).studies
    for split in ("train", "val", "test"):
        data = RadiographDataset(radiographs, split)
        study_ids = sorted(studies.loc[studies["split"] == split, "study_id"])
        pairs = [(data[i]["study_id"], data[i]["view"]) for i in range(len(data))]
        assert pairs == [(study_id, view) for study_id in study_ids for view in ("frontal", "lateral")]


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
    assert set().union(*patients.values()) == set(open_radiograph_folder(radiographs).studies["patient_id"])


def test_view_selection_and_order(radiographs):
    lateral = RadiographDataset(radiographs, "test", views=("lateral",))
    assert len(lateral) == 2 and {item["view"] for item in lateral} == {"lateral"}
    np.testing.assert_array_equal(lateral[0]["image"][0].numpy(), _stored(radiographs, "p4", "lateral")[0])
    assert [item["view"] for item in RadiographDataset(radiographs, "test", views="frontal")] == ["frontal"] * 2

    reversed_views = RadiographStudyDataset(radiographs, "test", views=("lateral", "frontal"))
    study = reversed_views[1]
    assert study["images"].shape == (2, 1, SIZE, SIZE) and study["views"] == ("lateral", "frontal")
    np.testing.assert_array_equal(study["images"][0, 0].numpy(), _stored(radiographs, study["study_id"], "lateral")[0])
    np.testing.assert_array_equal(study["images"][1, 0].numpy(), _stored(radiographs, study["study_id"], "frontal")[0])
    # the frontal and lateral projections of one CT differ
    assert not torch.equal(study["images"][0], study["images"][1])


def test_patient_ids_restrict_both_datasets(radiographs):
    data = RadiographDataset(radiographs, "train", patient_ids=["p1"])
    assert len(data) == 2 and {item["patient_id"] for item in data} == {"p1"}
    assert [item["labels"].tolist() for item in data] == [[1.0, 0.0]] * 2
    studies = RadiographStudyDataset(radiographs, "train", patient_ids=["p0"])
    assert len(studies) == 1 and studies[0]["patient_id"] == "p0" and studies[0]["labels"].tolist() == [0.0, 0.0]
    with pytest.raises(DatasetError, match=r"patient_ids: p2 not in split 'train'"):
        RadiographDataset(radiographs, "train", patient_ids=["p1", "p2"])
    with pytest.raises(DatasetError, match=r"patient_ids: got an empty list"):
        RadiographStudyDataset(radiographs, "train", patient_ids=[])


def test_the_linear_probe_reads_the_folders_labels_from_the_items(radiographs):
    with seeded(0):
        encoder = build_vit_encoder(TINY_VIT)
    for split in ("train", "val"):
        data = RadiographDataset(radiographs, split)
        features = extract_image_features(encoder, data, device="cpu", batch_size=3)
        assert features.features.shape == (len(data), TINY_VIT["hidden_size"])
        assert features.patient_ids.tolist() == data.frame["patient_id"].tolist()
        assert list(features.labels) == ["nodule", "malignant"]
        assert features.labels["nodule"].tolist() == [int(p in NODULE_PATIENTS) for p in data.frame["patient_id"]]
        assert features.labels["malignant"].tolist() == [MALIGNANT[p] for p in data.frame["patient_id"]]


def test_study_loader_batches_feed_the_study_level_vit(radiographs):
    data = RadiographStudyDataset(radiographs, "train")
    loader = DataLoader(data, batch_size=2, shuffle=False, collate_fn=collate_radiograph_studies)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 1, SIZE, SIZE) and batch["images"].dtype == torch.float32
    assert batch["study_index"].tolist() == [0, 0, 1, 1] and batch["num_views"].tolist() == [2, 2]
    assert batch["labels"].tolist() == [[0.0, 0.0], [1.0, 0.0]] and batch["labels"].dtype == torch.float32
    assert batch["study_id"] == batch["patient_id"] == ["p0", "p1"]
    assert batch["view"] == ["frontal", "lateral", "frontal", "lateral"]
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


# --------------------------------------------------------------------------------------
# A dataset-shaped folder: variable images per study, unknown labels, no masks
# --------------------------------------------------------------------------------------


def test_dataset_folder_items_have_no_mask_and_keep_unknown_labels(dataset_folder):
    data = RadiographDataset(dataset_folder, "train")
    assert data.label_names == ["finding_a", "finding_b"]
    # s1 (1 image), s2 (3: frontal, frontal, lateral), s3 (1); images of a study by view, then as stored.
    assert [(item["study_id"], item["view"]) for item in data] == [
        ("s1", "frontal"), ("s2", "frontal"), ("s2", "frontal"), ("s2", "lateral"), ("s3", "lateral")]
    assert [round(float(item["image"][0, 0, 0]), 2) for item in data] == [0.0, 0.1, 0.3, 0.2, 0.4]
    assert all("mask" not in item for item in data)
    assert data[1]["labels"][0].item() == 0.0 and math.isnan(data[1]["labels"][1].item())
    frontal = RadiographDataset(dataset_folder, "train", views="frontal")
    assert [item["study_id"] for item in frontal] == ["s1", "s2", "s2"]  # s3 has no frontal image


def test_dataset_folder_studies_carry_every_image_and_batch_with_different_counts(dataset_folder):
    studies = RadiographStudyDataset(dataset_folder, "train")
    assert [study["views"] for study in studies] == [("frontal",), ("frontal", "frontal", "lateral"), ("lateral",)]
    batch = collate_radiograph_studies([studies[0], studies[1], studies[2]])
    assert batch["num_views"].tolist() == [1, 3, 1] and batch["study_index"].tolist() == [0, 1, 1, 1, 2]
    assert batch["labels"].shape == (3, 2)
    only_frontal = RadiographStudyDataset(dataset_folder, "train", views=("frontal",))
    assert [study["study_id"] for study in only_frontal] == ["s1", "s2"]
    assert only_frontal[1]["images"].shape == (2, 1, SIZE, SIZE)


def test_unknown_labels_are_left_out_of_the_probe(dataset_folder):
    with seeded(0):
        encoder = build_vit_encoder(TINY_VIT)
    images = extract_image_features(encoder, RadiographDataset(dataset_folder, "train"), device="cpu")
    assert images.labels["finding_a"].tolist() == [1, 0, 0, 0, 1]
    assert images.labels["finding_b"].tolist() == [0, -1, -1, -1, 1]
    studies = extract_study_features(encoder, RadiographStudyDataset(dataset_folder, "train"), device="cpu")
    assert studies.features.shape == (3, TINY_VIT["hidden_size"])
    assert studies.labels["finding_b"].tolist() == [0, -1, 1]
    assert studies.patient_ids.tolist() == ["a", "a", "b"]


def test_a_view_the_folder_lacks_is_named(dataset_folder):
    with pytest.raises(DatasetError, match=r"no lateral images in split 'test'.*pretrain_radiographs\.views"):
        RadiographDataset(dataset_folder, "test", views="lateral")


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_missing_folder_or_file_names_the_path_and_the_stage(radiographs, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=r"nowhere not found.*dvc repro radiographs") as caught:
        RadiographDataset(missing, "train")
    assert isinstance(caught.value, (UserError, FileNotFoundError))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RadiographsNotFoundError, match=r"radiographs\.json not found.*dvc repro radiographs"):
        RadiographStudyDataset(empty, "train")
    (radiographs / "images.npy").rename(tmp_path / "images.npy")
    with pytest.raises(RadiographsNotFoundError, match=r"images\.npy not found.*dvc repro radiographs"):
        RadiographDataset(radiographs, "val")


def test_an_older_layout_or_mismatched_images_ask_for_a_rerun(radiographs, tmp_path):
    info = json.loads((radiographs / "radiographs.json").read_text())
    (radiographs / "radiographs.json").write_text(json.dumps({**info, "layout": 1}))
    with pytest.raises(DatasetError, match=r"layout 1, this code reads layout 2.*dvc repro radiographs"):
        RadiographDataset(radiographs, "train")
    (radiographs / "radiographs.json").write_text(json.dumps(info))
    np.save(radiographs / "images.npy", np.zeros((3, SIZE, SIZE), np.float16))
    with pytest.raises(DatasetError, match=r"images\.npy: float16 \(3, 32, 32\), expected float16 \(12, 32, 32\)"):
        RadiographDataset(radiographs, "train")


@pytest.mark.parametrize(
    ("argument", "value", "allowed"),
    [
        ("split", "validation", "train, val, test"),
        ("views", "pa", "frontal, lateral"),
    ],
)
def test_bad_arguments_name_the_argument_value_and_allowed(radiographs, argument, value, allowed):
    kwargs = {"split": "train", argument: value}
    with pytest.raises(ValueError, match=rf"{argument}: got '{value}', expected one of {allowed}"):
        RadiographDataset(radiographs, **kwargs)
    with pytest.raises(ValueError, match=rf"{argument}: got '{value}'"):
        RadiographStudyDataset(radiographs, **kwargs)


def test_views_must_be_distinct_and_not_empty(radiographs):
    with pytest.raises(ValueError, match="views: .*distinct"):
        RadiographDataset(radiographs, "train", views=("frontal", "frontal"))
    with pytest.raises(ValueError, match="views: got \\(\\), expected one or more"):
        RadiographStudyDataset(radiographs, "train", views=())


def test_an_empty_split_mixed_patient_split_or_bad_label_is_a_dataset_error(radiographs):
    table = radiographs / "studies.csv"
    images_table = radiographs / "images.csv"
    studies = pd.read_csv(table, dtype={"study_id": str, "scan_id": str, "patient_id": str})
    images = pd.read_csv(images_table, dtype={"study_id": str})
    kept = studies["split"] != "val"
    studies[kept].to_csv(table, index=False)
    images[images["study_id"].isin(studies.loc[kept, "study_id"])].to_csv(images_table, index=False)
    np.save(radiographs / "images.npy", np.zeros((8, SIZE, SIZE), np.float16))
    np.save(radiographs / "masks.npy", np.zeros((8, SIZE, SIZE), bool))
    with pytest.raises(DatasetError, match=r"no studies in split 'val'.*dvc repro radiographs"):
        RadiographDataset(radiographs, "val")
    with pytest.raises(DatasetError, match=r"no studies in split 'val'"):
        RadiographStudyDataset(radiographs, "val")
    assert len(RadiographStudyDataset(radiographs, "test")) == 2

    leaked = studies[kept].copy()
    leaked.loc[leaked["patient_id"] == "p0", "split"] = "test"
    leaked = pd.concat([leaked, studies[studies["patient_id"] == "p2"].assign(study_id="p2-b", split="train")])
    leaked.loc[leaked["study_id"] == "p2-b", "patient_id"] = "p4"
    leaked.to_csv(table, index=False)
    with pytest.raises(DatasetError, match=r"patients p4 are in more than one split"):
        RadiographDataset(radiographs, "train")

    bad = studies[kept].assign(nodule=lambda frame: frame["nodule"] * 2)
    bad.to_csv(table, index=False)
    with pytest.raises(DatasetError, match=r"label 'nodule' must be 1, 0 or empty"):
        RadiographDataset(radiographs, "train")


def test_an_opened_folder_serves_every_split_like_its_path(radiographs):
    folder = open_radiograph_folder(radiographs)
    for split in ("train", "test"):
        by_path, by_folder = RadiographDataset(radiographs, split), RadiographDataset(folder, split)
        assert by_folder.folder is folder and by_folder.radiographs_dir == by_path.radiographs_dir
        pd.testing.assert_frame_equal(by_folder.frame, by_path.frame)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(by_folder, by_path, strict=True))
        studies = RadiographStudyDataset(folder, split)
        assert [s["study_id"] for s in studies] == [s["study_id"] for s in RadiographStudyDataset(radiographs, split)]
