"""Stage ``pretrain_cross_modal@<method>``: the DAE's cross-modal contrastive term on CT slices and radiographs.

Valanarasu et al., "Disruptive Autoencoders", arXiv:2307.16896 (seed 003) pretrain one
Swin UNETR on CT and MRI together and add a supervised contrastive loss on the
bottleneck whose classes are the modalities (weight 0.03, temperature 0.5;
:class:`~chestssl.models.supervised_contrastive.CrossModalContrastiveLoss`). On
LIDC-IDRI alone every batch is CT, so ``pretrain@<dae entry>`` trains with the term
inactive. Here the second modality is the chest radiograph (``data/radiographs``:
rendered from the same CT, or a real dataset): each ``methods`` entry listed in
``cross_modal.methods`` (a 2D ``dae``) is trained again, with its own hyperparameters and
training length, on the CT slices of ``pretrain@`` mixed with radiographs
(:class:`~chestssl.data.cross_modal.CrossModalDataset`), every item tagged with its
modality, so the term acts whenever a batch holds both.

The encoder is then compared with the CT-only one of ``pretrain@<method>`` by the same
linear probe (one class-balanced logistic regression per label on frozen features,
bootstrap intervals over patients) on both modalities
(:func:`~chestssl.eval.radiograph_probe.both_modalities_probe`): CT slices (``nodule``,
``malignant``) and radiographs (the folder's labels). Outputs: ``encoder.pt`` (exported
as ``pretrain@`` exports it), ``metrics.json`` (training metrics, steps with the term
active, the four probes), ``cost.json`` (what the training cost) and the training curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl.data.cross_modal import CT, RADIOGRAPH, CrossModalDataset
from chestssl.io import write_json
from chestssl.model_files import load_model_file, save_model_file
from chestssl.params import ParamsError


def cross_modal_entry(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The ``methods`` entry ``name``, which ``cross_modal.methods`` must list."""
    listed = params["cross_modal"]["methods"]
    if name not in listed:
        raise ParamsError([f"cross_modal.methods: {name!r} is not listed ({', '.join(listed) or 'empty'})"])
    return dict(params["methods"][name])


def pretrain_cross_modal(
    params: Mapping[str, Any],
    name: str,
    processed_dir: str | Path,
    radiographs_dir: str | Path,
    ct_only_weights: str | Path,
    model_dir: str | Path,
    report_dir: str | Path,
    checkpoint_path: str | Path,
) -> dict[str, Any] | None:
    """Train DAE entry ``name`` on CT slices and radiographs, probe it and the CT-only encoder on both.

    Args:
        params: the loaded params (``cross_modal``, ``methods``, ``seed``, ``probe``,
            ``evaluate``, and what the CT views read: ``slices``, ``crops``, ``preprocess``).
        name: an entry of ``cross_modal.methods`` (a 2D ``dae``).
        processed_dir: ``data/processed``; radiographs_dir: ``data/radiographs``.
        ct_only_weights: the ``method.pt`` of ``pretrain@<name>`` (same entry, CT only).
        model_dir: receives ``encoder.pt``; report_dir: ``live/``, ``metrics.json`` and ``cost.json``
            (what the training cost, :func:`~chestssl.train.cost_probe.fit_cost`, as ``pretrain@``
            writes it; the report shows it beside the cross-modal encoder's probe scores).
        checkpoint_path: the training loop's resume checkpoint.

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.data.radiograph_datasets import RadiographDataset
    from chestssl.data.radiograph_folder import open_radiograph_folder
    from chestssl.data.views import labelled_view, pretrain_view, view_params
    from chestssl.eval.linear_probe import LinearProbeMonitor
    from chestssl.eval.radiograph_probe import both_modalities_probe
    from chestssl.inference import auto_device
    from chestssl.methods import build_method
    from chestssl.train.pretext import train_pretext

    processed_dir, model_dir, report_dir = Path(processed_dir), Path(model_dir), Path(report_dir)
    cfg = cross_modal_entry(params, name)
    block, seed, probe = params["cross_modal"], params["seed"], params["probe"]
    folder = open_radiograph_folder(radiographs_dir)  # read once for the three splits

    # Built once: training reads train/val, the probes train/test, of both modalities.
    ct_views = {split: labelled_view(params, cfg, split, processed_dir) for split in ("train", "val", "test")}
    radiographs = {split: RadiographDataset(folder, split, block["views"]) for split in ("train", "val", "test")}

    def mixed(split: str) -> CrossModalDataset:
        return CrossModalDataset(pretrain_view(params, cfg, split, processed_dir), radiographs[split],
                                 block["radiograph_fraction"])

    method = build_method(name, cfg, seed)
    train, val = mixed("train"), mixed("val")

    def data():
        hook = None
        if probe["every_epochs"] > 0:  # the CT probe, logged as pretrain@ logs it
            hook = LinearProbeMonitor(ct_views["train"], ct_views["val"], every_epochs=probe["every_epochs"],
                                      C=probe["C"], max_iter=probe["max_iter"], seed=seed, device=None)
        return train, val, hook

    read = {"entry": cfg, "cross_modal": block, **view_params(params)}
    trained = train_pretext(method, data, cfg["train"], report_dir / "live", Path(checkpoint_path), seed,
                            read, [processed_dir, radiographs_dir], cost_path=report_dir / "cost.json")
    if trained is None:
        return None
    metrics: dict[str, Any] = {
        **trained,
        "mm_con_active_steps": int(method.mm_con_active_steps),
        "radiograph_fraction": float(block["radiograph_fraction"]),
        "views": list(block["views"]),
        "items": {"train": {CT: train.n_ct, RADIOGRAPH: train.n_radiograph, "radiographs": len(train.radiographs)},
                  "val": {CT: val.n_ct, RADIOGRAPH: val.n_radiograph, "radiographs": len(val.radiographs)}},
    }
    saved = load_model_file(ct_only_weights, f"pretrain@{name}", required=("state_dict",))
    ct_only = build_method(name, cfg, seed)
    ct_only.load_state_dict(saved["state_dict"])
    device = auto_device()
    metrics["labels"] = list(radiographs["train"].label_names)
    metrics["probe"] = {
        encoder_name: both_modalities_probe(model.encoder(), {CT: ct_views, RADIOGRAPH: radiographs}, params, device)
        for encoder_name, model in (("cross_modal", method), ("ct_only", ct_only))
    }
    save_model_file(model_dir / "encoder.pt", method.export())
    write_json(report_dir / "metrics.json", metrics)
    return metrics
