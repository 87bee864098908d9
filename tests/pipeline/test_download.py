"""Stage download: data/raw filled from `data.source` (phantom, tcia or local)."""

from __future__ import annotations

import json

from chestssl.data.lidc import LIDC_DIRNAME
from chestssl.data.manifest import read_manifest
from chestssl.params import validate
from chestssl.pipeline.download import download
from tests.data.dicom_factory import write_series
from tests.shipped_params import read_shipped_params


def _params(source: str, **block) -> dict:
    raw = read_shipped_params()
    raw["data"]["source"] = source
    raw["data"][source].update(block)
    return validate(raw)


def test_the_phantom_writes_series_in_the_pylidc_layout_and_the_manifest(tmp_path):
    # With at most 90 slices and seed 5, one scan: LIDC-IDRI-0078 (87 slices).
    raw = tmp_path / "raw"
    records = download(_params("phantom", num_scans=1, seed=5, max_slices=90), raw, progress=False)
    (record,) = records
    assert record.source == "phantom" and record.images == 87
    series = raw / LIDC_DIRNAME / record.patient_id / record.study_instance_uid / record.series_instance_uid
    assert len(list(series.glob("*.dcm"))) == 87
    manifest = read_manifest(raw / "manifest.csv")
    assert manifest["series_instance_uid"].tolist() == [record.series_instance_uid]
    assert [scan["scan_id"] for scan in json.loads((raw / "phantom.json").read_text())["scans"]]


def test_a_local_folder_is_linked(tmp_path):
    study, series = "1.2.826.0.1.3680043.8.498.1.1", "1.2.826.0.1.3680043.8.498.1.2"
    source = tmp_path / "user" / "LIDC-IDRI"
    write_series(source / "LIDC-IDRI-0001" / study / series, "LIDC-IDRI-0001", study, series, num_slices=3)
    raw = tmp_path / "raw"
    (record,) = download(_params("local", path=str(source)), raw)
    assert (record.patient_id, record.images, record.source) == ("LIDC-IDRI-0001", 3, "local")
    assert (raw / LIDC_DIRNAME / "LIDC-IDRI-0001" / study / series).is_symlink()
    assert read_manifest(raw / "manifest.csv")["patient_id"].tolist() == ["LIDC-IDRI-0001"]


def test_tcia_gets_its_whole_block(tmp_path, monkeypatch):
    import chestssl.data.tcia as tcia

    calls = []
    monkeypatch.setattr(tcia, "download_tcia", lambda *args, **kwargs: calls.append((args, kwargs)) or [])
    params = _params("tcia", max_patients=2)
    assert download(params, tmp_path / "raw", progress=False) == []
    (args, kwargs), = calls
    assert args == (tmp_path / "raw",)
    assert kwargs == {**params["data"]["tcia"], "progress": False} and kwargs["max_patients"] == 2


def test_idc_gets_its_whole_block(tmp_path, monkeypatch):
    import chestssl.data.idc as idc

    calls = []
    monkeypatch.setattr(idc, "download_idc", lambda *args, **kwargs: calls.append((args, kwargs)) or [])
    params = _params("idc", max_patients=3)
    assert download(params, tmp_path / "raw", progress=False) == []
    (args, kwargs), = calls
    assert args == (tmp_path / "raw",)
    assert kwargs == {**params["data"]["idc"], "progress": False} and kwargs["max_patients"] == 3
