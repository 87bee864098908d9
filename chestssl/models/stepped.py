"""Shared base of everything the training loop fits (pretext methods and task models).

Such a module computes per-batch metrics in ``validation_step`` and may also feed
MONAI cumulative metrics (AUROC, pixel counts for a global Dice, ...) whose value only
means something over a whole validation pass. Those accumulators are registered here:
``validation_epoch_end()`` aggregates them, and they are cleared on every switch from
training to evaluation mode, so they always describe the current validation pass and
never grow across epochs, whether or not the loop calls ``validation_epoch_end``.
"""

from __future__ import annotations

from monai.metrics import Cumulative
from torch import nn


class SteppedModule(nn.Module):
    """``nn.Module`` with validation accumulators reset on each ``train() -> eval()`` switch."""

    def __init__(self) -> None:
        super().__init__()
        self._accumulators: list[Cumulative] = []

    def register_accumulator(self, accumulator: Cumulative) -> Cumulative:
        """Track a MONAI cumulative metric (or buffer) filled by ``validation_step``."""
        self._accumulators.append(accumulator)
        return accumulator

    def reset_accumulators(self) -> None:
        for accumulator in self._accumulators:
            accumulator.reset()

    def train(self, mode: bool = True) -> "SteppedModule":
        if self.training and not mode:
            self.reset_accumulators()
        return super().train(mode)
