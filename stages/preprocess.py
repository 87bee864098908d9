"""preprocess: LIDC-IDRI DICOM -> resampled, windowed volumes, masks, tables and splits."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import load_params  # method entries in shape only: this stage imports no torch


def main(argv: list[str]) -> None:
    from chestssl.pipeline.preprocess import preprocess

    summary = preprocess(load_params(), paths.RAW_DIR, paths.PROCESSED_DIR)
    print(f"preprocess: {summary}")


if __name__ == "__main__":
    run_stage(main, preload=False)  # imports neither torch nor MONAI: nothing to preload
