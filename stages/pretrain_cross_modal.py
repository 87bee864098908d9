"""pretrain_cross_modal@<method>: train a `dae` entry on CT slices mixed with radiographs, so its
cross-modal contrastive term acts (`cross_modal` in params.yaml); probe it and the CT-only
encoder of pretrain@<method> on both modalities."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import name_from_argv, run_stage


def main(argv: list[str]) -> None:
    from chestssl.methods import load_checked_params
    from chestssl.pipeline.pretrain_cross_modal import pretrain_cross_modal

    params = load_checked_params()  # method entries checked by their methods
    name = name_from_argv(argv, params["cross_modal"]["methods"], "cross_modal.methods")
    metrics = pretrain_cross_modal(
        params, name, paths.PROCESSED_DIR, paths.RADIOGRAPHS_DIR, ct_only_weights=paths.method_weights_path(name),
        model_dir=paths.cross_modal_model_dir(name), report_dir=paths.cross_modal_report_dir(name),
        checkpoint_path=paths.checkpoint_path("pretrain_cross_modal", name),
    )
    if metrics is not None:
        print(f"pretrain_cross_modal@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
