"""radiographs: processed CT -> two-view digitally reconstructed radiographs (frontal, lateral)."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.data.drr import render_radiographs

    params = load_params()
    cfg = params["radiographs"]  # render_radiographs checks it again for direct callers
    studies = render_radiographs(
        paths.PROCESSED_DIR, paths.RADIOGRAPHS_DIR, cfg, hu_window=params["preprocess"]["hu_window"], progress=True
    )
    print(
        f"radiographs: {len(studies)} studies ({int(studies['nodule'].sum())} with a nodule), "
        f"{cfg['size']}x{cfg['size']} -> {paths.RADIOGRAPHS_DIR}"
    )


if __name__ == "__main__":
    run_stage(main)
