"""Digitally reconstructed radiographs from processed CT (the X-ray view of seeds 001, 002, 004)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from chestssl.data.drr import (
    attenuation_per_mm,
    hu_from_processed,
    line_integral,
    max_projection,
    render_radiographs,
    render_study,
    study_geometry,
    window_percentiles,
)
from chestssl.data.preprocess import window_hu
from chestssl.data.radiograph_folder import open_radiograph_folder

HU_WINDOW = (-1000.0, 400.0)
CFG = {"side": 64, "mu_water_per_mm": 0.02, "window_percentiles": [1.0, 99.0]}


def chest_phantom(shape=(40, 48, 64), spacing=(2.5, 1.5, 1.5)):
    """A hand-made chest in HU, built in mm so it keeps its shape for any spacing.

    Soft-tissue body ellipse, two air-filled lungs (patient's right lung at low x), a spine
    cylinder of bone at the window top (posterior, at high y), and a 9 mm nodule sphere in
    the right lung. Returns (processed image in [0, 1], nodule mask, the geometry in mm).
    """
    z, y, x = (
        (np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)
    )
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    extent = [n * s for n, s in zip(shape, spacing)]
    cy, cx = extent[1] / 2, extent[2] / 2
    hu = np.full(shape, -1000.0, np.float32)
    body = ((yy - cy) / (0.45 * extent[1])) ** 2 + ((xx - cx) / (0.47 * extent[2])) ** 2 <= 1
    hu[body] = 40.0
    lung_y, lung_dx = cy - 0.06 * extent[1], 0.22 * extent[2]
    lung_semi = (0.25 * extent[1], 0.15 * extent[2], 0.38 * extent[0])
    lung_centres = {"right": cx - lung_dx, "left": cx + lung_dx}
    for lx in lung_centres.values():
        lung = (
            ((yy - lung_y) / lung_semi[0]) ** 2 + ((xx - lx) / lung_semi[1]) ** 2
            + ((zz - extent[0] / 2) / lung_semi[2]) ** 2
        ) <= 1
        hu[lung] = -850.0
    spine_y = cy + 0.30 * extent[1]
    spine = ((yy - spine_y) ** 2 + (xx - cx) ** 2) <= (0.08 * extent[2]) ** 2
    hu[spine] = 400.0
    nodule_mm = np.array([extent[0] / 2 + 6.0, lung_y, lung_centres["right"]])
    nodule = (zz - nodule_mm[0]) ** 2 + (yy - nodule_mm[1]) ** 2 + (xx - nodule_mm[2]) ** 2 <= 4.5**2
    hu[nodule] = 30.0
    image = window_hu(hu, *HU_WINDOW).astype(np.float16).astype(np.float32)
    places = {"lung_y": lung_y, "spine_y": spine_y, "lungs_x": list(lung_centres.values()), "spine_x": cx}
    return image, nodule.astype(np.uint8), places


def mm_to_index(mm: float, spacing: float) -> int:
    return int(mm / spacing)


# --------------------------------------------------------------------------------------
# Physics
# --------------------------------------------------------------------------------------


def test_hu_and_attenuation_invert_the_window():
    hu = np.array([-1200.0, -1000.0, 0.0, 400.0, 1500.0], np.float32)
    back = hu_from_processed(window_hu(hu, *HU_WINDOW), HU_WINDOW)
    # Outside the window the HU is clipped: bone above 400 HU comes back as 400.
    np.testing.assert_allclose(back, [-1000, -1000, 0, 400, 400], atol=1e-3)
    mu = attenuation_per_mm(back, 0.02)
    np.testing.assert_allclose(mu, [0.0, 0.0, 0.02, 0.028, 0.028], rtol=1e-5, atol=1e-8)
    assert attenuation_per_mm(np.array([-1500.0]), 0.02)[0] == 0.0


def test_line_integral_is_mu_times_path_length():
    mu = np.zeros((3, 4, 5), np.float32)
    mu[1, :, 2] = 0.02  # a 4-voxel rod along y at (z=1, x=2)
    frontal = line_integral(mu, (2.0, 1.5, 0.5), "frontal")
    lateral = line_integral(mu, (2.0, 1.5, 0.5), "lateral")
    assert frontal.shape == (3, 5) and lateral.shape == (3, 4)
    # 4 voxels of 1.5 mm at 0.02/mm; the row is flipped so the most superior slice is row 0.
    assert frontal[1, 2] == pytest.approx(4 * 1.5 * 0.02)
    assert frontal.sum() == pytest.approx(4 * 1.5 * 0.02)
    np.testing.assert_allclose(lateral[1], 0.02 * 0.5)  # one 0.5 mm voxel along each x ray


@pytest.mark.parametrize("spacing", [(2.5, 1.5, 1.5), (1.25, 2.0, 0.8)])
def test_lungs_darker_than_spine_in_both_views(spacing):
    shape = tuple(int(round(e / s)) for e, s in zip((100.0, 72.0, 96.0), spacing))
    image, mask, places = chest_phantom(shape, spacing)
    mu = attenuation_per_mm(hu_from_processed(image, HU_WINDOW), 0.02)
    mid_rows = slice(shape[0] // 2 - 3, shape[0] // 2 + 3)
    frontal = line_integral(mu, spacing, "frontal")[mid_rows]
    lateral = line_integral(mu, spacing, "lateral")[mid_rows]
    spine_col_f = mm_to_index(places["spine_x"], spacing[2])
    for lung_x in places["lungs_x"]:
        lung_col_f = mm_to_index(lung_x, spacing[2])
        assert frontal[:, lung_col_f].mean() < 0.8 * frontal[:, spine_col_f].mean()
    lung_col_l, spine_col_l = mm_to_index(places["lung_y"], spacing[1]), mm_to_index(places["spine_y"], spacing[1])
    assert lateral[:, lung_col_l].mean() < 0.8 * lateral[:, spine_col_l].mean()

    # The same holds in the displayed radiograph (windowed, resampled, padded).
    study = render_study(image, mask, spacing, CFG, HU_WINDOW)
    z_mid = shape[0] / 2
    for view, lungs, spine in (
        ("frontal", [(z_mid, 0, x / spacing[2]) for x in places["lungs_x"]], (z_mid, 0, places["spine_x"] / spacing[2])),
        ("lateral", [(z_mid, places["lung_y"] / spacing[1], 0)], (z_mid, places["spine_y"] / spacing[1], 0)),
    ):
        geo, shown = study.geometry[view], study.images[view]
        spine_value = shown[tuple(int(round(v)) for v in geo.voxel_to_pixel(spine))]
        for lung in lungs:
            assert shown[tuple(int(round(v)) for v in geo.voxel_to_pixel(lung))] < spine_value - 0.2


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 96])
@pytest.mark.parametrize("spacing", [(2.5, 1.5, 1.5), (1.0, 2.0, 0.75)])
def test_projected_nodule_mask_centroid_matches_projected_3d_centroid(size, spacing):
    shape = tuple(int(round(e / s)) for e, s in zip((100.0, 72.0, 96.0), spacing))
    image, mask, _ = chest_phantom(shape, spacing)
    centroid = np.argwhere(mask).mean(axis=0)
    study = render_study(image, mask, spacing, {**CFG, "side": size}, HU_WINDOW)
    expected = {}
    for view in ("frontal", "lateral"):
        projected = study.masks[view]
        assert projected.shape == (size, size) and projected.dtype == np.uint8
        assert set(np.unique(projected)) == {0, 1}
        expected[view] = np.array(study.geometry[view].voxel_to_pixel(centroid))
        found = np.argwhere(projected).mean(axis=0)
        assert np.all(np.abs(found - expected[view]) <= 1.0), (view, found, expected[view])
    # One pixel size for the study: the nodule is on the same row in both views.
    assert expected["frontal"][0] == pytest.approx(expected["lateral"][0])


def test_a_nodule_smaller_than_a_pixel_is_kept():
    mask = np.zeros((40, 64, 64), np.uint8)
    mask[20, 30, 10] = 3  # one voxel, 1/16 of an output pixel at size 32 from 128 mm
    image = np.full(mask.shape, 0.5, np.float32)
    study = render_study(image, mask, (3.2, 2.0, 2.0), {**CFG, "side": 32}, HU_WINDOW)
    for view in ("frontal", "lateral"):
        assert int((study.masks[view] == 3).sum()) == 1
        row, col = np.argwhere(study.masks[view] == 3)[0]
        expected = study.geometry[view].voxel_to_pixel((20, 30, 10))
        assert abs(row - expected[0]) <= 0.5 and abs(col - expected[1]) <= 0.5


def test_orientation_head_up_patient_right_on_the_left_anterior_on_the_left():
    shape, spacing = (30, 40, 40), (2.5, 1.5, 1.5)
    hu = np.full(shape, 40.0, np.float32)
    # A bone marker near the head end (high z), at the patient's right (low x), anterior (low y).
    hu[25:29, 3:9, 3:9] = 400.0
    image = window_hu(hu, *HU_WINDOW)
    mask = np.zeros(shape, np.uint8)
    mask[25:29, 3:9, 3:9] = 1
    study = render_study(image, mask, spacing, CFG, HU_WINDOW)
    size = CFG["side"]
    for view in ("frontal", "lateral"):
        shown, labels = study.images[view], study.masks[view]
        rows, cols = np.nonzero(labels)
        # The marker (by its carried mask and by brightness) is in the top-left quadrant.
        assert rows.max() < size // 2 and cols.max() < size // 2, view
        brightest = np.unravel_index(np.argmax(shown), shown.shape)
        assert labels[brightest] == 1, view
        row, col = study.geometry[view].voxel_to_pixel((27, 5, 5))
        assert row < size / 2 and col < size / 2
    # The same marker moved to the patient's left (high x) moves right in the frontal view only.
    hu_left = np.full(shape, 40.0, np.float32)
    hu_left[25:29, 3:9, 31:37] = 400.0
    frontal = line_integral(attenuation_per_mm(hu_left, 0.02), spacing, "frontal")
    lateral = line_integral(attenuation_per_mm(hu_left, 0.02), spacing, "lateral")
    frontal_row, frontal_col = np.unravel_index(np.argmax(frontal), frontal.shape)
    lateral_row, lateral_col = np.unravel_index(np.argmax(lateral), lateral.shape)
    assert frontal_row < 5 and frontal_col >= 31
    assert lateral_row < 5 and lateral_col < 9


def test_max_projection_orientation_matches_line_integral():
    labels = np.zeros((6, 5, 7), np.uint8)
    labels[5, 1, 6] = 2
    labels[0, 4, 0] = 1
    frontal, lateral = max_projection(labels, "frontal"), max_projection(labels, "lateral")
    assert frontal[0, 6] == 2 and frontal[5, 0] == 1  # slice 5 (superior) is row 0
    assert lateral[0, 1] == 2 and lateral[5, 4] == 1


@pytest.mark.parametrize(
    "shape, spacing",
    [((20, 30, 50), (3.0, 1.0, 1.0)), ((60, 20, 25), (1.0, 1.5, 2.0)), ((8, 40, 40), (2.5, 1.5, 1.5))],
)
def test_output_is_square_padded_and_windowed(shape, spacing):
    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 0.8, shape).astype(np.float32)
    study = render_study(image, np.zeros(shape, np.uint8), spacing, CFG, HU_WINDOW)
    extents = {"rows": shape[0] * spacing[0], "frontal": shape[2] * spacing[2], "lateral": shape[1] * spacing[1]}
    for view in ("frontal", "lateral"):
        shown, geo = study.images[view], study.geometry[view]
        assert shown.shape == (64, 64) and study.masks[view].shape == (64, 64)
        assert shown.min() == 0.0 and shown.max() == 1.0
        # Aspect ratio kept to within a pixel: physical height/width is the pixel height/width.
        height, width = geo.fitted_shape
        assert max(height, width) == 64 or max(extents.values()) > max(extents["rows"], extents[view])
        assert height == pytest.approx(extents["rows"] / max(extents.values()) * 64, abs=0.5)
        assert width == pytest.approx(extents[view] / max(extents.values()) * 64, abs=0.5)
        assert geo.pixel_mm[0] == pytest.approx(geo.pixel_mm[1], rel=0.1)
        top, left = geo.pad_before
        content = np.zeros((64, 64), bool)
        content[top:top + height, left:left + width] = True
        assert np.all(shown[~content] == 0)  # padding is 0
        assert np.mean(shown[content] > 0) > 0.9  # noise fills the content
    # The larger in-plane extent fills its width, the z extent fills every height equally.
    assert study.geometry["frontal"].fitted_shape[0] == study.geometry["lateral"].fitted_shape[0]


def test_window_percentiles_maps_percentiles_to_0_and_1():
    values = np.arange(101, dtype=np.float32)
    windowed = window_percentiles(values, 10, 90)
    assert windowed[10] == 0 and windowed[90] == 1 and windowed[50] == pytest.approx(0.5)
    assert windowed.min() == 0 and windowed.max() == 1
    np.testing.assert_array_equal(window_percentiles(np.full((4, 4), 3.0), 1, 99), np.zeros((4, 4)))


def test_study_geometry_rejects_a_bad_volume():
    with pytest.raises(ValueError, match="positive spacing"):
        study_geometry((10, 10, 10), (1.0, 0.0, 1.0), 32)


# --------------------------------------------------------------------------------------
# The processed folder
# --------------------------------------------------------------------------------------


def leftovers(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.parent.iterdir() if p.name.startswith("."))


def test_render_radiographs_writes_studies_and_labels(synthetic_processed, tmp_path):
    out_dir = tmp_path / "radiographs"
    table = render_radiographs(synthetic_processed, out_dir, CFG, HU_WINDOW)
    assert leftovers(out_dir) == []
    folder = open_radiograph_folder(out_dir)
    assert folder.source == "rendered" and folder.label_names == ["nodule", "malignant"] and folder.size == 64
    assert folder.info["views"] == ["frontal", "lateral"]
    studies = folder.studies
    assert studies["study_id"].tolist() == [f"p{i}" for i in range(6)] == table["study_id"].tolist()
    assert (studies["scan_id"] == studies["study_id"]).all()
    assert folder.images["study_id"].tolist() == [f"p{i}" for i in range(6) for _ in range(2)]
    assert folder.images["view"].tolist() == ["frontal", "lateral"] * 6
    assert folder.pixels.shape == (12, 64, 64) and folder.pixels.dtype == np.float16
    assert folder.masks is not None and folder.masks.shape == (12, 64, 64)
    assert 0.0 <= float(folder.pixels.min()) and float(folder.pixels.max()) <= 1.0
    splits = json.loads((synthetic_processed / "splits.json").read_text())
    for i, row in studies.iterrows():
        has_nodule = i % 2 == 1
        assert row["patient_id"] == f"p{i}" and row["split"] in splits and f"p{i}" in splits[row["split"]]
        assert row["nodule"] == int(has_nodule)
        assert row["malignancy"] == (4.0 if has_nodule else 0.0)
        assert row["malignant"] == int(has_nodule)  # rated 4: "moderately suspicious" counts as malignant
        centre_columns = ["nodule_id", "frontal_row", "frontal_col", "lateral_row", "lateral_col"]
        assert row[centre_columns].notna().all() == has_nodule and row[centre_columns].isna().all() != has_nodule
        for offset, view in enumerate(("frontal", "lateral")):
            mask = folder.masks[2 * i + offset]
            assert bool(mask.any()) == has_nodule
            if has_nodule:
                # The listed centre is the centre of the carried mask.
                found = np.argwhere(mask).mean(axis=0)
                listed = row[[f"{view}_row", f"{view}_col"]].to_numpy(float)
                assert np.all(np.abs(found - listed) <= 1.0)
    assert (folder.images[["pixel_mm_row", "pixel_mm_col"]] > 0).all().all()
    assert folder.info["cfg"] == CFG and folder.info["hu_window"] == list(HU_WINDOW)


def test_the_malignant_cut_is_the_linear_probes():
    from chestssl.data.labels import MALIGNANT_MIN_RATING
    from chestssl.eval.linear_probe import probe_labels

    assert MALIGNANT_MIN_RATING == 4.0
    # The CT probe cuts where the rendered `malignant` label does.
    below, at = MALIGNANT_MIN_RATING - 0.5, MALIGNANT_MIN_RATING
    assert probe_labels({"label": np.array([1, 1]), "malignancy": np.array([below, at])})["malignant"].tolist() == [0, 1]


def test_an_interrupted_render_keeps_the_output_and_resumes(synthetic_processed, tmp_path, monkeypatch):
    import chestssl.data.drr as drr

    out_dir = tmp_path / "radiographs"
    render_radiographs(synthetic_processed, out_dir, CFG, HU_WINDOW)
    before = (out_dir / "images.npy").read_bytes()

    calls = {"n": 0, "stop_at": 3}
    real_render = drr.render_study

    def counting_render(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt  # the run is stopped halfway
        return real_render(*args, **kwargs)

    monkeypatch.setattr(drr, "render_study", counting_render)
    small = {**CFG, "side": 32}
    with pytest.raises(KeyboardInterrupt):
        render_radiographs(synthetic_processed, out_dir, small, HU_WINDOW)
    # The previous output is whole and untouched; the finished scans wait for the next run.
    assert (out_dir / "images.npy").read_bytes() == before
    assert open_radiograph_folder(out_dir).size == 64
    assert leftovers(out_dir) == [".radiographs.partial"]

    calls.update(n=0, stop_at=None)
    render_radiographs(synthetic_processed, out_dir, small, HU_WINDOW)
    assert calls["n"] == 4  # scans p0 and p1 were done before the interruption
    assert leftovers(out_dir) == []
    resumed = open_radiograph_folder(out_dir)
    assert resumed.size == 32 and resumed.info["cfg"]["side"] == 32
    render_radiographs(synthetic_processed, tmp_path / "fresh", small, HU_WINDOW)
    assert (out_dir / "images.npy").read_bytes() == (tmp_path / "fresh" / "images.npy").read_bytes()
    assert (out_dir / "masks.npy").read_bytes() == (tmp_path / "fresh" / "masks.npy").read_bytes()


def test_an_interrupted_render_with_other_settings_starts_over(synthetic_processed, tmp_path, monkeypatch):
    import chestssl.data.drr as drr

    out_dir = tmp_path / "radiographs"
    real_render = drr.render_study
    calls = {"n": 0}

    def counting_render(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(drr, "render_study", counting_render)
    with pytest.raises(KeyboardInterrupt):
        render_radiographs(synthetic_processed, out_dir, {**CFG, "side": 32}, HU_WINDOW)
    assert not out_dir.exists() and leftovers(out_dir) == [".radiographs.partial"]
    calls["n"] = -100
    render_radiographs(synthetic_processed, out_dir, {**CFG, "side": 32, "mu_water_per_mm": 0.03}, HU_WINDOW)
    assert calls["n"] == -94  # all 6 scans rendered again
    assert open_radiograph_folder(out_dir).info["cfg"]["mu_water_per_mm"] == 0.03


def test_render_radiographs_rejects_bad_inputs_before_writing(synthetic_processed, tmp_path):
    out_dir = tmp_path / "radiographs"
    with pytest.raises(ValueError, match=r"hu_window: got \[400, -1000\], expected \[low, high\]"):
        render_radiographs(synthetic_processed, out_dir, CFG, (400, -1000))
    with pytest.raises(FileNotFoundError, match="slices.csv"):
        render_radiographs(tmp_path / "nowhere", out_dir, CFG, HU_WINDOW)
    assert not out_dir.exists() and leftovers(out_dir) == []


def test_stage_script_renders_from_params(synthetic_processed, tmp_path, monkeypatch):
    import shutil

    repo_root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("radiographs_stage", repo_root / "stages" / "radiographs.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    shutil.copytree(synthetic_processed, tmp_path / "data" / "processed")
    monkeypatch.chdir(tmp_path)
    params = {"radiographs": {**CFG, "side": 32}, "preprocess": {"hu_window": list(HU_WINDOW)},
              "data": {"cxr": {"source": "rendered"}}}
    monkeypatch.setattr(stage, "load_params", lambda: params)
    stage.main([])
    assert len(open_radiograph_folder(tmp_path / "data" / "radiographs").studies) == 6
