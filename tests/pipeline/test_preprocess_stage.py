"""Stage preprocess: raw LIDC-IDRI series -> the processed folder with a patient-level split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from chestssl.data.processed import SLICE_COLUMNS, load_scan
from chestssl.params import validate
from chestssl.pipeline.download import download
from chestssl.pipeline.preprocess import preprocess
from tests.shipped_params import read_shipped_params


@pytest.fixture(scope="module")
def params() -> dict:
    """Three short phantom scans (the fewest that fill the three splits; the drawn anatomy,
    which renders in half the time and needs no base CT), coarse spacing, one worker."""
    raw = read_shipped_params()
    raw["data"]["phantom"].update(num_scans=3, seed=5, max_slices=100, anatomy="geometric", workers=1)
    raw["preprocess"].update(spacing=[2.5, 2.0, 2.0], workers=1)
    return validate(raw)


@pytest.fixture(scope="module")
def raw_dir(params, tmp_path_factory):
    raw = tmp_path_factory.mktemp("download") / "raw"
    download(params, raw, progress=False)
    return raw


def test_every_scan_is_resampled_windowed_labelled_and_split_by_patient(params, raw_dir, tmp_path):
    out = tmp_path / "processed"
    summary = preprocess(params, raw_dir, out, progress=False)
    assert summary.scans == summary.patients == 3 and summary.skipped == 0
    assert summary.split_patients == {"train": 1, "val": 1, "test": 1}
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(p for split in ("train", "val", "test") for p in splits[split]) == sorted(
        pd.read_csv(raw_dir / "manifest.csv")["patient_id"])
    slices = pd.read_csv(out / "slices.csv", dtype={"patient_id": str, "scan_id": str})
    assert list(slices.columns) == SLICE_COLUMNS and len(slices) == summary.slices
    assert (slices["label"] == 1).sum() == summary.nodule_slices > 0
    for scan_id, rows in slices.groupby("scan_id"):
        scan = load_scan(out, scan_id)
        assert scan["image"].shape[0] == len(rows) and scan["image"].shape == scan["mask"].shape
        image = scan["image"].astype(np.float32)
        assert 0.0 <= image.min() and image.max() <= 1.0
        np.testing.assert_allclose(scan["spacing"], params["preprocess"]["spacing"])
    assert len(pd.read_csv(out / "nodules.csv")) == summary.nodules > 0
