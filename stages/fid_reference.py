"""fid_reference: the FID feature network's features of every real test slice (params `fid`),
shared by every evaluate_latent_diffusion@<name> stage."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import ParamsError, load_params


def main(argv: list[str]) -> None:
    from chestssl.pipeline.fid_reference import embed_reference

    if argv:
        raise ParamsError([f"fid_reference: expected no arguments, got {' '.join(argv)!r}"])
    summary = embed_reference(load_params(),  # method entries in shape only
                               paths.PROCESSED_DIR, paths.FID_REFERENCE)
    print(f"fid_reference: {summary}")


if __name__ == "__main__":
    run_stage(main)
