"""Loading and validating the params files: ``params.yaml`` and :data:`PARAMS_FILES`.

Every stage calls :func:`load_params` first. The files are checked against :data:`SCHEMA`
before any work starts: an unknown key, a wrong type or a value out of range stops the
stage with a message naming the file, the key, the value and what is allowed, listing
every problem at once.

``methods``, ``multihead`` and ``runs`` are maps from a user-chosen name to an entry whose
schema depends on one of its keys (``method`` or ``task``). Entries name their backbone and
training recipe from the presets ``backbones`` and ``recipes``; :func:`validate` fills
them in, so the entries a stage receives are written out in full.
"""

from __future__ import annotations

from chestssl.errors import UserError

import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

_REQUIRED = object()


class ParamsError(UserError, ValueError):
    """Raised when params.yaml does not match the schema; lists every problem."""

    def __init__(self, problems: list[str], source: str = "params.yaml"):
        self.problems = problems
        if len(problems) == 1:  # one problem, one line
            super().__init__(f"invalid parameters in {source}: {problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid parameters in {source}:\n{lines}")


@dataclass(frozen=True)
class Field:
    """One scalar or list parameter.

    kind: ``int``, ``float``, ``str``, ``bool`` or ``list``. Floats accept ints, and
    strings such as ``"1e-3"`` (YAML 1.1 readers leave those as strings).
    """

    kind: type
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    item: "Field | None" = None
    length: int | None = None
    doc: str = ""
    #: Whether ``null`` (None) is accepted, e.g. "inherit the top-level value".
    nullable: bool = False
    #: For ``str``: a regular expression the whole value must match (``doc`` says what it allows).
    pattern: str | None = None


@dataclass(frozen=True)
class Entries:
    """A map of user-chosen names to entries whose schema is picked by ``key``."""

    key: str
    schemas: Mapping[str, Mapping[str, Any]]
    min_entries: int = 0
    name_pattern_doc: str = "letters, digits, '_' and '-'"


@dataclass(frozen=True)
class Variant:
    """A mapping whose schema is picked by the value of one of its keys (e.g. ``backbone.name``)."""

    key: str
    schemas: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Section:
    """A fixed mapping of keys to sub-schemas; keys in ``optional`` may be left out."""

    fields: Mapping[str, Any] = field(default_factory=dict)
    optional: frozenset = frozenset()


@dataclass(frozen=True)
class Named:
    """A map of user-chosen names to values of one schema (a group of presets).

    ``reserved`` names have their own schema (e.g. the recipe ``none``: no training).
    """

    spec: Any
    reserved: Mapping[str, Any] = field(default_factory=dict)
    name_pattern_doc: str = "letters, digits, '_' and '-'"


def _positive_int(doc: str = "") -> Field:
    return Field(int, min=1, doc=doc)


def _nonneg_float(doc: str = "") -> Field:
    return Field(float, min=0.0, doc=doc)


TRAIN = Section(
    {
        "epochs": _positive_int(),
        "batch_size": _positive_int(),
        "lr": Field(float, min=0.0, min_exclusive=True),
        "weight_decay": _nonneg_float(),
        "optimizer": Field(str, choices=("adam", "adamw", "sgd")),
        "betas": Field(list, item=Field(float, min=0.0, max=1.0), length=2),
        "scheduler": Field(str, choices=("none", "cosine", "plateau")),
        "grad_clip": _nonneg_float("0 disables clipping"),
        "max_steps": Field(int, min=0, doc="0: no limit"),
        "amp": Field(bool),
        "num_workers": Field(int, min=0),
        "log_every": _positive_int(),
        "device": Field(str, choices=("auto", "cpu", "cuda")),
    }
)

#: An entry's own ``train`` keys: any of a recipe's, replacing the recipe's value.
TRAIN_OVERRIDES = Section(TRAIN.fields, optional=frozenset(TRAIN.fields))

BACKBONE_SCHEMAS: dict[str, Mapping[str, Any]] = {
    # The down path of MONAI's BasicUNetPlusPlus (chestssl.models.unet.UNetEncoder).
    "unet_encoder": {
        "name": Field(str),
        "spatial_dims": Field(int, choices=(2, 3)),
        "features": Field(list, item=Field(int, min=1), length=5),
    },
    # VQGAN-style convolutional encoder with attention (chestssl.models.cnn_attention).
    "cnn_attention": {
        "name": Field(str),
        "spatial_dims": Field(int, choices=(2, 3)),
        "channels": _positive_int("width of the first level"),
        "channel_multipliers": Field(list, item=Field(int, min=1), doc="one per level, at most 5"),
        "num_res_blocks": _positive_int(),
        "latent_channels": _positive_int(),
        "norm_num_groups": _positive_int("must divide every level width"),
    },
    # The Swin transformer of MONAI's SwinUNETR (chestssl.models.swin).
    "swin": {
        "name": Field(str),
        "spatial_dims": Field(int, choices=(2, 3)),
        "feature_size": Field(int, min=12, doc="a multiple of 12"),
        "patch_size": _positive_int(),
        "window_size": _positive_int(),
        "depths": Field(list, item=Field(int, min=1), length=4),
        "num_heads": Field(list, item=Field(int, min=1), length=4),
    },
}
# MONAI's ResNet without its fc (chestssl.models.resnet); seed 001's backbone.
for _resnet in ("resnet18", "resnet50"):
    BACKBONE_SCHEMAS[_resnet] = {
        "name": Field(str),
        "spatial_dims": Field(int, choices=(2, 3)),
        "block_inplanes": Field(list, item=Field(int, min=1), length=4, doc="widths of layer1..4; MONAI: 64..512"),
    }
