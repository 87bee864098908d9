"""pretrain_radiographs@<method>: train a `methods` entry on the radiographs rendered from CT
(`pretrain_radiographs` in params.yaml), log and fit the linear probe of its encoder."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import name_from_argv, run_stage


def main(argv: list[str]) -> None:
    from chestssl.methods import load_checked_params
    from chestssl.pipeline.pretrain_radiographs import pretrain_radiographs

    params = load_checked_params()  # method entries checked by their methods
    name = name_from_argv(argv, params["pretrain_radiographs"]["methods"], "pretrain_radiographs.methods")
    metrics = pretrain_radiographs(
        params, name, paths.RADIOGRAPHS_DIR, model_dir=paths.radiograph_model_dir(name),
        report_dir=paths.radiograph_report_dir(name), checkpoint_path=paths.checkpoint_path("pretrain_radiographs", name),
    )
    if metrics is not None:
        print(f"pretrain_radiographs@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
