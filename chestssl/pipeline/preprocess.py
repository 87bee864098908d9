"""Stage ``preprocess``: LIDC-IDRI DICOM -> resampled, windowed volumes, masks, tables and splits.

:func:`chestssl.data.preprocess.run_preprocess` reads every series of the raw folder
through pylidc (HU volume, nodule clusters, 50% consensus masks), resamples to
``preprocess.spacing``, windows to [0, 1], crops to the body and writes the processed
folder (:mod:`chestssl.data.processed`) with a seeded patient-level split.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from chestssl import paths

if TYPE_CHECKING:
    from chestssl.data.preprocess import PreprocessSummary


def preprocess(params: Mapping[str, Any], raw_dir: str | Path = paths.RAW_DIR,
               processed_dir: str | Path = paths.PROCESSED_DIR, progress: bool = True) -> "PreprocessSummary":
    """Preprocess every series of ``<raw_dir>/manifest.csv`` into ``processed_dir``; returns the summary.

    Args:
        params: the loaded params (``preprocess``).
        raw_dir: ``data/raw`` (stage ``download``).
        processed_dir: ``data/processed``: ``scans/*.npz``, ``slices.csv``, ``nodules.csv``,
            ``splits.json``, ``skipped.csv``.
        progress: show a progress bar.
    """
    from chestssl.data.preprocess import run_preprocess

    return run_preprocess(raw_dir, processed_dir, params["preprocess"], progress=progress)
