"""latent_diffusion@<name>: seed 000's DDPM on the quantised latents of the trained
autoencoder `methods.<name>` (a `latent_diffusion` entry), trained on the training split's slices."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import ParamsError


def main(argv: list[str]) -> None:
    from chestssl.methods import load_checked_params
    from chestssl.pipeline.latent_diffusion import train_latent_diffusion

    params = load_checked_params()
    if len(argv) != 1:
        raise ParamsError([f"latent_diffusion: expected one entry name on the command line, got "
                           f"{' '.join(argv) or 'nothing'!r}"])
    name = argv[0]
    metrics = train_latent_diffusion(params, name, paths.PROCESSED_DIR,
                                     checkpoint_path=paths.checkpoint_path("latent_diffusion", name))
    if metrics is not None:
        print(f"latent_diffusion@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
