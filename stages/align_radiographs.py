"""align_radiographs: seed 002's STN alignment experiment on the radiographs rendered from CT
(`alignment` in params.yaml): train the STN, score its parameter error and the linear probe
without vs with alignment."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import ParamsError


def main(argv: list[str]) -> None:
    from chestssl.methods import load_checked_params
    from chestssl.pipeline.align_radiographs import align_radiographs

    if argv:
        raise ParamsError([f"align_radiographs takes no arguments, got {' '.join(argv)!r}; "
                           "set `alignment` in params.yaml"])
    params = load_checked_params()  # method entries checked by their methods
    encoder = paths.radiograph_model_dir(params["alignment"]["feature_method"]) / "encoder.pt"
    metrics = align_radiographs(
        params, paths.RADIOGRAPHS_DIR, encoder, model_dir=paths.ALIGNMENT_MODEL_DIR,
        report_dir=paths.ALIGNMENT_REPORT_DIR, checkpoint_path=paths.checkpoint_path("align_radiographs", "stn"),
    )
    if metrics is None:  # under torchrun, rank 0 writes the outputs
        return
    error, auroc = metrics["parameter_error"]["misaligned"], metrics["auroc"]["mean"]
    print(f"align_radiographs: corner displacement {error['before_px']:.2f} -> {error['after_px']:.2f} px "
          f"({error['fraction_undone']:.1%} undone); mean probe AUROC {auroc['without_alignment']} without, "
          f"{auroc['with_alignment']} with alignment")


if __name__ == "__main__":
    run_stage(main)
