"""CT slices and radiographs in one dataset, every item tagged with its modality (seed 003)."""

from __future__ import annotations

import pytest
import torch

from chestssl.data.cross_modal import CrossModalDataset


class ConstantImages(torch.utils.data.Dataset):
    """``n`` constant images of side ``side``, item i holding the value i."""

    def __init__(self, n: int, side: int):
        self.n, self.side = n, side

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.full((1, self.side, self.side), float(index), dtype=torch.float16), "other": index}


def test_radiographs_make_up_the_set_share_of_the_items_and_are_tagged():
    data = CrossModalDataset(ConstantImages(30, 8), ConstantImages(4, 8), radiograph_fraction=0.25)
    assert (data.n_ct, data.n_radiograph, len(data)) == (30, 10, 40)
    modalities = [data[i]["modality"] for i in range(len(data))]
    assert modalities == ["ct"] * 30 + ["radiograph"] * 10 == [data.modality(i) for i in range(len(data))]
    # CT items in order, then the radiographs cycled; every item is float32 with only image and modality.
    assert [int(data[i]["image"][0, 0, 0]) for i in (0, 29, 30, 33, 34, 39)] == [0, 29, 0, 3, 0, 1]
    assert set(data[31]) == {"image", "modality"} and data[31]["image"].dtype == torch.float32
    # A tiny share still gives at least one radiograph.
    assert CrossModalDataset(ConstantImages(3, 8), ConstantImages(2, 8), 0.01).n_radiograph == 1


def test_radiographs_take_turns_over_the_epochs_when_an_epoch_is_one_slice_per_scan():
    ct = ConstantImages(6, 8)  # 6 scans, one slice each per epoch: 2 radiograph items for 10 radiographs
    data = CrossModalDataset(ct, ConstantImages(10, 8), 0.25)

    def radiographs() -> list[int]:
        return [int(data[i]["image"][0, 0, 0]) for i in range(data.n_ct, len(data))]
    assert radiographs() == [0, 1]  # CT items fixed across epochs: the cycle starts at 0
    starts = set()
    for seed in range(20):
        ct.draw_seed = seed  # what EpochSliceDataset.set_random_state sets every epoch
        first, second = radiographs()
        assert second == (first + 1) % 10 and radiographs() == [first, second]
        starts.add(first)
    assert len(starts) > 5
    # An epoch holding every radiograph keeps the plain cycle.
    assert CrossModalDataset(ct, ConstantImages(2, 8), 0.25)[6]["image"][0, 0, 0] == 0


def test_radiographs_of_another_size_are_resized_to_the_slices():
    data = CrossModalDataset(ConstantImages(4, 8), ConstantImages(2, 16), 0.5)
    assert data[5]["image"].shape == (1, 8, 8) and float(data[5]["image"].mean()) == pytest.approx(1.0)
    assert CrossModalDataset(ConstantImages(4, 16), ConstantImages(2, 8), 0.5)[5]["image"].shape == (1, 16, 16)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_a_share_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match=r"radiograph_fraction: got .*, expected a number in \(0, 1\)"):
        CrossModalDataset(ConstantImages(4, 8), ConstantImages(2, 8), fraction)


def test_an_empty_modality_is_refused_with_what_to_check():
    with pytest.raises(ValueError, match="no radiographs in this split.*dvc repro radiographs"):
        CrossModalDataset(ConstantImages(4, 8), ConstantImages(0, 8), 0.5)
    with pytest.raises(ValueError, match="no CT slices"):
        CrossModalDataset(ConstantImages(0, 8), ConstantImages(2, 8), 0.5)
