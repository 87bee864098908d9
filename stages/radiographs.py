"""radiographs: the radiographs folder, rendered from the processed CT or read from a real chest X-ray dataset."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import load_params  # method entries in shape only: this stage imports no torch


def main(argv: list[str]) -> None:
    from chestssl.pipeline.radiographs import radiographs

    params = load_params()
    cxr, size = params["data"]["cxr"], params["radiographs"]["side"]
    studies = radiographs(params, paths.PROCESSED_DIR, paths.RADIOGRAPHS_DIR)
    if cxr["source"] == "rendered":
        print(
            f"radiographs: {len(studies)} studies ({int(studies['nodule'].sum())} with a nodule), "
            f"{size}x{size} -> {paths.RADIOGRAPHS_DIR}"
        )
    else:
        print(
            f"radiographs: {len(studies)} {cxr['source']} studies, {int(studies['num_images'].sum())} images, "
            f"{size}x{size} -> {paths.RADIOGRAPHS_DIR} (images left out: {paths.RADIOGRAPHS_DIR / 'skipped.csv'})"
        )


if __name__ == "__main__":
    run_stage(main)
