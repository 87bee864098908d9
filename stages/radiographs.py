"""radiographs: the radiographs folder, rendered from the processed CT or read from a real chest X-ray dataset."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    params = load_params()
    cxr, size = params["data"]["cxr"], params["radiographs"]["size"]
    if cxr["source"] == "rendered":
        from chestssl.data.drr import render_radiographs

        cfg = params["radiographs"]  # render_radiographs checks it again for direct callers
        studies = render_radiographs(
            paths.PROCESSED_DIR, paths.RADIOGRAPHS_DIR, cfg, hu_window=params["preprocess"]["hu_window"], progress=True
        )
        print(
            f"radiographs: {len(studies)} studies ({int(studies['nodule'].sum())} with a nodule), "
            f"{size}x{size} -> {paths.RADIOGRAPHS_DIR}"
        )
        return
    from chestssl.data.cxr_import import import_radiographs

    studies = import_radiographs(cxr, paths.RADIOGRAPHS_DIR, size, progress=True)
    print(
        f"radiographs: {len(studies)} {cxr['source']} studies, {int(studies['num_images'].sum())} images, "
        f"{size}x{size} -> {paths.RADIOGRAPHS_DIR} (images left out: {paths.RADIOGRAPHS_DIR / 'skipped.csv'})"
    )


if __name__ == "__main__":
    run_stage(main)
