"""Readers for real chest X-ray datasets, on tiny fake trees in each published layout."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chestssl.data.cxr import (
    CHESTXRAY14_LABELS,
    CHEXPERT_LABELS,
    COVID_CLASSES,
    SKIPPED_COLUMNS,
    TABLE_COLUMNS,
    CXRConfig,
    CXRDataError,
    CXRLayoutError,
    load_radiograph,
    read_cxr_dataset,
)


def write_image(path: Path, value: int = 128, size: tuple[int, int] = (20, 16)) -> Path:
    """A tiny 8-bit grayscale image (width 20, height 16 by default), PNG or JPEG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path


def assert_patient_level(table: pd.DataFrame) -> None:
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()


# --- CheXpert -----------------------------------------------------------------------------

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def chexpert_row(path: str, view: str, position: str, **labels: str) -> list[str]:
    values = {name: "" for name in CHEXPERT_LABELS} | labels
    return [path, "Female", "60", view, position, *(values[name] for name in CHEXPERT_LABELS)]


@pytest.fixture
def chexpert_root(tmp_path: Path) -> Path:
    """CheXpert-v1.0-small: 8 train patients (patient00001 has two studies, one with a
    lateral view), one train image listed but absent, and one valid patient."""
    return build_chexpert(tmp_path / "CheXpert-v1.0-small")


def build_chexpert(root: Path) -> Path:
    """The tree of :func:`chexpert_root` at ``root`` (a folder named CheXpert-v1.0-small)."""
    train = [
        # Cardiomegaly: positive, Edema: uncertain, Pneumonia: negative, the rest blank.
        chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP",
                     Cardiomegaly="1.0", Edema="-1.0", Pneumonia="0.0"),
        chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg", "Lateral", "",
                     Cardiomegaly="1.0", Edema="-1.0", Pneumonia="0.0"),
        chexpert_row("CheXpert-v1.0-small/train/patient00001/study2/view1_frontal.jpg", "Frontal", "PA",
                     **{"No Finding": "1.0"}),
        chexpert_row("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", "Frontal", "AP",
                     Edema="1.0"),
    ] + [
        chexpert_row(f"CheXpert-v1.0-small/train/patient0000{i}/study1/view1_frontal.jpg", "Frontal", "PA")
        for i in range(3, 9)
    ]
    missing = chexpert_row("CheXpert-v1.0-small/train/patient00009/study1/view1_frontal.jpg", "Frontal", "AP")
    valid = [
        chexpert_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP",
                     Edema="1.0"),
        chexpert_row("CheXpert-v1.0-small/valid/patient64541/study1/view2_lateral.jpg", "Lateral", "",
                     Edema="1.0"),
    ]
    for row in train + valid:
        write_image(root.parent / row[0])
    pd.DataFrame(train + [missing], columns=CHEXPERT_HEADER).to_csv(root / "train.csv", index=False)
    pd.DataFrame(valid, columns=CHEXPERT_HEADER).to_csv(root / "valid.csv", index=False)
    return root


def chexpert_cfg(root: Path, **overrides) -> dict:
    return {"source": "chexpert", "root": str(root), "val_fraction": 0.25, "seed": 3, **overrides}


@pytest.mark.parametrize("uncertain, expected_edema", [("positive", 1.0), ("negative", 0.0), ("ignore", math.nan)])
def test_chexpert_labels_follow_the_uncertain_policy(chexpert_root, uncertain, expected_edema):
    table, labels, _ = read_cxr_dataset(chexpert_cfg(chexpert_root, uncertain=uncertain))
    assert labels == list(CHEXPERT_LABELS)
    assert list(table.columns) == TABLE_COLUMNS + labels
    row = table[table["path"].str.endswith("patient00001/study1/view1_frontal.jpg")].iloc[0]
    assert row["Cardiomegaly"] == 1.0 and row["Pneumonia"] == 0.0
    assert row["Atelectasis"] == 0.0  # blank: not mentioned
    if math.isnan(expected_edema):
        assert math.isnan(row["Edema"])
    else:
        assert row["Edema"] == expected_edema
    # Only the uncertain value is ever unknown.
    assert table[[c for c in labels if c != "Edema"]].notna().all().all()


def test_chexpert_label_subset_keeps_the_given_order(chexpert_root):
    table, labels, _ = read_cxr_dataset(chexpert_cfg(chexpert_root, labels=["Edema", "Cardiomegaly"]))
    assert labels == ["Edema", "Cardiomegaly"]
    assert list(table.columns) == TABLE_COLUMNS + ["Edema", "Cardiomegaly"]
    assert table.loc[table["patient_id"] == "patient00002", "Edema"].tolist() == [1.0]


