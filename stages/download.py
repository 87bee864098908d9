"""download: fill data/raw/LIDC-IDRI from `data.source` (phantom | idc | tcia | local)."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import load_params  # method entries in shape only: this stage imports no torch


def main(argv: list[str]) -> None:
    from chestssl.pipeline.download import download

    params = load_params()
    records = download(params, paths.RAW_DIR)
    images = sum(r.images for r in records)
    print(f"download: {len(records)} series, {images} images from '{params['data']['source']}' in {paths.LIDC_DIR}")


if __name__ == "__main__":
    run_stage(main, preload=False)  # imports neither torch nor MONAI: nothing to preload
