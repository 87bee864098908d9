"""Arrays derived from ``data/processed``, written once uncompressed and memory-mapped.

An entry is a folder of ``.npy`` files under :func:`chestssl.paths.cache_dir`
(``$CHESTSSL_CACHE_DIR``, else ``.cache``), named by a digest of everything its arrays
depend on, including the size, modification time and inode of each processed scan they
come from: a rewritten scan gets a new entry, never a stale one. Every process opens an
entry read-only with ``mmap_mode="r"``, so the operating system's page cache holds its
pages once for all DDP ranks and DataLoader workers and can drop them under memory
pressure; a process's own memory holds only what it copies out.

An entry is built by one process at a time, under an exclusive ``fcntl.flock`` on
``<key>.lock``, in a temporary folder ``.<key>.*`` that is renamed into place when
complete: the others wait on the lock and then open what it built. A folder left by an
interrupted build is never opened (and is removed by the next build); an entry whose
files do not open (truncated, corrupt) or fail the caller's check is rebuilt. Entries
of changed inputs stay behind until the cache folder is deleted.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from chestssl.data.processed import RERUN, DatasetError, scan_path
from chestssl.io import make_temp_dir
from chestssl.paths import CACHE_DIR_ENV

#: Bumped when the layout or the computation of the cached arrays changes.
FORMAT_VERSION = 1
_FOLDER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def digest(value: Any) -> str:
    """A hex SHA-256 of ``value`` (JSON-serialisable), with the cache's format version."""
    text = json.dumps([FORMAT_VERSION, value], separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def scan_identity(processed_dir: str | Path, scan_id: str) -> list[int]:
    """Size, modification time (ns) and inode of the scan's ``.npz``: they change when it is rewritten."""
    path = scan_path(processed_dir, scan_id)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} missing; {RERUN}") from None
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def cached_arrays(folder: Path, key: str, names: tuple[str, ...], build: Callable[[Path], None],
                  valid: Callable[[dict[str, np.ndarray]], bool] = lambda arrays: True) -> dict[str, np.ndarray]:
    """The arrays ``names`` of entry ``folder/key``, memory-mapped read-only; built first if needed.

    ``build(tmp)`` writes ``<name>.npy`` of every name into the empty folder ``tmp``;
    ``valid`` checks opened arrays (e.g. their shapes), an entry failing it being rebuilt.
    """
    entry = folder / key
    arrays = _open(entry, names, valid)
    if arrays is not None:
        return arrays
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{key}.lock", "a")
    except OSError as exc:
        raise _unwritable(folder, exc) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        arrays = _open(entry, names, valid)  # built by the process we waited for
        if arrays is not None:
            return arrays
        for leftover in [entry, *folder.glob(f".{key}.*")]:  # interrupted or broken builds
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            staging = make_temp_dir(folder, prefix=f".{key}.")
        except OSError as exc:
            raise _unwritable(folder, exc) from None
        try:
            build(staging)
            os.replace(staging, entry)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno in _FOLDER_ERRNOS:
                raise _unwritable(folder, exc) from None
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    arrays = _open(entry, names, valid)
    if arrays is None:
        raise DatasetError(f"{entry}: the arrays just written do not open; delete {folder} and rerun")
    return arrays


def open_entry(entry: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of a built entry, memory-mapped read-only (e.g. again in a spawned worker)."""
    return {name: np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in names}


def _open(entry: Path, names: tuple[str, ...], valid: Callable[[dict[str, np.ndarray]], bool]
          ) -> dict[str, np.ndarray] | None:
    try:
        arrays = open_entry(entry, names)
    except (OSError, ValueError, EOFError):  # absent, truncated or not a .npy
        return None
    return arrays if valid(arrays) else None


def _unwritable(folder: Path, exc: OSError) -> DatasetError:
    return DatasetError(
        f"cannot write the array cache in {folder} ({exc.strerror or exc}); make that folder writable "
        f"(with free space), or set {CACHE_DIR_ENV} to a writable folder"
    )
