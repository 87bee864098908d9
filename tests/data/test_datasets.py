"""SliceDataset on the synthetic processed folder (tests/conftest.py: patients p1, p3, p5
have a bright disc nodule on slices 4..7; two patients per split)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from chestssl.data.datasets import DatasetError, SliceDataset, nodule_free_patients, slice_options, square_resize
from chestssl.data.processed import load_scan, read_slices, scan_path
from chestssl.io import write_csv, write_npz

DISC_CENTRE = (20, 26)  # (y, x) in the fixture's 48 x 48 slices


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_counts_per_task_match_slices_csv(synthetic_processed, split):
    rows = read_slices(synthetic_processed)
    rows = rows[rows["split"] == split]
    nodule = int((rows["label"] == 1).sum())
    assert len(SliceDataset(synthetic_processed, split, 32, "pretrain")) == len(rows) == 24
    assert len(SliceDataset(synthetic_processed, split, 32, "seg")) == nodule == 4
    cls = SliceDataset(synthetic_processed, split, 32, "cls", clean_per_nodule_slice=1.5)
    assert len(cls) == nodule + 6
    assert int((cls.labels == 1).sum()) == nodule and int((cls.labels == 0).sum()) == 6
    assert set(cls.patient_ids) <= set(rows["patient_id"])


def test_items_and_default_collate(synthetic_processed):
    data = SliceDataset(synthetic_processed, "train", 32, "seg")
    item = data[0]
    assert item["image"].shape == item["mask"].shape == (1, 32, 32)
    assert item["image"].dtype == item["mask"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0 and int(item["label"]) == 1
    assert (item["patient_id"], item["scan_id"], item["slice_index"]) == ("p1", "p1", 4)
    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32)
    assert batch["patient_id"] == ["p1"] * 4 and batch["slice_index"].tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("size", [48, 32, 80])
def test_masks_are_aligned_with_the_bright_disc(synthetic_processed, size):
    data = SliceDataset(synthetic_processed, "val", size, "seg")
    for item in data:
        image, mask = item["image"][0], item["mask"][0]
        assert image.shape == (size, size)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        expected_area = 49 * (size / 48) ** 2  # the fixture's disc has 49 pixels
        assert abs(mask.sum().item() - expected_area) <= 0.35 * expected_area
        assert image[mask > 0].mean() > 0.7 and image[mask == 0].mean() < 0.35
        ys, xs = torch.nonzero(mask, as_tuple=True)
        scale = size / 48
        assert abs(ys.float().mean() - (DISC_CENTRE[0] + 0.5) * scale + 0.5) < 1.0
        assert abs(xs.float().mean() - (DISC_CENTRE[1] + 0.5) * scale + 0.5) < 1.0
    if size == 48:  # no resizing: exactly the stored slice and its mask
        scan = load_scan(synthetic_processed, "p3")
        np.testing.assert_allclose(data[0]["image"][0].numpy(), scan["image"][4], atol=1e-3)
        np.testing.assert_array_equal(data[0]["mask"][0].numpy(), scan["mask"][4] > 0)


def test_clean_slice_sampling_is_seeded(synthetic_processed):
    def clean_slices(seed: int) -> list[tuple[str, int]]:
        data = SliceDataset(synthetic_processed, "train", 32, "cls", seed=seed)
        return [(p, s) for p, s, label in zip(data.patient_ids, data.slice_indices, data.labels) if label == 0]

    assert clean_slices(0) == clean_slices(0)
    assert clean_slices(0) != clean_slices(1)
    assert len(clean_slices(0)) == 4


def test_cls_excludes_in_between_slices_and_warns_when_clean_slices_run_out(synthetic_processed):
    rows = read_slices(synthetic_processed)
    in_between = (rows["patient_id"] == "p0") & (rows["slice_index"] == 3)
    rows.loc[in_between, "label"] = -1
    write_csv(synthetic_processed / "slices.csv", rows)
    with pytest.warns(UserWarning, match="40 clean slices wanted .* only 19 available"):
        data = SliceDataset(synthetic_processed, "train", 32, "cls", clean_per_nodule_slice=10.0)
    assert len(data) == 4 + 19
    assert -1 not in data.labels.tolist()
    assert ("p0", 3) not in set(zip(data.patient_ids, data.slice_indices))
    assert len(SliceDataset(synthetic_processed, "train", 32, "pretrain")) == 24, "pretraining keeps every slice"


def test_non_square_slices_are_padded_with_air(synthetic_processed):
    scan = load_scan(synthetic_processed, "p3")
    write_npz(
        scan_path(synthetic_processed, "p3"),
        image=scan["image"][:, :, :36].astype(np.float16),  # 48 x 36: padded by 6 columns each side
        mask=scan["mask"][:, :, :36],
        spacing=scan["spacing"],
        origin_index=scan["origin_index"],
        lung_box=np.array([0, 48, 0, 36], np.int32),
    )
    item = SliceDataset(synthetic_processed, "val", 48, "seg")[0]
    image, mask = item["image"][0], item["mask"][0]
    assert torch.all(image[:, :6] == 0) and torch.all(image[:, 42:] == 0)
    assert image[:, 6:42].min() > 0
    xs = torch.nonzero(mask, as_tuple=True)[1].float()
    assert xs.mean() == pytest.approx(DISC_CENTRE[1] + 6, abs=0.01)


def test_the_lung_field_of_view_shows_the_lung_box_padded_to_a_square(synthetic_processed):
    from tests.conftest import LUNG_BOX

    y0, y1, x0, x1 = LUNG_BOX  # 32 rows x 36 columns: 2 rows of air above and below
    lungs = SliceDataset(synthetic_processed, "val", 36, "seg", field_of_view="lungs")
    body = SliceDataset(synthetic_processed, "val", 36, "seg")
    assert lungs.cache_entry != body.cache_entry
    scan = load_scan(synthetic_processed, "p3")
    item = lungs[0]
    np.testing.assert_allclose(item["image"][0, 2:34].numpy(), scan["image"][4, y0:y1, x0:x1], atol=1e-3)
    assert item["image"][0, :2].abs().max() == 0 and item["image"][0, 34:].abs().max() == 0
    np.testing.assert_array_equal(item["mask"][0, 2:34].numpy(), scan["mask"][4, y0:y1, x0:x1] > 0)
    # The nodule spans more of the slice than with the body in view (48 x 48 resized to 36).
    assert item["mask"].sum() > 1.5 * body[0]["mask"].sum()
    with pytest.raises(DatasetError, match="field_of_view: got 'chest'"):
        SliceDataset(synthetic_processed, "val", 36, "seg", field_of_view="chest")


def test_the_window_field_of_view_cuts_the_same_window_of_a_slice_for_every_task(synthetic_processed):
    """Windows of 16 pixels of 3 mm: 32 x 32 of the fixture's 1.5 mm voxels, in LUNG_BOX (32 x 36)."""
    from tests.conftest import LUNG_BOX

    from chestssl.data.slice_windows import cut_window, window_corner

    seg = SliceDataset(synthetic_processed, "val", 16, "seg", field_of_view="window", pixel_mm=3.0)
    scan = load_scan(synthetic_processed, "p3")
    for item in seg:
        index = item["slice_index"]
        corner = window_corner(scan["mask"][index], LUNG_BOX, (32, 32), "p3", index)
        assert LUNG_BOX[0] <= corner[0] <= LUNG_BOX[1] - 32 and LUNG_BOX[2] <= corner[1] <= LUNG_BOX[3] - 32
        window = cut_window(scan["mask"][index], corner, (32, 32))
        assert window.sum() == scan["mask"][index].sum()  # the whole disc
        image, mask = square_resize(cut_window(scan["image"][index], corner, (32, 32))[None], window[None] > 0, 16)
        np.testing.assert_allclose(item["image"][0].numpy(), image[0].numpy(), atol=1e-3)
        np.testing.assert_array_equal(item["mask"][0].numpy(), mask[0].numpy())
    # every task and stage sees the same window of a slice
    pretrain = SliceDataset(synthetic_processed, "val", 16, "pretrain", field_of_view="window", pixel_mm=3.0)
    position = {(s, i): k for k, (s, i) in enumerate(zip(pretrain.scan_ids, pretrain.slice_indices))}
    for k, item in enumerate(seg):
        np.testing.assert_array_equal(pretrain.images[position[item["scan_id"], item["slice_index"]]], seg.images[k])
    # the pixel size is part of the cache key; a window needs it
    other = SliceDataset(synthetic_processed, "val", 16, "seg", field_of_view="window", pixel_mm=2.5)
    lungs = SliceDataset(synthetic_processed, "val", 16, "seg", field_of_view="lungs")
    assert len({seg.cache_entry, other.cache_entry, lungs.cache_entry}) == 3
    with pytest.raises(DatasetError, match="pixel_mm: got None; field_of_view 'window' needs"):
        SliceDataset(synthetic_processed, "val", 16, "seg", field_of_view="window")


