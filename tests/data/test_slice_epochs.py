"""2D pretraining epochs counted over scans (`epoch_unit: scans`, seed 003's unit): one slice
of each training scan per epoch, drawn anew every epoch; validation on one slice per scan, drawn once."""

import hashlib

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from chestssl.data.datasets import DatasetError, SliceDataset
from chestssl.data.slice_epochs import EpochSliceDataset, one_slice_per_scan
from chestssl.data.views import pretrain_view
from chestssl.train.loop import fit
from tests.data.test_crops import CropRecorder, _worker_like_pytorch

PARAMS = {"seed": 0, "slices": {"side": 16, "clean_per_nodule_slice": 1.0, "clean_source": "any_slice",
                                "field_of_view": "body", "pixel_mm": 2.5}}
OVER_SCANS = {"backbone": {"spatial_dims": 2}, "epoch_unit": "scans"}


def _slices(processed, split: str = "train") -> SliceDataset:
    return SliceDataset(processed, split, 16, "pretrain")


def _key(item: dict) -> tuple:
    return item["scan_id"], item["slice_index"], hashlib.sha1(item["image"].numpy().tobytes()).hexdigest()


def _keys(data) -> list[tuple]:
    return [_key(data[i]) for i in range(len(data))]


def test_one_item_per_scan_each_a_slice_of_its_scan(synthetic_processed):
    slices = _slices(synthetic_processed)  # p0 and p1, 12 slices each
    data = EpochSliceDataset(slices, seed=0)
    assert len(data) == 2 and data.scan_ids == ["p0", "p1"]
    where = {(scan, z): i for i, (scan, z) in enumerate(zip(slices.scan_ids, slices.slice_indices))}
    for seed in range(5):
        data.set_random_state(seed=seed)
        for i in range(len(data)):
            item = data[i]
            assert item["scan_id"] == data.scan_ids[i] and item["image"].shape == (1, 16, 16)
            same = slices[where[item["scan_id"], item["slice_index"]]]  # read unchanged from the wrapped dataset
            assert torch.equal(item["image"], same["image"]) and torch.equal(item["mask"], same["mask"])
    with pytest.raises(IndexError):
        data[2]
    with pytest.raises(DatasetError, match="task 'pretrain', got task 'seg'"):
        EpochSliceDataset(SliceDataset(synthetic_processed, "train", 16, "seg"))


def test_draws_follow_the_seed_not_the_reading_order(synthetic_processed):
    data = EpochSliceDataset(_slices(synthetic_processed), seed=5)
    first = _keys(data)
    assert first == _keys(EpochSliceDataset(_slices(synthetic_processed), seed=5))
    assert [_key(data[i]) for i in reversed(range(len(data)))][::-1] == first
    draws = set()
    for seed in range(8):
        data.set_random_state(seed=seed)
        draws.add(tuple(data.drawn()))
        assert [data.slices.scan_ids[p] for p in data.drawn()] == data.scan_ids
    assert len(draws) > 4  # 144 possible pairs of slices


def test_workers_draw_the_slices_of_the_main_process(synthetic_processed):
    data = EpochSliceDataset(_slices(synthetic_processed))
    base = 2**40 + 777  # PyTorch's base seeds are 64-bit
    data.set_random_state(seed=base % 2**32)  # as set_rnd seeds the main process (no workers)
    expected = _keys(data)
    loader = DataLoader(data, batch_size=1, num_workers=2, worker_init_fn=_worker_like_pytorch(base),
                        collate_fn=lambda items: items)  # the two workers read one scan each
    assert [_key(item) for batch in loader for item in batch] == expected


def test_the_view_counts_over_scans_only_when_asked(synthetic_processed):
    by_default = {"backbone": {"spatial_dims": 2}}
    for split in ("train", "val", "test"):
        assert type(pretrain_view(PARAMS, by_default, split, synthetic_processed)) is SliceDataset
    assert type(pretrain_view(PARAMS, OVER_SCANS, "train", synthetic_processed)) is EpochSliceDataset
    assert type(pretrain_view(PARAMS, OVER_SCANS, "test", synthetic_processed)) is SliceDataset  # every test slice
    val = pretrain_view(PARAMS, OVER_SCANS, "val", synthetic_processed)
    assert type(val) is Subset and [item["scan_id"] for item in val] == ["p2", "p3"]
    assert _keys(val) == _keys(one_slice_per_scan(_slices(synthetic_processed, "val"), seed=0))


def _fit(processed, where, num_workers: int, batch_size: int = 2) -> CropRecorder:
    """Three epochs over the 2 training scans; with batch_size 2 a training step is an epoch."""
    cfg = dict(epochs=3, batch_size=batch_size, lr=0.01, weight_decay=0.0, optimizer="adam", betas=[0.9, 0.999],
               scheduler="none", grad_clip=0.0, max_steps=0, amp=False, num_workers=num_workers, log_every=1,
               device="cpu")
    model = CropRecorder()
    fit(model, pretrain_view(PARAMS, OVER_SCANS, "train", processed), pretrain_view(PARAMS, OVER_SCANS, "val", processed),
        cfg, where / "live", where / "ckpt.pt", seed=0)
    return model


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_loop_draws_new_slices_every_epoch_and_the_same_on_a_rerun(synthetic_processed, tmp_path, monkeypatch,
                                                                         num_workers):
    monkeypatch.chdir(tmp_path)  # dvclive then finds no DVC repo
    reference = _fit(synthetic_processed, tmp_path / "reference", num_workers)
    epochs = reference.trained
    assert len(epochs) == 3 and all([scan for scan, _, _ in slices] == ["p0", "p1"] for slices in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert reference.validated[0] == reference.validated[1] == reference.validated[2], "validation slices are fixed"
    assert _fit(synthetic_processed, tmp_path / "rerun", num_workers).trained == epochs


def test_the_loop_draws_the_same_slices_with_no_one_or_two_workers(synthetic_processed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one = _fit(synthetic_processed, tmp_path / "one", 1, batch_size=1)  # the two workers read alternate scans
    assert len(one.trained) == 6
    assert one.trained == _fit(synthetic_processed, tmp_path / "two", 2, batch_size=1).trained
    assert one.trained == _fit(synthetic_processed, tmp_path / "none", 0, batch_size=1).trained


def test_expected_class_counts_follow_the_sampling(synthetic_processed):
    slices = _slices(synthetic_processed)
    labels = slices.labels.numpy()
    assert slices.expected_class_counts() == [float((labels == 0).sum()), float((labels == 1).sum())]
    over_scans = EpochSliceDataset(slices, seed=0)
    expected = [0.0, 0.0]
    for scan in over_scans.positions:  # one slice per scan, uniformly: each scan adds its class shares
        for k in (0, 1):
            expected[k] += float((labels[scan] == k).mean())
    assert over_scans.expected_class_counts() == pytest.approx(expected)
    assert sum(over_scans.expected_class_counts()) <= len(over_scans) < sum(slices.expected_class_counts())
