"""benchmarks/reproduce_cost.py on fake commands that print DVC's stage lines (DVC never runs),
and the process-tree module it shares with benchmarks/test_suite_cost.py."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rc = _load("reproduce_cost")

# Stage a holds ~50 MB for 0.3 s, b is skipped, c@x holds nothing for 0.3 s.
FAKE = ("import time; print(\"Running stage 'a':\"); block = b'x' * 50_000_000; time.sleep(0.3); del block; "
        "print(\"Stage 'b' didn't change, skipping\"); print(\"Running stage 'c@x':\"); time.sleep(0.3); "
        "print('Use `dvc push` to send your updates to remote storage.')")
FAILING = "import sys, time; print(\"Running stage 'a':\"); time.sleep(0.2); print('boom'); sys.exit(3)"


def _shell(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


@pytest.mark.parametrize("line, expected", [
    ("Running stage 'finetune@seg_unetpp_scratch':", ("ran", "finetune@seg_unetpp_scratch")),
    ("Running stage 'sub/dir/dvc.yaml:train@a:b':\n", ("ran", "sub/dir/dvc.yaml:train@a:b")),
    ("\x1b[33mRunning stage 'pretrain@mae':\x1b[0m", ("ran", "pretrain@mae")),
    ("Stage 'evaluate@x' didn't change, skipping", ("skipped", "evaluate@x")),
    ("'data/raw.dvc' didn't change, skipping", ("skipped", "data/raw.dvc")),
    ("Stage 'report' is cached - skipping run, checking out outputs", ("restored", "report")),
    ("Use `dvc push` to send your updates to remote storage.", ("end", "")),
    ("Data and pipelines are up to date.", ("end", "")),
    ("> python stages/finetune.py seg_unetpp_scratch", None),
    ("Updating lock file 'dvc.lock'", None),
    ("epoch 3: Running stage 'x': nope", None),
])
def test_dvc_lines_are_parsed(line, expected):
    assert rc.parse_line(line) == expected


def test_samples_count_for_the_row_open_at_their_time():
    events = [(0.0, "set-up", "set-up"), (1.0, "ran", "a@1"), (3.0, "skipped", "b"), (3.5, "ran", "a@2")]
    samples = [(0.5, 100, 200, 1), (1.5, 5_000_000, 6_000_000, 3), (2.9, 300, 400, 2), (3.2, 50, 60, 1),
               (4.0, 700, 800, 2)]
    result = rc.summarise(events, samples, 5.0, 0, command=["dvc", "repro"], cwd=Path("."), interval=0.5)
    rows = {row["name"]: row for row in result["stages"]}
    assert [row["wall_s"] for row in result["stages"]] == [1.0, 2.0, 0.5, 1.5]
    assert [row["samples"] for row in result["stages"]] == [1, 2, 1, 1]
    assert rows["a@1"]["peak_pss_gb"] == round(5_000_000 * 1024 / 1e9, 3)
    assert rows["a@2"]["peak_pss_gb"] == round(700 * 1024 / 1e9, 3)
    assert result["peak_pss_during"] == "a@1" and result["peak_pss_at_s"] == 1.5
    kinds = {entry["kind"]: entry for entry in result["kinds"]}
    assert kinds["a"] == {"kind": "a", "stages": 2, "ran": 2, "total_s": 3.5, "mean_s": 1.75,
                          "peak_pss_gb": rows["a@1"]["peak_pss_gb"]}
    assert result["kinds"][0]["kind"] == "a"  # the most expensive first
    assert result["counts"] == {"ran": 2, "failed": 0, "skipped": 1, "restored": 0}
    assert not result["failed"]


def test_fake_reproduction_is_timed_and_sampled_per_stage(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # the script sets it for the child
    log = tmp_path / "run.log"
    result = rc.measure([sys.executable, "-c", FAKE], tmp_path, 0.05, log, progress=None)
    assert [(row["name"], row["kind"], row["status"]) for row in result["stages"]] == [
        ("set-up", "set-up", "set-up"), ("a", "a", "ran"), ("b", "b", "skipped"), ("c@x", "c", "ran")]
    rows = {row["name"]: row for row in result["stages"]}
    assert 0.28 <= rows["a"]["wall_s"] <= 0.7
    assert 0.28 <= rows["c@x"]["wall_s"] <= 0.7
    assert rows["a"]["peak_pss_gb"] - rows["c@x"]["peak_pss_gb"] >= 0.04
    assert result["peak_pss_during"] == "a"
    assert result["exit_status"] == 0 and not result["failed"] and result["dvc_finished"]
    assert abs(sum(row["wall_s"] for row in result["stages"]) - result["wall_s"]) < 0.05
    lines = log.read_text().splitlines()
    assert lines[0].split(None, 1)[1] == "Running stage 'a':"
    assert float(lines[-1].split()[0]) >= 0.6


def test_reports_are_written(tmp_path, capsys):
    status = rc.main(["--command", _shell(FAKE), "--cwd", str(tmp_path), "--interval", "0.05",
                      "--log", str(tmp_path / "run.log"), "--out-dir", str(tmp_path / "out")])
    assert status == 0
    result = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert {"cpus", "platform", "python"} <= set(result["machine"])
    assert result["command"] == ["/bin/sh", "-c", _shell(FAKE)]
    assert [row["name"] for row in result["stages"]] == ["set-up", "a", "b", "c@x"]
    assert [row["status"] for row in result["stages"]] == ["set-up", "ran", "skipped", "ran"]
    assert result["peak_pss_gb"] >= 0.05 and result["peak_rss_gb"] >= result["peak_pss_gb"]
    md = (tmp_path / "out" / "reproduce.md").read_text()
    assert md.index("Wall time") < md.index("| kind |") < md.index("| # | stage |")
    assert md.index("| 1 | `a` | ran |") < md.index("| 2 | `b` | skipped |") < md.index("| 3 | `c@x` | ran |")
    assert "| `c` | 1 | 1 |" in md
    assert not list((tmp_path / "out").glob(".*.tmp"))
    assert "Wall time" in capsys.readouterr().out


def test_a_failing_command_passes_its_exit_status_and_is_marked(tmp_path):
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(BENCHMARKS / "reproduce_cost.py"), "--command", _shell(FAILING),
                          "--cwd", str(tmp_path), "--interval", "0.05", "--log", str(tmp_path / "run.log"),
                          "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, run.stderr
    assert time.monotonic() - started < 30
    result = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert result["failed"] and result["exit_status"] == 3 and result["failed_during"] == "a"
    assert [row["status"] for row in result["stages"]] == ["set-up", "failed"]
    assert "boom" in (tmp_path / "run.log").read_text()
    assert "failed (exit 3) during `a`" in (tmp_path / "out" / "reproduce.md").read_text()


def test_dvc_args_and_command_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        rc.main(["--command", "true", "--cwd", str(tmp_path), "--", "--force"])


def test_process_tree_finds_children_and_their_memory():
    pt = _load("process_tree")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while child.pid not in pt.tree(__import__("os").getpid()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in pt.tree(__import__("os").getpid())
        rss, pss = pt.memory_kib(child.pid)
        assert 0 < pss <= rss
        assert "time.sleep(30)" in pt.command_line(child.pid)
    finally:
        child.kill()
        child.wait()
    assert pt.memory_kib(child.pid) == (0, 0)


def test_test_suite_cost_still_imports_and_shares_the_process_tree_code():
    module = _load("test_suite_cost")
    assert callable(module.measure)
    assert module.tree.__module__ == module.memory_kib.__module__ == "process_tree"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "test_suite_cost.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert all(option in run.stdout for option in ("--base", "--jobs", "--interval", "--out", "--command"))
