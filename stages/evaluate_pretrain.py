"""evaluate_pretrain@<method> and evaluate_multihead@<name>: test-split quality of a
pretrained model: a linear probe of its frozen encoder (logistic regression per label,
seed 004's protocol), its reconstruction (SSIM/PSNR, one data_range) and, for multihead
models, their segmentation and classification heads on the same test slices as the
downstream runs."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import ParamsError


def main(argv: list[str]) -> None:
    from chestssl.methods import load_checked_params
    from chestssl.pipeline.evaluate_pretrain import evaluate_pretrain

    params = load_checked_params()  # method entries checked by their methods
    if len(argv) != 1:
        raise ParamsError([f"evaluate_pretrain: expected one entry name, got {' '.join(argv) or 'nothing'!r}"])
    name = argv[0]
    metrics = evaluate_pretrain(params, name, paths.PROCESSED_DIR, model_path=paths.method_weights_path(name),
                                out_dir=paths.evaluate_pretrain_dir(name), heads_dir=paths.multihead_heads_dir(name))
    print(f"evaluate_pretrain@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