# A ViT with a CLS token (chestssl.models.vit); seed 004's encoder.
BACKBONE_SCHEMAS["vit"] = {
    "name": Field(str),
    "spatial_dims": Field(int, choices=(2, 3)),
    "img_size": _positive_int("side of the input; equal to slices.size (2D) or crops.size (3D)"),
    "patch_size": _positive_int("divides img_size"),
    "hidden_size": _positive_int("a multiple of num_heads"),
    "num_layers": _positive_int(),
    "num_heads": _positive_int(),
    "mlp_dim": _positive_int(),
}
BACKBONE = Variant("name", BACKBONE_SCHEMAS)

#: How entries name their presets: ``backbone: <name>`` (under ``backbones``) and
#: ``recipe: <name>`` (under ``recipes``, the loop's settings; ``none``: not trained).
BACKBONE_REF = Field(str, doc="a name under `backbones`")
RECIPE_REF = Field(str, doc="a name under `recipes`")
#: The recipe of entries that are not trained (scratch initialisations).
NO_RECIPE = "none"

# The decoder, quantizer and loss of seed 000's autoencoders (chestssl.models.vqgan).
AE_DECODER = Section(
    {
        "channels": _positive_int("width of the full-resolution level"),
        "channel_multipliers": Field(list, item=Field(int, min=1), doc="one per level"),
        "num_res_blocks": _positive_int(),
        "norm_num_groups": _positive_int(),
        "latent_channels": _positive_int("channels of the (quantised) latent the decoder reads"),
    }
)
QUANTIZER = Section(
    {
        "enabled": Field(bool),
        "codebook_size": Field(int, min=2),
        "dim": _positive_int(),
        "beta": _nonneg_float("commitment weight"),
    }
)
AE_LOSS = Section(
    {
        "l1": _nonneg_float(),
        "ssim": _nonneg_float(),
        "perceptual": _nonneg_float("needs perceptual_weights"),
        "perceptual_weights": Field(str, doc="a local TorchScript feature network; empty: none"),
        "codebook": _nonneg_float("weight of codebook + beta * commitment"),
        "adversarial": _nonneg_float("factor of the (adaptive) generator loss; 0: no discriminator"),
        "adaptive_weight": Field(bool),
        "disc_start": Field(int, min=0, doc="step at which the discriminator starts"),
        "disc_layers": _positive_int(),
        "disc_channels": _positive_int(),
    }
)
_SEG_LOSS_KEYS = {
    "seg_loss": Field(str, choices=("ce", "dice", "focal")),
    "seg_class_weights": Field(list, item=_nonneg_float(), length=2),
    "focal_gamma": _nonneg_float(),
    "focal_alpha": Field(float, min=0.0, max=1.0),
}

METHOD_SCHEMAS: dict[str, Mapping[str, Any]] = {
    "scratch": {"method": Field(str), "backbone": BACKBONE_REF, "recipe": RECIPE_REF},
    "ae": {
        "method": Field(str),
        "backbone": BACKBONE_REF,
        "loss": Section({"l1": _nonneg_float(), "ssim": _nonneg_float()}),
        "recipe": RECIPE_REF,
    "train": TRAIN_OVERRIDES,
    },
    "vqgan": {
        "method": Field(str),
        "backbone": BACKBONE_REF,
        "decoder": AE_DECODER,
        "quantizer": QUANTIZER,
        "loss": AE_LOSS,
        "recipe": RECIPE_REF,
    "train": TRAIN_OVERRIDES,
    },
}

# Seed 001's Barlow Twins (chestssl.methods.barlow_twins).
METHOD_SCHEMAS["barlow_twins"] = {
    "method": Field(str),
    "backbone": BACKBONE_REF,
    "projector_dim": _positive_int("output of the bias-free linear projector"),
    "lambda": _nonneg_float("weight of the off-diagonal (redundancy) term; seed 001: 5e-3"),
    "augment": Section(
        {
            "p": Field(float, min=0.0, max=1.0, doc="probability of each augmentation"),
            "crop_scale": Field(list, item=Field(float, min=0.0, max=1.0, min_exclusive=True), length=2),
            "blur_sigma": Field(list, item=_nonneg_float(), length=2),
            "perspective": Field(float, min=0.0, max=0.5, doc="corner displacement, a fraction of the side"),
            "noise_std": _nonneg_float(),
        }
    ),
    "recipe": RECIPE_REF,
    "train": TRAIN_OVERRIDES,
}
# Seed 003's Disruptive Autoencoders (chestssl.methods.dae).
METHOD_SCHEMAS["dae"] = {
    "method": Field(str),
    "backbone": BACKBONE_REF,
    "disruption": Field(str, choices=("denoise", "superres", "local", "all")),
    "noise_variance": _nonneg_float("variance of the added Gaussian noise; seed 003: 0.1"),
    "downsample_factor": Field(int, min=2, doc="nearest down- then up-sampling factor; seed 003: 4"),
    "local_fraction": Field(float, min=0.0, max=1.0, doc="fraction of patch-embedding channels zeroed; seed 003: 0.6"),
    "mm_con": _nonneg_float("weight of the cross-modal contrastive term; seed 003: 0.03"),
    "temperature": Field(float, min=0.0, min_exclusive=True),
    "recipe": RECIPE_REF,
    "train": TRAIN_OVERRIDES,
}
# Seed 004's masked autoencoders (chestssl.methods.mae).
_MAE = {
    "method": Field(str),
    "backbone": BACKBONE_REF,
    "mask_ratio": Field(float, min=0.0, max=1.0, min_exclusive=True),
    "norm_pix_loss": Field(bool),
    "decoder_hidden_size": _positive_int(),
    "decoder_num_layers": _positive_int(),
    "decoder_num_heads": _positive_int(),
    "recipe": RECIPE_REF,
    "train": TRAIN_OVERRIDES,
}
METHOD_SCHEMAS["mae"] = _MAE
METHOD_SCHEMAS["diffmae"] = {
    **_MAE,
    "num_steps": Field(int, min=2, doc="diffusion steps; seed 004: 100"),
    "beta_start": Field(float, min=0.0, max=1.0, min_exclusive=True),
    "beta_end": Field(float, min=0.0, max=1.0, min_exclusive=True),
}

