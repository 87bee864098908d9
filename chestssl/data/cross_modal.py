"""CT slices and radiographs in one dataset, every item tagged with its modality (seed 003).

Valanarasu et al., "Disruptive Autoencoders", arXiv:2307.16896 (seed 003) pretrain on
several modalities at once, with a supervised contrastive term whose classes are the
modalities (:class:`~chestssl.models.supervised_contrastive.CrossModalContrastiveLoss`).
:class:`CrossModalDataset` mixes the CT slices of ``pretrain@`` with chest radiographs
(``data/radiographs``) in a set share, so that term acts (stage
``pretrain_cross_modal@<method>``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from monai.transforms import Resize
from torch.utils.data import Dataset

#: Modality names of the two kinds of item (the contrastive term's classes).
CT, RADIOGRAPH = "ct", "radiograph"


class CrossModalDataset(Dataset):
    """CT slices and radiographs in one dataset, each item tagged with its modality.

    Items ``0 .. n_ct - 1`` are the CT items in their order; the next ``n_radiograph``
    items cycle through the radiographs, ``n_radiograph = round(n_ct * f / (1 - f))`` for
    ``f = radiograph_fraction``, so radiographs make up that share of every epoch whatever
    the sizes of the two sets (a rendered study is one per scan, so radiographs are far
    fewer than slices and each is seen several times per epoch, under different random
    disruptions). The training loop's shuffled sampler then mixes both into every batch.
    When the CT items are drawn per epoch, one slice per scan
    (:class:`~chestssl.data.slice_epochs.EpochSliceDataset`, ``epoch_unit: scans``), an
    epoch may hold fewer radiograph items than there are radiographs: the cycle then starts
    at a point drawn from the CT's epoch seed (``draw_seed``), so every radiograph takes
    its turn over the epochs.

    Args:
        ct: items with ``image`` (1, S, S) in [0, 1] (the CT slices of ``pretrain@``).
        radiographs: items with ``image`` (1, R, R) in [0, 1]; resized to S x S when R != S
            (area averaging when shrinking, bilinear when enlarging).
        radiograph_fraction: share of radiograph items, in (0, 1).

    Items: ``image`` (1, S, S) float32 and ``modality`` (``"ct"`` or ``"radiograph"``);
    the default collate makes ``modality`` a list of B strings, as the DAE reads it.
    """

    def __init__(self, ct: Dataset, radiographs: Dataset, radiograph_fraction: float) -> None:
        if not 0.0 < radiograph_fraction < 1.0:
            raise ValueError(f"radiograph_fraction: got {radiograph_fraction!r}, expected a number in (0, 1)")
        if len(ct) == 0:
            raise ValueError("no CT slices in this split: the cross-modal term needs both modalities")
        if len(radiographs) == 0:
            raise ValueError("no radiographs in this split (of the views in cross_modal.views): the cross-modal "
                             "term needs both modalities; check data/radiographs (`dvc repro radiographs`)")
        self.ct, self.radiographs = ct, radiographs
        self.n_ct = len(ct)
        self.n_radiograph = max(1, round(self.n_ct * radiograph_fraction / (1.0 - radiograph_fraction)))
        first = ct[0]["image"]
        if first.ndim != 3:
            raise ValueError(f"CT items must be 2D slices (1, S, S), got shape {tuple(first.shape)}")
        self.size = tuple(first.shape[-2:])
        # Area averaging when shrinking, bilinear when enlarging (area degenerates to nearest).
        side = radiographs[0]["image"].shape[-1]  # folder images are square
        self._resize = None if (side, side) == self.size else Resize(
            self.size, mode="area" if side >= self.size[-1] else "bilinear")

    def __len__(self) -> int:
        return self.n_ct + self.n_radiograph

    def modality(self, index: int) -> str:
        """The modality of item ``index`` without loading it."""
        return CT if index < self.n_ct else RADIOGRAPH

    def _radiograph_start(self) -> int:
        """Where this epoch's radiograph items start in the cycle (class docstring): 0 unless
        the CT items are drawn per epoch and the epoch cannot hold every radiograph."""
        seed = getattr(self.ct, "draw_seed", None)
        if seed is None or self.n_radiograph >= len(self.radiographs):
            return 0
        return int(np.random.default_rng(seed).integers(len(self.radiographs)))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if index < self.n_ct:
            return {"image": self.ct[index]["image"].float(), "modality": CT}
        image = self.radiographs[(self._radiograph_start() + index - self.n_ct) % len(self.radiographs)]["image"]
        image = image.float()
        if self._resize is not None:
            image = self._resize(image).as_tensor()
        return {"image": image, "modality": RADIOGRAPH}
