"""Pretext methods, one module each, behind one interface (:class:`PretrainMethod`).

A method is one module of this package holding its params entry's config (a
:class:`chestssl.params.MethodConfig` with ``method: Literal["<name>"]``) and its class (a
:class:`PretrainMethod` whose ``Config`` is that config). Defining the class registers it
(:data:`~chestssl.methods.base.REGISTRY`), and importing this package imports every module
in it, so the registry (:data:`METHODS`), the params check of the entries
(:func:`method_configs`) and the stages all follow from the module; nothing else lists
methods. A method that also trains on whole radiograph studies (seed 004's bottleneck CLS,
stage ``pretrain_radiograph_studies``) has a second class with ``level = "study"`` under
the same config.

Besides the pretext methods, :mod:`chestssl.methods.alignment` holds seed 002's STN
objective, which the training loop fits the same way.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

from chestssl.methods.base import LEVELS, REGISTRY, PretrainMethod
from chestssl.params import MethodConfig, load_params

# Every module of the package, so that each method's class registers itself.
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")

from chestssl.methods.ae import AutoencoderPretraining  # noqa: E402  (the public names)
from chestssl.methods.barlow_twins import BarlowTwinsPretraining  # noqa: E402
from chestssl.methods.dae import DisruptiveAutoencoderPretraining  # noqa: E402
from chestssl.methods.mae import DiffusionMaskedAutoencoderPretraining, MaskedAutoencoderPretraining  # noqa: E402
from chestssl.methods.multihead import MultiheadAutoencoder  # noqa: E402
from chestssl.methods.scratch import Scratch  # noqa: E402
from chestssl.methods.study_mae import StudyDiffusionMaskedAutoencoder, StudyMaskedAutoencoder  # noqa: E402
from chestssl.methods.vqgan import VQGANAutoencoderPretraining  # noqa: E402

#: Method classes keyed by the ``method`` param of a ``methods`` or ``multihead`` entry.
METHODS: dict[str, type[PretrainMethod]] = REGISTRY["image"]
#: The study-level class of the methods that have one, keyed by the same ``method`` names:
#: only masked-patch methods have a CLS token for the views of a study to share.
STUDY_LEVEL: dict[str, type[PretrainMethod]] = REGISTRY["study"]


def method_configs() -> dict[str, type[MethodConfig]]:
    """``{method name: its params config}`` of every registered method."""
    return {name: cls.Config for name, cls in METHODS.items()}


def load_checked_params(path: str = "params.yaml") -> dict[str, Any]:
    """:func:`chestssl.params.load_params` with every pretraining entry checked against its
    method's config (what a stage that builds methods reads)."""
    return load_params(path, method_configs())


def build_method(name: str, cfg: Mapping[str, Any], seed: int, level: str = "image") -> PretrainMethod:
    """Build the method of the validated params entry ``name`` (``cfg``).

    The class is picked by ``cfg["method"]`` (:data:`METHODS`, or :data:`STUDY_LEVEL` with
    ``level="study"``); ``seed`` seeds the initial weights.

    Raises:
        ValueError: an unknown ``method``, or one without a study-level form at ``level="study"``.
    """
    if level not in LEVELS:
        raise ValueError(f"level: got {level!r}, expected one of {', '.join(map(repr, LEVELS))}")
    kind = cfg.get("method")
    if kind not in METHODS:
        raise ValueError(f"{name}: unknown method {kind!r}; known: {', '.join(map(repr, METHODS))}")
    if level == "study" and kind not in STUDY_LEVEL:
        raise ValueError(
            f"{name}: method {kind!r} has no study-level form (bottleneck CLS); those that have one: "
            f"{', '.join(map(repr, STUDY_LEVEL))}"
        )
    return REGISTRY[level][kind](name, cfg, seed)


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
    "load_checked_params",
    "method_configs",
]
