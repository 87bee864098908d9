"""pretrain_radiograph_studies@<method>: train a `mae` / `diffmae` entry on whole radiograph studies,
the views sharing one CLS token (`pretrain_radiographs.study_methods`), and probe it per study."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import name_from_argv, run_stage


def main(argv: list[str]) -> None:
    from chestssl.methods import load_checked_params
    from chestssl.pipeline.pretrain_radiograph_studies import pretrain_radiograph_studies

    params = load_checked_params()  # method entries checked by their methods
    name = name_from_argv(argv, params["pretrain_radiographs"]["study_methods"], "pretrain_radiographs.study_methods")
    metrics = pretrain_radiograph_studies(
        params, name, paths.RADIOGRAPHS_DIR, model_dir=paths.radiograph_study_model_dir(name),
        report_dir=paths.radiograph_study_report_dir(name),
        checkpoint_path=paths.checkpoint_path("pretrain_radiograph_studies", name),
    )
    if metrics is not None:
        print(f"pretrain_radiograph_studies@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
