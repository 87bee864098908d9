"""``data/raw/manifest.csv``: one row per series in the raw LIDC-IDRI folder.

Columns: patient_id, study_instance_uid, series_instance_uid, images, source, checksum.
``checksum`` is :func:`series_checksum` of the series folder, so a later stage (or a
user) can verify that a series on disk is the one that was downloaded or generated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pandas as pd

from chestssl.io import write_csv

#: Written into a downloaded series' folder once every file of it is verified (pylidc reads
#: only files ending in ``.dcm`` and skips dot files).
VERIFIED_MARKER = ".chestssl-verified.json"

MANIFEST_COLUMNS = [
    "patient_id", "study_instance_uid", "series_instance_uid", "images", "source", "checksum",
]


@dataclass(frozen=True)
class SeriesRecord:
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    images: int
    source: str
    checksum: str


def series_checksum(series_dir: str | Path, pattern: str = "*.dcm") -> str:
    """SHA-256 over the sorted file names and contents of a series folder."""
    digest = hashlib.sha256()
    for path in sorted(Path(series_dir).glob(pattern)):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_manifest(path: str | Path, records: list[SeriesRecord]) -> pd.DataFrame:
    """Write the manifest atomically, sorted by patient and series."""
    frame = pd.DataFrame([asdict(r) for r in records], columns=MANIFEST_COLUMNS)
    frame = frame.sort_values(["patient_id", "series_instance_uid"]).reset_index(drop=True)
    write_csv(path, frame)
    return frame


def read_manifest(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str).astype({"images": int})


class _OfPatient(Protocol):
    patient_id: str


Series = TypeVar("Series", bound=_OfPatient)


def select_first_patients(series: list[Series], max_patients: int) -> list[Series]:
    """The series of the first ``max_patients`` patients sorted by ID (0: all)."""
    if max_patients < 0:
        raise ValueError(f"max_patients: got {max_patients}, expected 0 (all) or a positive count")
    if max_patients == 0:
        return list(series)
    keep = set(sorted({s.patient_id for s in series})[:max_patients])
    return [s for s in series if s.patient_id in keep]


def read_verified_marker(folder: Path) -> tuple[dict[str, Any], int] | None:
    """``(marker, number of .dcm files)`` of a downloaded series folder, or None when the
    folder is a link, is missing, or holds no readable :data:`VERIFIED_MARKER` (a partial
    download). The source checks the marker against what it expects."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        marker = json.loads((folder / VERIFIED_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    return marker, len(list(folder.glob("*.dcm")))


def move_into_place(source_dir: Path, final_dir: Path) -> None:
    """Rename ``source_dir`` to ``final_dir``, replacing what is there (never through a link)."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    if final_dir.is_symlink():
        final_dir.unlink()  # a link to a local copy: remove the link, never the data it points to
    elif final_dir.exists():
        shutil.rmtree(final_dir)
    os.rename(source_dir, final_dir)
