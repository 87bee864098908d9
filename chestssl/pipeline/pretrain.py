"""Stages ``pretrain@<method>`` and ``pretrain_multihead@<name>``: train one pretext method, export its encoder.

A ``methods`` or ``multihead`` entry (:func:`chestssl.params.pretrain_entry`) is built
(:func:`chestssl.methods.build_method`) and trained on the training split's view of the
processed CT (:func:`chestssl.data.views.pretrain_view`: axial slices, or 3D crops for a 3D
backbone), validated on the validation split's (:func:`chestssl.train.pretext.train_pretext`).
With ``probe.every_epochs`` > 0, a linear probe of the encoder on the labelled views
(:class:`~chestssl.eval.linear_probe.LinearProbeMonitor`) is logged during training.
The encoder is exported for the downstream runs (``encoder.pt``), the whole method for
``evaluate_pretrain`` (``method.pt``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl import paths
from chestssl.io import write_json
from chestssl.model_files import save_model_file
from chestssl.params import pretrain_entry


def pretrain(
    params: Mapping[str, Any],
    name: str,
    processed_dir: str | Path = paths.PROCESSED_DIR,
    model_dir: str | Path | None = None,
    report_dir: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
) -> dict[str, Any] | None:
    """Train the pretraining entry ``name`` and write its outputs.

    Args:
        params: the loaded params (the entry, ``seed``, ``slices``, ``crops``, ``probe``,
            ``preprocess.min_nodule_pixels``).
        name: an entry under ``methods`` or ``multihead``.
        processed_dir: ``data/processed`` (stage ``preprocess``).
        model_dir: receives ``encoder.pt`` and ``method.pt``; default
            :func:`chestssl.paths.pretrain_model_dir`.
        report_dir: receives ``live/`` (curves), ``metrics.json`` and ``cost.json`` (what the
            training cost); default
            :func:`chestssl.paths.pretrain_report_dir`.
        checkpoint_path: the training loop's resume checkpoint; default
            ``checkpoints/pretrain/<name>.pt``.

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.data.views import labelled_view, pretrain_view, view_params
    from chestssl.eval.linear_probe import LinearProbeMonitor
    from chestssl.methods import build_method
    from chestssl.train.pretext import train_pretext

    processed_dir = Path(processed_dir)
    model_dir = Path(model_dir) if model_dir is not None else paths.pretrain_model_dir(name)
    report_dir = Path(report_dir) if report_dir is not None else paths.pretrain_report_dir(name)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else paths.checkpoint_path("pretrain", name)
    _, cfg = pretrain_entry(params, name)
    seed, probe = params["seed"], params["probe"]
    method = build_method(name, cfg, seed)
    class_weighting: dict[str, Any] = {}

    def data():
        train = pretrain_view(params, cfg, "train", processed_dir)
        if hasattr(method, "fit_class_weights"):  # a multihead entry's cls head
            class_weighting.update(method.fit_class_weights(train))
        val = pretrain_view(params, cfg, "val", processed_dir)
        hook = None
        if probe["every_epochs"] > 0:
            hook = LinearProbeMonitor(
                labelled_view(params, cfg, "train", processed_dir),
                labelled_view(params, cfg, "val", processed_dir),
                every_epochs=probe["every_epochs"], C=probe["C"], max_iter=probe["max_iter"], seed=seed,
                device=None,  # the device the model is trained on
            )
        return train, val, hook

    read = {"entry": cfg, **view_params(params)}
    metrics = train_pretext(method, data, cfg.get("train"), report_dir / "live", checkpoint_path, seed, read,
                            [processed_dir], cost_path=report_dir / "cost.json")
    if metrics is None:  # under torchrun, rank 0 writes the outputs
        return None
    save_model_file(model_dir / "encoder.pt", method.export())
    save_model_file(model_dir / "method.pt", {"name": name, "config": cfg, "state_dict": method.state_dict()})
    metrics = {**metrics, **class_weighting}
    write_json(report_dir / "metrics.json", metrics)
    return metrics
