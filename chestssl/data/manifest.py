"""``data/raw/manifest.csv``: one row per series in the raw LIDC-IDRI folder.

Columns: patient_id, study_instance_uid, series_instance_uid, images, source, checksum.
``checksum`` is :func:`series_checksum` of the series folder, so a later stage (or a
user) can verify that a series on disk is the one that was downloaded or generated.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from chestssl.io import write_csv

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
