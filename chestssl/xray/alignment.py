"""The STN alignment study on the frontal radiographs of ``data/radiographs`` (seed 002; stage ``align_radiographs``).

Seed 002 aligns every chest radiograph to a *canonical chest* with a spatial transformer
network (Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015, arXiv:1506.02025)
and compares the downstream AUROC of a classifier on the radiographs as they are with one
on the aligned radiographs (ChestX-ray14, DenseNet-121 fine-tuned on 14 labels: mean
AUROC 0.8110 unaligned vs 0.8124 aligned). :func:`run_alignment_study` runs that study on
the frontal radiographs of ``data/radiographs`` (rendered from the CT by
:mod:`chestssl.data.drr`, or a real dataset, ``data.cxr.source``) with the building
blocks of :mod:`chestssl.xray.stn`:

1. **Canonical chest** (:func:`~chestssl.xray.stn.canonical_chest`): the mean of the
   training split's frontal radiographs (lateral views never enter it). The seed cropped
   each one to its lungs first; the radiographs come without lung masks here, so the
   whole image is used.
2. **Feature network** of the loss: the frozen encoder of
   ``pretrain_radiographs@<feature_method>``, trained earlier by the pipeline (nothing is
   downloaded), through :class:`EncoderFeatures` (its ``feature_maps``).
3. **Training** (:func:`~chestssl.xray.stn.train_alignment`): an
   :class:`~chestssl.xray.stn.AlignmentSTN` maps the training frontal radiographs,
   misaligned and intensity-jittered on the fly by
   :class:`~chestssl.xray.stn.AlignmentAugmentation`, onto the canonical chest under
   :class:`~chestssl.xray.stn.AlignmentLoss` (``pixel_weight`` x pixel MSE + feature
   MSE), AdamW, seeded.
4. **Evaluation** on the test split's frontal radiographs. The renderer fits every CT into
   the same frame, so rendered radiographs are already aligned with each other, and the
   misalignment of real films is unknown; so a known misalignment is made: every probed radiograph
   (training and test) is moved by one seeded random known transform
   (:func:`~chestssl.xray.stn.misalign`, the augmentation's shift/scale/rotation range).

   a. Parameter error (:func:`~chestssl.xray.stn.alignment_parameter_error`): mean
      corner displacement in pixels of the known transform (before) and of it chained with
      the STN's prediction (after), and the fraction undone; and how far the STN moves the
      radiographs that were not misaligned (0 for a perfect STN).
   b. AUROC per label of the folder (rendered: ``nodule``, ``malignant``) without and with
      alignment. The seed fine-tuned a DenseNet-121; here the downstream model is the
      linear probe of the frozen feature encoder (:func:`~chestssl.xray.probe.extract_image_features`,
      :func:`~chestssl.eval.linear_probe.fit_linear_probe`, the ``probe`` params and the
      patient bootstrap of ``evaluate``), fitted on the training radiographs and scored on
      the test radiographs, (i) misaligned, not aligned; (ii) misaligned, then aligned by
      the STN (training and test radiographs get the same treatment). The probe of the
      radiographs as stored (condition ``as_rendered``) is reported beside them for reference.
   c. Examples for the report figure: misaligned input, aligned output, canonical chest.

Training is not resumable: an interrupted stage starts over (the quick profile trains for
seconds; seed 002 trained for "a few epochs").
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from chestssl.model_files import load_model_file, save_model_file
from chestssl.params import ParamsError
from chestssl.xray.stn import DEFAULT_HIDDEN_DIM, AlignmentSTN

#: Format tag of ``stn.pt``.
STN_FORMAT = "chestssl-stn/1"
#: The view seed 002 aligns (ChestX-ray14 holds frontal films).
VIEW = "frontal"
#: The probe conditions: radiographs misaligned and left so, misaligned then aligned by
#: the STN, and as rendered (the reference without any misalignment).
CONDITIONS = ("misaligned", "aligned", "as_rendered")
#: Radiographs per forward pass when the trained STN is applied.
_APPLY_BATCH = 64
# Offsets of the random streams drawn from the ``seed`` param, so that e.g. more training
# steps never change which transforms misalign the evaluated radiographs.
_TRAIN_STREAM, _MISALIGN_TRAIN_STREAM, _MISALIGN_TEST_STREAM = 0, 1, 2

_FIELD_DOCS = {
    "feature_method": "the name of a `pretrain_radiographs.methods` entry whose frozen encoder is the loss's "
                      "feature network",
    "block_inplanes": "a list of 4 integers >= 1 (widths of the STN's ResNet-18 layer1..4; seed 002: "
                      "[64, 128, 256, 512])",
    "steps": "an integer >= 1 (optimisation steps)",
    "batch_size": "an integer >= 1 (radiographs per step, at most the training frontal radiographs)",
    "lr": "a number > 0 (AdamW learning rate; seed 002: 1e-4)",
    "weight_decay": "a number >= 0 (AdamW weight decay; seed 002: 1e-4)",
    "pixel_weight": "a number >= 0 (weight of the pixel MSE against the feature MSE; seed 002: 15)",
    "max_shift": "a number in [0, 1) (largest shift, as a fraction of the image size; seed 002: 0.05)",
    "max_scale": "a number in [0, 1) (largest relative scale change; seed 002: 0.05)",
    "max_rotation_deg": "a number in [0, 180] (largest rotation in degrees; seed 002: 10)",
    "max_brightness": "a number in [0, 1) (largest relative brightness change)",
    "max_contrast": "a number in [0, 1) (largest relative contrast change)",
    "num_examples": "an integer >= 1 (test radiographs shown in the report figure)",
    "max_images": "an integer >= 0 (frontal radiographs per split at most, whole patients drawn at random; "
                  "0: all; bounds the memory on a large dataset)",
}
#: The keys of the ``alignment`` params block.
ALIGNMENT_FIELDS: tuple[str, ...] = tuple(_FIELD_DOCS)


# --------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------


def _real(value: Any) -> float | None:
    """A finite float from a number or a numeric string (YAML 1.1 reads "1e-4" as a string); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def _integer(value: Any, minimum: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        return None
    return int(value)


def _in_range(
    low: float, high: float, high_inclusive: bool, low_exclusive: bool = False
) -> Callable[[Any], float | None]:
    """A parser of numbers in [low, high] (or [low, high), (low, high]); None for anything else."""

    def parse(value: Any) -> float | None:
        number = _real(value)
        if number is None or number < low or (low_exclusive and number == low):
            return None
        if number > high or (not high_inclusive and number == high):
            return None
        return number

    return parse


def _feature_method(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _block_inplanes(value: Any) -> list[int] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    widths = [_integer(width, 1) for width in value]
    return None if None in widths else widths


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "feature_method": _feature_method,
    "block_inplanes": _block_inplanes,
    "steps": lambda value: _integer(value, 1),
    "batch_size": lambda value: _integer(value, 1),
    "lr": _in_range(0.0, math.inf, True, low_exclusive=True),
    "weight_decay": _in_range(0.0, math.inf, True),
    "pixel_weight": _in_range(0.0, math.inf, True),
    "max_shift": _in_range(0.0, 1.0, False),
    "max_scale": _in_range(0.0, 1.0, False),
    "max_rotation_deg": _in_range(0.0, 180.0, True),
    "max_brightness": _in_range(0.0, 1.0, False),
    "max_contrast": _in_range(0.0, 1.0, False),
    "num_examples": lambda value: _integer(value, 1),
    "max_images": lambda value: _integer(value, 0),
}


def validate_alignment_cfg(
    cfg: Any, key: str = "alignment", feature_methods: Sequence[str] | None = None
) -> dict[str, Any]:
    """Check the ``alignment`` params block and return it normalised (floats as float).

    Keys (:data:`ALIGNMENT_FIELDS`): ``feature_method`` (str), ``block_inplanes`` (4 ints
    >= 1), ``steps`` (int >= 1), ``batch_size`` (int >= 1), ``lr`` (> 0),
    ``weight_decay`` (>= 0), ``pixel_weight`` (>= 0), ``max_shift``, ``max_scale``,
    ``max_brightness``, ``max_contrast`` (in [0, 1)), ``max_rotation_deg`` (in [0, 180]),
    ``num_examples`` (int >= 1), ``max_images`` (int >= 0). At least one of the shift, scale and rotation must be
    > 0, or there is no misalignment to learn or measure. ``feature_methods``: if given,
    the ``pretrain_radiographs.methods`` that ``feature_method`` must be one of.

    Raises :class:`~chestssl.params.ParamsError` listing every problem as
    ``<key>.<field>: got <value>, expected <what is allowed>``.
    """
    if not isinstance(cfg, Mapping):
        got = "missing" if cfg is None else f"got {cfg!r}"
        raise ParamsError([f"{key}: {got}, expected a mapping with keys {', '.join(ALIGNMENT_FIELDS)}"])
    problems = [f"{key}.{name}: unknown key; allowed keys are {', '.join(ALIGNMENT_FIELDS)}"
                for name in sorted(set(cfg) - set(ALIGNMENT_FIELDS), key=str)]
    checked: dict[str, Any] = {}
    for name in ALIGNMENT_FIELDS:
        if name not in cfg:
            problems.append(f"{key}.{name}: missing; expected {_FIELD_DOCS[name]}")
            continue
        value = _PARSERS[name](cfg[name])
        if value is None:
            problems.append(f"{key}.{name}: got {cfg[name]!r}, expected {_FIELD_DOCS[name]}")
        else:
            checked[name] = value
    geometric = ("max_shift", "max_scale", "max_rotation_deg")
    if all(checked.get(name) == 0.0 for name in geometric):
        problems.append(f"{key}.max_shift, {key}.max_scale, {key}.max_rotation_deg: all 0, expected at least one "
                        "> 0 (the STN learns to undo that misalignment, and the study measures how much it undoes)")
    method = checked.get("feature_method")
    if method is not None and feature_methods is not None and method not in feature_methods:
        problems.append(f"{key}.feature_method: got {method!r}, expected one of the pretrain_radiographs.methods "
                        f"({', '.join(feature_methods) or 'none listed'}), whose encoders the pipeline trains")
    if problems:
        raise ParamsError(problems)
    return checked


# --------------------------------------------------------------------------------------
# Feature network, STN file, applying the STN
# --------------------------------------------------------------------------------------


class EncoderFeatures(nn.Module):
    """A pretrained encoder as :class:`~chestssl.xray.stn.AlignmentLoss`'s feature network.

    ``forward(x)``: (B, 1, H, W) -> the encoder's ``feature_maps(x)`` (a list of maps,
    shallow to deep, as every backbone of :mod:`chestssl.models.backbones` gives), or
    ``representation(x)`` (B, D) for an encoder without maps. The loss freezes it (no
    parameter requires gradients, eval mode); gradients still flow through it to ``x``,
    which is how the loss reaches the STN.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        has_maps = callable(getattr(encoder, "feature_maps", None))
        if not has_maps and not callable(getattr(encoder, "representation", None)):
            raise ValueError(f"{type(encoder).__name__} has neither feature_maps() nor representation(); "
                             "the alignment loss needs a backbone of chestssl.models.backbones")
        self.encoder = encoder
        self._use_maps = has_maps

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, 1, H, W) -> list of (B, C_i, H_i, W_i) maps, or (B, D)."""
        if self._use_maps:
            return list(self.encoder.feature_maps(x))
        return self.encoder.representation(x)


def load_feature_encoder(encoder_path: str | Path, feature_method: str = "<feature_method>") -> nn.Module:
    """The encoder of ``pretrain_radiographs@<feature_method>`` from its ``encoder.pt`` (CPU, eval mode)."""
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
    return encoder.eval()


def stn_payload(stn: AlignmentSTN, canonical: torch.Tensor, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``stn.pt`` holds: format tag, the STN's config and CPU weights, the canonical chest (1, H', W')."""
    from chestssl.models.backbones import cpu_state_dict

    config = {
        "output_size": list(stn.output_size) if stn.output_size is not None else None,
        "block_inplanes": list(stn.features.block_inplanes),
        "hidden_dim": int(stn.regressor.in_features),
        "padding_mode": stn.padding_mode,
    }
    return {"format": STN_FORMAT, "config": config, "state_dict": cpu_state_dict(stn.state_dict()),
            "canonical": canonical.detach().cpu().to(torch.float32), **dict(extra or {})}


def load_alignment_stn(path: str | Path) -> tuple[AlignmentSTN, torch.Tensor]:
    """``(stn in eval mode, canonical chest (1, H', W'))`` from an ``stn.pt`` written by :func:`run_alignment_study`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected models/alignment/stn.pt, written by the stage "
                                "align_radiographs (dvc repro align_radiographs)")
    payload = load_model_file(path, "align_radiographs")
    if payload.get("format") != STN_FORMAT:
        found = payload.get("format")
        raise ValueError(f"{path}: not an alignment STN (format {found!r}, expected {STN_FORMAT!r}); "
                         "rerun the stage align_radiographs")
    stn = AlignmentSTN(**payload["config"])
    stn.load_state_dict(payload["state_dict"], strict=True)
    return stn.eval(), payload["canonical"]


@torch.no_grad()
def apply_stn(
    stn: AlignmentSTN, images: torch.Tensor, batch_size: int = _APPLY_BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained STN in eval mode on (N, 1, H, W) images -> (aligned (N, 1, H', W'), params (N, 5)), on CPU.

    Runs on the STN's device in batches; the STN's mode is restored afterwards.
    """
    device = next(stn.parameters()).device
    was_training = stn.training
    stn.eval()
    aligned, params = [], []
    try:
        for start in range(0, images.shape[0], batch_size):
            output = stn(images[start : start + batch_size].to(device))
            aligned.append(output.aligned.cpu())
            params.append(output.params.cpu())
    finally:
        stn.train(was_training)
    return torch.cat(aligned), torch.cat(params)


class _ReplacedImages(Dataset):
    """The items of a radiograph dataset with their ``image`` replaced by ``images[i]`` (1, H, W)."""

    def __init__(self, base: Dataset, images: torch.Tensor):
        if len(base) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images for a dataset of {len(base)} items")
        self.base, self.images = base, images

    def __len__(self) -> int:
        return len(self.base)

    @property
    def label_names(self) -> list[str]:
        return list(self.base.label_names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.base[index], "image": self.images[index]}


def _frontal_images(dataset: Dataset) -> torch.Tensor:
    """(N, 1, S, S) float32 stack of a frontal-only radiograph dataset's images."""
    return torch.stack([dataset[index]["image"] for index in range(len(dataset))])


# --------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------


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


def _auroc_entry(probe_label: Mapping[str, Any]) -> dict[str, Any]:
    """The probe's AUROC of one label ``{value, ci_low, ci_high[, note]}``; null with the reason when skipped."""
    if "skipped" in probe_label:
        return {"value": None, "ci_low": None, "ci_high": None, "note": str(probe_label["skipped"])}
    return dict(probe_label["auroc"])


def _difference(with_value: float | None, without_value: float | None) -> float | None:
    return None if with_value is None or without_value is None else float(with_value - without_value)


def compare_aurocs(probes: Mapping[str, Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """Per label and for the mean over labels: AUROC without / with alignment and their difference.

    ``probes``: :func:`~chestssl.eval.linear_probe.fit_linear_probe` results by condition
    (:data:`CONDITIONS`). Returns ``{label: {"without_alignment": entry, "with_alignment":
    entry, "as_rendered": entry, "difference": float | None, "n_images", "n_patients"},
    "mean": {"without_alignment": float | None, ..., "difference": float | None}}``, the
    difference being that of the point estimates (with - without).
    """
    comparison: dict[str, Any] = {}
    for label in labels:
        entries = {"without_alignment": _auroc_entry(probes["misaligned"][label]),
                   "with_alignment": _auroc_entry(probes["aligned"][label]),
                   "as_rendered": _auroc_entry(probes["as_rendered"][label])}
        probed = probes["aligned"][label]
        comparison[label] = {
            **entries,
            "difference": _difference(entries["with_alignment"]["value"], entries["without_alignment"]["value"]),
            "n_images": probed.get("n_images"),
            "n_patients": probed.get("n_patients"),
        }
    means = {"without_alignment": probes["misaligned"]["mean"]["auroc"],
             "with_alignment": probes["aligned"]["mean"]["auroc"],
             "as_rendered": probes["as_rendered"]["mean"]["auroc"]}
    comparison["mean"] = {**means, "difference": _difference(means["with_alignment"], means["without_alignment"]),
                          "labels": list(probes["aligned"]["mean"]["labels"])}
    return comparison


def run_alignment_study(
    params: Mapping[str, Any],
    radiographs_dir: str | Path,
    encoder_path: str | Path,
    out_model_dir: str | Path,
    report_dir: str | Path,
) -> dict[str, Any]:
    """Train the alignment STN on the rendered radiographs and measure what it changes (seed 002).

    Args:
        params: validated params with ``alignment`` (:func:`validate_alignment_cfg`),
            ``seed``, ``probe`` (``C``, ``max_iter``), ``evaluate`` (``bootstrap_samples``,
            ``confidence``) and, if present, ``pretrain_radiographs.methods``.
        radiographs_dir: ``data/radiographs`` (stage ``radiographs``).
        encoder_path: ``encoder.pt`` of ``pretrain_radiographs@<alignment.feature_method>``.
        out_model_dir: receives ``stn.pt`` (:func:`stn_payload`; load with
            :func:`load_alignment_stn`).
        report_dir: receives ``metrics.json`` and ``examples.npz``.

    ``examples.npz``: ``input`` (K, S, S) the misaligned test radiographs, ``aligned``
    (K, S, S) the STN's output, ``original`` (K, S, S) as rendered, ``canonical`` (S, S),
    ``study_id`` (K,) str, ``before_px`` / ``after_px`` (K,) their corner displacements;
    K = min(``alignment.num_examples``, test radiographs), in study-id order.

    Returns the metrics written to ``metrics.json``: ``protocol``, ``feature_method``,
    ``canonical``, ``training`` (losses), ``parameter_error`` (``misaligned``:
    ``before_px``, ``after_px``, ``fraction_undone``; ``not_misaligned``:
    ``displacement_px``), ``auroc`` (:func:`compare_aurocs`) and ``probe`` (the full
    probe results per condition of :data:`CONDITIONS`).

    Training is not resumable: a killed run starts over.
    """
    from chestssl.data.radiograph_datasets import RadiographDataset
    from chestssl.data.radiograph_folder import open_radiograph_folder
    from chestssl.eval.linear_probe import fit_linear_probe
    from chestssl.inference import auto_device
    from chestssl.io import write_json, write_npz
    from chestssl.models.seeding import seeded
    from chestssl.xray.stn import (
        AlignmentAugmentation,
        AlignmentLoss,
        alignment_parameter_error,
        canonical_chest,
        mean_corner_displacement,
        misalign,
        train_alignment,
    )
    from chestssl.xray.probe import extract_image_features

    known_methods = (params.get("pretrain_radiographs") or {}).get("methods")
    cfg = validate_alignment_cfg(params.get("alignment"), feature_methods=known_methods)
    seed = int(params["seed"])
    probe_cfg, evaluate_cfg = params["probe"], params["evaluate"]
    radiographs_dir, out_model_dir, report_dir = Path(radiographs_dir), Path(out_model_dir), Path(report_dir)
    device = auto_device()

    folder = open_radiograph_folder(radiographs_dir)
    splits = {split: RadiographDataset(folder, split, (VIEW,)) for split in ("train", "test")}
    used = {split: capped(data, cfg["max_images"], seed) for split, data in splits.items()}
    train_set, test_set = used["train"], used["test"]
    train_images, test_images = _frontal_images(train_set), _frontal_images(test_set)
    size = (int(train_images.shape[-2]), int(train_images.shape[-1]))
    _check_batch_size(cfg["batch_size"], train_images.shape[0], size)

    canonical = canonical_chest(train_images, size=size)
    encoder = load_feature_encoder(encoder_path, cfg["feature_method"]).to(device)
    loss = AlignmentLoss(EncoderFeatures(encoder), pixel_weight=cfg["pixel_weight"]).to(device)
    with seeded(seed):
        stn = AlignmentSTN(output_size=size, block_inplanes=cfg["block_inplanes"], hidden_dim=DEFAULT_HIDDEN_DIM)
    stn.to(device)
    augmentation = AlignmentAugmentation(cfg["max_shift"], cfg["max_scale"], cfg["max_rotation_deg"],
                                         cfg["max_brightness"], cfg["max_contrast"])
    # CPU generators: the same draws on every device (stn.py moves them where the images are).
    losses = train_alignment(
        stn, train_images.to(device), canonical.to(device), loss, steps=cfg["steps"], lr=cfg["lr"],
        generator=torch.Generator().manual_seed(seed + _TRAIN_STREAM), weight_decay=cfg["weight_decay"],
        batch_size=cfg["batch_size"], augmentation=augmentation,
    )

    def misaligned(images: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        return misalign(images, cfg["max_shift"], cfg["max_scale"], cfg["max_rotation_deg"],
                        torch.Generator().manual_seed(seed + stream))

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

    condition_images = {"misaligned": (train_moved, test_moved), "aligned": (train_aligned, test_aligned),
                        "as_rendered": (train_images, test_images)}
    probes = {}
    for condition in CONDITIONS:
        train_condition, test_condition = condition_images[condition]
        probes[condition] = fit_linear_probe(
            extract_image_features(encoder, _ReplacedImages(train_set, train_condition), device),
            extract_image_features(encoder, _ReplacedImages(test_set, test_condition), device),
            C=probe_cfg["C"], max_iter=probe_cfg["max_iter"], seed=seed,
            n_bootstrap=evaluate_cfg["bootstrap_samples"], confidence=evaluate_cfg["confidence"],
        )

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
        "training": {"steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1],
                     "n_images": int(train_images.shape[0])},
        "parameter_error": parameter_error,
        "images_used": {split: {"used": len(used[split]), "of": len(splits[split])} for split in splits},
        "auroc": compare_aurocs(probes, train_set.label_names),
        "probe": probes,
    }

    count = min(cfg["num_examples"], test_images.shape[0])
    save_model_file(out_model_dir / "stn.pt", stn_payload(stn, canonical, {
        "feature_method": cfg["feature_method"], "augmentation": asdict(augmentation), "losses": losses}))
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
    write_json(report_dir / "metrics.json", metrics)
    return metrics


def capped(dataset: Any, max_images: int, seed: int) -> Any:
    """``dataset`` (a :class:`~chestssl.data.radiograph_datasets.RadiographDataset`) cut to at
    most ``max_images`` images of whole patients, drawn in a seeded random order (a patient
    whose images would pass the cap is passed over; at least one patient is kept);
    unchanged when ``max_images`` is 0 or not exceeded."""
    from chestssl.data.radiograph_datasets import RadiographDataset

    if max_images == 0 or len(dataset) <= max_images:
        return dataset
    counts = dataset.frame.groupby("patient_id", sort=True).size()
    kept, total = [], 0
    for position in np.random.default_rng(seed).permutation(len(counts)):
        count = int(counts.iloc[position])
        if total + count <= max_images or not kept:
            kept.append(str(counts.index[position]))
            total += count
        if total >= max_images:
            break
    return RadiographDataset(dataset.folder, dataset.split, dataset.views, patient_ids=kept)


def _check_batch_size(batch_size: int, count: int, size: tuple[int, int]) -> None:
    """``alignment.batch_size`` fits the training radiographs and the STN's batch norm."""
    if batch_size > count:
        raise ParamsError([f"alignment.batch_size: got {batch_size}, expected at most {count}, the training "
                           f"split's {VIEW} radiographs"])
    # Layer4 of the trunk has stride 32; batch norm in training needs > 1 value per channel.
    deepest = math.ceil(size[0] / 32) * math.ceil(size[1] / 32)
    if batch_size * deepest < 2:
        raise ParamsError([f"alignment.batch_size: got {batch_size}, expected >= 2 for {size[0]}x{size[1]} "
                           "radiographs (the STN's deepest batch norm needs more than one value per channel)"])
