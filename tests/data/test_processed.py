"""The processed-data readers: one checked split, and one-line errors that name the file."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from chestssl.data.processed import (
    ProcessedDataError,
    load_scan,
    read_nodules,
    read_slices,
    read_splits,
    scan_path,
)
from chestssl.errors import UserError


def _splits(root):
    return json.loads((root / "splits.json").read_text())


def _write_splits(root, splits):
    (root / "splits.json").write_text(json.dumps(splits))


def test_consistent_folder_reads(synthetic_processed):
    assert read_splits(synthetic_processed)["test"] == ["p4", "p5"]
    assert len(read_slices(synthetic_processed)) == 72 and len(read_nodules(synthetic_processed)) == 3
    assert load_scan(synthetic_processed, "p0")["image"].shape == (12, 48, 48)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"\x93NUMPY garbage"])
def test_a_truncated_or_foreign_scan_names_the_file(synthetic_processed, content):
    path = scan_path(synthetic_processed, "p1")
    path.write_bytes(content)
    with pytest.raises(ProcessedDataError, match=r"scans/p1\.npz: unreadable .*dvc repro -f preprocess") as error:
        load_scan(synthetic_processed, "p1")
    assert "\n" not in str(error.value)


def test_a_plain_npy_under_the_scan_name_is_refused(synthetic_processed):
    import numpy as np

    with open(scan_path(synthetic_processed, "p1"), "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ProcessedDataError, match=r"p1\.npz: a single array"):
        load_scan(synthetic_processed, "p1")


def test_a_half_written_scan_names_the_file(synthetic_processed):
    path = scan_path(synthetic_processed, "p1")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ProcessedDataError, match=r"p1\.npz"):
        load_scan(synthetic_processed, "p1")


def test_a_scan_without_its_arrays_names_them(synthetic_processed, tmp_path):
    import numpy as np

    np.savez(scan_path(synthetic_processed, "p1"), image=np.zeros((2, 2, 2), np.float16))
    with pytest.raises(ProcessedDataError, match=r"p1\.npz: no array mask, spacing, origin_index, lung_box"):
        load_scan(synthetic_processed, "p1")


def test_a_lung_box_outside_the_slices_is_refused(synthetic_processed):
    import numpy as np

    from chestssl.io import write_npz

    scan = load_scan(synthetic_processed, "p1")
    write_npz(scan_path(synthetic_processed, "p1"), image=scan["image"].astype(np.float16), mask=scan["mask"],
              spacing=scan["spacing"], origin_index=scan["origin_index"], lung_box=np.array([0, 60, 0, 48], np.int32))
    with pytest.raises(ProcessedDataError, match=r"p1\.npz: lung_box \[0, 60, 0, 48\] is not a box"):
        load_scan(synthetic_processed, "p1")


def test_slices_csv_missing_a_column_names_it(synthetic_processed):
    path = synthetic_processed / "slices.csv"
    pd.read_csv(path).drop(columns=["label"]).to_csv(path, index=False)
    with pytest.raises(ProcessedDataError, match=r"slices\.csv: missing column\(s\) label .*preprocess"):
        read_slices(synthetic_processed)


def test_an_empty_slices_csv_is_named(synthetic_processed):
    (synthetic_processed / "slices.csv").write_text("")
    with pytest.raises(ProcessedDataError, match=r"slices\.csv: unreadable as CSV"):
        read_slices(synthetic_processed)


def test_a_patient_in_two_splits_is_refused(synthetic_processed):
    splits = _splits(synthetic_processed)
    splits["test"].append("p0")
    _write_splits(synthetic_processed, splits)
    with pytest.raises(ProcessedDataError, match="patient p0 is in both train and test"):
        read_splits(synthetic_processed)
    with pytest.raises(ProcessedDataError):
        read_slices(synthetic_processed)


def test_an_unknown_or_missing_patient_is_refused(synthetic_processed):
    splits = _splits(synthetic_processed)
    _write_splits(synthetic_processed, {**splits, "val": ["p2", "p3", "LIDC-IDRI-9999"]})
    with pytest.raises(ProcessedDataError, match="not in slices.csv .*LIDC-IDRI-9999"):
        read_splits(synthetic_processed)
    _write_splits(synthetic_processed, {**splits, "val": ["p2"]})
    with pytest.raises(ProcessedDataError, match="no split for patient.* p3"):
        read_slices(synthetic_processed)


def test_an_edited_split_disagreeing_with_the_tables_is_refused(synthetic_processed):
    """Moving a patient in splits.json alone used to leave two sources of truth."""
    splits = _splits(synthetic_processed)
    _write_splits(synthetic_processed, {**splits, "train": ["p0", "p4"], "test": ["p1", "p5"]})
    with pytest.raises(ProcessedDataError, match="disagrees with splits.json for patient.*p1, p4"):
        read_slices(synthetic_processed)
    with pytest.raises(ProcessedDataError, match="disagrees"):
        read_nodules(synthetic_processed)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"train": "p0", "val": [], "test": []}',
                                  '{"train": [1], "val": [], "test": []}'])
def test_a_corrupt_splits_json_is_refused(synthetic_processed, text):
    (synthetic_processed / "splits.json").write_text(text)
    with pytest.raises(ProcessedDataError, match=r"splits\.json"):
        read_splits(synthetic_processed)


def test_the_errors_are_user_errors(synthetic_processed):
    """A stage prints them as one line (chestssl.cli.run_stage)."""
    assert issubclass(ProcessedDataError, UserError)
    (synthetic_processed / "splits.json").unlink()
    with pytest.raises(FileNotFoundError, match="splits.json missing; rerun the preprocess stage"):
        read_slices(synthetic_processed)