def test_slice_options_are_the_slices_params():
    slices = {"side": 32, "clean_per_nodule_slice": 2.0, "clean_source": "any_slice", "field_of_view": "window",
              "pixel_mm": 2.5}
    assert slice_options(slices) == {"size": 32, "clean_per_nodule_slice": 2.0, "clean_source": "any_slice",
                                     "field_of_view": "window", "pixel_mm": 2.5}


def test_square_resize_keeps_masks_binary_and_images_in_range():
    image = np.random.default_rng(0).random((3, 30, 50))
    mask = np.zeros((3, 30, 50), bool)
    mask[:, 10:20, 20:30] = True
    out_image, out_mask = square_resize(image, mask, 25)
    assert out_image.shape == out_mask.shape == (3, 25, 25)
    assert out_mask.dtype == torch.bool and 0 <= out_image.min() and out_image.max() <= 1
    assert out_mask.sum(dim=(1, 2)).tolist() == [25, 25, 25]  # 10 x 10 pixels halved per side


def test_patient_subset(synthetic_processed):
    data = SliceDataset(synthetic_processed, "train", 32, "pretrain", patient_ids=["p1"])
    assert len(data) == 12 and set(data.patient_ids) == {"p1"}
    with pytest.raises(ValueError, match=r"patient_ids: p2 not in split 'train'"):
        SliceDataset(synthetic_processed, "train", 32, "pretrain", patient_ids=["p1", "p2"])


