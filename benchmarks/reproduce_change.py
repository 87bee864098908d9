"""What a change of params would do to the time and memory of ``make reproduce``.

Compares two records of ``benchmarks/reproduce_cost.py``, made one after the other on the
same machine: the baseline, a whole reproduction (``--command "make reproduce"`` in a fresh
clone), and the change, a ``dvc exp run -S ...`` of the same checkout right after it, which
reruns only the stages the change reaches. For those stages, their wall time in both runs,
by kind (the part of the stage name before ``@``) and in all; the projected reproduction
time is the baseline's with those stages' times replaced by the change's, and its peak
memory the larger of the baseline's peak and the change's stages' peaks.

    python benchmarks/reproduce_cost.py --cwd /tmp/clone --command "make reproduce" --out-dir /tmp/base
    python benchmarks/reproduce_cost.py --cwd /tmp/clone --out-dir /tmp/change \\
        --command ".venv/bin/python -m chestssl.preload run -- dvc exp run -S slices.side=96"
    python benchmarks/reproduce_change.py /tmp/base/reproduce.json /tmp/change/reproduce.json \\
        --name "96 px slices" --out reports/benchmarks/reproduce_slices_96px.md

Results are printed and written atomically to ``--out`` (Markdown) and a ``.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def compare(baseline: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """The stages ``change`` ran, their times in both records, by kind and in all, and the
    projected reproduction. Raises ``ValueError`` when a stage the change ran is not in the
    baseline, or the baseline did not run it (its time there would not be a run's)."""
    before = {stage["name"]: stage for stage in baseline["stages"]}
    ran = [stage for stage in change["stages"] if stage["status"] == "ran"]
    if not ran:
        raise ValueError("the change's record ran no stage; was it made after the change of params?")
    for stage in ran:
        if before.get(stage["name"], {}).get("status") != "ran":
            raise ValueError(f"stage {stage['name']} ran in the change but not in the baseline; "
                             "record the baseline with a whole reproduction (make reproduce in a fresh clone)")
    kinds: dict[str, dict[str, float]] = {}
    for stage in ran:
        kind = kinds.setdefault(stage["kind"], {"stages": 0, "baseline_s": 0.0, "change_s": 0.0})
        kind["stages"] += 1
        kind["baseline_s"] += before[stage["name"]]["wall_s"]
        kind["change_s"] += stage["wall_s"]
    rows = [{"kind": name, **values, "ratio": values["change_s"] / values["baseline_s"]}
            for name, values in sorted(kinds.items(), key=lambda kv: kv[1]["baseline_s"] - kv[1]["change_s"])]
    baseline_s = sum(row["baseline_s"] for row in rows)
    change_s = sum(row["change_s"] for row in rows)
    peaks = [stage["peak_pss_gb"] for stage in ran if stage.get("peak_pss_gb") is not None]
    return {
        "stages": len(ran), "baseline_s": baseline_s, "change_s": change_s, "ratio": change_s / baseline_s,
        "kinds": rows,
        "reproduce_baseline_s": baseline["wall_s"],
        "reproduce_projected_s": baseline["wall_s"] - baseline_s + change_s,
        "peak_pss_baseline_gb": baseline["peak_pss_gb"],
        "peak_pss_projected_gb": max([baseline["peak_pss_gb"], *peaks]),
    }


def command_text(record: dict[str, Any]) -> str:
    """The recorded command as typed: the shell's script for ``sh -c``, without a leading
    ``PATH=...`` (the clone's own ``.venv``, a path of that machine)."""
    command = record["command"]
    if isinstance(command, list):
        command = command[2] if command[1:2] == ["-c"] and len(command) == 3 else shlex.join(command)
    return re.sub(r"^PATH=\S+\s+", "", command)


def markdown(result: dict[str, Any], name: str, commands: tuple[str, str]) -> str:
    lines = [
        f"# Reproduction cost of a change: {name}", "",
        "Written by `python benchmarks/reproduce_change.py` (its docstring gives the method): the stages "
        "the change reran, their wall time in the baseline and with the change, measured one after the "
        "other on the same machine.", "",
        f"Baseline: `{commands[0]}`. Change: `{commands[1]}`.", "",
        f"- Stages the change reaches: {result['stages']}, {result['baseline_s']:.0f} s -> "
        f"{result['change_s']:.0f} s ({result['ratio']:.2f}x).",
        f"- `make reproduce`: {result['reproduce_baseline_s']:.0f} s -> about "
        f"{result['reproduce_projected_s']:.0f} s ({result['reproduce_projected_s'] / 60:.1f} min) projected.",
        f"- Peak memory: {result['peak_pss_baseline_gb']:.2f} -> {result['peak_pss_projected_gb']:.2f} GB PSS.", "",
        "| kind | stages | baseline (s) | change (s) | ratio |", "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| `{row['kind']}` | {row['stages']} | {row['baseline_s']:.1f} | {row['change_s']:.1f} | "
              f"{row['ratio']:.2f} |" for row in result["kinds"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="reproduce.json of the whole reproduction")
    parser.add_argument("change", type=Path, help="reproduce.json of the dvc exp run with the change")
    parser.add_argument("--name", default="the change", help="what the change is, for the title")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "reproduce_change.md")
    args = parser.parse_args(argv)

    from chestssl.io import write_json, write_text

    records = []
    for path in (args.baseline, args.change):
        if not path.exists():
            raise SystemExit(f"{path} not found; write it with benchmarks/reproduce_cost.py")
        records.append(json.loads(path.read_text()))
    try:
        result = compare(*records)
    except ValueError as error:
        raise SystemExit(f"{args.change}: {error}") from None
    text = markdown(result, args.name, (command_text(records[0]), command_text(records[1])))
    print(text)
    write_text(args.out, text)
    write_json(args.out.with_suffix(".json"), {"name": args.name, **result})
    return result


if __name__ == "__main__":
    main()
