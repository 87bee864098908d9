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


def test_training_curves_put_train_and_val_of_a_metric_and_all_probe_curves_in_one_panel(tmp_path, monkeypatch):
    import pandas as pd
    from matplotlib.figure import Figure

    def frame(values):
        return pd.DataFrame({"step": range(len(values)), "value": values})

    curves = {name: frame([1.0, 0.5, 0.25]) for name in
              ("lr", "val/loss", "train/loss", "train/l1", "val/ssim", "probe/nodule/auroc", "probe/mean_auroc")}
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda figure, path: drawn.append(figure) or path)
    figures.training_curves_figure(tmp_path / "curves.png", "ae", curves)
    (figure,) = drawn
    assert isinstance(figure, Figure)
    panels = {ax.get_title(): sorted(line.get_label() for line in ax.get_lines()) for ax in figure.axes if ax.get_visible()}
    assert list(panels) == ["loss", "l1", "ssim", "linear probe", "lr"]
    assert panels["loss"] == ["train", "val"]
    assert panels["linear probe"] == ["mean_auroc", "nodule auroc"]
    assert panels["l1"] == ["train"] and panels["ssim"] == ["val"]