MULTIHEAD_SCHEMAS: dict[str, Mapping[str, Any]] = {
    "multihead": {
        "method": Field(str),
        "heads": Field(list, item=Field(str, choices=("seg", "cls")), doc="seg, cls or both"),
        "seg_beta": Field(float, min=0.0, nullable=True, doc="null: the top-level seg_beta"),
        "cls_weight": _nonneg_float(),
        **_SEG_LOSS_KEYS,
        "cls_arch": Field(str, choices=("resnet18", "resnet50")),
        "cls_class_weights": Field(list, item=_nonneg_float(), length=2),
        "backbone": BACKBONE_REF,
        "decoder": AE_DECODER,
        "quantizer": QUANTIZER,
        "loss": AE_LOSS,
        "recipe": RECIPE_REF,
    "train": TRAIN_OVERRIDES,
    }
}

_SEG_RUN = {
    "task": Field(str),
    "arch": Field(str, choices=("unetpp", "swin_unetr")),
    "init": Field(str, doc="an entry name under `methods` or `multihead`"),
    "loss": Field(str, choices=("ce", "dice", "focal")),
    "class_weights": Field(list, item=_nonneg_float(), length=2),
    "focal_gamma": _nonneg_float(),
    "focal_alpha": Field(float, min=0.0, max=1.0),
    "recipe": RECIPE_REF,
    "train": TRAIN_OVERRIDES,
}
_CLS_RUN = {
    "task": Field(str),
    "arch": Field(str, choices=("resnet18", "resnet50", "linear"), doc="ResNet on the latent, or a linear head"),
    "init": Field(str, doc="an entry name under `methods` or `multihead`"),
    "class_weights": Field(list, item=_nonneg_float(), length=2),
    "recipe": RECIPE_REF,
    "train": TRAIN_OVERRIDES,
}
RUN_SCHEMAS: dict[str, Mapping[str, Any]] = {"seg": _SEG_RUN, "cls": _CLS_RUN}


def _entry(fields: Mapping[str, Any]) -> Section:
    """An entry's schema: its own ``train`` keys are optional (the recipe has them all)."""
    return Section(dict(fields), optional=frozenset({"train"}) & set(fields))


METHOD_SCHEMAS = {kind: _entry(fields) for kind, fields in METHOD_SCHEMAS.items()}
MULTIHEAD_SCHEMAS = {kind: _entry(fields) for kind, fields in MULTIHEAD_SCHEMAS.items()}
RUN_SCHEMAS = {kind: _entry(fields) for kind, fields in RUN_SCHEMAS.items()}

