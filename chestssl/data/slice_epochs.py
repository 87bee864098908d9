"""Epochs of 2D slices counted over scans (``epoch_unit: scans``, seed 003's unit).

Seed 003 (Valanarasu et al., "Disruptive Autoencoders: Leveraging Low-level features for
3D Medical Image Pre-training", arXiv:2307.16896) trains on volumes: each of its 300
(1000 for ``all``) epochs is one random crop of every training volume. A 2D entry's
epoch over slices (:class:`~chestssl.data.datasets.SliceDataset`, task ``pretrain``)
reads every slice of every scan, so it is as many times longer than the seed's as a scan
has slices. Counted over scans, an epoch holds one slice of each training scan, drawn
anew every epoch (:class:`EpochSliceDataset`), as the seed's held one crop of each
volume; the validation epoch holds one slice of each validation scan, drawn once
(:func:`one_slice_per_scan`), as the validation crops are (:mod:`chestssl.data.crops`).

Both wrap a ``SliceDataset`` of task ``pretrain``: they read its items (``image``
(1, S, S) float32 in [0, 1], ``mask`` (1, S, S), ``label``, ``malignancy``,
``patient_id``, ``scan_id``, ``slice_index``) unchanged, from whatever storage it keeps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from chestssl.data.crops import EpochDraws
from chestssl.data.datasets import DatasetError, SliceDataset


class EpochSliceDataset(Dataset, EpochDraws):
    """One axial slice of every scan of a ``SliceDataset``, drawn anew every epoch: an epoch
    over scans, as seed 003's were over volumes.

    Item ``i`` is a slice of scan ``scan_ids[i]`` (scans in the order of the wrapped
    dataset's items), drawn uniformly among that scan's slices by a generator seeded with
    (the epoch's seed, ``i``): the same seed gives the same slices whatever order the
    items are read in, and ``len`` is the number of scans.

    Seeding, as :class:`~chestssl.data.crops.EpochCropDataset`'s: the dataset is a MONAI
    ``Randomizable``; :meth:`set_random_state` sets the seed the slices are drawn from
    (``seed`` until it is first called). The training loop (:func:`chestssl.train.loop.fit`)
    calls it with a seed of (seed, epoch, rank): through ``monai.data.utils.set_rnd`` at the
    start of every epoch when ``num_workers`` is 0, and through its ``worker_init_fn`` in
    every DataLoader worker otherwise, where PyTorch seeds worker ``k`` with ``base + k``
    and the worker id is taken off here; without workers the loop passes the same base
    seed. So an item's slice depends on neither which worker reads it nor how many workers
    there are, if any; the slices change every epoch and are the same on a rerun and on a
    resumed run.

    Args:
        slices: a :class:`~chestssl.data.datasets.SliceDataset` of task ``pretrain``.
        seed: the draws' seed until :meth:`set_random_state` is called.
    """

    def __init__(self, slices: SliceDataset, seed: int = 0) -> None:
        if getattr(slices, "task", None) != "pretrain":
            raise DatasetError(f"EpochSliceDataset wraps a SliceDataset of task 'pretrain', got task "
                               f"{getattr(slices, 'task', None)!r}")
        self.slices = slices
        positions: dict[str, list[int]] = {}
        for position, scan_id in enumerate(slices.scan_ids):
            positions.setdefault(scan_id, []).append(position)
        self.scan_ids = list(positions)
        self.positions = [np.asarray(items, dtype=np.int64) for items in positions.values()]
        self.set_random_state(seed)

    def __len__(self) -> int:
        return len(self.scan_ids)

    def expected_class_counts(self) -> list[float]:
        """Expected clean (label 0) and nodule (label 1) items in one epoch: one slice of
        each scan drawn uniformly, so a scan adds the share of its slices in each class
        (slices labelled -1 count in neither)."""
        labels = self.slices.labels.numpy()
        return [float(sum(np.mean(labels[positions] == k) for positions in self.positions)) for k in (0, 1)]

    def drawn(self) -> list[int]:
        """The items of the wrapped dataset that this epoch's items read, in item order."""
        return [self._position(index) for index in range(len(self))]

    def _position(self, index: int) -> int:
        scan = self.positions[index]
        return int(scan[np.random.default_rng([self.draw_seed, index]).integers(len(scan))])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} scans")
        return self.slices[self._position(index)]


def one_slice_per_scan(slices: SliceDataset, seed: int) -> Subset:
    """One slice of every scan of ``slices`` (task ``pretrain``), drawn once with ``seed`` and
    the same every epoch, so validation metrics compare across epochs. A plain ``Subset``:
    nothing in it is reseeded by the training loop."""
    return Subset(slices, EpochSliceDataset(slices, seed).drawn())

