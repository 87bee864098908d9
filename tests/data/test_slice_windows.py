"""chestssl.data.slice_windows: where a fixed-size window lies in a slice, and its cut."""

from __future__ import annotations

import numpy as np
import pytest

from chestssl.data.slice_windows import cut_window, window_corner, window_pixels


def test_a_window_spans_side_times_pixel_mm_at_the_slice_spacing():
    assert window_pixels(64, 2.5, (1.5, 1.5)) == (107, 107)  # 160 mm of 1.5 mm voxels
    assert window_pixels(64, 2.5, (2.0, 1.0)) == (80, 160)
    assert window_pixels(4, 0.1, (1.5, 1.5)) == (1, 1)


def _disc(shape, centre, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


@pytest.mark.parametrize("seed", range(40))
def test_the_window_holds_every_nodule_pixel_and_stays_in_the_lungs(seed):
    rng = np.random.default_rng(seed)
    box = (40, 200, 30, 250)  # 160 x 220 pixels of lungs
    centre = (int(rng.integers(50, 190)), int(rng.integers(40, 240)))
    mask = _disc((256, 280), centre, int(rng.integers(1, 12)))
    y0, x0 = window_corner(mask, box, (100, 100), f"scan{seed}", 7)
    assert box[0] <= y0 and y0 + 100 <= box[1] and box[2] <= x0 and x0 + 100 <= box[3]
    assert cut_window(mask, (y0, x0), (100, 100)).sum() == mask.sum()


def test_a_clean_slice_window_lies_anywhere_in_the_lungs_and_is_the_same_for_the_same_slice():
    clean = np.zeros((256, 280), bool)
    box = (40, 200, 30, 250)
    corners = {window_corner(clean, box, (100, 100), "scan", index) for index in range(200)}
    ys, xs = np.array(sorted(corners)).T
    assert ys.min() >= 40 and ys.max() <= 100 and xs.min() >= 30 and xs.max() <= 150
    assert ys.max() - ys.min() > 40 and xs.max() - xs.min() > 80  # spread over the box, not fixed
    assert window_corner(clean, box, (100, 100), "scan", 3) == window_corner(clean, box, (100, 100), "scan", 3)
    assert window_corner(clean, box, (100, 100), "scan", 3) != window_corner(clean, box, (100, 100), "other", 3)


def test_the_nodule_is_not_always_in_the_window_centre():
    """The nodule's place in the window varies, so a model cannot find it by position."""
    mask = _disc((256, 280), (120, 140), 4)
    offsets = [window_corner(mask, (40, 200, 30, 250), (100, 100), "scan", index) for index in range(100)]
    rows = np.array([120 - y0 for y0, _ in offsets])  # y0 in [40, 100]: the box's bounds
    assert rows.min() <= 25 and rows.max() >= 75


def test_lungs_narrower_than_the_window_are_centred_and_far_apart_nodules_centre_on_the_larger():
    clean = np.zeros((256, 280), bool)
    assert window_corner(clean, (100, 160, 30, 250), (100, 100), "s", 0)[0] == 80  # (100 + 160 - 100) // 2
    larger, smaller = _disc((256, 280), (120, 40), 9), _disc((256, 280), (120, 230), 3)  # 190 columns apart
    y0, x0 = window_corner(larger | smaller, (40, 200, 30, 250), (100, 100), "s", 0)
    assert abs(x0 + 50 - 40) <= 2  # centred on the median nodule pixel's column, in the larger disc
    assert cut_window(larger, (y0, x0), (100, 100)).sum() == larger.sum()
    assert not cut_window(smaller, (y0, x0), (100, 100)).any()


def test_a_nodule_outside_the_lung_box_still_lies_in_its_window():
    mask = _disc((256, 280), (20, 20), 3)  # above and left of the box
    corner = window_corner(mask, (40, 200, 30, 250), (100, 100), "s", 1)
    assert cut_window(mask, corner, (100, 100)).sum() == mask.sum()


def test_cut_window_copies_what_lies_in_the_slice_and_reads_0_outside():
    slices = np.arange(2 * 6 * 8, dtype=np.float32).reshape(2, 6, 8) + 1
    out = cut_window(slices, (-2, 5), (4, 5))
    assert out.shape == (2, 4, 5)
    np.testing.assert_array_equal(out[:, 2:, :3], slices[:, :2, 5:8])
    assert not out[:, :2].any() and not out[:, :, 3:].any()
    assert not cut_window(slices, (10, 10), (3, 3)).any()
