"""pretrain@<name>: train one pretext method (a `methods` or `multihead` entry) on the
training split's slices (or 3D crops, for a 3D backbone); export its encoder. With
`probe.every_epochs` > 0, a linear probe of the encoder is logged during training."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import ParamsError


def main(argv: list[str]) -> None:
    from chestssl.methods import load_checked_params
    from chestssl.pipeline.pretrain import pretrain

    params = load_checked_params()  # method entries checked by their methods
    if len(argv) != 1:
        raise ParamsError([f"pretrain: expected one entry name on the command line, got {' '.join(argv) or 'nothing'!r}"])
    name = argv[0]
    metrics = pretrain(params, name, paths.PROCESSED_DIR, model_dir=paths.pretrain_model_dir(name),
                       report_dir=paths.pretrain_report_dir(name),
                       checkpoint_path=paths.checkpoint_path("pretrain", name))
    if metrics is not None:
        print(f"pretrain@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
