"""benchmarks/idc_selection.py on the bundled IDC index (offline)."""

from __future__ import annotations

import json

from tests.benchmarks.test_reproduce_cost import _load

idc_selection = _load("idc_selection")


def test_the_collection_size_and_the_selection_are_written(tmp_path, capsys):
    out = tmp_path / "idc_selection.json"
    report = idc_selection.main(["--patients", "2", "--repeats", "1", "--out", str(out)])
    ct = next(row for row in report["lidc_idri_by_modality"] if row["modality"] == "CT")
    assert (ct["series"], ct["patients"]) == (1018, 1010) and ct["gb"] > 100
    assert report["selection"]["patients"] == 2 and report["selection"]["series"] == 2
    assert report["selection"]["unknown_to_pylidc"] == 0 and report["selection"]["select_s_median"] > 0
    assert json.loads(out.read_text()) == report
    assert "selecting 2 patients" in capsys.readouterr().out
