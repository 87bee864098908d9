"""download: fill data/raw/LIDC-IDRI from `data.source` (phantom | tcia | local)."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    data = load_params()["data"]
    source = data["source"]
    if source == "phantom":
        from chestssl.data.phantom import generate_phantom

        records = generate_phantom(paths.RAW_DIR, **data["phantom"])
    elif source == "tcia":
        from chestssl.data.tcia import download_tcia

        records = download_tcia(paths.RAW_DIR, **data["tcia"])
    else:
        from chestssl.data.local import link_local

        records = link_local(data["local"]["path"], paths.RAW_DIR)
    images = sum(r.images for r in records)
    print(f"download: {len(records)} series, {images} images from '{source}' in {paths.LIDC_DIR}")


if __name__ == "__main__":
    run_stage(main)