def test_chexpert_views_and_frontal_filter(chexpert_root):
    everything, _, _ = read_cxr_dataset(chexpert_cfg(chexpert_root))
    assert everything["view"].value_counts().to_dict() == {"frontal": 10, "lateral": 2}
    lateral = everything[everything["view"] == "lateral"]
    assert lateral["view_position"].isna().all()
    assert set(everything.loc[everything["view"] == "frontal", "view_position"]) == {"AP", "PA"}
    frontal, _, _ = read_cxr_dataset(chexpert_cfg(chexpert_root, frontal_only=True))
    assert len(frontal) == 10 and (frontal["view"] == "frontal").all()
    assert frontal["path"].map(lambda p: Path(p).is_absolute() and Path(p).is_file()).all()


@pytest.mark.parametrize("seed", range(6))
def test_chexpert_splits_are_patient_level_and_seeded(chexpert_root, seed):
    table, _, _ = read_cxr_dataset(chexpert_cfg(chexpert_root, seed=seed))
    assert_patient_level(table)
    assert set(table.loc[table["split"] == "test", "patient_id"]) == {"patient64541"}
    train_patients = {f"patient0000{i}" for i in range(1, 9)}
    held = table[table["patient_id"].isin(train_patients)]
    assert set(held["split"]) == {"train", "val"}
    assert held.loc[held["split"] == "val", "patient_id"].nunique() == 2  # 25% of 8 patients
    assert table["study_id"].nunique() == 10  # patient00001 has two studies
    again, _, _ = read_cxr_dataset(chexpert_cfg(chexpert_root, seed=seed))
    pd.testing.assert_frame_equal(table, again)


def test_chexpert_missing_image_is_reported(chexpert_root):
    table, _, skipped = read_cxr_dataset(chexpert_cfg(chexpert_root))
    assert list(skipped.columns) == SKIPPED_COLUMNS
    assert len(skipped) == 1
    assert skipped["path"].iloc[0] == str(chexpert_root / "train/patient00009/study1/view1_frontal.jpg")
    assert "not found" in skipped["reason"].iloc[0] and skipped["listed_in"].iloc[0] == "train.csv"
    assert "patient00009" not in set(table["patient_id"])


def test_chexpert_renamed_folder_still_resolves(chexpert_root):
    renamed = chexpert_root.rename(chexpert_root.parent / "my_chexpert")
    table, _, skipped = read_cxr_dataset(chexpert_cfg(renamed))
    assert len(table) == 12 and len(skipped) == 1
    assert table["path"].str.startswith(str(renamed)).all()


def test_no_usable_image_is_an_error(chexpert_root):
    for image in chexpert_root.rglob("*.jpg"):
        image.unlink()
    with pytest.raises(CXRDataError, match=r"no usable image.*13 rows skipped"):
        read_cxr_dataset(chexpert_cfg(chexpert_root))


# --- ChestX-ray14 -------------------------------------------------------------------------

