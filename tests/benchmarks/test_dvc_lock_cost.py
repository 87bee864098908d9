"""benchmarks/dvc_lock_cost.py: what DVC's rewrite of dvc.lock costs after each stage."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.test_reproduce_cost import _load

dvc_lock_cost = _load("dvc_lock_cost")


def _lock(stages: int) -> str:
    body = "".join(
        f"  s{i}:\n    cmd: python stages/s.py {i}\n    deps:\n    - path: stages/s.py\n      hash: md5\n"
        f"      md5: {i:032x}\n      size: 10\n    params:\n      params.yaml:\n        seed: {i}\n"
        for i in range(stages)
    )
    return "schema: '2.0'\nstages:\n" + body


def test_partial_locks_keep_the_first_stages_in_dvcs_layout():
    text, kept = dvc_lock_cost.partial_lock(_lock(8), 0.25)
    assert kept == 2 and "  s1:" in text and "  s2:" not in text and text.startswith("schema:")


def test_the_round_trip_is_timed_and_projected_over_the_stages(tmp_path, capsys):
    (tmp_path / "dvc.lock").write_text(_lock(12))
    out = tmp_path / "dvc_lock.json"
    assert dvc_lock_cost.main(["--cwd", str(tmp_path), "--repeats", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [row["stages"] for row in record["rows"]] == [3, 6, 12]
    sizes = [row["bytes"] for row in record["rows"]]
    assert sizes == sorted(sizes) and all(row["round_trip_s"] > 0 for row in record["rows"])
    assert record["projected_run_seconds"] == pytest.approx(record["rows"][-1]["round_trip_s"] * 12, abs=0.1)
    assert "rewriting the lock" in capsys.readouterr().out


def test_a_folder_without_a_lock_is_named(tmp_path):
    with pytest.raises(SystemExit, match="dvc.lock not found"):
        dvc_lock_cost.main(["--cwd", str(tmp_path), "--out", str(tmp_path / "x.json")])
