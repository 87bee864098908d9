"""Figures from tables whose numbers are awkward but legitimate."""

from __future__ import annotations

from PIL import Image

from chestssl.report import figures
from chestssl.report.tables import RECONSTRUCTION_COLUMNS, reconstruction_table


def entry(value, low, high):
    return {"value": value, "ci_low": low, "ci_high": high}


def test_interval_figure_accepts_an_estimate_outside_its_percentile_interval(tmp_path):
    # Percentile bootstrap intervals of skewed statistics need not contain the estimate.
    metrics = {"ssim": entry(0.72, 0.0, 0.70), "psnr": entry(17.0, 15.0, 19.0), "l1": entry(0.1, 0.12, 0.2),
               "n_images": 10, "n_patients": 3}
    table = reconstruction_table({"ae": (metrics, "metrics.json")})
    path = figures.interval_figure(tmp_path / "intervals.png", table, RECONSTRUCTION_COLUMNS, "method")
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 50
