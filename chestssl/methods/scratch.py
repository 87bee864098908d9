"""``scratch``: a seeded random initialisation of the backbone, the no-pretraining baseline.

Treating "no pretraining" as a method gives every downstream run the same shape of
inputs (an encoder file), so scratch-vs-pretrained comparisons differ only in weights.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
from torch import nn

from chestssl.methods.base import PretrainMethod
from chestssl.params import MethodConfig
from chestssl.models.backbones import build_backbone
from chestssl.models.seeding import seeded


class ScratchConfig(MethodConfig):
    """``method: scratch``: a backbone and no training (``recipe: none``)."""

    method: Literal["scratch"]


class Scratch(PretrainMethod):
    """The backbone of ``cfg["backbone"]`` initialised from ``seed``; nothing to train.

    The same seed gives the same weights as the encoder an ``ae`` run starts from.
    """

    Config = ScratchConfig
    trainable = False

    def __init__(self, name: str, cfg: Mapping[str, Any], seed: int):
        super().__init__(name, cfg, seed)
        with seeded(self.seed):
            self.backbone = build_backbone(self.cfg["backbone"])

    def encoder(self) -> nn.Module:
        return self.backbone

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        raise RuntimeError(
            f"methods.{self.name}: method 'scratch' is a random initialisation and has nothing to "
            "train; export it directly (check `trainable` before training)"
        )

    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        raise RuntimeError(
            f"methods.{self.name}: method 'scratch' is a random initialisation and has nothing to "
            "validate; export it directly (check `trainable` before training)"
        )
