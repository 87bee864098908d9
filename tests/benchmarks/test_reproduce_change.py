"""benchmarks/reproduce_change.py: a change's stages timed against a whole reproduction."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.test_reproduce_cost import _load

reproduce_change = _load("reproduce_change")


def _stage(name: str, status: str, wall_s: float, peak: float | None = 1.0) -> dict:
    return {"name": name, "kind": name.split("@")[0], "status": status, "wall_s": wall_s, "peak_pss_gb": peak}


BASELINE = {
    "command": ["/bin/sh", "-c", "make reproduce"], "wall_s": 100.0, "peak_pss_gb": 2.0,
    "stages": [_stage("set-up", "set-up", 20.0), _stage("download", "ran", 30.0, 2.0),
               _stage("pretrain@a", "ran", 10.0), _stage("pretrain@b", "ran", 20.0), _stage("report", "ran", 20.0)],
}
CHANGE = {
    "command": ["/bin/sh", "-c", "PATH=/tmp/clone/.venv/bin:$PATH dvc exp run -S slices.side=96"],
    "wall_s": 70.0, "peak_pss_gb": 2.5,
    "stages": [_stage("set-up", "set-up", 2.0), _stage("download", "skipped", 0.1, None),
               _stage("pretrain@a", "ran", 20.0, 2.5), _stage("pretrain@b", "ran", 40.0), _stage("report", "ran", 25.0)],
}


def test_the_stages_the_change_ran_replace_theirs_in_the_whole_reproduction(tmp_path, capsys):
    (tmp_path / "base.json").write_text(json.dumps(BASELINE))
    (tmp_path / "change.json").write_text(json.dumps(CHANGE))
    out = tmp_path / "change.md"
    result = reproduce_change.main([str(tmp_path / "base.json"), str(tmp_path / "change.json"), "--name", "96 px",
                                    "--out", str(out)])
    assert (result["stages"], result["baseline_s"], result["change_s"]) == (3, 50.0, 85.0)
    # download and set-up keep their baseline times: 100 - 50 + 85.
    assert result["reproduce_projected_s"] == 135.0
    assert result["peak_pss_projected_gb"] == 2.5
    assert [(row["kind"], row["stages"], row["ratio"]) for row in result["kinds"]] == [
        ("pretrain", 2, 2.0), ("report", 1, 1.25)]
    text = out.read_text()
    assert "Change: `dvc exp run -S slices.side=96`" in text and "/tmp/clone" not in text
    assert "| `pretrain` | 2 | 30.0 | 60.0 | 2.00 |" in text and "135 s (2.2 min)" in text
    assert json.loads(out.with_suffix(".json").read_text())["name"] == "96 px"
    assert "# Reproduction cost of a change: 96 px" in capsys.readouterr().out


def test_a_baseline_that_skipped_a_stage_the_change_ran_is_refused():
    skipped = {**BASELINE, "stages": [*BASELINE["stages"][:3], _stage("pretrain@b", "skipped", 0.1)]}
    with pytest.raises(ValueError, match="pretrain@b ran in the change but not in the baseline"):
        reproduce_change.compare(skipped, CHANGE)
    with pytest.raises(ValueError, match="ran no stage"):
        reproduce_change.compare(BASELINE, {**CHANGE, "stages": CHANGE["stages"][:2]})
