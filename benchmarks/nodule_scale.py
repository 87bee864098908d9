"""How many pixels a median nodule spans in the 2D slices, by slice size and field of view.

The 2D models see each processed slice cropped to ``slices.field_of_view`` (``body``: the
whole slice, cropped to the body; ``lungs``: the scan's ``lung_box``; ``window``: a window
``side * pixel_mm`` mm across, so a pixel spans ``pixel_mm`` whatever the size), padded to
a square and resized to ``slices.side``. On a ``data/processed`` folder (default: this checkout's,
written by ``dvc repro preprocess``), for each size and field of view: the median over the
nodules of ``nodules.csv`` of their consensus diameter in slice pixels, with the median mm
per pixel (:func:`chestssl.report.anatomy_figures.nodule_scale`), and the compute per slice
relative to the quick profile's 64 px (pixels, the cost of a 2D convolutional network).

    python benchmarks/nodule_scale.py --sizes 64 96 128 --pixel-mm 2.5 3.0

Results are printed and written atomically to ``reports/benchmarks/nodule_scale.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BASELINE_SIZE = 64


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", type=Path, default=REPO / "data" / "processed")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--pixel-mm", type=float, nargs="+", default=[2.5],
                        help="pixel sizes (mm) of the window field of view")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "nodule_scale.json")
    args = parser.parse_args(argv)

    from chestssl.io import write_json
    from chestssl.params import FIELDS_OF_VIEW
    from chestssl.report.anatomy_figures import nodule_scale

    rows = []
    for size in args.sizes:
        views = [(view, None) for view in FIELDS_OF_VIEW if view != "window"]
        views += [("window", pixel_mm) for pixel_mm in args.pixel_mm]
        for view, pixel_mm in views:
            scale = nodule_scale(args.processed, size, view, pixel_mm)
            if scale is None:
                raise SystemExit(f"{args.processed}: no processed scans with nodules; run `dvc repro preprocess`")
            rows.append({"size": size, "field_of_view": view, "pixel_mm": pixel_mm, "nodules": scale["nodules"],
                         "nodule_mm": round(scale["nodule_mm"], 2), "mm_per_pixel": round(scale["mm_per_pixel"], 2),
                         "nodule_pixels": round(scale["nodule_pixels"], 2),
                         "compute_vs_64px": round((size / BASELINE_SIZE) ** 2, 2)})
    print(f"{'size':>5} {'view':>6} {'mm/px':>6} {'nodule px':>9} {'compute':>8}")
    for row in rows:
        print(f"{row['size']:>5} {row['field_of_view']:>6} {row['mm_per_pixel']:>6.2f} {row['nodule_pixels']:>9.2f} "
              f"{row['compute_vs_64px']:>7.2f}x")
    print(f"{rows[0]['nodules']} nodules, median diameter {rows[0]['nodule_mm']} mm")
    report = {"processed": str(args.processed), "rows": rows}
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