def build_chestxray14(root: Path, spread: bool, entry_name: str = "Data_Entry_2017.csv") -> None:
    """Six patients; patients 5 and 6 are the official test set; 00000002_001.png is in no
    list, 00000004_000.png is listed but absent; with ``spread`` the images are divided
    over images_001/images and images_002/images, else all in images/."""
    entries = [
        ("00000001_000.png", "Cardiomegaly|Effusion", 0, 1, "PA"),
        ("00000001_001.png", "No Finding", 1, 1, "AP"),
        ("00000002_000.png", "Pleural_Thickening", 0, 2, "PA"),
        ("00000002_001.png", "Hernia", 1, 2, "PA"),
        ("00000003_000.png", "No Finding", 0, 3, "PA"),
        ("00000004_000.png", "Mass", 0, 4, "AP"),
        ("00000005_000.png", "Nodule|Mass", 0, 5, "PA"),
        ("00000005_001.png", "No Finding", 1, 5, "PA"),
        ("00000006_000.png", "Effusion", 0, 6, "AP"),
    ]
    frame = pd.DataFrame(
        [(name, labels, follow_up, patient, 58, "M", position, 2048, 2500, 0.14, 0.14)
         for name, labels, follow_up, patient, position in entries],
        columns=["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                 "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"],
    )
    root.mkdir(parents=True, exist_ok=True)
    frame.to_csv(root / entry_name, index=False)
    test = ["00000005_000.png", "00000005_001.png", "00000006_000.png"]
    train_val = [name for name, *_ in entries if name not in test and name != "00000002_001.png"]
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    for i, (name, *_) in enumerate(entries):
        if name == "00000004_000.png":
            continue
        folder = root / (f"images_{1 + i % 2:03d}" if spread else "") / "images"
        write_image(folder / name)


@pytest.mark.parametrize("spread, entry_name", [(True, "Data_Entry_2017.csv"), (False, "Data_Entry_2017_v2020.csv")])
def test_chestxray14_official_test_split_and_labels(tmp_path, spread, entry_name):
    build_chestxray14(tmp_path / "nih", spread, entry_name)
    cfg = {"source": "chestxray14", "root": str(tmp_path / "nih"), "val_fraction": 0.34, "seed": 0}
    table, labels, skipped = read_cxr_dataset(cfg)
    assert labels == list(CHESTXRAY14_LABELS)
    test_images = {Path(p).name for p in table.loc[table["split"] == "test", "path"]}
    assert test_images == {"00000005_000.png", "00000005_001.png", "00000006_000.png"}
    assert_patient_level(table)
    assert set(table.loc[table["split"] != "test", "split"]) == {"train", "val"}
    assert table.loc[table["split"] == "val", "patient_id"].nunique() == 1  # 34% of 3 train_val patients
    first = table[table["path"].str.endswith("00000001_000.png")].iloc[0]
    assert first[["Cardiomegaly", "Effusion"]].tolist() == [1.0, 1.0]
    assert first[labels].sum() == 2.0
    assert (table.loc[table["path"].str.endswith("00000003_000.png"), labels] == 0.0).all().all()
    assert table.loc[table["path"].str.endswith("00000002_000.png"), "Pleural_Thickening"].item() == 1.0
    # Each image is its own study, named after patient and follow-up.
    assert table["study_id"].is_unique
    assert set(table["study_id"]) == {Path(p).stem for p in table["path"]}
    assert (table["view"] == "frontal").all() and set(table["view_position"]) == {"AP", "PA"}
    reasons = dict(zip(skipped["path"].map(lambda p: Path(p).name), skipped["reason"]))
    assert set(reasons) == {"00000002_001.png", "00000004_000.png"}
    assert "neither" in reasons["00000002_001.png"] and "not found" in reasons["00000004_000.png"]


# --- COVID-19 Radiography -------------------------------------------------------------------

def build_covid(root: Path, nested: bool, per_class: int = 5) -> None:
    """Class folders in the newer layout (``images/`` + ``masks/``) or the older one
    (images directly in the class folder), with a metadata xlsx beside each."""
    for index, name in enumerate(COVID_CLASSES):
        folder = root / name
        for i in range(1, per_class + 1):
            stem = f"{name.replace(' ', '_')}-{i}"
            write_image((folder / "images" if nested else folder) / f"{stem}.png", value=40 * index)
            if nested:
                write_image(folder / "masks" / f"{stem}.png", value=255)
        (root / f"{name}.metadata.xlsx").write_bytes(b"PK\x03\x04 not read")


@pytest.mark.parametrize("nested", [True, False])
def test_covid_both_layouts_masks_ignored_stratified_split(tmp_path, nested):
    build_covid(tmp_path / "COVID-19_Radiography_Dataset", nested)
    cfg = {"source": "covid_radiography", "root": str(tmp_path / "COVID-19_Radiography_Dataset"),
           "val_fraction": 0.2, "test_fraction": 0.2, "seed": 1}
    table, labels, skipped = read_cxr_dataset(cfg)
    assert labels == ["class"] and skipped.empty
    assert len(table) == 20
    assert not table["path"].map(lambda p: "masks" in Path(p).parts).any()
    assert table["class"].value_counts().to_dict() == {0: 5, 1: 5, 2: 5, 3: 5}
    for index, name in enumerate(COVID_CLASSES):
        assert (table.loc[table["class"] == index, "path"].map(lambda p: Path(p).parts[-3 if nested else -2])
                == name).all()
    # Every image is its own patient; each class contributes 3/1/1 images to train/val/test.
    assert table["patient_id"].is_unique and (table["study_id"] == table["patient_id"]).all()
    per_class = table.groupby(["class", "split"]).size().unstack()
    assert (per_class[["train", "val", "test"]].to_numpy() == [3, 1, 1]).all()


def test_covid_missing_class_folder_is_named(tmp_path):
    build_covid(tmp_path / "covid", nested=True, per_class=1)
    for file in (tmp_path / "covid" / "Lung_Opacity").rglob("*.png"):
        file.unlink()
    for folder in sorted((tmp_path / "covid" / "Lung_Opacity").rglob("*"), reverse=True):
        folder.rmdir()
    (tmp_path / "covid" / "Lung_Opacity").rmdir()
    with pytest.raises(CXRLayoutError, match=r"Lung_Opacity.*expected the COVID-19 Radiography"):
        read_cxr_dataset({"source": "covid_radiography", "root": str(tmp_path / "covid")})


# --- MIMIC-CXR-JPG ------------------------------------------------------------------------

MIMIC_STUDIES = {
    # study_id: (subject_id, split, [(dicom_id, ViewPosition)])
    "50000001": ("10000032", "train", [("d1a", "PA"), ("d1b", "LATERAL")]),
    "50000002": ("10000032", "train", [("d2a", "AP"), ("d2b", "LL"), ("d2c", "PA")]),
    "50000003": ("10000032", "train", [("d3a", "AP")]),
    "50000004": ("11000011", "validate", [("d4a", "PA"), ("d4b", "LATERAL")]),
    "50000005": ("12000012", "test", [("d5a", "AP"), ("d5b", "")]),  # blank view: skipped
    "50000006": ("12000012", "test", [("d6a", "PA"), ("d6b", "LAO")]),  # oblique: skipped
}
MISSING_DICOM = "d2c"


def build_mimic(root: Path) -> None:
    meta, split, labels = [], [], []
    for study, (subject, name, views) in MIMIC_STUDIES.items():
        for dicom, position in views:
            meta.append((dicom, subject, study, "CHEST (PA AND LAT)", position, 3056, 2544))
            split.append((dicom, study, subject, name))
            if dicom != MISSING_DICOM:
                write_image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
        values = {label: "" for label in CHEXPERT_LABELS}
        values["Edema"] = "-1.0" if study == "50000002" else "1.0"
        labels.append((subject, study, *values.values()))
    pd.DataFrame(meta, columns=["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                                "ViewPosition", "Rows", "Columns"]).to_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
                                                                            index=False)
    pd.DataFrame(split, columns=["dicom_id", "study_id", "subject_id", "split"]).to_csv(
        root / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    pd.DataFrame(labels, columns=["subject_id", "study_id", *CHEXPERT_LABELS]).to_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv", index=False)


def test_mimic_views_grouped_by_study_with_official_split(tmp_path):
    build_mimic(tmp_path / "mimic")
    table, labels, skipped = read_cxr_dataset(
        {"source": "mimic_cxr", "root": str(tmp_path / "mimic"), "uncertain": "negative"}
    )
    views_per_study = table.groupby("study_id")["path"].count().to_dict()
    assert views_per_study == {"50000001": 2, "50000002": 2, "50000003": 1, "50000004": 2, "50000005": 1,
                               "50000006": 1}
    per_study = table.groupby("study_id")
    assert (per_study["patient_id"].nunique() == 1).all() and (per_study["split"].nunique() == 1).all()
    # Labels are per study, so every view of a study carries the same ones.
    assert (per_study[labels].nunique(dropna=False) == 1).all().all()
    assert set(table.loc[table["study_id"] == "50000002", "Edema"]) == {0.0}  # uncertain -> negative
    assert set(table.loc[table["study_id"] == "50000001", "Edema"]) == {1.0}
    assert table.set_index("study_id")["split"].to_dict() == {
        "50000001": "train", "50000002": "train", "50000003": "train", "50000004": "val", "50000005": "test",
        "50000006": "test"}
    assert_patient_level(table)
    assert table.loc[table["view_position"] == "LL", "view"].tolist() == ["lateral"]
    lateral = table[table["path"].str.endswith("d1b.jpg")].iloc[0]
    assert lateral["view"] == "lateral"
    assert lateral["path"] == str(tmp_path / "mimic/files/p10/p10000032/s50000001/d1b.jpg")
    reasons = dict(zip(skipped["path"].map(lambda p: Path(p).stem), skipped["reason"]))
    assert set(reasons) == {"d2c", "d5b", "d6b"}
    assert "not found" in reasons["d2c"] and "'LAO'" in reasons["d6b"]

    frontal, _, _ = read_cxr_dataset({"source": "mimic_cxr", "root": str(tmp_path / "mimic"), "frontal_only": True})
    assert set(frontal["view"]) == {"frontal"} and len(frontal) == 6


# --- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "source, build, remove",
    [
        ("chexpert", None, "valid.csv"),
        ("chestxray14", lambda root: build_chestxray14(root, spread=False), "test_list.txt"),
        ("mimic_cxr", build_mimic, "mimic-cxr-2.0.0-chexpert.csv"),
    ],
)
def test_missing_label_file_is_named_with_the_layout(tmp_path, chexpert_root, source, build, remove):
    root = chexpert_root if build is None else tmp_path / source
    if build is not None:
        root.mkdir()
        build(root)
    (root / remove).unlink()
    with pytest.raises(CXRLayoutError) as raised:
        read_cxr_dataset({"source": source, "root": str(root)})
    assert str(root / remove) in str(raised.value) and "expected the" in str(raised.value)


def test_missing_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.cxr\.root: folder .*nowhere not found"):
        read_cxr_dataset({"source": "chestxray14", "root": str(tmp_path / "nowhere")})


def test_cfg_from_params_takes_defaults_and_reads_empty_labels_as_all():
    cfg = CXRConfig.from_params({"source": "covid_radiography", "root": "/data/covid", "labels": ["class"]})
    assert cfg.labels == ("class",) and cfg.uncertain == "positive" and cfg.seed == 0
    assert CXRConfig.from_params({"source": "rendered", "labels": []}) == CXRConfig(source="rendered")


def test_a_source_not_on_disk_and_unknown_labels_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"source: got 'rendered', expected a dataset read from disk"):
        read_cxr_dataset({"source": "rendered"})
    with pytest.raises(ValueError, match=r"labels: \['Effusion'\] are not chexpert labels"):
        read_cxr_dataset({"source": "chexpert", "root": str(tmp_path), "labels": ["Effusion"]})


# --- load_radiograph ----------------------------------------------------------------------

def test_load_radiograph_8bit_png_keeps_aspect_by_padding(tmp_path):
    # 32 wide, 16 tall, white: the long side fills 32 pixels, 8 black rows above and below.
    path = write_image(tmp_path / "wide.png", value=255, size=(32, 16))
    image = load_radiograph(path, 32)
    assert image.shape == (32, 32) and image.dtype == np.float32
    assert np.allclose(image[8:24], 1.0) and np.all(image[:8] == 0) and np.all(image[24:] == 0)
    small = load_radiograph(path, 8)  # shrinking: 4 image rows, 2 padding rows each side
    assert small.shape == (8, 8) and np.allclose(small[2:6], 1.0) and np.all(small[:2] == 0)


def test_load_radiograph_16bit_png_uses_the_16bit_range(tmp_path):
    pixels = np.full((16, 20), 30000, np.uint16)
    pixels[:, :10] = 65535
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    image = load_radiograph(tmp_path / "deep.png", 40)  # 20 -> 40 wide, 16 -> 32 tall
    assert image.shape == (40, 40) and 0.0 <= image.min() and image.max() <= 1.0
    assert np.isclose(image[20, 2], 1.0, atol=1e-3)
    assert np.isclose(image[20, 37], 30000 / 65535, atol=1e-3)
    assert np.all(image[:4] == 0) and np.all(image[36:] == 0)


def test_load_radiograph_rgb_jpeg_becomes_grayscale(tmp_path):
    rgb = np.zeros((16, 20, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "colour.jpg", quality=95)
    image = load_radiograph(tmp_path / "colour.jpg", 20)
    luma = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255
    assert image.shape == (20, 20) and image.dtype == np.float32
    assert abs(float(np.median(image[4:14])) - luma) < 0.03
    with pytest.raises(FileNotFoundError, match="absent.png"):
        load_radiograph(tmp_path / "absent.png", 20)


def test_mimic_patient_in_two_official_splits_goes_to_the_held_out_one(tmp_path, caplog):
    build_mimic(tmp_path / "mimic")
    split_file = tmp_path / "mimic" / "mimic-cxr-2.0.0-split.csv.gz"
    splits = pd.read_csv(split_file, dtype=str)
    splits.loc[splits["study_id"] == "50000003", "split"] = "test"  # one of subject 10000032's three studies
    splits.to_csv(split_file, index=False)
    table, _, _ = read_cxr_dataset({"source": "mimic_cxr", "root": str(tmp_path / "mimic")})
    assert set(table.loc[table["patient_id"] == "10000032", "split"]) == {"test"}
    assert_patient_level(table)
    assert "several splits" in caplog.text
