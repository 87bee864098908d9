"""Shared fixtures. Tests never touch the network or the user's home."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    """The end-to-end modules (marked ``slow``) first, then those that start stage processes
    (``starts_stages``). With ``--dist loadfile --no-loadscope-reorder`` (the Makefile's) each
    end-to-end module then goes whole to a worker at the start and the unit tests fill in
    around them; last, one would run alone at the end. The stage processes' torch and MONAI
    (about 0.9 GB) come while the workers are still small: at the end of the run each worker
    holds about 0.9 GB of its own imports, and with them the suite peaked at 2.9 GB."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 item.get_closest_marker("starts_stages") is None))


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _trim_heap() -> None:
    trim = getattr(_LIBC, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


@pytest.fixture(autouse=True, scope="module")
def release_memory_after_each_module():
    """Hand the memory a test module freed back to the system, reference cycles included.
    glibc keeps freed heap pages of large tensors and arrays for reuse, so a worker would
    otherwise hold the peak of its heaviest module until the run ends, beside the
    end-to-end tests' stage processes."""
    yield
    # The base CT of the ct anatomy (~200 MB), kept by chestssl.data.ct_anatomy for the next
    # scan of the same process: a worker would hold it through every later module.
    ct_anatomy = sys.modules.get("chestssl.data.ct_anatomy")
    if ct_anatomy is not None:
        ct_anatomy._LOADED.clear()
    gc.collect()
    _trim_heap()


@pytest.fixture(autouse=True)
def release_memory_after_each_test():
    """The same after each test, without the (slower) cycle collection: a module of 3D
    tests would otherwise hold its largest test's heap through all the others (1.3 GB
    for the classification tasks' module), at whatever moment the other worker peaks."""
    yield
    _trim_heap()


@pytest.fixture(autouse=True, scope="session")
def array_cache_outside_the_repo(tmp_path_factory):
    """The array cache (chestssl.data.array_cache) of every test and of the stage processes
    they start goes to a temporary folder, never to ``.cache`` of the working directory."""
    from chestssl.paths import CACHE_DIR_ENV

    previous = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("array-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = previous


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small networks run faster on one thread than contending for a shared machine's cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


#: The ``lung_box`` of every scan of ``synthetic_processed`` (rows 8..39, columns 6..41:
#: 32 x 36 pixels holding the nodule disc).
LUNG_BOX = (8, 40, 6, 42)


@pytest.fixture
def synthetic_processed(tmp_path):
    """A tiny ``data/processed`` folder in the contract of chestssl.data.processed.

    Six patients (2 per split), 12 slices of 48x48 each; patients p1, p3, p5 have one
    disc-shaped nodule on slices 4..7; the others none.
    """
    from chestssl.data.processed import NODULE_COLUMNS, SLICE_COLUMNS
    from chestssl.io import write_json, write_npz

    root = tmp_path / "processed"
    rng = np.random.default_rng(0)
    splits = {"train": ["p0", "p1"], "val": ["p2", "p3"], "test": ["p4", "p5"], "seed": 0}
    split_of = {p: s for s in ("train", "val", "test") for p in splits[s]}
    slice_rows, nodule_rows = [], []
    yy, xx = np.mgrid[:48, :48]
    for i, pid in enumerate(sorted(split_of)):
        image = np.clip(0.3 + 0.05 * rng.standard_normal((12, 48, 48)), 0, 1)
        mask = np.zeros((12, 48, 48), np.uint8)
        if i % 2 == 1:
            disc = (yy - 20) ** 2 + (xx - 26) ** 2 <= 16
            mask[4:8][:, disc] = 1
            image[4:8][:, disc] = 0.8
            nodule_rows.append([pid, pid, 1, 5.5, 20.0, 26.0, 8.0, 4, 4.0, 5.0, 6.0, split_of[pid]])
        for z in range(12):
            pixels = int(mask[z].sum())
            label = 1 if pixels > 8 else (0 if pixels == 0 else -1)
            slice_rows.append([pid, pid, z, pixels, 4.0 if pixels else 0.0, label, split_of[pid]])
        write_npz(
            root / "scans" / f"{pid}.npz",
            image=image.astype(np.float16),
            mask=mask,
            spacing=np.array([2.5, 1.5, 1.5], np.float32),
            origin_index=np.zeros(3, np.int32),
            lung_box=np.array(LUNG_BOX, np.int32),
        )
    pd.DataFrame(slice_rows, columns=SLICE_COLUMNS).to_csv(root / "slices.csv", index=False)
    pd.DataFrame(nodule_rows, columns=NODULE_COLUMNS).to_csv(root / "nodules.csv", index=False)
    write_json(root / "splits.json", splits)
    return root