def test_empty_split_for_a_task_is_an_error_that_names_it(synthetic_processed):
    with pytest.raises(ValueError, match=r"no 'seg' slices in split 'train' .*\(1 scans: p0\)"):
        SliceDataset(synthetic_processed, "train", 32, "seg", patient_ids=["p0"])
    with pytest.raises(ValueError, match=r"no 'cls' slices in split 'test'"):
        SliceDataset(synthetic_processed, "test", 32, "cls", patient_ids=["p4"])
    with pytest.raises(ValueError, match="task: got 'detect'"):
        SliceDataset(synthetic_processed, "train", 32, "detect")
    with pytest.raises(FileNotFoundError, match="dvc repro preprocess"):
        SliceDataset(synthetic_processed / "missing", "train", 32, "seg")


def test_malignancy_comes_from_slices_csv_and_is_zero_without_nodule(synthetic_processed):
    rows = read_slices(synthetic_processed)
    graded = (rows["patient_id"] == "p1") & (rows["slice_index"] == 6)
    rows.loc[graded, "max_malignancy"] = 2.5  # one slice with another rating than its neighbours
    write_csv(synthetic_processed / "slices.csv", rows)
    data = SliceDataset(synthetic_processed, "train", 32, "pretrain")
    item = data[6]
    assert (item["patient_id"], item["slice_index"]) == ("p0", 6)
    assert item["malignancy"].dtype == torch.float32 and item["malignancy"].ndim == 0
    by_slice = {(p, s): float(m) for p, s, m in zip(data.patient_ids, data.slice_indices, data.malignancy)}
    assert by_slice[("p1", 6)] == 2.5
    assert [by_slice[("p1", z)] for z in (4, 5, 7)] == [4.0, 4.0, 4.0]
    assert all(value == 0.0 for (p, z), value in by_slice.items() if p == "p0" or z not in (4, 5, 6, 7))
    batch = next(iter(DataLoader(SliceDataset(synthetic_processed, "val", 32, "seg"), batch_size=4)))
    assert batch["malignancy"].dtype == torch.float32 and batch["malignancy"].tolist() == [4.0] * 4


def _clean_slices(data: SliceDataset) -> list[tuple[str, int]]:
    return [(p, s) for p, s, label in zip(data.patient_ids, data.slice_indices, data.labels) if label == 0]


