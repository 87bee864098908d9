"""Pretext methods, one module each, behind one interface (:class:`PretrainMethod`).

Adding a method is one module here, one entry in :data:`METHODS` and one schema in
``chestssl.params.METHOD_SCHEMAS`` (or ``MULTIHEAD_SCHEMAS``); no stage script changes.
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


def build_method(name: str, cfg: Mapping[str, Any], seed: int) -> PretrainMethod:
    """Build the method of the validated params entry ``methods.<name>`` (``cfg``).

    The class is picked by ``cfg["method"]``; ``seed`` seeds the initial weights.
    """
    kind = cfg.get("method")
    if kind not in METHODS:
        raise ValueError(
            f"methods.{name}.method: got {kind!r}, expected one of {', '.join(map(repr, METHODS))}"
        )
    return METHODS[kind](name, cfg, seed)


__all__ = [
    "METHODS",
    "AutoencoderPretraining",
    "BarlowTwinsPretraining",
    "DiffusionMaskedAutoencoderPretraining",
    "DisruptiveAutoencoderPretraining",
    "MaskedAutoencoderPretraining",
    "MultiheadAutoencoder",
    "PretrainMethod",
    "Scratch",
    "VQGANAutoencoderPretraining",
    "build_method",
]