SCHEMA = Section(
    {
        "seed": Field(int, min=0),
        "seg_beta": _nonneg_float("weight of the segmentation loss in multihead pretraining"),
        "data": Section(
            {
                "source": Field(str, choices=("phantom", "tcia", "local")),
                "phantom": Section(
                    {
                        "num_scans": Field(int, min=1, max=1018),
                        "seed": Field(int, min=0),
                        "max_slices": Field(int, min=0, doc="0: no limit"),
                        "noise_hu": _nonneg_float(),
                    }
                ),
                "tcia": Section(
                    {
                        "base_url": Field(
                            str, pattern=r"(?i)https?://(\[[0-9a-f:.]+\]|[^\s/?#@\[\]:]+)(:[0-9]{1,5})?([/?#]\S*)?",
                            doc="an http(s) URL with a host, e.g. "
                                "https://services.cancerimagingarchive.net/nbia-api/services/v1",
                        ),
                        "collection": Field(str),
                        "modality": Field(str),
                        "patients": Field(list, item=Field(str)),
                        "max_patients": Field(int, min=0, doc="0: no limit"),
                        "retries": Field(int, min=0),
                        "backoff_s": _nonneg_float(),
                        "timeout_s": Field(float, min=0.0, min_exclusive=True,
                                           doc="to connect, and between received bytes"),
                        "min_rate_kbps": _nonneg_float(
                            "kilobits/s; a request may take timeout_s + its expected size at this rate; 0: no deadline"
                        ),
                    }
                ),
                "local": Section({"path": Field(str)}),
                "cxr": Section(
                    {
                        "source": Field(
                            str, choices=("rendered", "chexpert", "chestxray14", "covid_radiography", "mimic_cxr"),
                            doc="rendered from the CT, or a real chest X-ray dataset at `root`",
                        ),
                        "root": Field(str, doc="the dataset's folder in its published layout; unused when rendered"),
                        "labels": Field(list, item=Field(str), doc="labels to keep; empty: all of the dataset's"),
                        "uncertain": Field(str, choices=("positive", "negative", "ignore"),
                                           doc="CheXpert / MIMIC-CXR uncertain labels (-1)"),
                        "frontal_only": Field(bool),
                        "val_fraction": Field(float, min=0.0, max=1.0, doc="share of the training patients for val"),
                        "test_fraction": Field(float, min=0.0, max=1.0, doc="COVID-19 Radiography only"),
                        "seed": Field(int, min=0, doc="seeds the val (and COVID-19 test) draw"),
                    }
                ),
            }
        ),
        "preprocess": Section(
            {
                "spacing": Field(list, item=Field(float, min=0.0, min_exclusive=True), length=3),
                "hu_window": Field(list, item=Field(float, min=-2000.0, max=4000.0), length=2),
                "body_threshold_hu": Field(float, min=-1100.0, max=1000.0),
                "clevel": Field(float, min=0.0, max=1.0, min_exclusive=True),
                "min_nodule_pixels": Field(int, min=0),
                "split": Section(
                    {
                        "seed": Field(int, min=0),
                        "train": Field(float, min=0.0, max=1.0),
                        "val": Field(float, min=0.0, max=1.0),
                        "test": Field(float, min=0.0, max=1.0),
                    }
                ),
                "workers": _positive_int(),
                "on_error": Field(str, choices=("raise", "skip")),
            }
        ),
        "slices": Section(
            {
                "size": Field(int, min=32, max=1024, doc="the UNet encoder pools 4 times and needs >= 2 pixels at 1/16"),
                "clean_per_nodule_slice": _nonneg_float(),
            }
        ),
        "radiographs": Section(
            {
                "size": Field(int, min=32, max=1024, doc="a multiple of 16"),
                "mu_water_per_mm": Field(float, min=0.0, min_exclusive=True, doc="linear attenuation of water per mm"),
                "window_percentiles": Field(list, item=Field(float, min=0.0, max=100.0), length=2),
            }
        ),
        "pretrain_radiographs": Section(
            {
                "methods": Field(list, item=Field(str), doc="`methods` entries (2D) also trained on the radiographs"),
                "study_methods": Field(
                    list, item=Field(str), doc="`mae` / `diffmae` entries also trained on whole studies (bottleneck CLS)"
                ),
                "views": Field(list, item=Field(str, choices=("frontal", "lateral"))),
                "train": Section(
                    {
                        "epochs": _positive_int("replaces the entry's train.epochs"),
                        "batch_size": _positive_int("replaces the entry's train.batch_size"),
                    }
                ),
            }
        ),
        "cross_modal": Section(
            {
                "methods": Field(list, item=Field(str), doc="2D `dae` entries also trained on CT slices and radiographs"),
                "views": Field(list, item=Field(str, choices=("frontal", "lateral"))),
                "radiograph_fraction": Field(float, min=0.0, max=1.0, min_exclusive=True,
                                             doc="share of each epoch's items that are radiographs, below 1"),
            }
        ),
        "alignment": Section(
            {
                "feature_method": Field(str, doc="a pretrain_radiographs method whose frozen encoder gives the feature loss"),
                "block_inplanes": Field(list, item=Field(int, min=1), length=4, doc="widths of the STN's ResNet-18 trunk"),
                "steps": _positive_int(),
                "batch_size": _positive_int(),
                "lr": Field(float, min=0.0, min_exclusive=True),
                "weight_decay": _nonneg_float(),
                "pixel_weight": _nonneg_float("weight of the pixel MSE to the canonical chest; seed 002: 15"),
                "max_shift": Field(float, min=0.0, max=1.0, doc="share of the image side"),
                "max_scale": Field(float, min=0.0, max=1.0, doc="relative scale change"),
                "max_rotation_deg": Field(float, min=0.0, max=180.0),
                "max_brightness": Field(float, min=0.0, max=1.0),
                "max_contrast": Field(float, min=0.0, max=1.0),
                "num_examples": _positive_int("radiographs in the report's alignment figure"),
                "max_images": Field(int, min=0, doc="frontal radiographs per split at most (whole patients); 0: all"),
            }
        ),
        "crops": Section(
            {
                "size": Field(int, min=8, doc="side of the cubic crops of 3D methods; seed 003: 96"),
                "per_scan": _positive_int("crops drawn per scan"),
                "positive_fraction": Field(float, min=0.0, max=1.0, doc="share of crops centred on a nodule"),
            }
        ),
        "probe": Section(
            {
                "every_epochs": Field(int, min=0, doc="linear probe during pretraining every N epochs; 0: only at the end"),
                "C": Field(float, min=0.0, min_exclusive=True, doc="inverse L2 strength of the logistic regression"),
                "max_iter": _positive_int(),
            }
        ),
        "recipes": Named(TRAIN, reserved={NO_RECIPE: Section({})}),
        "backbones": Named(BACKBONE),
        "methods": Entries("method", METHOD_SCHEMAS, min_entries=1),
        "multihead": Entries("method", MULTIHEAD_SCHEMAS),
        "runs": Entries("task", RUN_SCHEMAS),
        "label_fraction": Section(
            {
                "fractions": Field(list, item=Field(float, min=0.0, max=1.0, min_exclusive=True),
                                   doc="shares of the training patients; seed 001: 1, 5, 10, 25, 50, 100%"),
                "runs": Field(list, item=Field(str), doc="`runs` entries repeated at each fraction"),
            }
        ),
        "frozen_parts": Section(
            {
                "unfrozen_stages": Field(list, item=Field(int, min=0),
                                         doc="encoder stages trained with the head, deepest first; 0: head only"),
                "runs": Field(list, item=Field(str), doc="`runs` entries (task cls) repeated per setting"),
            }
        ),
        "evaluate": Section(
            {
                "bootstrap_samples": Field(int, min=0),
                "confidence": Field(float, min=0.0, max=1.0, min_exclusive=True),
                "seg_threshold": Field(float, min=0.0, max=1.0),
                "cls_threshold": Field(float, min=0.0, max=1.0),
            }
        ),
        "report": Section({"num_examples": _positive_int()}),
    }
)


def _describe(spec: Field) -> str:
    if spec.choices is not None:
        return "one of " + ", ".join(repr(c) for c in spec.choices)
    name = spec.kind.__name__
    if spec.kind is list:
        inner = _describe(spec.item) if spec.item else "values"
        size = f"{spec.length} " if spec.length else ""
        return f"a list of {size}{inner if spec.item else inner}"
    bounds = []
    if spec.min is not None:
        bounds.append(f"{'>' if spec.min_exclusive else '>='} {spec.min:g}")
    if spec.max is not None:
        bounds.append(f"<= {spec.max:g}")
    text = f"{'a number' if spec.kind is float else 'an integer' if spec.kind is int else 'a ' + name}"
    if bounds:
        text += " " + " and ".join(bounds)
    if spec.doc:
        text += f" ({spec.doc})"
    return text


