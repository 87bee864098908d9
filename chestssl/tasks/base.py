"""The interface of downstream task models (what ``finetune`` trains and ``evaluate`` scores).

Same training-loop contract as :class:`chestssl.methods.PretrainMethod`:
``training_step(batch)`` (key ``"loss"`` optimised), ``validation_step(batch)`` (scalar
metrics of one batch), ``validation_epoch_end()`` (metrics over the current validation
pass, e.g. AUROC and the global Dice; see :mod:`chestssl.models.stepped`), plus
``predict(batch)`` for evaluation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import torch

from chestssl.models.stepped import SteppedModule
from chestssl.models.backbones import backbone_name


class TaskModel(SteppedModule, ABC):
    """Base of the downstream models; the whole network (encoder included) is trained.

    Args:
        name: the run's entry name under ``runs`` in params.yaml (for messages).
        run_cfg: the validated ``runs.<name>`` entry.
        seed: seed of the randomly initialised parts (decoder or head).
    """

    def __init__(self, name: str, run_cfg: Mapping[str, Any], seed: int):
        super().__init__()
        self.name = name
        self.run_cfg = dict(run_cfg)
        self.seed = int(seed)

    def checked_arch(self, allowed: Mapping[str, Sequence[str]], encoder: torch.nn.Module) -> str:
        """The run's ``arch`` if it is a key of ``allowed`` and ``encoder``'s backbone is one
        of the backbone names ``allowed[arch]`` (params are checked for this up front; this
        guards direct use)."""
        arch = self.run_cfg.get("arch")
        if arch not in allowed:
            raise ValueError(f"{self.name}: unknown arch {arch!r}; known: {', '.join(map(repr, allowed))}")
        backbone = backbone_name(encoder)
        if backbone not in allowed[arch]:
            raise ValueError(f"{self.name}: arch {arch!r} needs a backbone of {', '.join(map(repr, allowed[arch]))}, "
                             f"got a {backbone!r} encoder")
        return arch

    @abstractmethod
    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of one training batch; ``"loss"`` is optimised."""

    @abstractmethod
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Scalar metrics of one validation batch."""

    @abstractmethod
    def validation_epoch_end(self) -> dict[str, torch.Tensor]:
        """Metrics over every batch of the current validation pass (empty before any)."""

    @abstractmethod
    def predict(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Probabilities for ``batch["image"]`` (no gradients)."""
