"""Throughput of the preprocess stage against pylidc's own loading, and of its process pool.

On ``--scans`` phantom LIDC-IDRI series (generated in a temporary folder):

- baseline: what every pylidc pipeline does per scan, ``scan.to_volume()``,
  ``scan.cluster_annotations()`` and ``pylidc.utils.consensus`` of each cluster;
- ours: :func:`chestssl.data.preprocess.preprocess_scan` (the same reading plus the
  slice-position check, resampling, body crop, windowing and tables);

each timed per scan (interleaved, best of ``--repeats``), giving scans/s and the
overhead ratio ours / baseline (target <= 1.30). Then the whole stage,
:func:`~chestssl.data.preprocess.run_preprocess` (including writing the compressed
arrays and the process pool's start-up), with 1 and ``--workers`` workers, giving the
speedup. Peak memory per scan (``tracemalloc``, which sees NumPy's buffers) is measured
in a separate pass so it does not slow the timed ones.

    python benchmarks/preprocess_throughput.py --scans 4 --max-slices 100

Results are printed and written atomically to ``reports/benchmarks/preprocess.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET_OVERHEAD = 1.30


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=4, help="phantom scans to generate (default 4)")
    parser.add_argument("--max-slices", type=int, default=100, help="prefer scans with at most this many slices")
    parser.add_argument("--seed", type=int, default=0, help="phantom selection and rendering seed")
    parser.add_argument("--noise-hu", type=float, default=18.0, help="phantom CT noise (HU)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per scan; the best counts")
    parser.add_argument("--workers", type=int, default=2, help="workers of the parallel run_preprocess")
    parser.add_argument(
        "--params", type=Path, default=REPO / "params.yaml", help="params file (its preprocess section is used)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "preprocess.json")
    args = parser.parse_args(argv)
    for name in ("scans", "repeats", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _baseline(scan: Any, clevel: float) -> None:
    """pylidc's own per-scan work: HU volume, nodule clusters, consensus masks."""
    from pylidc.utils import consensus

    scan.to_volume(verbose=False)
    for cluster in scan.cluster_annotations(verbose=False):
        consensus(cluster, clevel=clevel, ret_masks=False)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _peak_mb(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    from chestssl.data.lidc import import_pylidc, use_dicom_root
    from chestssl.data.manifest import read_manifest
    from chestssl.data.phantom import generate_phantom
    from chestssl.data.preprocess import preprocess_scan, run_preprocess
    from chestssl.io import write_json
    from chestssl.params import load_params

    params = load_params(args.params)["preprocess"]
    pl = import_pylidc()
    with tempfile.TemporaryDirectory(prefix="chestssl-bench-") as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw"
        print(f"generating {args.scans} phantom scans in {raw} ...", flush=True)
        generate_phantom(raw, args.scans, args.seed, args.max_slices, args.noise_hu, progress=True)
        manifest = read_manifest(raw / "manifest.csv")
        use_dicom_root(raw / "LIDC-IDRI", tmp / "pylidc")
        scans = {
            uid: pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == uid).first()
            for uid in manifest["series_instance_uid"]
        }
        rows = manifest.to_dict("records")

        # Warm the page cache and the lazy imports once, untimed.
        _baseline(scans[rows[0]["series_instance_uid"]], params["clevel"])
        preprocess_scan(rows[0], params)

        baseline_s: dict[str, list[float]] = {r["series_instance_uid"]: [] for r in rows}
        ours_s: dict[str, list[float]] = {r["series_instance_uid"]: [] for r in rows}
        for repeat in range(args.repeats):
            for row in rows:
                uid = row["series_instance_uid"]
                baseline_s[uid].append(_timed(lambda scan=scans[uid]: _baseline(scan, params["clevel"])))
                ours_s[uid].append(_timed(lambda row=row: preprocess_scan(row, params)))
            print(f"pass {repeat + 1}/{args.repeats} done", flush=True)
        best_baseline = {uid: min(t) for uid, t in baseline_s.items()}
        best_ours = {uid: min(t) for uid, t in ours_s.items()}
        baseline_total, ours_total = sum(best_baseline.values()), sum(best_ours.values())

        largest = max(rows, key=lambda r: r["images"])
        peak_baseline = _peak_mb(lambda: _baseline(scans[largest["series_instance_uid"]], params["clevel"]))
        peak_ours = _peak_mb(lambda: preprocess_scan(largest, params))

        stage_s = {}
        for workers in sorted({1, args.workers}):
            out = tmp / f"processed-{workers}"
            stage_params = {**params, "workers": workers, "on_error": "raise"}
            stage_s[workers] = _timed(lambda out=out, p=stage_params: run_preprocess(raw, out, p, progress=False))
            print(f"run_preprocess with {workers} worker(s): {stage_s[workers]:.2f} s", flush=True)

    slices = [int(r["images"]) for r in rows]
    report = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "setup": {
            "scans": len(rows),
            "slices_per_scan": slices,
            "phantom_seed": args.seed,
            "max_slices": args.max_slices,
            "repeats": args.repeats,
            "spacing_mm": params["spacing"],
        },
        "per_scan": {
            "baseline_pylidc_s": round(baseline_total / len(rows), 4),
            "preprocess_scan_s": round(ours_total / len(rows), 4),
            "baseline_scans_per_s": round(len(rows) / baseline_total, 4),
            "preprocess_scans_per_s": round(len(rows) / ours_total, 4),
            "overhead_ratio": round(ours_total / baseline_total, 4),
            "overhead_ratio_per_scan": [round(best_ours[u] / best_baseline[u], 4) for u in best_ours],
            "target_overhead_ratio": TARGET_OVERHEAD,
            "meets_target": bool(ours_total / baseline_total <= TARGET_OVERHEAD),
        },
        "peak_memory_mb": {
            "scan_slices": int(largest["images"]),
            "baseline_pylidc": round(peak_baseline, 1),
            "preprocess_scan": round(peak_ours, 1),
        },
        "run_preprocess": {
            "workers": sorted(stage_s),
            "seconds": [round(stage_s[w], 3) for w in sorted(stage_s)],
            "scans_per_s": [round(len(rows) / stage_s[w], 4) for w in sorted(stage_s)],
            "speedup": round(stage_s[1] / stage_s[args.workers], 4),
        },
    }
    write_json(args.out, report)
    p = report["per_scan"]
    print(
        f"\n{len(rows)} scans ({statistics.mean(slices):.0f} slices on average)\n"
        f"  pylidc baseline     {p['baseline_pylidc_s']:.3f} s/scan  ({p['baseline_scans_per_s']:.2f} scans/s)\n"
        f"  preprocess_scan     {p['preprocess_scan_s']:.3f} s/scan  ({p['preprocess_scans_per_s']:.2f} scans/s)\n"
        f"  overhead ratio      {p['overhead_ratio']:.3f}  (target <= {TARGET_OVERHEAD}: "
        f"{'met' if p['meets_target'] else 'NOT met'})\n"
        f"  peak memory         {peak_baseline:.0f} MB pylidc, {peak_ours:.0f} MB preprocess_scan "
        f"({largest['images']} slices)\n"
        + "".join(
            f"  run_preprocess      {w} worker(s): {stage_s[w]:.2f} s\n" for w in sorted(stage_s)
        )
        + f"  speedup             {report['run_preprocess']['speedup']:.2f}x with {args.workers} workers\n"
        f"written to {args.out}"
    )
    return report


if __name__ == "__main__":
    main()
