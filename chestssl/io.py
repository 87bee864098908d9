"""Atomic file output.

Every model, array and metrics file is written to a temporary file in the destination
folder and then renamed over the destination (``os.replace`` is atomic on POSIX), so a
stage killed mid-write never leaves a half-written file that DVC would cache. A folder
(:func:`atomic_dir`, e.g. training curves) is built beside its destination and swapped in.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from chestssl.errors import UserError

# Errors of the output folder rather than of the code: no permission, read-only, full.
_FOLDER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


class OutputWriteError(UserError, OSError):
    """An output that cannot be written because of its folder (permissions, read-only, full)."""

    def __str__(self) -> str:
        return str(self.strerror)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    ``suffix`` keeps the extension for writers that append or check one (numpy,
    matplotlib). On error the temporary file is removed and ``path`` is untouched. The
    file gets the mode a plain ``open`` would give it (0666 less the umask), not the
    private 0600 of a temporary file, so a team's shared folders and DVC cache work.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix
        )
    except OSError as exc:
        raise _output_error(path, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _output_error(path, exc) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _output_error(path: Path, exc: OSError) -> OSError:
    """``exc`` as an :class:`OutputWriteError` naming ``path`` when the folder is at fault."""
    if isinstance(exc, OutputWriteError) or exc.errno not in _FOLDER_ERRNOS:
        return exc
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        advice = "free space on that disk (or point the output folder elsewhere), then rerun"
    else:
        advice = "make the folder writable by this user (or run from a writable clone), then rerun"
    return OutputWriteError(exc.errno, f"cannot write {path}: {os.strerror(exc.errno)} in {path.parent}; {advice}")


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new folder in ``parent`` to build an output in before it is moved into place,
    with the mode ``mkdir`` would give it (0777 less the umask) rather than 0700."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(folder, 0o777 & ~current_umask())
    return folder


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` whole.

    The folder is filled in the temporary place and renamed into place, so ``path`` is
    never a half-written folder; on error the temporary folder is removed and ``path``
    is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = make_temp_dir(path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise _output_error(path, exc) from None
    try:
        yield staging
        if path.exists():
            previous = staging.with_name(f"{staging.name}.old")
            os.replace(path, previous)
            os.replace(staging, path)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, path)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _output_error(path, exc) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Compressed ``.npz`` written atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def write_csv(path: str | os.PathLike, frame: Any) -> None:
    """Write a pandas DataFrame as CSV atomically (no index column)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically, byte-identical for identical ``obj``.

    torch names the archive's inner folder after the file it is given; saving through a
    file object keeps that name fixed instead of the random temporary name, so DVC sees
    the same hash when a stage reproduces the same weights.
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