def test_clean_slices_from_any_slice_are_those_drawn_before_clean_source_existed(synthetic_processed):
    # The selection the default `slices.clean_source: any_slice` must keep, item for item.
    default = SliceDataset(synthetic_processed, "train", 32, "cls", seed=0)
    chosen = SliceDataset(synthetic_processed, "train", 32, "cls", seed=0, clean_source="any_slice")
    assert _clean_slices(default) == _clean_slices(chosen) == [("p0", 5), ("p0", 9), ("p0", 11), ("p1", 2)]
    assert default.frame.equals(chosen.frame)
    assert np.array_equal(default.images, chosen.images) and np.array_equal(default.masks, chosen.masks)
    (synthetic_processed / "nodules.csv").unlink()  # any_slice never reads it
    assert SliceDataset(synthetic_processed, "train", 32, "cls", seed=0).frame.equals(default.frame)


@pytest.mark.parametrize("split, free", [("train", "p0"), ("val", "p2"), ("test", "p4")])
def test_seed_000_clean_slices_come_from_patients_without_nodules(synthetic_processed, split, free):
    data = SliceDataset(synthetic_processed, split, 32, "cls", clean_per_nodule_slice=1.5, seed=0,
                        clean_source="nodule_free_patients")
    clean = _clean_slices(data)
    assert {p for p, _ in clean} == {free} and len(clean) == 6  # still 1.5 per nodule slice
    assert int((data.labels == 1).sum()) == 4 and len(data) == 10
    assert nodule_free_patients(synthetic_processed, split) == [free]
    again = SliceDataset(synthetic_processed, split, 32, "cls", clean_per_nodule_slice=1.5, seed=0,
                         clean_source="nodule_free_patients")
    assert _clean_slices(again) == clean
    for task in ("seg", "pretrain"):  # only classification's clean slices depend on it
        assert SliceDataset(synthetic_processed, split, 32, task, clean_source="nodule_free_patients").frame.equals(
            SliceDataset(synthetic_processed, split, 32, task).frame)


def test_a_patient_listed_in_nodules_csv_is_annotated_even_without_mask_pixels(synthetic_processed):
    nodules = pd.read_csv(synthetic_processed / "nodules.csv", dtype={"patient_id": str, "scan_id": str})
    row = nodules.iloc[[0]].assign(patient_id="p0", scan_id="p0", split="train")  # consensus below clevel
    write_csv(synthetic_processed / "nodules.csv", pd.concat([nodules, row]))
    assert nodule_free_patients(synthetic_processed, "train") == []
    with pytest.raises(DatasetError, match=r"^slices.clean_source: 'nodule_free_patients' .* 2 patient\(s\) of "
                                           r"split 'train' .* set slices.clean_source: any_slice"):
        SliceDataset(synthetic_processed, "train", 32, "cls", clean_source="nodule_free_patients")
    assert len(SliceDataset(synthetic_processed, "train", 32, "cls")) == 8  # any_slice is unaffected


def test_nodule_free_clean_slices_need_such_a_patient_and_a_known_source(synthetic_processed):
    with pytest.raises(DatasetError, match=r"slices.clean_source: .* 1 patient\(s\) of patient_ids in split 'train' "
                                           r".* include a patient without nodules in patient_ids"):
        SliceDataset(synthetic_processed, "train", 32, "cls", patient_ids=["p1"], clean_source="nodule_free_patients")
    subset = SliceDataset(synthetic_processed, "train", 32, "cls", patient_ids=["p0", "p1"],
                          clean_source="nodule_free_patients")
    assert {p for p, _ in _clean_slices(subset)} == {"p0"}
    with pytest.raises(DatasetError, match="clean_source: got 'nodule_free', expected one of any_slice, "
                                           "nodule_free_patients"):
        SliceDataset(synthetic_processed, "train", 32, "cls", clean_source="nodule_free")
    with pytest.warns(UserWarning, match="40 clean slices wanted .* only 12 available from patients without nodules"):
        data = SliceDataset(synthetic_processed, "train", 32, "cls", clean_per_nodule_slice=10.0,
                            clean_source="nodule_free_patients")
    assert len(data) == 4 + 12
