"""Pretraining on the radiographs folder (stage ``pretrain_radiographs@<method>``).

Seeds 001 (Barlow Twins) and 004 (MAE vs diffusion MAE, linear-probe curves) pretrain on
chest X-rays. Each method listed in ``pretrain_radiographs.methods`` is the ``methods``
entry of that name (same module, backbone and hyperparameters), trained on single
radiographs (:class:`~chestssl.data.radiograph_datasets.RadiographDataset`, the images of
``pretrain_radiographs.views``) instead of CT slices: rendered from the CT or a real
dataset (``data.cxr.source``). Rendered studies are one per scan, so the split has about a
hundredth of the CT slices: ``pretrain_radiographs.train`` overrides the ``epochs`` and
``batch_size`` of the entry's ``train`` block.

The encoder's linear probe (:mod:`chestssl.xray.probe`: one balanced logistic regression
per label of the folder, e.g. ``nodule`` and ``malignant`` when rendered, on frozen
features) is logged on the
validation split every ``probe.every_epochs`` epochs, as seed 004 plots it, and fitted on
the training views and scored on the test views at the end, with bootstrap intervals over
patients.

Study level (stage ``pretrain_radiograph_studies@<method>``, seed 004): the ``mae`` and
``diffmae`` entries of ``pretrain_radiographs.study_methods`` are trained on whole studies,
the views of a study sharing a bottleneck CLS token (:mod:`chestssl.xray.study_mae`), and
probed on one feature per study (:mod:`chestssl.xray.probe`). Same training length,
views, probe and outputs; a batch is ``batch_size`` studies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from chestssl.io import write_json
from chestssl.model_files import save_model_file

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

def radiograph_entry(params: Mapping[str, Any], name: str, listed_in: str = "methods") -> dict[str, Any]:
    """The ``methods`` entry ``name`` with ``pretrain_radiographs.train`` applied to its ``train`` block.

    ``listed_in``: the ``pretrain_radiographs`` list that must name it (``methods``, or
    ``study_methods`` for study-level pretraining).
    """
    from chestssl.params import ParamsError

    listed = params["pretrain_radiographs"][listed_in]
    if name not in listed:
        raise ParamsError([f"pretrain_radiographs.{listed_in}: {name!r} is not listed ({', '.join(listed) or 'empty'})"])
    entry = dict(params["methods"][name])
    if "train" in entry:  # `scratch` entries train nothing
        entry["train"] = {**entry["train"], **params["pretrain_radiographs"]["train"]}
    return entry


@dataclass(frozen=True)
class _Level:
    """What differs between image-level and study-level pretraining."""

    name: str
    datasets: Callable[[str], Dataset]  # split -> dataset
    build: Callable[[str, Mapping[str, Any], int], nn.Module]
    features: Callable[..., Any]  # (encoder, dataset, device[, batch_size]) -> ProbeFeatures
    collate_fn: Callable | None = None


def pretrain_on_radiographs(
    name: str,
    params: Mapping[str, Any],
    radiographs_dir: Path,
    model_dir: Path,
    report_dir: Path,
    checkpoint_path: Path,
) -> dict[str, Any] | None:
    """Train method ``name`` on single radiographs, probe its encoder per view, write its outputs.

    Writes ``model_dir/encoder.pt`` (the exported encoder, as ``pretrain@`` exports it),
    ``report_dir/live`` (curves) and ``report_dir/metrics.json``; returns the metrics,
    or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.data.radiograph_datasets import RadiographDataset
    from chestssl.data.radiograph_folder import open_radiograph_folder
    from chestssl.methods import build_method
    from chestssl.xray.probe import extract_image_features

    views = params["pretrain_radiographs"]["views"]
    folder = open_radiograph_folder(radiographs_dir)  # read once for the three splits
    level = _Level(
        name="image",
        datasets=lambda split: RadiographDataset(folder, split, views),
        build=build_method,
        features=extract_image_features,
    )
    return _train_and_probe(level, radiograph_entry(params, name), name, params, radiographs_dir, model_dir, report_dir,
                            checkpoint_path)


def pretrain_on_radiograph_studies(
    name: str,
    params: Mapping[str, Any],
    radiographs_dir: Path,
    model_dir: Path,
    report_dir: Path,
    checkpoint_path: Path,
) -> dict[str, Any] | None:
    """Train ``mae`` / ``diffmae`` entry ``name`` on whole studies with the bottleneck CLS (seed 004).

    :mod:`chestssl.xray.study_mae`: batches of ``pretrain_radiographs.train.batch_size``
    studies, every view masked on its own, one CLS shared per study. The probe (logged on
    val every ``probe.every_epochs`` epochs and scored on test) reads one feature per study
    (:mod:`chestssl.xray.probe`). Outputs as :func:`pretrain_on_radiographs`.
    """
    from chestssl.data.radiograph_datasets import RadiographStudyDataset, collate_radiograph_studies
    from chestssl.xray.probe import extract_study_features
    from chestssl.xray.study_mae import build_study_method

    from chestssl.data.radiograph_folder import open_radiograph_folder

    views = params["pretrain_radiographs"]["views"]
    folder = open_radiograph_folder(radiographs_dir)  # read once for the three splits
    level = _Level(
        name="study",
        datasets=lambda split: RadiographStudyDataset(folder, split, views),
        build=build_study_method,
        features=extract_study_features,
        collate_fn=collate_radiograph_studies,
    )
    cfg = radiograph_entry(params, name, listed_in="study_methods")
    return _train_and_probe(level, cfg, name, params, radiographs_dir, model_dir, report_dir, checkpoint_path)


def _train_and_probe(
    level: _Level,
    cfg: Mapping[str, Any],
    name: str,
    params: Mapping[str, Any],
    radiographs_dir: Path,
    model_dir: Path,
    report_dir: Path,
    checkpoint_path: Path,
) -> dict[str, Any] | None:
    from chestssl.eval.linear_probe import LinearProbeMonitor, fit_linear_probe
    from chestssl.inference import auto_device
    from chestssl.train.pretext import train_pretext

    seed, probe, evaluate = params["seed"], params["probe"], params["evaluate"]
    # Every study of a split is used both to pretrain and to probe (the probe leaves out
    # unknown labels itself), so one dataset per split serves both.
    train, val = level.datasets("train"), level.datasets("val")
    method = level.build(name, cfg, seed)

    def data():
        hook = None
        if probe["every_epochs"] > 0:
            hook = LinearProbeMonitor(train, val, every_epochs=probe["every_epochs"], C=probe["C"],
                                      max_iter=probe["max_iter"], seed=seed, features=level.features)
        return train, val, hook

    read = {"entry": cfg, "level": level.name, "views": params["pretrain_radiographs"]["views"]}
    metrics = train_pretext(method, data, cfg.get("train"), report_dir / "live", checkpoint_path, seed,
                            read, [radiographs_dir], collate_fn=level.collate_fn)
    if metrics is None:
        return None
    device = auto_device()
    encoder = method.encoder().to(device)
    metrics["level"] = level.name
    metrics["views"] = list(params["pretrain_radiographs"]["views"])
    metrics["labels"] = list(train.label_names)
    metrics["probe"] = fit_linear_probe(
        level.features(encoder, train, device), level.features(encoder, level.datasets("test"), device),
        C=probe["C"], max_iter=probe["max_iter"], seed=seed,
        n_bootstrap=evaluate["bootstrap_samples"], confidence=evaluate["confidence"],
    )
    save_model_file(model_dir / "encoder.pt", method.export())
    write_json(report_dir / "metrics.json", metrics)
    return metrics
