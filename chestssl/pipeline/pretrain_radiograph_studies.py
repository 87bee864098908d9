"""Stage ``pretrain_radiograph_studies@<method>``: ``mae`` / ``diffmae`` trained on whole radiograph studies.

Seed 004 (RadDiffusion) pretrains on studies: the ``mae`` and ``diffmae`` entries of
``pretrain_radiographs.study_methods`` are trained on whole studies
(:class:`~chestssl.data.radiograph_datasets.RadiographStudyDataset`, batches of
``train.batch_size`` studies: ``pretrain_radiographs.train``, or the entry's
``pretrain_radiographs.per_entry``; seed 004: 512), every view masked on its own, the
views of a study sharing one bottleneck CLS token (:mod:`chestssl.methods.study_mae`),
and probed on one feature per study
(:func:`~chestssl.eval.radiograph_probe.extract_study_features`). Training length, views,
probe and outputs are those of :mod:`chestssl.pipeline.pretrain_radiographs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl.pipeline.pretrain_radiographs import Level, radiograph_entry, train_and_probe


def pretrain_radiograph_studies(
    params: Mapping[str, Any],
    name: str,
    radiographs_dir: str | Path,
    model_dir: str | Path,
    report_dir: str | Path,
    checkpoint_path: str | Path,
) -> dict[str, Any] | None:
    """Train ``mae`` / ``diffmae`` entry ``name`` on whole studies with the bottleneck CLS (seed 004).

    Args and outputs as :func:`~chestssl.pipeline.pretrain_radiographs.pretrain_radiographs`;
    ``name`` must be listed in ``pretrain_radiographs.study_methods``. The probe (logged on
    val every ``probe.every_epochs`` epochs and scored on test) reads one feature per study.
    """
    from chestssl.data.radiograph_datasets import RadiographStudyDataset, collate_radiograph_studies
    from chestssl.data.radiograph_folder import open_radiograph_folder
    from chestssl.eval.radiograph_probe import extract_study_features

    cfg = radiograph_entry(params, name, listed_in="study_methods")
    views = params["pretrain_radiographs"]["views"]
    folder = open_radiograph_folder(radiographs_dir)  # read once for the three splits
    level = Level(name="study", datasets=lambda split: RadiographStudyDataset(folder, split, views),
                  features=extract_study_features, collate_fn=collate_radiograph_studies)
    return train_and_probe(level, cfg, name, params, radiographs_dir, model_dir, report_dir, checkpoint_path)
