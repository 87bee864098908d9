"""Stage ``pretrain_radiographs@<method>``: a ``methods`` entry trained on single radiographs.

Seeds 001 (Barlow Twins) and 004 (MAE vs diffusion MAE, linear-probe curves) pretrain on
chest X-rays. Each method listed in ``pretrain_radiographs.methods`` is the ``methods``
entry of that name (same module, backbone and hyperparameters), trained on single
radiographs (:class:`~chestssl.data.radiograph_datasets.RadiographDataset`, the images of
``pretrain_radiographs.views``) instead of CT slices: rendered from the CT or a real
dataset (``data.cxr.source``). Rendered studies are one per scan, so the split has about a
hundredth of the CT slices: ``pretrain_radiographs.train`` overrides the ``epochs`` and
``batch_size`` of the entry's ``train`` block, and ``pretrain_radiographs.per_entry.<name>``
any of its recipe keys (``train``) and backbone keys (``backbone``), so that each seed keeps its
own recipe (seed 001: 60 epochs at batch 128; seed 004: 200 epochs at batch 512 studies, patch
32). A ViT entry is built for ``radiographs.side`` (its ``img_size``), whatever the CT's
``slices.side``; the exported ``encoder.pt`` records that backbone (:func:`radiograph_entry`).

The encoder's linear probe (:mod:`chestssl.eval.radiograph_probe`: one balanced logistic
regression per label of the folder, e.g. ``nodule`` and ``malignant`` when rendered, on
frozen features) is logged on the validation split every ``probe.every_epochs`` epochs,
as seed 004 plots it, and fitted on the training views and scored on the test views at
the end, with bootstrap intervals over patients.

The study-level stage (:mod:`chestssl.pipeline.pretrain_radiograph_studies`) shares all
of this but its datasets, method class and probe features (:class:`Level`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn
from torch.utils.data import Dataset

from chestssl.io import write_json
from chestssl.model_files import save_model_file
from chestssl.params import radiograph_entry as params_radiograph_entry


def radiograph_entry(params: Mapping[str, Any], name: str, listed_in: str = "methods") -> dict[str, Any]:
    """The ``methods`` entry ``name`` as trained on radiographs: :func:`chestssl.params.radiograph_entry`
    (``pretrain_radiographs.train``, then ``pretrain_radiographs.per_entry.<name>``; a ViT sized by
    ``radiographs.side``).

    ``listed_in``: the ``pretrain_radiographs`` list that must name it (``methods``, or
    ``study_methods`` for study-level pretraining).
    """
    return params_radiograph_entry(params, name, listed_in)


@dataclass(frozen=True)
class Level:
    """What differs between image-level and study-level pretraining on radiographs."""

    #: ``image`` or ``study`` (:data:`chestssl.methods.LEVELS`).
    name: str
    #: split -> dataset.
    datasets: Callable[[str], Dataset]
    #: (encoder, dataset, device) -> :class:`~chestssl.eval.linear_probe.ProbeFeatures`.
    features: Callable[..., Any]
    collate_fn: Callable | None = None


def pretrain_radiographs(
    params: Mapping[str, Any],
    name: str,
    radiographs_dir: str | Path,
    model_dir: str | Path,
    report_dir: str | Path,
    checkpoint_path: str | Path,
) -> dict[str, Any] | None:
    """Train method ``name`` on single radiographs, probe its encoder per view, write its outputs.

    Args:
        params: the loaded params (``pretrain_radiographs``, ``methods``, ``seed``,
            ``probe``, ``evaluate``).
        name: an entry of ``pretrain_radiographs.methods``.
        radiographs_dir: ``data/radiographs`` (stage ``radiographs``).
        model_dir: receives ``encoder.pt`` (the exported encoder, as ``pretrain@`` exports it).
        report_dir: receives ``live/`` (curves), ``metrics.json`` and ``cost.json`` (what the
            training cost, :func:`~chestssl.train.cost_probe.fit_cost`, as ``pretrain@`` writes it;
            the report shows it beside the probe's scores).
        checkpoint_path: the training loop's resume checkpoint.

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.data.radiograph_datasets import RadiographDataset
    from chestssl.data.radiograph_folder import open_radiograph_folder
    from chestssl.eval.radiograph_probe import extract_image_features

    cfg = radiograph_entry(params, name)
    views = params["pretrain_radiographs"]["views"]
    folder = open_radiograph_folder(radiographs_dir)  # read once for the three splits
    level = Level(name="image", datasets=lambda split: RadiographDataset(folder, split, views),
                  features=extract_image_features)
    return train_and_probe(level, cfg, name, params, radiographs_dir, model_dir, report_dir, checkpoint_path)


def train_and_probe(
    level: Level,
    cfg: Mapping[str, Any],
    name: str,
    params: Mapping[str, Any],
    radiographs_dir: str | Path,
    model_dir: str | Path,
    report_dir: str | Path,
    checkpoint_path: str | Path,
) -> dict[str, Any] | None:
    """Build entry ``name`` (``cfg``) at ``level``, train it, probe it on test, write ``encoder.pt``,
    ``metrics.json`` and ``cost.json``; ``None`` on a non-main process under ``torchrun``."""
    from chestssl.eval.linear_probe import LinearProbeMonitor, fit_linear_probe
    from chestssl.inference import auto_device
    from chestssl.methods import build_method
    from chestssl.train.pretext import train_pretext

    model_dir, report_dir = Path(model_dir), Path(report_dir)
    seed, probe, evaluate = params["seed"], params["probe"], params["evaluate"]
    # Every study of a split is used both to pretrain and to probe (the probe leaves out
    # unknown labels itself), so one dataset per split serves both.
    train, val = level.datasets("train"), level.datasets("val")
    method = build_method(name, cfg, seed, level=level.name)

    def data():
        hook = None
        if probe["every_epochs"] > 0:
            hook = LinearProbeMonitor(train, val, every_epochs=probe["every_epochs"], C=probe["C"],
                                      max_iter=probe["max_iter"], seed=seed, features=level.features)
        return train, val, hook

    read = {"entry": cfg, "level": level.name, "views": params["pretrain_radiographs"]["views"]}
    metrics = train_pretext(method, data, cfg.get("train"), report_dir / "live", Path(checkpoint_path), seed,
                            read, [radiographs_dir], collate_fn=level.collate_fn, cost_path=report_dir / "cost.json")
    if metrics is None:
        return None
    device = auto_device()
    encoder: nn.Module = method.encoder().to(device)
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
