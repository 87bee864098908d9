"""preprocess: LIDC-IDRI DICOM -> resampled, windowed volumes, masks, tables and splits."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.data.preprocess import run_preprocess

    summary = run_preprocess(paths.RAW_DIR, paths.PROCESSED_DIR, load_params()["preprocess"])
    print(f"preprocess: {summary}")


if __name__ == "__main__":
    run_stage(main)
