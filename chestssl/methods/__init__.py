"""Pretext methods, one module each, behind one interface (:class:`PretrainMethod`).

Adding a method is one module here, one entry in :data:`METHODS` and one schema in
``chestssl.params.METHOD_SCHEMAS`` (or ``MULTIHEAD_SCHEMAS``); no stage script changes.
A method that also trains on whole radiograph studies (seed 004's bottleneck CLS, stage
``pretrain_radiograph_studies``) gives its study-level class in :data:`STUDY_LEVEL`, under
the same ``method`` name; :func:`build_method` picks it with ``level="study"``.

Besides the pretext methods, :mod:`chestssl.methods.alignment` holds seed 002's STN
objective, which the training loop fits the same way.
"""

from __future__ import annotations

from typing import Any, Mapping

from chestssl.methods.ae import AutoencoderPretraining
from chestssl.methods.barlow_twins import BarlowTwinsPretraining
from chestssl.methods.base import PretrainMethod
from chestssl.methods.dae import DisruptiveAutoencoderPretraining
from chestssl.methods.mae import DiffusionMaskedAutoencoderPretraining, MaskedAutoencoderPretraining
from chestssl.methods.multihead import MultiheadAutoencoder
from chestssl.methods.scratch import Scratch
from chestssl.methods.study_mae import StudyDiffusionMaskedAutoencoder, StudyMaskedAutoencoder
from chestssl.methods.vqgan import VQGANAutoencoderPretraining

#: Method classes keyed by the ``method`` param of a ``methods`` entry.
METHODS: dict[str, type[PretrainMethod]] = {
    "scratch": Scratch,
    "ae": AutoencoderPretraining,
    "vqgan": VQGANAutoencoderPretraining,
    "multihead": MultiheadAutoencoder,
    "dae": DisruptiveAutoencoderPretraining,
    "barlow_twins": BarlowTwinsPretraining,
    "mae": MaskedAutoencoderPretraining,
    "diffmae": DiffusionMaskedAutoencoderPretraining,
}
#: The study-level class of the methods that have one, keyed by the same ``method`` names:
#: only masked-patch methods have a CLS token for the views of a study to share.
STUDY_LEVEL: dict[str, type[PretrainMethod]] = {
    "mae": StudyMaskedAutoencoder,
    "diffmae": StudyDiffusionMaskedAutoencoder,
}
#: What :func:`build_method` builds: one image (or slice, or crop) per item, or one study per item.
LEVELS = ("image", "study")


def build_method(name: str, cfg: Mapping[str, Any], seed: int, level: str = "image") -> PretrainMethod:
    """Build the method of the validated params entry ``methods.<name>`` (``cfg``).

    The class is picked by ``cfg["method"]`` (:data:`METHODS`, or :data:`STUDY_LEVEL` with
    ``level="study"``); ``seed`` seeds the initial weights.

    Raises:
        ValueError: an unknown ``method``, or one without a study-level form at ``level="study"``.
    """
    kind = cfg.get("method")
    if kind not in METHODS:
        raise ValueError(
            f"methods.{name}.method: got {kind!r}, expected one of {', '.join(map(repr, METHODS))}"
        )
    if level == "image":
        return METHODS[kind](name, cfg, seed)
    if level != "study":
        raise ValueError(f"level: got {level!r}, expected one of {', '.join(map(repr, LEVELS))}")
    if kind not in STUDY_LEVEL:
        raise ValueError(
            f"methods.{name}.method: got {kind!r}; study-level pretraining (bottleneck CLS) exists for "
            f"{', '.join(map(repr, STUDY_LEVEL))} only; list such entries in pretrain_radiographs.study_methods"
        )
    return STUDY_LEVEL[kind](name, cfg, seed)


__all__ = [
    "LEVELS",
    "METHODS",
    "STUDY_LEVEL",
    "AutoencoderPretraining",
    "BarlowTwinsPretraining",
    "DiffusionMaskedAutoencoderPretraining",
    "DisruptiveAutoencoderPretraining",
    "MaskedAutoencoderPretraining",
    "MultiheadAutoencoder",
    "PretrainMethod",
    "Scratch",
    "StudyDiffusionMaskedAutoencoder",
    "StudyMaskedAutoencoder",
    "VQGANAutoencoderPretraining",
    "build_method",
]
