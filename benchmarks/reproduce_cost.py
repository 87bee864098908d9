"""Wall time and peak memory of every stage of a reproduction, as ``dvc repro`` runs it.

The command (by default ``dvc repro`` in the checkout, the ``.venv``'s ``dvc`` when there is
one; ``--command "make reproduce"`` in a fresh clone to include the set-up) runs in a child
process with ``PYTHONUNBUFFERED=1``, its stdout and stderr merged. Each line is timestamped
as it arrives and copied to a log file (``--log``). DVC runs the stages one after another
and announces each (``dvc/stage/run.py`` and ``dvc/stage/__init__.py``, ``dvc/stage/cache.py``):

- ``Running stage '<name>':`` -- the stage runs (status ``ran``);
- ``Stage '<name>' didn't change, skipping`` (``'<name>' didn't change, skipping`` for a
  ``.dvc`` file) -- status ``skipped``;
- ``Stage '<name>' is cached - skipping run, checking out outputs`` -- restored from the run
  cache, status ``restored``;

and at the end ``Use `dvc push` to send your updates to remote storage.`` (or ``Data and
pipelines are up to date.``). A stage's row runs from its line to the next stage's line, or
to the end of the command: its command, then DVC caching its outputs and writing the lock
file, then DVC checking whether the next stage changed (hashing its dependencies). Whatever
comes before the first stage's line is a row of its own, ``set-up``: DVC starting and
loading the pipeline, and with ``make reproduce`` the installation.

Every ``--interval`` seconds the memory of the child and all its descendants (the stage
processes, their DataLoader workers) is read from ``/proc`` and summed (``process_tree.py``):
PSS (``/proc/<pid>/smaps_rollup``, a page shared by n processes counted 1/n in each: what
the tree holds) and RSS (shared pages once per process: an upper bound). Each sample counts
for the row open at its time; a row shorter than the interval may have none. GB are 10^9
bytes.

Results are printed and written atomically to ``reports/benchmarks/reproduce.json`` and
``reproduce.md`` (the stages in the order they ran, and their sums by kind: the part of the
name before ``@``). The script exits with the command's exit status; when the command
fails, what was measured until then is written, the failure marked.

    python benchmarks/reproduce_cost.py
    python benchmarks/reproduce_cost.py -- --force finetune   # arguments for dvc repro
    python benchmarks/reproduce_cost.py --cwd /tmp/clone --command "make reproduce"
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # process_tree.py, beside this script, also when imported from elsewhere
    sys.path.insert(0, HERE)

from process_tree import command_line, memory_kib, tree, write_atomic  # noqa: E402

SETUP = "set-up"
# DVC's messages (dvc 3.x), the name taken exactly as printed: it may hold '@', ':' and '/'.
STAGE_LINES = (
    ("ran", re.compile(r"Running stage '(?P<name>.+)':")),
    ("skipped", re.compile(r"(?:Stage )?'(?P<name>.+)' didn't change, skipping")),
    ("restored", re.compile(r"Stage '(?P<name>.+)' is cached - skipping run, checking out outputs")),
)
END_LINES = ("Use `dvc push` to send your updates to remote storage.", "Data and pipelines are up to date.")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
GB = 1e9


def parse_line(line: str) -> tuple[str, str] | None:
    """(status, stage name) for a stage line of DVC's, ("end", "") for its last line, else None."""
    text = ANSI.sub("", line).strip()
    for status, pattern in STAGE_LINES:
        match = pattern.fullmatch(text)
        if match:
            return status, match["name"]
    if text in END_LINES:
        return "end", ""
    return None


def kind_of(name: str) -> str:
    """``finetune@seg_unetpp_scratch`` -> ``finetune``."""
    return name.split("@", 1)[0]


def _gb(kib: float | None) -> float | None:
    return None if kib is None else round(kib * 1024 / GB, 3)


