"""The CPU a no-op ``dvc status`` costs in a reproduced checkout, and where it goes.

Runs ``dvc status -q`` ``--repeats`` times in each ``--cwd`` (a clone where ``make
reproduce`` has run, so every stage is up to date; give two to compare layouts, the runs
alternate between them so that a slower spell of the machine hits both alike) and reports
the CPU time (user + system) of each run, with ``dvc version`` timed the same way as the
baseline: DVC's own import and start-up, which no layout of the project can remove. It then counts what the status
parses: each params file once for every stage that reads a key from it (read from the
``params`` sections of ``dvc.lock``), with its parse time, and the size of ``dvc.lock``.

    python benchmarks/dvc_status_cost.py --cwd /path/to/reproduced/clone
    python benchmarks/dvc_status_cost.py --cwd /clone/of/the/old/layout --cwd /clone/of/the/new/layout

Results are printed and written atomically to ``reports/benchmarks/dvc_status.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def cpu_seconds(command: list[str], cwd: Path) -> float:
    """User + system CPU of ``command`` and its children, run to completion in ``cwd``."""
    pid = os.fork()
    if pid == 0:  # the child: run the command with its output discarded
        os.chdir(cwd)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed in {cwd} (exit {os.waitstatus_to_exitcode(status)})")
    return usage.ru_utime + usage.ru_stime


def params_reads(cwd: Path) -> list[dict[str, Any]]:
    """Per params file: the stages that read it (so parse it), its size and one parse's time."""
    from dvc.utils.serialize._yaml import parse_yaml  # the parser `dvc status` uses

    lock = yaml.safe_load((cwd / "dvc.lock").read_text())
    readers: collections.Counter[str] = collections.Counter()
    for entry in lock["stages"].values():
        readers.update(list(entry.get("params") or {}))
    rows = []
    for name, count in readers.most_common():
        text = (cwd / name).read_text()
        start = time.perf_counter()
        for _ in range(20):
            parse_yaml(text, name)
        parse_ms = (time.perf_counter() - start) / 20 * 1000
        rows.append({"file": name, "stages": count, "lines": len(text.splitlines()),
                     "parse_ms": round(parse_ms, 2), "total_ms": round(parse_ms * count)})
    return rows


def summarise(cwd: Path, version: list[float], status: list[float]) -> dict[str, Any]:
    """One checkout's figures: its status runs against its ``dvc version`` runs, and what it parses."""
    reads = params_reads(cwd)
    lock = cwd / "dvc.lock"
    return {
        "checkout": str(cwd),
        "stages_in_lock": len(yaml.safe_load(lock.read_text())["stages"]),
        "dvc_lock_kb": round(lock.stat().st_size / 1024),
        "status_cpu_s": [round(s, 2) for s in status],
        "status_cpu_median_s": round(statistics.median(status), 2),
        "dvc_version_cpu_median_s": round(statistics.median(version), 2),
        "status_over_version": round(statistics.median(status) / statistics.median(version), 2),
        "params_file_parses": sum(row["stages"] for row in reads),
        "params_parse_total_ms": sum(row["total_ms"] for row in reads),
        "params_files": reads,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cwd", type=Path, action="append",
                        help="a reproduced checkout (repeat to compare layouts in one run; default: this one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "dvc_status.json")
    args = parser.parse_args(argv)
    checkouts = [cwd.resolve() for cwd in (args.cwd or [REPO])]
    runs: dict[Path, dict[str, list[float]]] = {cwd: {"version": [], "status": []} for cwd in checkouts}
    for cwd in checkouts:
        if not (cwd / ".venv" / "bin" / "dvc").exists():
            raise SystemExit(f"{cwd}/.venv/bin/dvc not found; run `make .venv/.installed` there first")
    for _ in range(args.repeats):  # rounds alternate between the checkouts
        for cwd in checkouts:
            dvc = str(cwd / ".venv" / "bin" / "dvc")
            runs[cwd]["version"].append(cpu_seconds([dvc, "version"], cwd))
            runs[cwd]["status"].append(cpu_seconds([dvc, "status", "-q"], cwd))
    results = [summarise(cwd, runs[cwd]["version"], runs[cwd]["status"]) for cwd in checkouts]
    result = {"machine": f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
              "checkouts": results}
    for row in results:
        print(f"no-op `dvc status` in {row['checkout']} ({row['stages_in_lock']} stages): median "
              f"{row['status_cpu_median_s']} s CPU over {args.repeats} runs {row['status_cpu_s']}; "
              f"`dvc version` {row['dvc_version_cpu_median_s']} s (ratio {row['status_over_version']})")
        print(f"  dvc.lock {row['dvc_lock_kb']} KB; params files parsed {row['params_file_parses']} times, "
              f"{row['params_parse_total_ms']} ms in all:")
        for read in row["params_files"]:
            print(f"    {read['file']:28s} {read['stages']:4d} stages x {read['parse_ms']:5.2f} ms "
                  f"({read['lines']} lines) = {read['total_ms']} ms")
    from chestssl.io import write_text

    write_text(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
