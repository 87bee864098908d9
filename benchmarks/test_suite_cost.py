"""Wall time and peak memory of the test suite, run as ``make test`` runs it.

The suite runs in a child process (by default ``python -m pytest -q -n 2 --dist loadfile
--no-loadscope-reorder`` in the checkout: the Makefile's ``test`` recipe without the
set-up). Every ``--interval`` seconds the script reads ``/proc`` for the child and all its
descendants (pytest's workers, the ``dvc`` processes of the end-to-end tests and their
stage processes) and sums their memory:

- *PSS* (``/proc/<pid>/smaps_rollup``): each process's resident pages, a page shared by
  n processes counted 1/n in each, so the sum is what the process tree holds. Forked
  children (a multiprocessing pool, DDP workers) share their parent's pages until they
  write them; the libraries every worker maps (torch, MONAI) count once.
- *RSS*: resident set sizes added up, shared pages once per process: an upper bound.

The peak of each sum, the wall time and pytest's last line are printed and written
atomically to ``reports/benchmarks/test_suite.json``. With ``--base`` another checkout
(e.g. the previous commit in a ``git worktree``, its own ``.venv`` or this one's) is
measured first in the same way, and the ratios are printed.

    python benchmarks/test_suite_cost.py
    python benchmarks/test_suite_cost.py --base /tmp/base_wt -- -m "not slow"
    python benchmarks/test_suite_cost.py --command "make test"   # in a fresh clone: set-up included
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # process_tree.py, beside this script, also when imported from elsewhere
    sys.path.insert(0, HERE)

from process_tree import command_line, memory_kib, tree, write_atomic  # noqa: E402


def measure(command: list[str], cwd: Path, interval: float, log: Path | None = None,
            timeline: Path | None = None) -> dict:
    """Run ``command`` in ``cwd``; its wall time, peak summed memory and pytest's summary line
    (its whole output written to ``log`` when given, and every sample to ``timeline`` as CSV:
    seconds, summed PSS and RSS, the number of processes and the three largest by PSS)."""
    env = {**os.environ, "MPLBACKEND": "Agg", "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(command[0]).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    peak = {"rss_mib": 0.0, "pss_mib": 0.0, "processes": 0, "at_pss_peak": []}
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines: list[str] = []
    samples: list[list] = [["seconds", "pss_mib", "rss_mib", "processes", "largest_pss_mib"]]
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        pids = tree(process.pid)
        sizes = [memory_kib(pid) for pid in pids]
        peak["rss_mib"] = max(peak["rss_mib"], sum(s[0] for s in sizes) / 1024)
        pss = sum(s[1] for s in sizes) / 1024
        if pss > peak["pss_mib"]:
            peak["pss_mib"] = pss
            peak["at_pss_peak"] = sorted(((round(s[1] / 1024), command_line(pid)) for pid, s in zip(pids, sizes)
                                           if s[1]), reverse=True)
            peak["pss_peak_at_s"] = round(time.monotonic() - start)
        peak["processes"] = max(peak["processes"], len(pids))
        if timeline is not None:
            largest = sorted(((s[1], pid) for pid, s in zip(pids, sizes)), reverse=True)[:3]
            samples.append([f"{time.monotonic() - start:.1f}", f"{pss:.0f}", f"{sum(s[0] for s in sizes) / 1024:.0f}",
                            len(pids), " | ".join(f"{kib // 1024} [{pid}] {' '.join(command_line(pid).split())[-60:]}"
                                                  for kib, pid in largest)])
        time.sleep(interval)
    reader.join()
    wall = time.monotonic() - start
    if log is not None:
        write_atomic(log, "".join(lines))
    if timeline is not None:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(samples)
        write_atomic(timeline, text.getvalue())
    # pytest's own last line (`N passed ... in S s`), not make's error line after a failure
    summary = next((line.strip() for line in reversed(lines) if re.search(r"\b(passed|failed|error)\b.* in ", line)),
                   next((line.strip() for line in reversed(lines) if line.strip()), ""))
    failures = [line.strip() for line in lines if line.startswith(("FAILED ", "ERROR "))]
    durations = [line.rstrip() for line in lines if line.split()[:1] and line.split()[0].endswith("s")
                 and line.split()[0][:-1].replace(".", "", 1).isdigit()]
    return {"command": command, "cwd": str(cwd), "exit_status": process.returncode, "wall_s": round(wall, 1),
            "peak_rss_mib": round(peak["rss_mib"]), "peak_pss_mib": round(peak["pss_mib"]),
            "peak_processes": peak["processes"], "pss_peak_at_s": peak.get("pss_peak_at_s"),
            "processes_at_pss_peak_mib": peak["at_pss_peak"], "summary": summary, "failures": failures,
            "slowest": durations[:15]}


def _print(label: str, result: dict) -> None:
    print(f"{label}: {result['wall_s']:.0f} s wall, peak {result['peak_pss_mib']} MiB PSS "
          f"({result['peak_rss_mib']} MiB RSS summed, {result['peak_processes']} processes at most); "
          f"exit {result['exit_status']}: {result['summary']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="another checkout, measured first for the ratios")
    parser.add_argument("--jobs", type=int, default=2, help="pytest-xdist workers (the Makefile's TEST_JOBS)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "test_suite.json")
    parser.add_argument("--command", help="measure this shell command instead (e.g. 'make test' in a fresh "
                                          "clone, the set-up included)")
    parser.add_argument("--log", type=Path, help="write the suite's whole output here")
    parser.add_argument("--timeline", type=Path, help="write every memory sample here (CSV), to see what overlaps")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args()

    def command(checkout: Path) -> list[str]:
        if args.command:
            return ["/bin/sh", "-c", args.command]
        python = checkout / ".venv" / "bin" / "python"
        python = python if python.exists() else Path(sys.executable)
        return [str(python), "-m", "pytest", "-q", "-n", str(args.jobs), "--dist", "loadfile",
                "--no-loadscope-reorder", *args.pytest_args]

    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "load_average_at_start": os.getloadavg()[0]}}
    if args.base:
        results["base"] = measure(command(args.base), args.base, args.interval)
        _print("baseline", results["base"])
    results["ours"] = measure(command(REPO), REPO, args.interval, args.log, args.timeline)
    _print("ours", results["ours"])
    for line in results["ours"]["failures"]:
        print("  ", line)
    for line in results["ours"]["slowest"]:
        print("  ", line)
    print(f"at the PSS peak ({results['ours']['pss_peak_at_s']} s in), MiB by process:")
    for mib, process_command in results["ours"]["processes_at_pss_peak_mib"]:
        print(f"   {mib:6d}  {process_command}")
    if args.base:
        base, ours = results["base"], results["ours"]
        results["ratios"] = {key: round(ours[key] / base[key], 2) for key in ("wall_s", "peak_pss_mib", "peak_rss_mib")
                             if base[key]}
        print("ours / baseline:", ", ".join(f"{key} {value}" for key, value in results["ratios"].items()))
    write_atomic(args.out, json.dumps(results, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
