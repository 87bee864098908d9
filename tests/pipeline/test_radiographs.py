"""Stage radiographs: the radiographs folder, rendered from the processed CT or imported from a dataset."""

from __future__ import annotations

import pytest

from chestssl.data.radiograph_folder import open_radiograph_folder
from chestssl.params import validate
from chestssl.pipeline.radiographs import radiographs
from tests.shipped_params import read_shipped_params


def _params(**cxr) -> dict:
    raw = read_shipped_params()
    raw["data"]["cxr"].update(cxr)
    return validate(raw)


def test_each_processed_scan_becomes_a_two_view_study(synthetic_processed, tmp_path):
    out = tmp_path / "radiographs"
    studies = radiographs(_params(), synthetic_processed, out, progress=False)
    folder = open_radiograph_folder(out)
    assert folder.source == "rendered" and folder.size == 64 and folder.info["views"] == ["frontal", "lateral"]
    # Six patients, one scan each; p1, p3 and p5 have a nodule.
    assert studies["study_id"].tolist() == folder.studies["study_id"].tolist() == [f"p{i}" for i in range(6)]
    assert studies["nodule"].tolist() == [0, 1] * 3
    assert folder.pixels.shape == (12, 64, 64) and 0.0 <= float(folder.pixels.min()) <= float(folder.pixels.max()) <= 1
    assert folder.info["hu_window"] == list(_params()["preprocess"]["hu_window"])


def test_a_real_dataset_is_imported_instead(tmp_path, monkeypatch):
    import chestssl.data.cxr_import as cxr_import

    calls = []
    monkeypatch.setattr(cxr_import, "import_radiographs", lambda *args, **kwargs: calls.append((args, kwargs)) or "table")
    params = _params(source="chexpert", root=str(tmp_path / "CheXpert-v1.0-small"))
    assert radiographs(params, tmp_path / "processed", tmp_path / "radiographs", progress=False) == "table"
    (cfg, out, size), kwargs = calls[0]
    assert cfg["source"] == "chexpert" and out == tmp_path / "radiographs" and size == 64
    assert kwargs == {"progress": False}


def test_a_missing_processed_folder_says_which_stage_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the preprocess stage first"):
        radiographs(_params(), tmp_path / "processed", tmp_path / "radiographs", progress=False)