def _check_field(value: Any, spec: Field, key: str, problems: list[str]) -> Any:
    def bad() -> None:
        problems.append(f"{key}: got {value!r}, expected {_describe(spec)}" + (" or null" if spec.nullable else ""))

    if value is None and spec.nullable:
        return None

    if spec.kind is bool:
        if not isinstance(value, bool):
            return bad()
        return value
    if spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return bad()
    elif spec.kind is float:
        if isinstance(value, bool):
            return bad()
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return bad()
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return bad()
        value = float(value)
    elif spec.kind is str:
        if not isinstance(value, str) or (spec.pattern is not None and re.fullmatch(spec.pattern, value) is None):
            return bad()
    elif spec.kind is list:
        if not isinstance(value, list) or (spec.length is not None and len(value) != spec.length):
            return bad()
        if spec.item is not None:
            return [_check_field(v, spec.item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return value
    if spec.choices is not None and value not in spec.choices:
        return bad()
    if spec.min is not None and (value < spec.min or (spec.min_exclusive and value == spec.min)):
        return bad()
    if spec.max is not None and value > spec.max:
        return bad()
    return value


def _check(value: Any, spec: Any, key: str, problems: list[str]) -> Any:
    if isinstance(spec, Field):
        return _check_field(value, spec, key, problems)
    if isinstance(spec, Mapping):
        spec = Section(spec)
    if isinstance(spec, Section):
        if not isinstance(value, Mapping):
            problems.append(f"{key}: got {value!r}, expected a mapping with keys {', '.join(spec.fields)}")
            return value
        out = {}
        for name in value:
            if name not in spec.fields:
                problems.append(
                    f"{_join(key, name)}: unknown key; allowed here: {', '.join(spec.fields)}"
                )
        for name, sub in spec.fields.items():
            if name not in value and name in spec.optional:
                continue
            if name not in value:
                problems.append(f"{_join(key, name)}: missing; expected {_expected(sub)}")
                continue
            out[name] = _check(value[name], sub, _join(key, name), problems)
        return out
    if isinstance(spec, Variant):
        if not isinstance(value, Mapping) or spec.key not in value:
            problems.append(f"{key}: expected a mapping with `{spec.key}` (one of {', '.join(spec.schemas)})")
            return value
        kind = value[spec.key]
        if kind not in spec.schemas:
            problems.append(
                f"{_join(key, spec.key)}: got {kind!r}, expected one of " + ", ".join(repr(k) for k in spec.schemas)
            )
            return value
        return _check(value, spec.schemas[kind], key, problems)
    if isinstance(spec, Named):
        if not isinstance(value, Mapping):
            problems.append(f"{key}: got {value!r}, expected a mapping of named presets")
            return value
        out = {}
        for name, preset in value.items():
            preset_key = _join(key, str(name))
            if not _valid_name(name):
                problems.append(f"{preset_key}: preset names may contain only {spec.name_pattern_doc}")
                continue
            out[name] = _check(preset, spec.reserved.get(name, spec.spec), preset_key, problems)
        return out
    if isinstance(spec, Entries):
        if not isinstance(value, Mapping) or len(value) < spec.min_entries:
            problems.append(f"{key}: expected a mapping of at least {spec.min_entries} named entries")
            return value
        out = {}
        for name, entry in value.items():
            entry_key = _join(key, str(name))
            if not _valid_name(name):
                problems.append(f"{entry_key}: entry names may contain only {spec.name_pattern_doc}")
            if not isinstance(entry, Mapping) or spec.key not in entry:
                problems.append(f"{entry_key}: missing `{spec.key}` (one of {', '.join(spec.schemas)})")
                continue
            kind = entry[spec.key]
            if kind not in spec.schemas:
                problems.append(
                    f"{_join(entry_key, spec.key)}: got {kind!r}, expected one of "
                    + ", ".join(repr(k) for k in spec.schemas)
                )
                continue
            out[name] = _check(entry, spec.schemas[kind], entry_key, problems)
        return out
    raise TypeError(f"bad schema at {key}: {spec!r}")


def _valid_name(name: Any) -> bool:
    """Whether ``name`` may name an entry or a preset: letters, digits, '_' and '-'."""
    return isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum()


def _expected(spec: Any) -> str:
    return _describe(spec) if isinstance(spec, Field) else "a mapping"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _cross_checks(params: dict, problems: list[str]) -> None:
    split = params.get("preprocess", {}).get("split", {})
    if all(isinstance(split.get(k), float) for k in ("train", "val", "test")):
        total = split["train"] + split["val"] + split["test"]
        if abs(total - 1.0) > 1e-6:
            problems.append(f"preprocess.split: train + val + test = {total:g}, expected 1")
    window = params.get("preprocess", {}).get("hu_window")
    if isinstance(window, list) and len(window) == 2 and all(isinstance(w, float) for w in window):
        if window[0] >= window[1]:
            problems.append(f"preprocess.hu_window: got {window}, expected [low, high] with low < high")
    radiographs = params.get("radiographs", {})
    if isinstance(radiographs.get("size"), int) and radiographs["size"] % 16:
        problems.append(f"radiographs.size: got {radiographs['size']}, expected a multiple of 16")
    low_high = radiographs.get("window_percentiles")
    if isinstance(low_high, list) and len(low_high) == 2 and low_high[0] >= low_high[1]:
        problems.append(f"radiographs.window_percentiles: got {low_high}, expected [low, high] with low < high")
    _check_radiograph_pretraining(params, problems)
    _check_cross_modal(params, problems)
    feature_method = (params.get("alignment") or {}).get("feature_method")
    listed = (params.get("pretrain_radiographs") or {}).get("methods") or []
    if isinstance(feature_method, str) and feature_method not in listed:
        problems.append(f"alignment.feature_method: got {feature_method!r}, expected one of pretrain_radiographs.methods "
                        f"({', '.join(listed) or 'none listed'}), whose encoders the pipeline trains")
    methods = params.get("methods") or {}
    multihead = params.get("multihead") or {}
    for name in sorted(set(methods) & set(multihead)):
        problems.append(
            f"multihead.{name}: the name is also used under `methods`; pretrained models are stored by name "
            "(models/pretrain/<name>), so rename one of them"
        )
    for name, run in (params.get("runs") or {}).items():
        init = run.get("init") if isinstance(run, Mapping) else None
        init_entry = methods.get(init) or multihead.get(init)
        if isinstance(init_entry, Mapping) and init_entry.get("backbone", {}).get("spatial_dims") == 3:
            problems.append(
                f"runs.{name}.init: {init!r} has a 3D backbone, but the downstream runs train on 2D slices; "
                "init the run from a method with backbone.spatial_dims 2"
            )
    for name, run in (params.get("runs") or {}).items():
        if isinstance(run, Mapping) and run.get("init") not in methods and run.get("init") not in multihead:
            problems.append(
                f"runs.{name}.init: got {run.get('init')!r}, expected an entry name under `methods` or "
                "`multihead`: " + ", ".join([*methods, *multihead])
            )
    _check_studies(params, problems)
    if params.get("data", {}).get("source") == "local" and not params["data"]["local"].get("path"):
        problems.append("data.local.path: empty, but data.source is 'local'; set it to your LIDC-IDRI folder")
    cxr = (params.get("data") or {}).get("cxr") or {}
    if cxr.get("source", "rendered") != "rendered" and not str(cxr.get("root") or "").strip():
        problems.append(f"data.cxr.root: empty, but data.cxr.source is {cxr.get('source')!r}; set it to the folder "
                        "holding that dataset in its published layout")


def _check_studies(params: dict, problems: list[str]) -> None:
    """The studies name existing runs, each once, and list at least one setting."""
    runs = params.get("runs") or {}
    for study, settings_key in (("label_fraction", "fractions"), ("frozen_parts", "unfrozen_stages")):
        block = params.get(study)
        if not isinstance(block, Mapping):
            continue
        named = block.get("runs") if isinstance(block.get("runs"), list) else []
        settings = block.get(settings_key) if isinstance(block.get(settings_key), list) else []
        if named and not settings:
            problems.append(f"{study}.{settings_key}: empty; list at least one setting, or empty {study}.runs")
        for name in sorted({n for n in named if named.count(n) > 1}):
            problems.append(f"{study}.runs: {name!r} is listed twice; each run is one stage ({study}@{name})")
        for name in named:
            if name not in runs:
                problems.append(f"{study}.runs: {name!r} is not an entry under `runs`: " + ", ".join(runs))
            elif study == "frozen_parts" and isinstance(runs[name], Mapping) and runs[name].get("task") != "cls":
                problems.append(
                    f"frozen_parts.runs: {name!r} is a {runs[name].get('task')!r} run; the frozen-parts study "
                    "freezes the encoder under a classification head, so list `task: cls` runs"
                )


def _check_radiograph_pretraining(params: dict, problems: list[str]) -> None:
    """``pretrain_radiographs`` names 2D ``methods`` entries, each once, fed radiographs of their input size;
    its ``study_methods`` are ``mae`` / ``diffmae`` entries, and studies have at least two views."""
    block = params.get("pretrain_radiographs")
    if not isinstance(block, Mapping):
        return
    methods = params.get("methods") or {}
    views = block.get("views") if isinstance(block.get("views"), list) else []
    for view in sorted({v for v in views if views.count(v) > 1}):
        problems.append(f"pretrain_radiographs.views: {view!r} is listed twice")
    size = (params.get("radiographs") or {}).get("size")
    listed = {key: block.get(key) if isinstance(block.get(key), list) else [] for key in ("methods", "study_methods")}
    if any(listed.values()) and not views:
        problems.append("pretrain_radiographs.views: empty; list frontal, lateral or both")
    for key, named in listed.items():
        where = f"pretrain_radiographs.{key}"
        for name in sorted({n for n in named if named.count(n) > 1}):
            problems.append(f"{where}: {name!r} is listed twice; each is one stage")
        for name in named:
            entry = methods.get(name)
            if not isinstance(entry, Mapping):
                problems.append(f"{where}: {name!r} is not an entry under `methods`: " + ", ".join(methods))
                continue
            backbone = entry.get("backbone") or {}
            if key == "study_methods" and entry.get("method") not in ("mae", "diffmae"):
                problems.append(f"{where}: {name!r} is a {entry.get('method')!r} entry; study-level pretraining "
                                "shares the ViT's CLS token among a study's views, so list `mae` or `diffmae` entries")
            if backbone.get("spatial_dims") != 2:
                problems.append(f"{where}: {name!r} has a {backbone.get('spatial_dims')}D backbone; "
                                "radiographs are 2D, so list entries with backbone.spatial_dims 2")
            elif backbone.get("name") == "vit" and backbone.get("img_size") != size:
                problems.append(f"{where}: {name!r} is a ViT built for {backbone.get('img_size')}-pixel "
                                f"inputs, but radiographs.size is {size}; set them equal")
        rendered = ((params.get("data") or {}).get("cxr") or {}).get("source", "rendered") == "rendered"
        if key == "study_methods" and named and len(views) == 1 and rendered:
            problems.append(f"pretrain_radiographs.study_methods: studies of the single view {views[0]!r} share "
                            "nothing; list both views in pretrain_radiographs.views or leave study_methods empty")


def _check_cross_modal(params: dict, problems: list[str]) -> None:
    """``cross_modal`` names 2D ``dae`` entries, each once, with views to mix in and some CT left."""
    block = params.get("cross_modal")
    if not isinstance(block, Mapping):
        return
    methods = params.get("methods") or {}
    named = block.get("methods") if isinstance(block.get("methods"), list) else []
    views = block.get("views") if isinstance(block.get("views"), list) else []
    for name in sorted({n for n in named if named.count(n) > 1}):
        problems.append(f"cross_modal.methods: {name!r} is listed twice; each is one stage")
    for view in sorted({v for v in views if views.count(v) > 1}):
        problems.append(f"cross_modal.views: {view!r} is listed twice")
    if named and not views:
        problems.append("cross_modal.views: empty; list frontal, lateral or both")
    if named and block.get("radiograph_fraction") == 1.0:
        problems.append("cross_modal.radiograph_fraction: got 1.0, expected a share below 1 (the rest are CT slices)")
    for name in named:
        entry = methods.get(name)
        if not isinstance(entry, Mapping):
            problems.append(f"cross_modal.methods: {name!r} is not an entry under `methods`: " + ", ".join(methods))
        elif entry.get("method") != "dae":
            problems.append(f"cross_modal.methods: {name!r} is a {entry.get('method')!r} entry; list `dae` entries, "
                            "whose loss has the cross-modal contrastive term")
        elif (entry.get("backbone") or {}).get("spatial_dims") != 2:
            problems.append(f"cross_modal.methods: {name!r} has a {(entry.get('backbone') or {}).get('spatial_dims')}D "
                            "backbone; radiographs are 2D, so list entries with backbone.spatial_dims 2")
        elif isinstance(entry.get("mm_con"), (int, float)) and entry["mm_con"] == 0:
            problems.append(f"cross_modal.methods: {name!r} has mm_con 0, so the contrastive term would stay off; "
                            f"set methods.{name}.mm_con > 0 (seed 003: 0.03)")


def _check_method_inputs(params: dict, problems: list[str]) -> None:
    """Sizes that must agree with the data a method is fed, and ordered schedules.

    A ViT preset is checked once, against the data of its dimension, and named with the
    entries that use it.
    """
    users: dict[str, list[str]] = {}
    for section in ("methods", "multihead"):
        for name, entry in (params.get(section) or {}).items():
            if isinstance(entry, Mapping) and isinstance(entry.get("backbone"), str):
                users.setdefault(entry["backbone"], []).append(f"{section}.{name}")
            if isinstance(entry, Mapping) and entry.get("method") == "diffmae" and entry["beta_start"] >= entry["beta_end"]:
                problems.append(
                    f"{section}.{name}: beta_start {entry['beta_start']:g} must be below beta_end {entry['beta_end']:g}"
                )
    for preset, backbone in (params.get("backbones") or {}).items():
        if preset not in users or backbone.get("name") != "vit":
            continue
        used_by = f" (the backbone of {', '.join(users[preset])})"
        three_d = backbone.get("spatial_dims") == 3
        side = params["crops"]["size"] if three_d else params["slices"]["size"]
        source = "crops.size" if three_d else "slices.size"
        if backbone.get("img_size") != side:
            problems.append(
                f"backbones.{preset}.img_size: got {backbone.get('img_size')}, but {source} is {side}; "
                f"the ViT's position embeddings are built for one input size, so set them equal{used_by}"
            )
        elif side % backbone.get("patch_size", 1):
            problems.append(
                f"backbones.{preset}.patch_size: got {backbone.get('patch_size')}, which does not "
                f"divide img_size {side}{used_by}"
            )


#: The sections whose entries name presets, and the references each entry holds.
PRESET_USERS = {"methods": ("backbone", "recipe"), "multihead": ("backbone", "recipe"), "runs": ("recipe",)}


def _resolve_presets(params: dict, problems: list[str]) -> dict:
    """``params`` with each entry's presets filled in: ``backbone: <name>`` becomes a copy
    of ``backbones.<name>``; ``recipe: <name>`` becomes ``train``, a copy of
    ``recipes.<name>`` updated with the entry's own ``train`` keys. Entries then look
    as if written out in full, so their consumers never see a preset name.
    """
    recipes = params.get("recipes") or {}
    backbones = params.get("backbones") or {}
    resolved = dict(params)
    for section, references in PRESET_USERS.items():
        entries = {}
        for name, raw_entry in (params.get(section) or {}).items():
            where = f"{section}.{name}"
            entry = copy.deepcopy(dict(raw_entry))
            if "backbone" in references:
                preset = entry["backbone"]
                if preset in backbones:
                    entry["backbone"] = copy.deepcopy(backbones[preset])
                else:
                    problems.append(f"{where}.backbone: got {preset!r}, expected a name under `backbones`: "
                                    + ", ".join(backbones))
            recipe = entry.pop("recipe")
            untrained = entry.get("method") == "scratch"
            if untrained and recipe != NO_RECIPE:
                problems.append(f"{where}.recipe: got {recipe!r}, but a scratch entry is not trained; "
                                f"set it to {NO_RECIPE!r}")
            elif not untrained and recipe == NO_RECIPE:
                problems.append(f"{where}.recipe: {NO_RECIPE!r} means not trained; name a training recipe under "
                                "`recipes`: " + ", ".join(r for r in recipes if r != NO_RECIPE))
            elif recipe not in recipes:
                problems.append(f"{where}.recipe: got {recipe!r}, expected a name under `recipes`: " + ", ".join(recipes))
            elif untrained and "train" in entry:
                problems.append(f"{where}.train: a scratch entry is not trained; remove its `train` keys")
            elif not untrained:
                entry["train"] = {**copy.deepcopy(recipes[recipe]), **entry.get("train", {})}
            entries[name] = entry
        resolved[section] = entries
    return resolved


#: The params sections whose entries are pretraining stages (``pretrain@<name>``).
PRETRAIN_SECTIONS = ("methods", "multihead")


def pretrain_entry(params: Mapping[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    """``(section, entry)`` of the pretraining entry ``name`` under ``methods`` or ``multihead``.

    A multihead entry whose ``seg_beta`` is null gets the top-level ``seg_beta`` here,
    so the model and its saved config carry the weight that was actually used.
    """
    for section in PRETRAIN_SECTIONS:
        entries = params.get(section) or {}
        if name in entries:
            entry = dict(entries[name])
            if section == "multihead" and entry.get("seg_beta") is None:
                entry["seg_beta"] = float(params["seg_beta"])
            return section, entry
    known = [n for section in PRETRAIN_SECTIONS for n in (params.get(section) or {})]
    raise ParamsError([f"{name!r} is not an entry under `methods` or `multihead` (known: {', '.join(known)})"])


def validate(raw: Mapping[str, Any], source: str = "params.yaml") -> dict[str, Any]:
    """Validate a parsed params mapping; returns it with floats normalised and every
    entry's presets filled in (:func:`_resolve_presets`).

    Raises :class:`ParamsError` listing every problem found.
    """
    problems: list[str] = []
    params = _check(raw, SCHEMA, "", problems)
    if not problems:
        checked, params = params, _resolve_presets(params, problems)
    if not problems:
        _check_method_inputs(checked, problems)  # on the presets, before they are copied into entries
        _cross_checks(params, problems)
    if problems:
        raise ParamsError(problems, source)
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (DVC refuses such a
    file too; the plain loader would silently keep the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); "
                    "keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file's content (safe types only); a syntax error or a duplicate key is a
    :class:`ParamsError` naming the file, the line and the column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found" + ("; it is a folder" if path.is_dir() else ""))
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ParamsError([f"{where}{problem}; fix the YAML (a DVC command would refuse it too)"], str(path)) from None
    except UnicodeDecodeError as exc:
        raise ParamsError([f"not UTF-8 text ({exc})"], str(path)) from None


#: The params files besides ``params.yaml`` (paths relative to its folder) and the groups
#: each holds. DVC parses a params file once for every stage that reads a key from it, so
#: the large groups live in files of their own and a stage parses only those it reads
#: (dvc.yaml names them under ``vars`` and in the stages' ``params``).
PARAMS_FILES: dict[str, tuple[str, ...]] = {
    "params/presets.yaml": ("recipes", "backbones"),
    "params/methods.yaml": ("methods", "multihead"),
    "params/runs.yaml": ("runs",),
}


def params_file_of(group: str) -> str:
    """The params file (relative to the repository root) that holds the top-level ``group``."""
    for name, groups in PARAMS_FILES.items():
        if group in groups:
            return name
    return "params.yaml"


def read_raw_params(path: str | os.PathLike = "params.yaml") -> tuple[dict[str, Any], dict[str, str]]:
    """The params files as written, merged into one mapping, and the file of each group.

    ``path`` is ``params.yaml``; the files of :data:`PARAMS_FILES` are read from its
    folder. A missing file, a group in the wrong file or in two files is a
    :class:`ParamsError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run stages from the repository root")
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in ["params.yaml", *PARAMS_FILES]:
        file = path if name == "params.yaml" else path.parent / name
        if not file.exists():
            raise FileNotFoundError(f"{file} not found; it holds {', '.join(PARAMS_FILES[name])} "
                                    f"(a params file next to {path.name})")
        raw = read_yaml(file)
        if raw is not None and not isinstance(raw, Mapping):
            raise ParamsError([f"the file holds a {type(raw).__name__}, expected a mapping of keys to values"], str(file))
        for group, value in (raw or {}).items():
            home = params_file_of(str(group))
            if home != name:
                raise ParamsError([f"{group}: this group belongs in {home} (dvc.yaml reads it there); move it"],
                                  str(file))
            merged[group] = value
            sources[group] = name
    return merged, sources


def write_raw_params(raw: Mapping[str, Any], path: str | os.PathLike = "params.yaml") -> None:
    """Write a merged params mapping back to ``params.yaml`` and :data:`PARAMS_FILES`
    (plain YAML, without comments: for generated projects and tests)."""
    from chestssl.io import write_text

    path = Path(path)
    for name in ["params.yaml", *PARAMS_FILES]:
        file = path if name == "params.yaml" else path.parent / name
        part = {group: value for group, value in raw.items() if params_file_of(group) == name}
        file.parent.mkdir(parents=True, exist_ok=True)
        write_text(file, yaml.safe_dump(part, sort_keys=False))


def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    """Read and validate ``params.yaml`` and the params files next to it (:data:`PARAMS_FILES`)."""
    raw, sources = read_raw_params(path)
    try:
        return validate(raw, str(path))
    except ParamsError as exc:
        raise _locate(exc.problems, sources, Path(path)) from None


def _locate(problems: list[str], sources: Mapping[str, str], main: Path) -> ParamsError:
    """The error with each problem's file: the one holding the group its key starts with."""
    def file_of(problem: str) -> str:
        group = re.split(r"[.:\[ ]", problem, maxsplit=1)[0]
        name = sources.get(group, "params.yaml")
        return str(main) if name == "params.yaml" else str(main.parent / name)

    files = [file_of(p) for p in problems]
    if len(set(files)) == 1:
        return ParamsError(problems, files[0])
    return ParamsError([f"{file}: {problem}" for file, problem in zip(files, problems)], "the params files")
