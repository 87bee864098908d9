"""The report's figure of the data: base CT, processed scans and their radiographs (chestssl.report.anatomy_figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chestssl.data.processed import NODULE_COLUMNS, SLICE_COLUMNS
from chestssl.io import write_json, write_npz
from chestssl.report.anatomy_figures import (
    FIGURE_NAME,
    anatomy_section,
    choose_nodules,
    nodule_scale,
    pad,
    render_views,
    window_percentiles,
)
from tests.data.test_ct_anatomy import write_synthetic_base

REPO_ROOT = Path(__file__).resolve().parents[2]
SPACING = (2.5, 1.5, 1.5)
SHAPE = (16, 40, 48)
RADIOGRAPHS = {"side": 64, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]}
#: scan -> (split, nodules as (diameter_mm, centre (z, y, x) voxels)); p3 has the largest nodule but is not test.
SCANS = {
    "p1": ("test", [(6.0, (8, 18, 14))]),
    "p2": ("test", [(4.0, (5, 18, 34)), (10.5, (9, 20, 15))]),
    "p3": ("train", [(20.0, (8, 18, 33))]),
    "p4": ("test", []),
    "p5": ("val", []),
}


def params(source: str = "phantom", anatomy: str = "ct") -> dict:
    return {
        "data": {"source": source, "phantom": {"anatomy": anatomy}},
        "preprocess": {"spacing": list(SPACING), "hu_window": [-1000.0, 400.0], "clevel": 0.5},
        "radiographs": dict(RADIOGRAPHS),
    }


def write_processed(root: Path, scans: dict = SCANS) -> Path:
    """A small ``data/processed`` folder: a soft-tissue body with two lungs per scan, the
    ``scans`` nodules as balls in them (labels 1, 2, ... in order)."""
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(SHAPE, SPACING)), indexing="ij")
    body = ((y - 30) / 27) ** 2 + ((x - 36) / 34) ** 2 <= 1
    lungs = (((y - 27) / 18) ** 2 + ((np.abs(x - 36) - 15) / 11) ** 2 + ((z - 20) / 17) ** 2) <= 1
    splits = {"train": [], "val": [], "test": [], "seed": 0}
    slice_rows, nodule_rows = [], []
    for scan_id, (split, nodules) in scans.items():
        splits[split].append(scan_id)
        hu = np.where(body, 40.0, -1000.0)
        hu[lungs] = -850.0
        mask = np.zeros(SHAPE, np.uint8)
        for label, (diameter, centre) in enumerate(nodules, start=1):
            ball = sum(((axis - c * s) ** 2 for axis, c, s in zip((z, y, x), centre, SPACING))) <= (diameter / 2) ** 2
            hu[ball], mask[ball] = 30.0, label
            nodule_rows.append([scan_id, scan_id, label, *centre, diameter, 4, 3.0, 5.0, 6.0, split])
        for index in range(SHAPE[0]):
            pixels = int((mask[index] > 0).sum())
            slice_rows.append([scan_id, scan_id, index, pixels, 3.0 if pixels else 0.0, int(pixels > 0), split])
        image = np.clip((hu + 1000.0) / 1400.0, 0.0, 1.0)
        write_npz(root / "scans" / f"{scan_id}.npz", image=image.astype(np.float16), mask=mask,
                  spacing=np.array(SPACING, np.float32), origin_index=np.zeros(3, np.int32),
                  lung_box=np.array([0, SHAPE[1], 0, SHAPE[2]], np.int32))
    pd.DataFrame(slice_rows, columns=SLICE_COLUMNS).to_csv(root / "slices.csv", index=False)
    pd.DataFrame(nodule_rows, columns=NODULE_COLUMNS).to_csv(root / "nodules.csv", index=False)
    write_json(root / "splits.json", splits)
    return root


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    return write_processed(tmp_path_factory.mktemp("anatomy") / "processed")


@pytest.fixture(scope="module")
def synthetic_base(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("base-ct")
    return folder, write_synthetic_base(folder)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size  # (width, height)


# ----------------------------------------------------------------------------- choice of scans


def test_the_test_scans_with_the_largest_nodules_come_first(processed):
    from chestssl.data.processed import read_nodules

    chosen = choose_nodules(read_nodules(processed))
    assert chosen["scan_id"].tolist() == ["p2", "p1"]  # p3's larger nodule is in train
    assert chosen["nodule_id"].tolist() == [2, 1]  # p2's largest nodule, not its first
    assert choose_nodules(read_nodules(processed), count=1)["scan_id"].tolist() == ["p2"]


def test_without_a_test_nodule_any_split_is_used(tmp_path):
    scans = {"a": ("test", []), "b": ("train", [(5.0, (8, 18, 14))]), "c": ("val", [(7.0, (8, 18, 33))])}
    root = write_processed(tmp_path / "processed", scans)
    from chestssl.data.processed import read_nodules

    assert choose_nodules(read_nodules(root))["scan_id"].tolist() == ["c", "b"]
    captioned, _ = anatomy_section(params(anatomy="geometric"), root, tmp_path / "figures")
    assert "the rows are the 2 scans of any split (the test split has none with a nodule)" in captioned[0][0]


# ----------------------------------------------------------------------------- radiographs without MONAI


def test_render_views_matches_render_study(processed):
    from chestssl.data.drr import render_study
    from chestssl.data.processed import load_scan

    scan = load_scan(processed, "p2")
    images, masks = render_views(scan["image"], scan["mask"], scan["spacing"], RADIOGRAPHS)
    study = render_study(scan["image"], scan["mask"], scan["spacing"], RADIOGRAPHS)
    for view in ("frontal", "lateral"):
        assert images[view].shape == masks[view].shape == (64, 64)
        assert images[view].dtype == np.float32 and masks[view].dtype == np.uint8
        np.testing.assert_allclose(images[view], study.images[view], atol=1e-6)
        np.testing.assert_array_equal(masks[view], study.masks[view])
        assert set(np.unique(masks[view])) == {0, 1, 2}


def test_numpy_window_and_pad():
    image = np.arange(100, dtype=np.float32).reshape(10, 10)
    windowed = window_percentiles(image, 0.0, 100.0)
    assert windowed.min() == 0.0 and windowed.max() == 1.0 and windowed.dtype == np.float32
    assert np.array_equal(window_percentiles(np.ones((4, 4)), 1.0, 99.0), np.zeros((4, 4), np.float32))
    from chestssl.data.drr import study_geometry

    geometry = study_geometry((10, 20, 40), (1.0, 1.0, 1.0), 32)["lateral"]
    fitted = np.ones(geometry.fitted_shape, np.uint8)
    padded = pad(geometry, fitted)
    assert padded.shape == (32, 32) and padded.dtype == np.uint8 and padded.sum() == fitted.sum()
    top, left = geometry.pad_before
    assert padded[top, left] == 1 and padded[top - 1, left] == 0
    with pytest.raises(ValueError, match="to pad"):
        pad(geometry, np.ones((3, 3)))


# ----------------------------------------------------------------------------- the section


def test_ct_anatomy_draws_the_base_ct_and_two_scans(processed, synthetic_base, tmp_path):
    folder, expected = synthetic_base
    captioned, skipped = anatomy_section(params(), processed, tmp_path / "figures", folder, expected)
    assert skipped == []
    [(caption, path)] = captioned
    assert path == tmp_path / "figures" / FIGURE_NAME
    width, height = png_size(path)
    assert 1000 <= width <= 1500 and 900 <= height <= 1300  # 4 columns, 3 rows
    assert "real chest CT" in caption and "first row is the base CT" in caption
    assert "the next rows are the 2 test-split scans with the largest nodules" in caption
    assert "1.5 x 1.5 mm axial, 2.5 x 1.5 mm coronal" in caption
    assert "consensus" in caption and "`preprocess.clevel` 0.5" in caption
    assert "[-1000, 400] HU" in caption


def test_geometric_anatomy_has_no_base_ct_row(processed, tmp_path):
    captioned, skipped = anatomy_section(params(anatomy="geometric"), processed, tmp_path / "figures",
                                         tmp_path / "no-base-ct")
    [(caption, path)] = captioned
    width, height = png_size(path)
    assert 1000 <= width <= 1500 and 550 <= height <= 900  # 4 columns, 2 rows
    assert "drawn anatomy" in caption and "base CT" not in caption.split(";")[1]
    [note] = skipped
    assert "geometric" in note and "no base CT" in note


def test_real_ct_has_no_base_ct_row(processed, tmp_path):
    captioned, skipped = anatomy_section(params(source="tcia"), processed, tmp_path / "figures")
    assert "real LIDC-IDRI CT" in captioned[0][0]
    [note] = skipped
    assert "real CT" in note and "data.source: tcia" in note


def test_a_missing_base_ct_is_a_note_naming_the_fetch_command(processed, tmp_path):
    captioned, skipped = anatomy_section(params(), processed, tmp_path / "figures", tmp_path / "no-base-ct")
    assert len(captioned) == 1 and "the rows are the 2 test-split scans" in captioned[0][0]
    [note] = skipped
    assert "base CT row" in note and "python -m chestssl.data.base_ct fetch" in note


def test_missing_processed_data_is_a_note(tmp_path, synthetic_base):
    captioned, skipped = anatomy_section(params(anatomy="geometric"), tmp_path / "nothing", tmp_path / "figures")
    assert captioned == []
    assert any("scan rows" in note and "nodules.csv missing" in note for note in skipped)
    assert not (tmp_path / "figures" / FIGURE_NAME).exists()
    folder, expected = synthetic_base  # the base CT row alone
    captioned, skipped = anatomy_section(params(), tmp_path / "nothing", tmp_path / "figures", folder, expected)
    [(caption, path)] = captioned
    assert path.exists() and "first row is the base CT" in caption and "largest nodule" not in caption
    assert len(skipped) == 1 and "preprocess" in skipped[0]


def test_processed_data_without_nodules_is_a_note(tmp_path):
    root = write_processed(tmp_path / "processed", {"a": ("test", []), "b": ("train", [])})
    captioned, skipped = anatomy_section(params(anatomy="geometric"), root, tmp_path / "figures")
    assert captioned == []
    assert any("lists no nodule" in note for note in skipped)


def test_the_figure_imports_neither_torch_nor_monai(processed, synthetic_base, tmp_path):
    folder, expected = synthetic_base
    script = (
        "import json, sys\n"
        "import chestssl.report.anatomy_figures as figures\n"
        "args = json.loads(sys.argv[1])\n"
        "captioned, _ = figures.anatomy_section(args['params'], args['processed'], args['figures'], args['base'],\n"
        "                                       args['expected'])\n"
        "assert captioned, 'no figure drawn'\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    args = {"params": params(), "processed": str(processed), "figures": str(tmp_path / "figures"),
            "base": str(folder), "expected": expected}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(args)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "figures" / FIGURE_NAME).exists()


def test_nodule_scale_is_the_median_nodule_in_slice_pixels(processed, tmp_path):
    """Slices of 40 x 48 voxels of 1.5 mm, padded to 48 and resized to 64: 1.125 mm per pixel;
    diameters 6, 4, 10.5 and 20 mm: median 8.25 mm, 7.33 pixels."""
    scale = nodule_scale(processed, 64)
    assert scale == pytest.approx({"nodules": 4, "nodule_mm": 8.25, "mm_per_pixel": 1.125, "nodule_pixels": 8.25 / 1.125})
    assert nodule_scale(processed, 32)["nodule_pixels"] == pytest.approx(8.25 / 2.25)
    # windows of 64 pixels of 2.5 mm: 107 voxels of 1.5 mm, 2.51 mm per pixel, whatever the slice's width
    window = nodule_scale(processed, 64, "window", 2.5)
    assert window["mm_per_pixel"] == pytest.approx(107 * 1.5 / 64)
    assert window["nodule_pixels"] == pytest.approx(8.25 / (107 * 1.5 / 64))
    with pytest.raises(ValueError, match="pixel_mm: got None"):
        nodule_scale(processed, 64, "window")
    assert nodule_scale(tmp_path / "nothing", 64) is None
    assert nodule_scale(write_processed(tmp_path / "clean", {"p1": ("test", []), "p2": ("train", [])}), 64) is None