def measure(command: list[str], cwd: Path, interval: float, log: Path, bin_dirs: tuple[Path, ...] = (),
            progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Run ``command`` in ``cwd``; its stages' rows (wall time, peak memory) and the totals.

    ``cwd/.venv/bin`` and ``bin_dirs`` go first on the PATH, as the Makefile puts ``.venv/bin``:
    the stages' ``python`` and ``dvc``."""
    path = [str(cwd / ".venv" / "bin"), *map(str, bin_dirs), os.environ.get("PATH", "")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg",
           "PATH": os.pathsep.join(path)}
    samples: list[tuple[float, int, int, int]] = []  # (seconds in, PSS KiB, RSS KiB, processes)
    at_peak: dict[str, Any] = {"pss_kib": 0, "processes": []}
    stop = threading.Event()
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", bufsize=1)

    def sample() -> None:
        while True:
            seconds = time.monotonic() - start
            pids = tree(process.pid)
            sizes = [memory_kib(pid) for pid in pids]
            pss, rss = sum(s[1] for s in sizes), sum(s[0] for s in sizes)
            if pss:  # 0 once the child has ended
                samples.append((seconds, pss, rss, sum(1 for s in sizes if s[1])))
            if pss > at_peak["pss_kib"]:
                at_peak["pss_kib"] = pss
                at_peak["processes"] = sorted(((_gb(s[1]), command_line(pid)) for pid, s in zip(pids, sizes)
                                               if s[1]), reverse=True)
            if stop.wait(interval):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    events: list[tuple[float, str, str]] = [(0.0, SETUP, SETUP)]  # (seconds in, status, name)
    finished = interrupted = False
    with open(log, "w", buffering=1) as fh:
        try:
            assert process.stdout is not None
            for line in process.stdout:
                seconds = time.monotonic() - start
                text = line.rstrip("\r\n")
                fh.write(f"{seconds:9.2f}  {text}\n")
                parsed = parse_line(text)
                if parsed is None:
                    continue
                if parsed[0] == "end":
                    finished = True
                    continue
                events.append((seconds, *parsed))
                if progress is not None:
                    print(f"[{seconds:8.1f} s] {parsed[0]:8s} {parsed[1]}", file=progress, flush=True)
        except KeyboardInterrupt:  # the child got the SIGINT as well: wait for it, keep what was measured
            interrupted = True
        exit_status = process.wait()
    wall = time.monotonic() - start
    stop.set()
    sampler.join()
    return summarise(events, samples, wall, exit_status, finished=finished, interrupted=interrupted,
                     command=command, cwd=cwd, log=log, interval=interval, at_peak=at_peak)


def summarise(events: list[tuple[float, str, str]], samples: list[tuple[float, int, int, int]], wall: float,
              exit_status: int, **facts: Any) -> dict[str, Any]:
    """Rows from the stage lines' times, each with the memory samples taken while it was open."""
    times = [sample[0] for sample in samples]
    stages = []
    for i, (begin, status, name) in enumerate(events):
        end = events[i + 1][0] if i + 1 < len(events) else wall
        inside = samples[bisect.bisect_left(times, begin):bisect.bisect_left(times, end)]
        stages.append({"name": name, "kind": SETUP if status == SETUP else kind_of(name), "status": status,
                       "start_s": round(begin, 2), "wall_s": round(end - begin, 2),
                       "peak_pss_gb": _gb(max((s[1] for s in inside), default=None)),
                       "peak_rss_gb": _gb(max((s[2] for s in inside), default=None)), "samples": len(inside)})
    failed = exit_status != 0 or facts.get("interrupted", False)
    if failed and stages[-1]["status"] == "ran":
        stages[-1]["status"] = "failed"
    peak = max(samples, key=lambda s: s[1], default=None)
    peak_row = None if peak is None else stages[bisect.bisect_right([e[0] for e in events], peak[0]) - 1]["name"]
    at_peak = facts.get("at_peak") or {}
    return {
        "machine": machine(),
        "command": facts.get("command"), "cwd": str(facts.get("cwd")), "log": str(facts.get("log")),
        "interval_s": facts.get("interval"), "exit_status": exit_status, "failed": failed,
        "failed_during": stages[-1]["name"] if failed else None, "interrupted": facts.get("interrupted", False),
        "dvc_finished": facts.get("finished", False), "wall_s": round(wall, 2),
        "peak_pss_gb": _gb(peak[1]) if peak else None,
        "peak_rss_gb": _gb(max((s[2] for s in samples), default=None)),
        "peak_processes": max((s[3] for s in samples), default=0),
        "peak_pss_at_s": round(peak[0], 1) if peak else None, "peak_pss_during": peak_row,
        "processes_at_peak_pss_gb": at_peak.get("processes", []),
        "counts": {status: sum(1 for row in stages if row["status"] == status)
                   for status in ("ran", "failed", "skipped", "restored")},
        "stages": stages, "kinds": by_kind(stages),
    }


def by_kind(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows summed per kind, the most expensive kind first."""
    kinds: dict[str, dict[str, Any]] = {}
    for row in stages:
        entry = kinds.setdefault(row["kind"], {"kind": row["kind"], "stages": 0, "ran": 0, "total_s": 0.0,
                                               "peak_pss_gb": None})
        entry["stages"] += 1
        entry["ran"] += row["status"] in ("ran", "failed")
        entry["total_s"] += row["wall_s"]
        if row["peak_pss_gb"] is not None:
            entry["peak_pss_gb"] = max(entry["peak_pss_gb"] or 0.0, row["peak_pss_gb"])
    for entry in kinds.values():
        entry["total_s"] = round(entry["total_s"], 2)
        entry["mean_s"] = round(entry["total_s"] / entry["stages"], 2)
    return sorted(kinds.values(), key=lambda entry: -entry["total_s"])


def machine() -> dict[str, Any]:
    """CPUs, memory, GPUs (``nvidia-smi``'s names; none without it), platform and Python."""
    memory = None
    try:
        with open("/proc/meminfo") as fh:
            memory = next(round(int(line.split()[1]) * 1024 / GB, 1) for line in fh if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=20)
            gpus = [name.strip() for name in query.stdout.splitlines() if name.strip()] if query.returncode == 0 else []
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {"cpus": os.cpu_count(), "memory_gb": memory, "gpus": gpus, "platform": platform.platform(),
            "python": platform.python_version(), "load_average_at_start": round(os.getloadavg()[0], 2)}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def summary(result: dict[str, Any]) -> str:
    """The totals and the table by kind (Markdown), as printed and at the top of reproduce.md."""
    facts, counts = result["machine"], result["counts"]
    command, cwd = list(result["command"]), Path(result["cwd"])
    if command[:2] == ["/bin/sh", "-c"]:
        shown = command[-1]
    else:  # the checkout's dvc as .venv/bin/dvc
        if Path(command[0]).is_relative_to(cwd):
            command[0] = str(Path(command[0]).relative_to(cwd))
        shown = shlex.join(command)
    where = "the checkout" if cwd == REPO else f"`{cwd}`"
    gpus = ", ".join(facts["gpus"]) if facts["gpus"] else "no GPU"
    lines = [f"Command: `{shown}` in {where}.",
             f"Machine: {facts['cpus']} CPUs, {facts['memory_gb']} GB memory, {gpus}, {facts['platform']}, "
             f"Python {facts['python']}, load average {facts['load_average_at_start']} at the start.", ""]
    if result["failed"]:
        how = "was interrupted" if result["interrupted"] else f"failed (exit {result['exit_status']})"
        lines += [f"**The command {how} during {_code(result['failed_during'])}: the figures cover what ran "
                  "until then.**", ""]
    lines += [f"- Wall time: {result['wall_s']:.0f} s ({result['wall_s'] / 60:.1f} min); "
              f"{counts['ran'] + counts['failed']} stages ran, {counts['skipped']} skipped, "
              f"{counts['restored']} restored from the run cache.",
              f"- Peak memory of the process tree: {_fmt(result['peak_pss_gb'])} GB PSS "
              f"({_fmt(result['peak_rss_gb'])} GB RSS summed, {result['peak_processes']} processes at most), "
              + (f"{result['peak_pss_at_s']:.0f} s in, during {_code(result['peak_pss_during'])}."
                 if result["peak_pss_during"] else "not sampled."),
              "", "| kind | stages | ran | total (s) | mean (s) | peak PSS (GB) |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {_code(k['kind'])} | {k['stages']} | {k['ran']} | {k['total_s']:.1f} | {k['mean_s']:.1f} | "
              f"{_fmt(k['peak_pss_gb'])} |" for k in result["kinds"]]
    return "\n".join(lines) + "\n"


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Reproduction cost", "",
             "Written by `python benchmarks/reproduce_cost.py` (its docstring gives the method): per DVC stage, "
             "the wall time from its line in DVC's output to the next stage's, and the peak memory (PSS, summed "
             f"over the process tree, sampled every {result['interval_s']} s) while it was open.", "",
             summary(result).rstrip("\n"), "", "## Stages, in the order they ran", "",
             "| # | stage | status | start (s) | wall (s) | peak PSS (GB) | peak RSS (GB) |",
             "|---:|---|---|---:|---:|---:|---:|"]
    lines += [f"| {i} | {_code(row['name'])} | {row['status']} | {row['start_s']:.1f} | {row['wall_s']:.1f} | "
              f"{_fmt(row['peak_pss_gb'])} | {_fmt(row['peak_rss_gb'])} |" for i, row in enumerate(result["stages"])]
    return "\n".join(lines) + "\n"


def write_reports(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    json_path, md_path = out_dir / "reproduce.json", out_dir / "reproduce.md"
    write_atomic(json_path, json.dumps(result, indent=2) + "\n")
    write_atomic(md_path, markdown(result))
    return json_path, md_path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", help="measure this shell command instead of 'dvc repro' (e.g. 'make reproduce' "
                                          "in a fresh clone, the set-up included)")
    parser.add_argument("--cwd", type=Path, default=REPO, help="the checkout to run in (default: this one)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples (default 0.5)")
    parser.add_argument("--log", type=Path, help="copy of the command's output, each line timestamped (default: "
                                                 "chestssl-reproduce-<time>.log in the temporary folder)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "reports" / "benchmarks",
                        help="where reproduce.json and reproduce.md go (default reports/benchmarks)")
    parser.add_argument("dvc_args", nargs="*", help="more 'dvc repro' arguments, after --")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be > 0")
    if args.command and args.dvc_args:
        parser.error("arguments after -- go to 'dvc repro'; with --command, put them in the command")
    if not args.cwd.is_dir():
        parser.error(f"--cwd {args.cwd}: not a folder")
    args.cwd = args.cwd.resolve()
    args.bin_dirs = ()
    if args.command:
        args.argv = ["/bin/sh", "-c", args.command]
    else:
        # The checkout's .venv, else the one running this script, else the PATH's
        candidates = (args.cwd / ".venv" / "bin" / "dvc", Path(sys.executable).parent / "dvc")
        found = next((str(dvc) for dvc in candidates if dvc.exists()), None) or shutil.which("dvc")
        if found is None:
            parser.error(f"no dvc in {candidates[0].parent} nor on PATH; run 'make reproduce' once, or use --command")
        args.argv = [found, "repro", *args.dvc_args]
        args.bin_dirs = (Path(found).parent,)
    if args.log is None:
        args.log = Path(tempfile.gettempdir()) / f"chestssl-reproduce-{time.strftime('%Y%m%d-%H%M%S')}.log"
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    print(f"running {shlex.join(args.argv)} in {args.cwd}; output in {args.log}", file=sys.stderr, flush=True)
    result = measure(args.argv, args.cwd, args.interval, args.log, bin_dirs=args.bin_dirs)
    print(summary(result), end="")
    print(f"output of the command: {args.log}")
    for path in write_reports(result, args.out_dir):
        print(f"written {path}")
    status = result["exit_status"]
    if status < 0:  # killed by signal N: 128 + N, as a shell reports it
        return 128 - status
    return 130 if status == 0 and result["interrupted"] else status


if __name__ == "__main__":
    sys.exit(main())
