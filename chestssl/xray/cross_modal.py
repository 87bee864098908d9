"""The DAE's cross-modal contrastive term on CT slices and radiographs (stage ``pretrain_cross_modal@<method>``).

Valanarasu et al., "Disruptive Autoencoders", arXiv:2307.16896 (seed 003) pretrain one
Swin UNETR on CT and MRI together and add a supervised contrastive loss on the
bottleneck whose classes are the modalities (weight 0.03, temperature 0.5;
:class:`~chestssl.models.supervised_contrastive.CrossModalContrastiveLoss`). On
LIDC-IDRI alone every batch is CT, so ``pretrain@<dae entry>`` trains with the term
inactive. Here the second modality is the chest radiograph (``data/radiographs``:
rendered from the same CT, or a real dataset): each ``methods`` entry listed in
``cross_modal.methods`` (a 2D ``dae``) is trained again, with its own hyperparameters and
training length, on the CT slices of ``pretrain@`` mixed with radiographs
(:class:`CrossModalDataset`), every item tagged with its modality, so the term acts
whenever a batch holds both.

The encoder is then compared with the CT-only one of ``pretrain@<method>`` by the same
linear probe (one class-balanced logistic regression per label on frozen features,
bootstrap intervals over patients) on both modalities: CT slices (``nodule``,
``malignant``) and radiographs (the folder's labels). Outputs: ``encoder.pt`` (exported
as ``pretrain@`` exports it), ``metrics.json`` (training metrics, steps with the term
active, the four probes) and the training curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from monai.transforms import Resize
from torch.utils.data import Dataset

from chestssl.io import write_json
from chestssl.model_files import load_model_file, save_model_file

#: Modality names of the two kinds of item (the contrastive term's classes).
CT, RADIOGRAPH = "ct", "radiograph"


class CrossModalDataset(Dataset):
    """CT slices and radiographs in one dataset, each item tagged with its modality.

    Items ``0 .. n_ct - 1`` are the CT items in their order; the next ``n_radiograph``
    items cycle through the radiographs, ``n_radiograph = round(n_ct * f / (1 - f))`` for
    ``f = radiograph_fraction``, so radiographs make up that share of every epoch whatever
    the sizes of the two sets (a rendered study is one per scan, so radiographs are far
    fewer than slices and each is seen several times per epoch, under different random
    disruptions). The training loop's shuffled sampler then mixes both into every batch.

    Args:
        ct: items with ``image`` (1, S, S) in [0, 1] (the CT slices of ``pretrain@``).
        radiographs: items with ``image`` (1, R, R) in [0, 1]; resized to S x S when R != S
            (area averaging when shrinking, bilinear when enlarging).
        radiograph_fraction: share of radiograph items, in (0, 1).

    Items: ``image`` (1, S, S) float32 and ``modality`` (``"ct"`` or ``"radiograph"``);
    the default collate makes ``modality`` a list of B strings, as the DAE reads it.
    """

    def __init__(self, ct: Dataset, radiographs: Dataset, radiograph_fraction: float) -> None:
        if not 0.0 < radiograph_fraction < 1.0:
            raise ValueError(f"cross_modal.radiograph_fraction: got {radiograph_fraction!r}, expected a number in (0, 1)")
        if len(ct) == 0:
            raise ValueError("no CT slices in this split: the cross-modal term needs both modalities")
        if len(radiographs) == 0:
            raise ValueError("no radiographs in this split (of the views in cross_modal.views): the cross-modal "
                             "term needs both modalities; check data/radiographs (`dvc repro radiographs`)")
        self.ct, self.radiographs = ct, radiographs
        self.n_ct = len(ct)
        self.n_radiograph = max(1, round(self.n_ct * radiograph_fraction / (1.0 - radiograph_fraction)))
        first = ct[0]["image"]
        if first.ndim != 3:
            raise ValueError(f"CT items must be 2D slices (1, S, S), got shape {tuple(first.shape)}; "
                             "cross_modal.methods must name entries with backbone.spatial_dims 2")
        self.size = tuple(first.shape[-2:])
        # Area averaging when shrinking, bilinear when enlarging (area degenerates to nearest).
        side = radiographs[0]["image"].shape[-1]  # folder images are square
        self._resize = None if (side, side) == self.size else Resize(
            self.size, mode="area" if side >= self.size[-1] else "bilinear")

    def __len__(self) -> int:
        return self.n_ct + self.n_radiograph

    def modality(self, index: int) -> str:
        """The modality of item ``index`` without loading it."""
        return CT if index < self.n_ct else RADIOGRAPH

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if index < self.n_ct:
            return {"image": self.ct[index]["image"].float(), "modality": CT}
        image = self.radiographs[(index - self.n_ct) % len(self.radiographs)]["image"].float()
        if self._resize is not None:
            image = self._resize(image).as_tensor()
        return {"image": image, "modality": RADIOGRAPH}


def cross_modal_entry(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The ``methods`` entry ``name``, which ``cross_modal.methods`` must list."""
    from chestssl.params import ParamsError

    listed = params["cross_modal"]["methods"]
    if name not in listed:
        raise ParamsError([f"cross_modal.methods: {name!r} is not listed ({', '.join(listed) or 'empty'})"])
    return dict(params["methods"][name])


