"""Named stages of every backbone, and a task model trained with only some of them.

Seed 001's frozen-parts ablation fine-tunes a pretrained ResNet-18 classifier with only the
head trained, then with the head and ``layer4``, then ``layer3``-``layer4``, and so on
down to the whole network, to show how much of the pretrained representation is reused.
Its freezing code trained one stage fewer than it said; here the stages a setting trains
are named, and a test checks that exactly their parameters receive gradients.

:func:`encoder_stages` cuts each backbone (:mod:`chestssl.models.backbones`) into stages,
shallow to deep, that together hold every parameter and buffer exactly once:

- ``resnet18`` / ``resnet50``: ``stem`` (conv1, bn1), ``layer1`` ... ``layer4``;
- ``swin``: ``patch_embed``, ``layers1`` ... ``layers4``;
- ``unet_encoder``: ``level0`` ... ``level4`` (``conv_0_0`` ... ``conv_4_0``);
- ``cnn_attention``: ``level0`` ... ``levelK`` (:meth:`CNNAttentionEncoder.stages`; the
  final GroupNorm and latent convolution join the deepest level);
- ``vit``: ``embed`` (patch embedding, position embedding, CLS token), ``block0`` ...
  ``blockN-1`` (the last also holds the final LayerNorm).

:class:`PartlyFrozenTask` wraps a classification task so that only its head and the
``unfrozen_stages`` deepest encoder stages train; frozen stages also keep their
normalisation statistics (they stay in eval mode), so a frozen part does not change at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from chestssl.models.backbones import backbone_name
from chestssl.models.stepped import SteppedModule
from chestssl.tasks.cls import classifier_encoder


@dataclass(frozen=True)
class EncoderStage:
    """One stage of a backbone: its ``name`` and the parameter/buffer name prefixes it owns."""

    name: str
    prefixes: tuple[str, ...]

    def owns(self, key: str) -> bool:
        """Whether the parameter or buffer ``key`` (a name in the backbone) belongs to this stage."""
        return any(key == prefix or key.startswith(prefix + ".") for prefix in self.prefixes)


def _cnn_attention_stages(encoder: nn.Module) -> list[EncoderStage]:
    index = {id(block): i for i, block in enumerate(encoder.blocks)}
    stages = [[index[id(block)] for block in stage] for stage in encoder.stages()]
    assigned = {i for stage in stages for i in stage}
    stages[-1].extend(i for i in range(len(encoder.blocks)) if i not in assigned)
    return [EncoderStage(f"level{level}", tuple(f"blocks.{i}" for i in stage)) for level, stage in enumerate(stages)]


def encoder_stages(encoder: nn.Module) -> list[EncoderStage]:
    """The stages of a backbone built by :func:`chestssl.models.backbones.build_backbone`,
    shallow (next to the input) to deep (next to the head)."""
    name = backbone_name(encoder)
    if name in ("resnet18", "resnet50"):
        return [EncoderStage("stem", ("conv1", "bn1"))] + [EncoderStage(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)]
    if name == "swin":
        return [EncoderStage("patch_embed", ("patch_embed",))] + [
            EncoderStage(f"layers{i}", (f"layers{i}",)) for i in range(1, 5)
        ]
    if name == "unet_encoder":
        return [EncoderStage(f"level{i}", (f"conv_{i}_0",)) for i in range(5)]
    if name == "cnn_attention":
        return _cnn_attention_stages(encoder)
    if name == "vit":
        blocks = len(encoder.blocks)
        stages = [EncoderStage("embed", ("patch_embedding", "cls_token"))]
        stages += [EncoderStage(f"block{i}", (f"blocks.{i}",)) for i in range(blocks - 1)]
        stages.append(EncoderStage(f"block{blocks - 1}", (f"blocks.{blocks - 1}", "norm")))
        return stages
    raise TypeError(f"no stage names for backbone {name!r}")


def stage_label(trained: list[str]) -> str:
    """How a setting is shown: ``head``, or ``head + layer4, layer3`` (trained stages, deepest first)."""
    return "head" if not trained else "head + " + ", ".join(trained)


class PartlyFrozenTask(SteppedModule):
    """A classification task with only its head and the ``unfrozen_stages`` deepest encoder stages trained.

    ``forward``, ``training_step``, ``validation_step``, ``validation_epoch_end`` and
    ``predict`` are the wrapped task's (same shapes). Frozen parameters have
    ``requires_grad = False`` (the training loop optimises only the others) and the
    frozen stages stay in eval mode, so batch-norm statistics there do not move either.

    Args:
        task: a :class:`chestssl.tasks.cls.ClassificationTask`.
        unfrozen_stages: how many encoder stages, counted from the deepest, train with the
            head: 0 trains the head only, ``len(encoder_stages(...))`` the whole network.
    """

    def __init__(self, task: nn.Module, unfrozen_stages: int):
        super().__init__()
        self.task = task
        prefix, encoder = classifier_encoder(task)
        stages = encoder_stages(encoder)
        if isinstance(unfrozen_stages, bool) or not isinstance(unfrozen_stages, int) or not 0 <= unfrozen_stages <= len(stages):
            raise ValueError(
                f"unfrozen_stages: got {unfrozen_stages!r}, expected an integer from 0 (head only) to {len(stages)} "
                f"(every stage of this {backbone_name(encoder)}: {', '.join(s.name for s in stages)})"
            )
        frozen = stages[: len(stages) - unfrozen_stages]
        #: Names of the trained encoder stages, deepest first.
        self.trained_stages = [stage.name for stage in reversed(stages[len(stages) - unfrozen_stages:])]
        self.frozen_stages = [stage.name for stage in frozen]
        self.label = stage_label(self.trained_stages)
        self.ddp_find_unused_parameters = getattr(task, "ddp_find_unused_parameters", True)
        for key, parameter in encoder.named_parameters():
            if any(stage.owns(key) for stage in frozen):
                parameter.requires_grad_(False)
        # Modules whose every parameter and buffer lies in a frozen stage: kept in eval mode.
        self._frozen_module_names = [
            f"{prefix}.{name}" for name, module in encoder.named_modules()
            if name and any(stage.owns(name) for stage in frozen)
        ]

    def train(self, mode: bool = True) -> "PartlyFrozenTask":
        super().train(mode)
        for name in self._frozen_module_names:
            self.task.get_submodule(name).eval()
        return self

    def trainable_parameter_names(self) -> list[str]:
        """Names (in the wrapped task) of the parameters that train."""
        return [name for name, parameter in self.task.named_parameters() if parameter.requires_grad]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.task(image)

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.task.training_step(batch)

    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.task.validation_step(batch)

    def validation_epoch_end(self) -> dict[str, torch.Tensor]:
        return self.task.validation_epoch_end()

    def predict(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.task.predict(batch)
