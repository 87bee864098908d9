"""The phantom data source (chestssl.data.phantom): selection, rendering, DICOM, pylidc round trip.

One small scan is generated once per module: with max_slices = 90 the only malignant
scan within the limit is LIDC-IDRI-0078 (87 slices of 3 mm, 13 annotations).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from chestssl.data import phantom
from chestssl.data.lidc import LIDC_DIRNAME, use_dicom_root
from chestssl.data.manifest import read_manifest, series_checksum
from chestssl.data.phantom import Tissue

SMALL = dict(num_scans=1, seed=5, max_slices=90, noise_hu=18.0)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    records = phantom.generate_phantom(raw, progress=False, **SMALL)
    return raw, records


@pytest.fixture(scope="module")
def scan(generated):
    raw, _ = generated
    (choice,) = json.loads((raw / phantom.STATE_FILE).read_text())["scans"]
    return phantom.load_scan(choice["scan_id"])


@pytest.fixture(scope="module")
def rendered(scan):
    """The same scan rendered again in memory, with tissue labels."""
    return phantom.render_phantom(scan, SMALL["seed"], SMALL["noise_hu"])


@pytest.fixture(scope="module")
def loaded(generated, scan, tmp_path_factory):
    """The written series as pylidc loads it."""
    raw, _ = generated
    use_dicom_root(raw / LIDC_DIRNAME, tmp_path_factory.mktemp("pylidc-config"))
    return scan.to_volume(verbose=False)


def series_dir(raw: Path, scan) -> Path:
    return raw / LIDC_DIRNAME / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid


def test_selection_is_deterministic_and_mixes_categories():
    three = phantom.select_scans(3, seed=0, max_slices=100)
    assert three == phantom.select_scans(3, seed=0, max_slices=100)
    assert [c.category for c in three] == ["malignant", "benign", "none"]
    assert phantom.select_scans(3, seed=1, max_slices=100) != three
    eight = phantom.select_scans(8, seed=0, max_slices=140)
    assert [c.category for c in eight] == list(phantom.CATEGORIES) * 2
    assert len({c.patient_id for c in eight}) == 8
    assert all(c.num_slices <= 140 for c in eight)
    for choice in three:
        scan = phantom.load_scan(choice.scan_id)
        assert (scan.patient_id, scan.series_instance_uid) == (choice.patient_id, choice.series_instance_uid)
        assert choice.num_slices == len(scan.slice_zvals)
        assert phantom.category_of_clusters(scan.cluster_annotations(verbose=False)) == choice.category


def test_selection_reports_impossible_requests():
    # More scans than the database holds is a run-time finding, named by its params key.
    with pytest.raises(ValueError, match="data.phantom.num_scans: got 5000, but pylidc's annotation database"):
        phantom.select_scans(5000, seed=0, max_slices=0)
    with pytest.raises(ValueError, match="num_scans: got 0, expected an integer >= 1"):
        phantom.select_scans(0, seed=0, max_slices=0)


def test_series_loads_through_pylidc_with_real_geometry(generated, scan, loaded):
    raw, _ = generated
    files = sorted(series_dir(raw, scan).glob("*.dcm"))
    zvals = scan.slice_zvals
    assert len(files) == len(zvals) == 87
    assert loaded.shape == (512, 512, len(zvals))
    assert len(scan.annotations) == 13
    for ann in scan.annotations:
        assert loaded[ann.bbox()].shape == ann.boolean_mask().shape
    slices = [pydicom.dcmread(f) for f in files]
    assert sorted(float(ds.ImagePositionPatient[2]) for ds in slices) == list(zvals)
    assert sorted(int(ds.InstanceNumber) for ds in slices) == list(range(1, len(zvals) + 1))
    assert len({ds.SOPInstanceUID for ds in slices}) == len(slices)


def test_dicom_tags(generated, scan):
    raw, _ = generated
    path = sorted(series_dir(raw, scan).glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert ds.SOPClassUID == phantom.CT_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (
        scan.patient_id, scan.study_instance_uid, scan.series_instance_uid,
    )
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    assert [float(x) for x in ds.PixelSpacing] == [scan.pixel_spacing] * 2
    assert float(ds.SliceThickness) == scan.slice_thickness
    assert [float(x) for x in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert (ds.Rows, ds.Columns, ds.Modality) == (512, 512, "CT")
    assert path.stat().st_size < 0.7 * 512 * 512 * 2  # deflated


def test_pydicom_writes_and_reads_deflated_like_our_writer(generated, scan, tmp_path):
    raw, _ = generated
    ours = pydicom.dcmread(sorted(series_dir(raw, scan).glob("*.dcm"))[0])
    theirs_path = tmp_path / "pydicom.dcm"
    ours.save_as(theirs_path, enforce_file_format=True)
    theirs = pydicom.dcmread(theirs_path)
    assert theirs.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(theirs.pixel_array, ours.pixel_array)
    assert [e.tag for e in theirs] == [e.tag for e in ours]


def test_same_seed_same_pixels_through_dicom(generated, scan, rendered, loaded, tmp_path):
    raw, records = generated
    np.testing.assert_array_equal(loaded, rendered.hu)
    assert phantom.write_series(scan, rendered.hu, tmp_path / "again") == len(scan.slice_zvals)
    assert series_checksum(tmp_path / "again") == records[0].checksum


def test_other_seed_changes_anatomy_and_noise_has_the_requested_level(scan, rendered):
    other = phantom.render_phantom(scan, SMALL["seed"] + 1, SMALL["noise_hu"])
    counts = np.bincount(rendered.tissue.ravel(), minlength=len(Tissue))
    other_counts = np.bincount(other.tissue.ravel(), minlength=len(Tissue))
    assert abs(int(counts[Tissue.LUNG]) - int(other_counts[Tissue.LUNG])) > 0.01 * counts[Tissue.LUNG]
    clean = phantom.render_phantom(scan, SMALL["seed"], noise_hu=0.0)
    np.testing.assert_array_equal(clean.tissue, rendered.tissue)
    body = clean.tissue != Tissue.AIR
    noise = rendered.hu[body].astype(np.float32) - clean.hu[body]
    assert abs(noise.std() - SMALL["noise_hu"]) < 1.5
    assert abs(noise.mean()) < 0.5


def test_tissues_have_ct_values(rendered):
    hu, tissue = rendered.hu, rendered.tissue
    mean = {t: float(hu[tissue == t].mean()) for t in Tissue if np.any(tissue == t)}
    assert set(mean) == set(Tissue)
    assert mean[Tissue.AIR] < -950
    assert -900 < mean[Tissue.LUNG] < -780
    assert -150 < mean[Tissue.FAT] < -50
    assert 0 < mean[Tissue.SOFT_TISSUE] < 120
    assert mean[Tissue.BONE] > 300
    assert mean[Tissue.LUNG] < mean[Tissue.FAT] < mean[Tissue.SOFT_TISSUE] < mean[Tissue.BONE]
    assert mean[Tissue.VESSEL] > mean[Tissue.LUNG] + 400
    lung_fraction = np.mean(tissue == Tissue.LUNG)
    vessel_fraction = np.mean(tissue == Tissue.VESSEL)
    assert 0.05 < lung_fraction < 0.4
    assert 0.005 < vessel_fraction / lung_fraction < 0.2
    # the two lungs: lung voxels on both sides of the midline of a mid slice
    mid = tissue[:, :, tissue.shape[2] // 2] == Tissue.LUNG
    assert mid[:, :240].sum() > 1000 and mid[:, 272:].sum() > 1000


def test_nodules_lie_in_the_lungs_and_are_brighter(scan, rendered, loaded):
    from pylidc.utils import consensus

    in_lung = (Tissue.LUNG, Tissue.VESSEL, Tissue.NODULE)
    for cluster in scan.cluster_annotations(verbose=False):
        cmask, cbbox, _ = consensus(cluster, clevel=0.5, ret_masks=True)
        assert np.all(rendered.tissue[cbbox][cmask] == Tissue.NODULE)
        for ann in cluster:
            mask = ann.boolean_mask()
            assert np.all(np.isin(rendered.tissue[ann.bbox()][mask], in_lung))
            around = ann.bbox(pad=5)
            lung = rendered.tissue[around] == Tissue.LUNG
            assert lung.sum() > 50
            assert loaded[ann.bbox()][mask].mean() > loaded[around][lung].mean() + 150


def test_manifest_matches_files(generated, scan):
    raw, records = generated
    manifest = read_manifest(raw / "manifest.csv")
    assert len(manifest) == len(records) == 1
    row = manifest.iloc[0]
    folder = series_dir(raw, scan)
    assert (row.patient_id, row.study_instance_uid, row.series_instance_uid) == (
        scan.patient_id, scan.study_instance_uid, scan.series_instance_uid,
    )
    assert row.source == "phantom"
    assert row.images == len(list(folder.glob("*.dcm")))
    assert row.checksum == series_checksum(folder) == records[0].checksum
    state = json.loads((raw / phantom.STATE_FILE).read_text())
    assert state["scans"][0]["category"] == "malignant"
    assert not (raw / ".phantom-tmp").exists()


def test_rerun_keeps_regenerates_and_cleans(generated, scan, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(generated[0], raw)
    original = generated[1]
    folder = series_dir(raw, scan)
    files = sorted(folder.glob("*.dcm"))
    stamps = {f.name: f.stat().st_mtime_ns for f in files}

    # unchanged: kept as is
    assert phantom.generate_phantom(raw, progress=False, **SMALL) == original
    assert {f.name: f.stat().st_mtime_ns for f in folder.glob("*.dcm")} == stamps

    # a missing file: regenerated, identical; a series not selected: removed
    files[3].unlink()
    stale = raw / LIDC_DIRNAME / "LIDC-IDRI-9999" / "1.2.3" / "1.2.3.4"
    stale.mkdir(parents=True)
    (stale / "1-001.dcm").write_bytes(b"not a phantom")
    assert phantom.generate_phantom(raw, progress=False, **SMALL) == original
    assert len(list(folder.glob("*.dcm"))) == len(files)
    assert not (raw / LIDC_DIRNAME / "LIDC-IDRI-9999").exists()

    # other settings: regenerated with the new noise
    records = phantom.generate_phantom(raw, progress=False, **{**SMALL, "noise_hu": 5.0})
    assert records[0].checksum != original[0].checksum
    assert read_manifest(raw / "manifest.csv").checksum.tolist() == [records[0].checksum]


def test_write_series_rejects_a_wrong_shape(scan, tmp_path):
    with pytest.raises(ValueError, match=scan.patient_id):
        phantom.write_series(scan, np.zeros((512, 512, 3), np.int16), tmp_path)


def test_two_worker_processes_write_the_same_series_as_one(tmp_path):
    """Scans rendered in spawned workers are byte-identical to those rendered in this
    process, in the same order, and the state records the same."""
    settings = dict(SMALL, num_scans=2, max_slices=60)
    one = phantom.generate_phantom(tmp_path / "one", progress=False, **settings)
    two = phantom.generate_phantom(tmp_path / "two", progress=False, workers=2, **settings)
    assert len(one) == 2 and one == two
    assert (json.loads((tmp_path / "one" / phantom.STATE_FILE).read_text())
            == json.loads((tmp_path / "two" / phantom.STATE_FILE).read_text()))
    assert not (tmp_path / "two" / ".phantom-tmp").exists()
