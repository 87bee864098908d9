"""Seeded construction of networks without touching the caller's random state."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU generator seeded to ``seed``, then restore it.

    Module constructors draw their initial weights from the global CPU generator, so
    building a network inside ``seeded(seed)`` gives the same weights for the same seed
    on every machine, and the caller's own random stream (data order, augmentation) is
    left exactly as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
