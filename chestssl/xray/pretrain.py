"""Pretraining on the radiographs rendered from CT (stage ``pretrain_radiographs@<method>``).

Seeds 001 (Barlow Twins) and 004 (MAE vs diffusion MAE, linear-probe curves) pretrain on
chest X-rays. Each method listed in ``pretrain_radiographs.methods`` is the ``methods``
entry of that name (same module, backbone and hyperparameters), trained on single views
of the rendered studies (:class:`~chestssl.data.radiograph_datasets.RadiographDataset`,
``pretrain_radiographs.views``) instead of CT slices. A radiograph study is one per scan, so
the split has about a hundredth of the CT slices: ``pretrain_radiographs.train`` overrides
the ``epochs`` and ``batch_size`` of the entry's ``train`` block.

The encoder's linear probe (:mod:`chestssl.eval.linear_probe`: one balanced logistic
regression per label, ``nodule`` and ``malignant``, on frozen features) is logged on the
validation split every ``probe.every_epochs`` epochs, as seed 004 plots it, and fitted on
the training views and scored on the test views at the end, with bootstrap intervals over
patients.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping

from chestssl.cli import flat_metrics
from chestssl.io import save_torch, write_json

def radiograph_entry(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The ``methods`` entry ``name`` with ``pretrain_radiographs.train`` applied to its ``train`` block."""
    from chestssl.params import ParamsError

    if name not in params["pretrain_radiographs"]["methods"]:
        raise ParamsError([f"pretrain_radiographs.methods: {name!r} is not listed "
                           f"({', '.join(params['pretrain_radiographs']['methods']) or 'empty'})"])
    entry = dict(params["methods"][name])
    if "train" in entry:  # `scratch` entries train nothing
        entry["train"] = {**entry["train"], **params["pretrain_radiographs"]["train"]}
    return entry


def pretrain_on_radiographs(
    name: str,
    params: Mapping[str, Any],
    radiographs_dir: Path,
    model_dir: Path,
    report_dir: Path,
    checkpoint_path: Path,
) -> dict[str, Any] | None:
    """Train method ``name`` on the radiographs, probe its encoder, write its outputs.

    Writes ``model_dir/encoder.pt`` (the exported encoder, as ``pretrain@`` exports it),
    ``report_dir/live`` (curves) and ``report_dir/metrics.json``; returns the metrics,
    or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.data.radiograph_datasets import RadiographDataset
    from chestssl.eval.linear_probe import LinearProbeMonitor, extract_features, fit_linear_probe
    from chestssl.inference import auto_device
    from chestssl.methods import build_method
    from chestssl.train.loop import fit

    cfg = radiograph_entry(params, name)
    seed, probe, evaluate = params["seed"], params["probe"], params["evaluate"]
    views = params["pretrain_radiographs"]["views"]

    # Every study of a split is used both to pretrain and to probe (each has a 0/1 label),
    # so one dataset per split serves both.
    train, val = (RadiographDataset(radiographs_dir, split, views, task="cls") for split in ("train", "val"))
    method = build_method(name, cfg, seed)
    live_dir = report_dir / "live"
    if method.trainable:
        hook = None
        if probe["every_epochs"] > 0:
            hook = LinearProbeMonitor(train, val, every_epochs=probe["every_epochs"],
                                      C=probe["C"], max_iter=probe["max_iter"], seed=seed)
        monitor, mode = method.monitor
        result = fit(method, train, val, cfg["train"], live_dir,
                     checkpoint_path, seed, monitor=monitor, mode=mode, epoch_hook=hook)
        if not result.is_main:
            return None
        method.load_state_dict(result.best_state)
        metrics: dict[str, Any] = {"trained": True, "epochs": result.epochs, "steps": result.steps,
                                   f"best_{monitor.replace('/', '_')}": result.best_value,
                                   **flat_metrics(result.final_metrics)}
    else:
        shutil.rmtree(live_dir, ignore_errors=True)
        (live_dir / "plots" / "metrics").mkdir(parents=True)
        metrics = {"trained": False}
    device = auto_device()
    encoder = method.encoder().to(device)
    metrics["views"] = list(views)
    metrics["probe"] = fit_linear_probe(
        extract_features(encoder, train, device),
        extract_features(encoder, RadiographDataset(radiographs_dir, "test", views, task="cls"), device),
        C=probe["C"], max_iter=probe["max_iter"], seed=seed,
        n_bootstrap=evaluate["bootstrap_samples"], confidence=evaluate["confidence"],
    )
    save_torch(model_dir / "encoder.pt", method.export())
    write_json(report_dir / "metrics.json", metrics)
    return metrics
