"""Frozen-parts ablation (seed 001): train the head only, then unfreeze the encoder from the deepest stage.

Seed 001 fine-tunes its pretrained ResNet-18 with only ``fc`` trained, then ``layer4`` +
``fc``, ``layer3``-``layer4`` + ``fc``, ... and reports test accuracy per setting: how far
down the pretrained features must adapt to the task. Each setting here names the stages
it trains (:class:`chestssl.ablations.parts.PartlyFrozenTask`); setting ``unfrozen_N``
trains the head and the ``N`` deepest stages of :func:`chestssl.ablations.parts.encoder_stages`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from chestssl.ablations.parts import encoder_stages, stage_label
from chestssl.ablations.runner import AblationSetting


def setting_key(unfrozen_stages: int) -> str:
    return f"unfrozen_{unfrozen_stages}"


def frozen_parts_settings(encoder, unfrozen: Sequence[int], run_name: str) -> list[AblationSetting]:
    """One setting per count of trained encoder stages in ``unfrozen``, checked against the encoder's stages.

    Raises:
        ValueError: a count above the number of stages of this backbone (names them).
    """
    stages = encoder_stages(encoder)
    too_many = [n for n in unfrozen if n > len(stages)]
    if too_many:
        raise ValueError(
            f"unfrozen stage counts {too_many} exceed the {len(stages)} stages of the encoder of run {run_name!r} "
            f"({', '.join(stage.name for stage in stages)}); use counts from 0 to {len(stages)}"
        )
    return [AblationSetting(key=setting_key(n), unfrozen_stages=n) for n in sorted(set(unfrozen))]


def frozen_parts_metrics(
    run_name: str, run: Mapping[str, Any], encoder, results: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The stage's metrics file: one entry per setting with the stages it trained."""
    stages = [stage.name for stage in encoder_stages(encoder)]
    settings = {}
    for key, result in results.items():
        n = int(key.removeprefix("unfrozen_"))
        trained = list(reversed(stages[len(stages) - n:])) if n else []
        settings[key] = {
            "unfrozen_stages": n,
            "trained": trained,
            "label": stage_label(trained),
            "trainable_parameters": result["trainable_parameters"],
            "best_epoch": result["best_epoch"],
            **result["test"],
        }
    return {"run": run_name, "task": run["task"], "init": run["init"], "arch": run["arch"],
            "encoder_stages": stages, "settings": settings}
