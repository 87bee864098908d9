"""Stage ``align_radiographs``: seed 002's STN alignment experiment on the frontal radiographs of ``data/radiographs``.

Seed 002 aligns every chest radiograph to a *canonical chest* with a spatial transformer
network (Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015, arXiv:1506.02025)
and compares the downstream AUROC of a classifier on the radiographs as they are with one
on the aligned radiographs (ChestX-ray14, DenseNet-121 fine-tuned on 14 labels: mean
AUROC 0.8110 unaligned vs 0.8124 aligned). :func:`align_radiographs` runs that study on
the frontal radiographs of ``data/radiographs`` (rendered from the CT by
:mod:`chestssl.data.drr`, or a real dataset, ``data.cxr.source``):

1. **Canonical chest** (:func:`~chestssl.data.canonical_chest.canonical_chest`): the mean
   of the training split's frontal radiographs (lateral views never enter it). The seed
   cropped each one to its lungs first; the radiographs come without lung masks here, so
   the whole image is used.
2. **Feature network** of the loss: the frozen encoder of
   ``pretrain_radiographs@<feature_method>``, trained earlier by the pipeline (nothing is
   downloaded), through :class:`~chestssl.models.losses.EncoderFeatures` (its ``feature_maps``).
3. **Training** through the project's loop (:func:`chestssl.train.loop.fit`, with resume,
   curves, DistributedDataParallel): an :class:`~chestssl.models.stn.AlignmentSTN` maps the
   training frontal radiographs, misaligned and intensity-jittered on the fly by
   :class:`~chestssl.data.affine.AlignmentAugmentation`, onto the canonical chest under
   :class:`~chestssl.models.losses.AlignmentLoss` (``pixel_weight`` x pixel MSE + feature
   MSE), AdamW (:class:`~chestssl.methods.alignment.STNAlignment`;
   :func:`alignment_train_cfg` maps the ``alignment`` params onto the loop's ``train``
   block). Each epoch is validated on the validation split's frontal radiographs (the
   training ones when that split has none), moved by one seeded known misalignment: loss
   and corner displacement before / after (``val/before_px``, ``val/after_px``). The STN
   of the last step is kept.
4. **Evaluation** on the test split's frontal radiographs. The renderer fits every CT into
   the same frame, so rendered radiographs are already aligned with each other, and the
   misalignment of real films is unknown; so a known misalignment is made: every probed radiograph
   (training and test) is moved by one seeded random known transform
   (:func:`~chestssl.data.affine.misalign`, the augmentation's shift/scale/rotation range).

   a. Parameter error (:func:`~chestssl.eval.alignment.alignment_parameter_error`): mean
      corner displacement in pixels of the known transform (before) and of it chained with
      the STN's prediction (after), and the fraction undone; and how far the STN moves the
      radiographs that were not misaligned (0 for a perfect STN).
   b. AUROC per label of the folder (rendered: ``nodule``, ``malignant``) without and with
      alignment. The seed fine-tuned a DenseNet-121; here the downstream model is the
      linear probe of the frozen feature encoder
      (:func:`~chestssl.eval.radiograph_probe.extract_image_features`,
      :func:`~chestssl.eval.linear_probe.fit_linear_probe`, the ``probe`` params and the
      patient bootstrap of ``evaluate``), fitted on the training radiographs and scored on
      the test radiographs, (i) misaligned, not aligned; (ii) misaligned, then aligned by
      the STN (training and test radiographs get the same treatment). The probe of the
      radiographs as stored (condition ``as_rendered``) is reported beside them for
      reference (:func:`~chestssl.eval.alignment.compare_aurocs`).
   c. Examples for the report figure: misaligned input, aligned output, canonical chest.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from chestssl.model_files import load_model_file, save_model_file
from chestssl.params import ParamsError

#: The view seed 002 aligns (ChestX-ray14 holds frontal films).
VIEW = "frontal"
# Offsets of the random streams drawn from the ``seed`` param, so that e.g. more training
# steps never change which transforms misalign the evaluated radiographs. The training
# draws (batch order, augmentation) come from the loop's own seeded generators.
_MISALIGN_TRAIN_STREAM, _MISALIGN_TEST_STREAM, _MISALIGN_VAL_STREAM = 1, 2, 3
#: The validation metric of the loop's bookkeeping (the STN kept is the last step's).
MONITOR = ("val/loss", "min")


# --------------------------------------------------------------------------------------
# Training settings, the feature encoder, the protocol
# --------------------------------------------------------------------------------------


def alignment_train_cfg(cfg: Mapping[str, Any], n_images: int, world_size: int | None = None) -> dict[str, Any]:
    """The training loop's ``train`` block (:data:`chestssl.train.loop.TRAIN_KEYS`) for a validated
    ``alignment`` block and ``n_images`` training radiographs.

    ``alignment.steps`` optimisation steps of ``alignment.batch_size`` radiographs
    (``max_steps``; ``epochs`` is the most passes over the radiographs that many steps can
    take, each pass drawing every radiograph once in a seeded order), AdamW with
    ``alignment.lr`` and ``alignment.weight_decay`` and torch's default betas
    (0.9, 0.999), as seed 002; a constant learning rate, no gradient clipping, float32,
    the loss logged every step, the device chosen by the loop. ``world_size``: the
    processes under ``torchrun`` (default: ``WORLD_SIZE``, else 1).
    """
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE") or 1)
    per_rank = math.ceil(n_images / max(1, world))
    fewest_steps_per_epoch = max(1, per_rank // cfg["batch_size"])
    return {
        "epochs": math.ceil(cfg["steps"] / fewest_steps_per_epoch),
        "batch_size": cfg["batch_size"],
        "lr": float(cfg["lr"]),
        "weight_decay": float(cfg["weight_decay"]),
        "optimizer": "adamw",
        "betas": [0.9, 0.999],
        "scheduler": "none",
        "grad_clip": 0.0,
        "max_steps": cfg["steps"],
        "amp": False,
        "num_workers": 0,
        "log_every": 1,
        "device": "auto",
    }


def load_feature_encoder(encoder_path: str | Path, feature_method: str = "<feature_method>",
                         image_size: tuple[int, int] | None = None) -> nn.Module:
    """The encoder of ``pretrain_radiographs@<feature_method>`` from its ``encoder.pt`` (CPU, eval mode).

    The file records the backbone it was trained with, so a ViT comes back built for
    ``radiographs.side`` (its ``img_size`` on radiographs, whatever the CT's ``slices.side``);
    ``image_size`` (rows, cols of the radiographs it will read) refuses one built for another size.
    """
    from chestssl.models.backbones import load_encoder

    encoder_path = Path(encoder_path)
    if not encoder_path.is_file():
        raise FileNotFoundError(
            f"{encoder_path} not found; expected models/pretrain_radiographs/{feature_method}/encoder.pt, the "
            f"encoder written by the stage pretrain_radiographs@{feature_method} (dvc repro "
            f"pretrain_radiographs@{feature_method}); alignment.feature_method names it"
        )
    payload = load_model_file(encoder_path, f"pretrain_radiographs@{feature_method}")
    encoder = load_encoder(payload, source=str(encoder_path))
    if getattr(encoder, "spatial_dims", 2) != 2:
        raise ValueError(f"{encoder_path}: a {encoder.spatial_dims}D encoder; radiographs are 2D, so set "
                         "alignment.feature_method to an entry with backbone.spatial_dims 2")
    side = getattr(encoder, "img_size", None)  # a ViT's position embeddings fit one input size
    if side is not None and image_size is not None and tuple(image_size) != (side, side):
        raise ValueError(f"{encoder_path}: a ViT built for {side} x {side} px radiographs, but the radiographs are "
                         f"{image_size[0]} x {image_size[1]} px; rerun pretrain_radiographs@{feature_method}, which "
                         "builds it for radiographs.side")
    return encoder.eval()


def protocol(feature_method: str) -> str:
    """The downstream protocol, as written to ``metrics.json`` and the report."""
    return (
        f"linear probe (one class-balanced logistic regression per label, probe.C, probe.max_iter) on the frozen "
        f"encoder of pretrain_radiographs@{feature_method}, fitted on the training split's frontal radiographs and "
        "scored on the test split's, with patient bootstrap intervals; every probed radiograph is first moved by one "
        "seeded random known transform (shift/scale/rotation of the alignment params), then left so (without "
        "alignment) or aligned by the STN (with alignment). Seed 002 instead fine-tuned a DenseNet-121 on "
        "ChestX-ray14 films (14 labels) as they came, without or with alignment."
    )


def _check_batch_size(batch_size: int, count: int, size: tuple[int, int]) -> None:
    """``alignment.batch_size`` fits the training radiographs and the STN's batch norm.

    A cost measurement (:mod:`chestssl.cost`) draws its batches with replacement, so a
    sample of a few scans may hold fewer radiographs than a batch.
    """
    from chestssl.train.cost_probe import cost_request

    if batch_size > count and cost_request() is None:
        raise ParamsError([f"alignment.batch_size: got {batch_size}, expected at most {count}, the training "
                           f"split's {VIEW} radiographs"])
    # Layer4 of the trunk has stride 32; batch norm in training needs > 1 value per channel.
    deepest = math.ceil(size[0] / 32) * math.ceil(size[1] / 32)
    if batch_size * deepest < 2:
        raise ParamsError([f"alignment.batch_size: got {batch_size}, expected >= 2 for {size[0]}x{size[1]} "
                           "radiographs (the STN's deepest batch norm needs more than one value per channel)"])


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def align_radiographs(
    params: Mapping[str, Any],
    radiographs_dir: str | Path,
    encoder_path: str | Path,
    model_dir: str | Path,
    report_dir: str | Path,
    checkpoint_path: str | Path,
    live_dir: str | Path | None = None,
) -> dict[str, Any] | None:
    """Train the alignment STN on the radiographs and measure what it changes (seed 002).

    Args:
        params: the params validated by :func:`chestssl.params.load_params`, with ``alignment``,
            ``seed``, ``probe`` (``C``, ``max_iter``) and ``evaluate`` (``bootstrap_samples``,
            ``confidence``).
        radiographs_dir: ``data/radiographs`` (stage ``radiographs``).
        encoder_path: ``encoder.pt`` of ``pretrain_radiographs@<alignment.feature_method>``.
        model_dir: receives ``stn.pt`` (:func:`~chestssl.models.stn.stn_payload`; load with
            :func:`~chestssl.models.stn.load_alignment_stn`).
        report_dir: receives ``metrics.json``, ``examples.npz`` and ``cost.json`` (what training the
            STN cost, :func:`~chestssl.train.cost_probe.fit_cost`; its parameters are the STN's, the
            frozen feature encoder of the loss is not among them; the report shows it beside the
            alignment table's scores).
        checkpoint_path: the training loop's resume checkpoint: an interrupted run resumes
            from its last finished epoch and ends with the weights of an uninterrupted one.
        live_dir: the training curves (dvclive; ``step`` = optimisation step); default
            ``report_dir/live``.

    ``examples.npz``: ``input`` (K, S, S) the misaligned test radiographs, ``aligned``
    (K, S, S) the STN's output, ``original`` (K, S, S) as rendered, ``canonical`` (S, S),
    ``study_id`` (K,) str, ``before_px`` / ``after_px`` (K,) their corner displacements;
    K = min(``alignment.num_examples``, test radiographs), in study-id order.

    Returns the metrics written to ``metrics.json`` (``None`` on a non-main process under
    ``torchrun``): ``protocol``, ``feature_method``, ``canonical``, ``training`` (steps,
    epochs, the first and last epochs' mean training loss, the last epoch's validation
    metrics), ``parameter_error`` (``misaligned``: ``before_px``, ``after_px``,
    ``fraction_undone``; ``not_misaligned``: ``displacement_px``), ``auroc``
    (:func:`~chestssl.eval.alignment.compare_aurocs`) and ``probe`` (the full probe results
    per condition of :data:`~chestssl.eval.alignment.CONDITIONS`).
    """
    from chestssl.data.affine import AlignmentAugmentation, misalign
    from chestssl.data.canonical_chest import canonical_chest
    from chestssl.data.datasets import DatasetError
    from chestssl.data.radiograph_datasets import IndexedImages, RadiographDataset, ReplacedImages, capped, stack_images
    from chestssl.data.radiograph_folder import open_radiograph_folder
    from chestssl.eval.alignment import (
        CONDITIONS,
        alignment_parameter_error,
        compare_aurocs,
        mean_corner_displacement,
    )
    from chestssl.eval.linear_probe import fit_linear_probe
    from chestssl.eval.radiograph_probe import extract_image_features
    from chestssl.io import write_json, write_npz
    from chestssl.methods.alignment import STNAlignment
    from chestssl.models.losses import AlignmentLoss, EncoderFeatures
    from chestssl.models.seeding import seeded
    from chestssl.models.stn import DEFAULT_HIDDEN_DIM, AlignmentSTN, apply_stn, stn_payload
    from chestssl.train.checkpoint import stage_inputs
    from chestssl.train.cost_probe import fit_cost
    from chestssl.train.loop import fit
    from chestssl.train.metrics import flat_metrics

    cfg = params["alignment"]
    seed = int(params["seed"])
    probe_cfg, evaluate_cfg = params["probe"], params["evaluate"]
    model_dir, report_dir = Path(model_dir), Path(report_dir)
    live_dir = report_dir / "live" if live_dir is None else Path(live_dir)

    folder = open_radiograph_folder(radiographs_dir)
    splits = {split: RadiographDataset(folder, split, (VIEW,)) for split in ("train", "test")}
    used = {split: capped(data, cfg["max_images"], seed) for split, data in splits.items()}
    train_set, test_set = used["train"], used["test"]
    train_images, test_images = stack_images(train_set), stack_images(test_set)
    size = (int(train_images.shape[-2]), int(train_images.shape[-1]))
    _check_batch_size(cfg["batch_size"], train_images.shape[0], size)

    canonical = canonical_chest(train_images, size=size)
    encoder = load_feature_encoder(encoder_path, cfg["feature_method"], size)
    loss = AlignmentLoss(EncoderFeatures(encoder), pixel_weight=cfg["pixel_weight"])
    with seeded(seed):
        stn = AlignmentSTN(output_size=size, block_inplanes=cfg["block_inplanes"], hidden_dim=DEFAULT_HIDDEN_DIM)
    augmentation = AlignmentAugmentation(cfg["max_shift"], cfg["max_scale"], cfg["max_rotation_deg"],
                                         cfg["max_brightness"], cfg["max_contrast"])

    def misaligned(images: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        # CPU generators: the same draws on every device.
        return misalign(images, cfg["max_shift"], cfg["max_scale"], cfg["max_rotation_deg"],
                        torch.Generator().manual_seed(seed + stream))

    try:
        validation_split = "val"
        val_images = stack_images(capped(RadiographDataset(folder, "val", (VIEW,)), cfg["max_images"], seed))
    except DatasetError:  # no frontal radiograph in the validation split: validate on the training ones
        validation_split, val_images = "train", train_images
    val_moved, val_applied = misaligned(val_images, _MISALIGN_VAL_STREAM)

    module = STNAlignment(stn, loss, canonical, augmentation)
    result = fit(
        module, IndexedImages(train_images), IndexedImages(val_moved, {"applied": val_applied}),
        alignment_train_cfg(cfg, train_images.shape[0]), live_dir, Path(checkpoint_path), seed,
        monitor=MONITOR[0], mode=MONITOR[1],
        # The number of report examples does not change the training.
        inputs=stage_inputs({"alignment": {k: v for k, v in cfg.items() if k != "num_examples"}},
                            [radiographs_dir, encoder_path]),
    )
    if not result.is_main:  # under torchrun, rank 0 evaluates and writes the outputs
        return None
    cost = fit_cost(module, result)
    stn = module.stn  # the weights of the last step

    train_moved, _ = misaligned(train_images, _MISALIGN_TRAIN_STREAM)
    test_moved, test_applied = misaligned(test_images, _MISALIGN_TEST_STREAM)
    train_aligned, _ = apply_stn(stn, train_moved)
    test_aligned, test_predicted = apply_stn(stn, test_moved)
    _, unmoved_predicted = apply_stn(stn, test_images)

    error = alignment_parameter_error(test_predicted, test_applied, image_size=size)
    unmoved_displacement = mean_corner_displacement(unmoved_predicted, image_size=size)
    parameter_error = {
        "misaligned": {"before_px": float(error.before.mean()), "after_px": float(error.after.mean()),
                       "fraction_undone": error.fraction_undone, "n_images": int(test_images.shape[0])},
        "not_misaligned": {"displacement_px": float(unmoved_displacement.mean()),
                           "n_images": int(test_images.shape[0])},
    }

    device = next(stn.parameters()).device
    condition_images = {"misaligned": (train_moved, test_moved), "aligned": (train_aligned, test_aligned),
                        "as_rendered": (train_images, test_images)}
    probes = {}
    for condition in CONDITIONS:
        train_condition, test_condition = condition_images[condition]
        probes[condition] = fit_linear_probe(
            extract_image_features(encoder, ReplacedImages(train_set, train_condition), device),
            extract_image_features(encoder, ReplacedImages(test_set, test_condition), device),
            C=probe_cfg["C"], max_iter=probe_cfg["max_iter"], seed=seed,
            n_bootstrap=evaluate_cfg["bootstrap_samples"], confidence=evaluate_cfg["confidence"],
        )

    history = result.history
    metrics: dict[str, Any] = {
        "protocol": protocol(cfg["feature_method"]),
        "feature_method": cfg["feature_method"],
        "view": VIEW,
        "canonical": {
            "n_images": int(train_images.shape[0]),
            "size": list(size),
            "note": "mean of the whole training frontal radiographs: the radiographs come without lung masks, so "
                    "they are not cropped to the lungs as in seed 002",
        },
        "training": {
            "steps": result.steps, "epochs": result.epochs, "n_images": int(train_images.shape[0]),
            # Means over the first and the last epoch (one step each when a batch holds every radiograph);
            # none when the fit trained no epoch (a cost measurement, chestssl.cost).
            "first_loss": history[0]["train/loss"] if history else None,
            "final_loss": history[-1]["train/loss"] if history else None,
            "validation": {"split": validation_split, "n_images": int(val_images.shape[0])},
            **flat_metrics(result.final_metrics),
        },
        "parameter_error": parameter_error,
        "images_used": {split: {"used": len(used[split]), "of": len(splits[split])} for split in splits},
        "auroc": compare_aurocs(probes, train_set.label_names),
        "probe": probes,
    }

    count = min(cfg["num_examples"], test_images.shape[0])
    save_model_file(model_dir / "stn.pt", stn_payload(stn, canonical, {
        "feature_method": cfg["feature_method"], "augmentation": asdict(augmentation), "history": history}))
    write_npz(
        report_dir / "examples.npz",
        input=test_moved[:count, 0].numpy().astype(np.float32),
        aligned=test_aligned[:count, 0].numpy().astype(np.float32),
        original=test_images[:count, 0].numpy().astype(np.float32),
        canonical=canonical[0].numpy().astype(np.float32),
        study_id=np.asarray(test_set.frame["study_id"].iloc[:count], dtype=str),
        before_px=error.before[:count].numpy().astype(np.float32),
        after_px=error.after[:count].numpy().astype(np.float32),
    )
    write_json(report_dir / "cost.json", cost)
    write_json(report_dir / "metrics.json", metrics)
    return metrics
