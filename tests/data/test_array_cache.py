"""The memory-mapped array cache behind SliceDataset and EpochCropDataset (chestssl.data.array_cache),
on the synthetic processed folder of tests/conftest.py."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import shutil
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from chestssl.data.crops import EpochCropDataset
from chestssl.data.datasets import DatasetError, SliceDataset, square_resize
from chestssl.data.processed import load_scan, scan_path
from chestssl.io import write_npz
from chestssl.paths import CACHE_DIR_ENV


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of the test's own (the session's shared one is tests/conftest.py's)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(folder))
    return folder


@pytest.fixture
def slice_builds(monkeypatch):
    """The cache folders SliceDataset writes its slices into, in this process."""
    built, write = [], SliceDataset._write_slices

    def counted(self, folder):
        built.append(folder)
        write(self, folder)

    monkeypatch.setattr(SliceDataset, "_write_slices", counted)
    return built


def in_ram_slices(data: SliceDataset) -> tuple[np.ndarray, np.ndarray]:
    """The (N, S, S) float16 images and uint8 masks as SliceDataset computed them in memory before the cache."""
    images = np.empty((len(data), data.size, data.size), np.float16)
    masks = np.empty((len(data), data.size, data.size), np.uint8)
    for scan_id, rows in data.frame.groupby("scan_id", sort=False):
        scan = load_scan(data.processed_dir, scan_id)
        wanted = rows["slice_index"].to_numpy()
        image, mask = square_resize(scan["image"][wanted], scan["mask"][wanted] > 0, data.size)
        images[rows.index] = image.to(torch.float16).numpy()
        masks[rows.index] = mask.to(torch.uint8).numpy()
    return images, masks


def assert_items_are_the_in_ram_ones(data: SliceDataset) -> None:
    images, masks = in_ram_slices(data)
    for i in range(len(data)):
        item = data[i]
        assert item["image"].dtype == item["mask"].dtype == torch.float32
        assert torch.equal(item["image"], torch.from_numpy(images[i]).to(torch.float32)[None])
        assert torch.equal(item["mask"], torch.from_numpy(masks[i]).to(torch.float32)[None])


def items_digest(data) -> str:
    h = hashlib.sha256()
    for i in range(len(data)):
        item = data[i]
        h.update(item["image"].numpy().tobytes())
        h.update(item["mask"].numpy().tobytes())
        h.update(f"{int(item['label'])},{float(item['malignancy'])},{item['scan_id']},{item['slice_index']};".encode())
    return h.hexdigest()


def rewrite_scan(processed, scan_id: str, scale: float) -> None:
    scan = load_scan(processed, scan_id)
    write_npz(scan_path(processed, scan_id), image=(scan["image"] * scale).astype(np.float16), mask=scan["mask"],
              spacing=scan["spacing"], origin_index=scan["origin_index"], lung_box=scan["lung_box"])


# ---------------------------------------------------------------- SliceDataset


@pytest.mark.parametrize(("split", "size", "task"), [("train", 32, "pretrain"), ("val", 80, "seg"),
                                                       ("test", 48, "cls")])
def test_slices_are_the_in_ram_ones_memory_mapped(synthetic_processed, cache, split, size, task):
    data = SliceDataset(synthetic_processed, split, size, task)
    assert_items_are_the_in_ram_ones(data)
    assert isinstance(data.images, np.memmap) and not data.images.flags.writeable
    assert data.images.dtype == np.float16 and data.masks.dtype == np.uint8
    assert data.images.shape == data.masks.shape == (len(data), size, size)
    assert data.cache_entry.parent == cache / "slices"


def test_slices_give_the_items_they_gave_before_the_cache(synthetic_processed, cache):
    # Digests of the items of the in-RAM SliceDataset (before the cache), bit for bit.
    expected = {("train", 32, "pretrain"): "eef128bca8cc7735931d60a5935b7ca737cc204febbc3fdae98dda2e9cedabec",
                ("val", 80, "seg"): "9ac13f7f0968c742bac388a4cb76339ddab357da351ec64b9c230dd22c4414ce",
                ("test", 48, "cls"): "4a7caa12f2c52bafa3acaa68c1191a6d5674c5541f2032bc4b1228c4e429bff8"}
    for args, digest in expected.items():
        assert items_digest(SliceDataset(synthetic_processed, *args)) == digest, args


def test_a_second_construction_reuses_the_cache(synthetic_processed, cache, slice_builds):
    first = SliceDataset(synthetic_processed, "train", 32, "pretrain")
    written = {p.name: p.stat().st_mtime_ns for p in first.cache_entry.iterdir()}
    second = SliceDataset(synthetic_processed, "train", 32, "pretrain")
    assert len(slice_builds) == 1 and second.cache_entry == first.cache_entry
    assert {p.name: p.stat().st_mtime_ns for p in second.cache_entry.iterdir()} == written
    assert sorted(written) == ["images.npy", "masks.npy"]
    SliceDataset(synthetic_processed, "train", 48, "pretrain")  # another size, another entry
    SliceDataset(synthetic_processed, "train", 32, "pretrain", patient_ids=["p1"])  # other slices
    assert len(slice_builds) == 3


def test_a_rewritten_scan_is_never_read_from_a_stale_cache(synthetic_processed, cache, slice_builds):
    before = SliceDataset(synthetic_processed, "train", 32, "seg")
    old_images = np.array(before.images)
    rewrite_scan(synthetic_processed, "p1", 0.5)
    after = SliceDataset(synthetic_processed, "train", 32, "seg")
    assert len(slice_builds) == 2 and after.cache_entry != before.cache_entry
    assert_items_are_the_in_ram_ones(after)
    assert not np.array_equal(np.array(after.images), old_images)


def test_an_interrupted_build_is_ignored_and_a_truncated_entry_rebuilt(synthetic_processed, cache, slice_builds):
    data = SliceDataset(synthetic_processed, "val", 32, "pretrain")
    entry = data.cache_entry
    del data
    # What a build killed midway leaves: a temporary folder beside the entry, never the entry.
    leftover = entry.parent / f".{entry.name}.k1ll3d"
    leftover.mkdir()
    (leftover / "images.npy").write_bytes(b"\x93NUMPY half")
    shutil.rmtree(entry)
    again = SliceDataset(synthetic_processed, "val", 32, "pretrain")
    assert len(slice_builds) == 2 and not leftover.exists()
    assert_items_are_the_in_ram_ones(again)
    del again
    images = entry / "images.npy"
    os.truncate(images, images.stat().st_size // 2)
    rebuilt = SliceDataset(synthetic_processed, "val", 32, "pretrain")
    assert len(slice_builds) == 3 and rebuilt.images.shape == (24, 32, 32)
    assert_items_are_the_in_ram_ones(rebuilt)


def test_the_default_cache_is_dot_cache_of_the_working_directory(synthetic_processed, tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    data = SliceDataset(synthetic_processed, "test", 32, "seg")
    assert data.cache_entry.parent == project / ".cache" / "slices" and data.cache_entry.is_dir()


def test_an_unwritable_cache_folder_is_named(synthetic_processed, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    folder = tmp_path / "a_file" / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(folder))
    with pytest.raises(DatasetError, match=rf"cannot write the array cache in {folder / 'slices'}.*{CACHE_DIR_ENV}"):
        SliceDataset(synthetic_processed, "train", 32, "seg")


def test_workers_read_the_batches_of_the_main_process(synthetic_processed, cache):
    data = SliceDataset(synthetic_processed, "train", 32, "cls")
    copy = pickle.dumps(data)  # what a spawned worker receives: the entry's name, not its arrays
    assert len(copy) < data.images.nbytes
    assert items_digest(pickle.loads(copy)) == items_digest(data)

    def batches(workers: int) -> list[dict]:
        return list(DataLoader(data, batch_size=3, num_workers=workers))

    in_main, in_workers = batches(0), batches(2)
    assert len(in_main) == len(in_workers) == 3
    for one, other in zip(in_main, in_workers):
        assert one.keys() == other.keys()
        for key in one:
            assert (torch.equal(one[key], other[key]) if isinstance(one[key], torch.Tensor)
                    else one[key] == other[key]), key


def _construct_at_once(processed, builds_log, barrier, results) -> None:
    """In a spawned process: build SliceDataset when the other process does; log each build."""
    write = SliceDataset._write_slices

    def logged(self, folder):
        with open(builds_log, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough for the other process to reach the lock
        write(self, folder)

    SliceDataset._write_slices = logged
    try:
        barrier.wait(timeout=120)
        data = SliceDataset(processed, "train", 32, "pretrain")
        arrays = np.asarray(data.images).tobytes() + np.asarray(data.masks).tobytes()
        results.put((hashlib.sha256(arrays).hexdigest(), str(data.cache_entry)))
    except BaseException as exc:  # reported rather than left for the parent to wait on
        results.put(repr(exc))


def test_processes_building_at_once_build_once_and_read_the_same(synthetic_processed, cache, tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    builds_log = tmp_path / "builds.log"
    processes = [context.Process(target=_construct_at_once, args=(synthetic_processed, builds_log, barrier, results))
                 for _ in range(2)]
    for process in processes:
        process.start()
    got = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert len(builds_log.read_text().split()) == 1, "one process builds, the other waits and reads"
    reference = SliceDataset(synthetic_processed, "train", 32, "pretrain")
    images, masks = in_ram_slices(reference)
    assert got == [(hashlib.sha256(images.tobytes() + masks.tobytes()).hexdigest(), str(reference.cache_entry))] * 2


# ---------------------------------------------------------------- EpochCropDataset


@pytest.fixture
def scan_builds(monkeypatch):
    """The scans EpochCropDataset writes into the cache, in this process."""
    built, write = [], EpochCropDataset._write_scan

    def counted(self, scan_id, folder):
        built.append(scan_id)
        write(self, scan_id, folder)

    monkeypatch.setattr(EpochCropDataset, "_write_scan", counted)
    return built


def test_epoch_crops_are_those_cropped_from_the_decompressed_scans(synthetic_processed, cache, scan_builds):
    # Digests of the crops of EpochCropDataset before the cache (each read decompressed its scan):
    # 16^3 crops pad the 12 slices; 8^3 crops read the memory-mapped volume.
    for size, digest in [(16, "a69ada2737db754b778ca8ad0057bf7b461ba86e742913be9e8328e37249e7d9"),
                         (8, "bb55724d0912d70c04ae35775b42c62365053ac05e5e47d3b0858bd74b19d4e9")]:
        assert items_digest(EpochCropDataset(synthetic_processed, "train", size, crops_per_scan=3, seed=5)) == digest
    assert scan_builds == ["p0", "p1"], "each scan is written once, whatever the crop size"
    data = EpochCropDataset(synthetic_processed, "train", 8, crops_per_scan=3, seed=5)
    image, nodule_ids, foreground = data._volume("p1")
    scan = load_scan(synthetic_processed, "p1")
    assert isinstance(image, np.memmap) and image.dtype == np.float16 and nodule_ids.dtype == np.uint8
    assert np.array_equal(image, scan["image"]) and np.array_equal(nodule_ids, scan["mask"])
    assert np.array_equal(foreground, np.flatnonzero(scan["mask"]))
    assert len(list((cache / "scans").glob("*/image.npy"))) == 2
    assert scan_builds == ["p0", "p1"]


def test_a_rewritten_scan_is_cropped_anew(synthetic_processed, cache, scan_builds):
    before = EpochCropDataset(synthetic_processed, "train", 8, crops_per_scan=2, seed=1)
    crops = [before[i]["image"] for i in range(len(before))]
    rewrite_scan(synthetic_processed, "p1", 0.5)
    after = EpochCropDataset(synthetic_processed, "train", 8, crops_per_scan=2, seed=1)
    assert [after[i]["image"].equal(crops[i]) for i in range(len(after))] == [True, True, False, False]
    assert scan_builds == ["p0", "p1", "p1"]


def test_epoch_crop_workers_read_the_crops_of_the_main_process(synthetic_processed, cache, scan_builds):
    # Equal draws (a fixed seed, no epoch seeding): workers read the main process's crops from the same cache.
    data = EpochCropDataset(synthetic_processed, "train", 8, crops_per_scan=4, seed=3, cache_scans=0)

    def batches(workers: int) -> list[dict]:
        return list(DataLoader(data, batch_size=3, num_workers=workers))

    in_main, in_workers = batches(0), batches(2)
    assert len(in_main) == len(in_workers) == 3
    for one, other in zip(in_main, in_workers):
        assert torch.equal(one["image"], other["image"]) and torch.equal(one["mask"], other["mask"])
        assert one["slice_index"].tolist() == other["slice_index"].tolist()
    assert scan_builds == ["p0", "p1"], "the workers open what the main process wrote"
