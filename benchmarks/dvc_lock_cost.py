"""What DVC spends writing ``dvc.lock`` after each stage of a ``dvc repro``, and how it scales.

After every stage it runs, ``dvc repro`` records the stage in ``dvc.lock``
(``dvc.dvcfile.Lockfile.dump_stages``): it parses the whole lock with ruamel.yaml's
round-trip loader (``dvc.utils.serialize.modify_yaml``), replaces the stage's entry and
writes the whole file back. That cost grows with the lock, so with the number of stages and
with what each records (dependencies, params values, outputs), and a run pays it once per
stage: it is the floor under every stage's time, however little the stage computes.

This script times that round trip with DVC's own functions on the lock of ``--cwd`` (the
project's committed ``dvc.lock`` by default) and on locks made of the first quarter and the
first half of its stages (the baseline, measured in the same run), median of ``--repeats``,
and prints the projected total over the DAG's stages.

    python benchmarks/dvc_lock_cost.py [--cwd PATH] [--repeats 5]

Results are printed and written atomically to ``reports/benchmarks/dvc_lock.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def round_trip_seconds(text: str) -> tuple[float, float]:
    """Seconds to parse ``text`` as DVC does before updating a lock, and to write it back."""
    from dvc.utils.serialize._yaml import _get_yaml, parse_yaml_for_update

    start = time.perf_counter()
    data = parse_yaml_for_update(text, "dvc.lock")
    parsed = time.perf_counter()
    _get_yaml().dump(data, io.StringIO())
    return parsed - start, time.perf_counter() - parsed


def partial_lock(text: str, fraction: float) -> tuple[str, int]:
    """The lock with only the first ``fraction`` of its stages, and that stage count."""
    import yaml

    lock = yaml.safe_load(text)
    names = list(lock["stages"])
    keep = max(1, round(len(names) * fraction))
    lock["stages"] = {name: lock["stages"][name] for name in names[:keep]}
    from dvc.utils.serialize._yaml import _get_yaml

    out = io.StringIO()
    _get_yaml().dump(lock, out)  # DVC's own writer, so the layout matches a real lock
    return out.getvalue(), keep


def measure(text: str, repeats: int) -> dict[str, float]:
    runs = [round_trip_seconds(text) for _ in range(repeats)]
    parse = statistics.median(r[0] for r in runs)
    dump = statistics.median(r[1] for r in runs)
    return {"bytes": len(text.encode()), "parse_s": round(parse, 3), "dump_s": round(dump, 3),
            "round_trip_s": round(parse + dump, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cwd", type=Path, default=REPO, help="a checkout with dvc.lock (default: this one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "dvc_lock.json")
    args = parser.parse_args(argv)
    lock_path = args.cwd / "dvc.lock"
    if not lock_path.exists():
        raise SystemExit(f"{lock_path} not found; give --cwd a checkout of the project")
    text = lock_path.read_text()
    import yaml

    stages = len(yaml.safe_load(text)["stages"])
    rows = []
    for fraction in (0.25, 0.5, 1.0):
        partial, kept = (text, stages) if fraction == 1.0 else partial_lock(text, fraction)
        row = {"stages": kept, **measure(partial, args.repeats)}
        rows.append(row)
        print(f"{kept:4d} stages, {row['bytes'] / 1e3:7.1f} KB: parse {row['parse_s']:.2f} s + write "
              f"{row['dump_s']:.2f} s = {row['round_trip_s']:.2f} s a stage", flush=True)
    base, full = rows[0], rows[-1]
    per_kb = {"baseline": base["round_trip_s"] / (base["bytes"] / 1e3), "full": full["round_trip_s"] / (full["bytes"] / 1e3)}
    total = full["round_trip_s"] * stages
    print(f"{full['round_trip_s'] / base['round_trip_s']:.2f}x the quarter lock's cost for "
          f"{full['bytes'] / base['bytes']:.2f}x its size; {per_kb['full'] * 1e3:.2f} ms per KB "
          f"(quarter: {per_kb['baseline'] * 1e3:.2f})")
    print(f"a run of all {stages} stages spends about {total:.0f} s ({total / 60:.1f} min) rewriting the lock")
    record: dict[str, Any] = {
        "lock": str(lock_path), "stages": stages, "rows": rows, "repeats": args.repeats,
        "seconds_per_kb": {k: round(v, 5) for k, v in per_kb.items()},
        "projected_run_seconds": round(total, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": round(os.getloadavg()[0], 2)},
    }
    from chestssl.io import write_json

    write_json(args.out, record)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
