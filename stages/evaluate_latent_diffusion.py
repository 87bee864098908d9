"""evaluate_latent_diffusion@<name>: sample the latent diffusion model of `methods.<name>`'s
autoencoder and score the samples by FID against the test slices (features: `fid`)."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import ParamsError


def main(argv: list[str]) -> None:
    from chestssl.methods import load_checked_params
    from chestssl.pipeline.evaluate_latent_diffusion import evaluate_latent_diffusion

    params = load_checked_params()
    if len(argv) != 1:
        raise ParamsError([f"evaluate_latent_diffusion: expected one entry name on the command line, got "
                           f"{' '.join(argv) or 'nothing'!r}"])
    metrics = evaluate_latent_diffusion(params, argv[0], paths.PROCESSED_DIR)
    print(f"evaluate_latent_diffusion@{argv[0]}: FID {metrics['fid']}")


if __name__ == "__main__":
    run_stage(main)