def pretrain_cross_modal(
    name: str,
    params: Mapping[str, Any],
    processed_dir: Path,
    radiographs_dir: Path,
    ct_only_weights: Path,
    model_dir: Path,
    report_dir: Path,
    checkpoint_path: Path,
) -> dict[str, Any] | None:
    """Train DAE entry ``name`` on CT slices and radiographs, probe it and the CT-only encoder on both.

    ``ct_only_weights``: the ``method.pt`` of ``pretrain@<name>`` (same entry, CT only).
    Writes ``model_dir/encoder.pt``, ``report_dir/live`` and ``report_dir/metrics.json``;
    returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.data.radiograph_datasets import RadiographDataset
    from chestssl.data.radiograph_folder import open_radiograph_folder
    from chestssl.data.views import labelled_view, pretrain_view, view_params
    from chestssl.eval.linear_probe import LinearProbeMonitor
    from chestssl.inference import auto_device
    from chestssl.methods import build_method
    from chestssl.train.pretext import train_pretext

    cfg = cross_modal_entry(params, name)
    if cfg["method"] != "dae":
        raise ValueError(f"cross_modal.methods: {name!r} is a {cfg['method']!r} entry; list `dae` entries, whose "
                         "loss has the cross-modal contrastive term")
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
    trained = train_pretext(method, data, cfg["train"], report_dir / "live", checkpoint_path, seed,
                            read, [processed_dir, radiographs_dir])
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
        encoder_name: both_modalities_probe(trained.encoder(), {CT: ct_views, RADIOGRAPH: radiographs}, params, device)
        for encoder_name, trained in (("cross_modal", method), ("ct_only", ct_only))
    }
    save_model_file(model_dir / "encoder.pt", method.export())
    write_json(report_dir / "metrics.json", metrics)
    return metrics


def both_modalities_probe(
    encoder: torch.nn.Module,
    datasets: Mapping[str, Mapping[str, Dataset]],
    params: Mapping[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    """``{"ct": probe, "radiograph": probe}`` of a frozen encoder: fitted on train, scored on test.

    ``datasets``: ``{"ct": {split: dataset}, "radiograph": {split: dataset}}`` with the
    ``train`` and ``test`` splits. The CT probe is ``evaluate_pretrain``'s (labelled slices,
    ``nodule`` and ``malignant``); the radiograph probe is ``pretrain_radiographs``'s
    (:class:`~chestssl.data.radiograph_datasets.RadiographDataset`, the folder's labels).
    """
    from chestssl.eval.linear_probe import extract_features, fit_linear_probe
    from chestssl.xray.probe import extract_image_features

    probe, evaluate, seed = params["probe"], params["evaluate"], params["seed"]
    settings = dict(C=probe["C"], max_iter=probe["max_iter"], seed=seed,
                    n_bootstrap=evaluate["bootstrap_samples"], confidence=evaluate["confidence"])
    extractors = {CT: extract_features, RADIOGRAPH: extract_image_features}
    return {
        modality: fit_linear_probe(extract(encoder, datasets[modality]["train"], device),
                                   extract(encoder, datasets[modality]["test"], device), **settings)
        for modality, extract in extractors.items()
    }
