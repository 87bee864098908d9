"""3D crops of the processed CT volumes (seed 003's protocol, Disruptive Autoencoders).

Seed 003 (Valanarasu et al., "Disruptive Autoencoders: Leveraging Low-level features for
3D Medical Image Pre-training", arXiv:2307.16896) pretrains a 3D Swin UNETR on random
96^3 crops of CT volumes, a new crop of each volume every epoch. Two datasets here:

- :class:`CropDataset` (``crops.draw: once``): the crops of a split are drawn once, when
  the dataset is built, and reused every epoch;
- :class:`EpochCropDataset` (``crops.draw: every_epoch``, training only): every item
  draws its crop position when it is read, anew every epoch of the training loop.

Both draw from the same distribution, that of MONAI's ``RandCropByPosNegLabeld``: per
scan ``crops_per_scan`` crops, each centred on a nodule voxel or on a background voxel with
probability ``positive_fraction`` / ``1 - positive_fraction`` (a scan without nodules
gets only background crops), the centre then moved as little as needed for the crop to
fit in the volume. A volume smaller than the crop in some axis is first padded with 0
(air after windowing), centred.

Items have the keys of :class:`chestssl.data.datasets.SliceDataset`, with 3D shapes:

- ``image``: (1, C, C, C) float32 in [0, 1]; ``mask``: (1, C, C, C) float32, 1 on
  nodule voxels;
- ``label``: int64, 1 if the crop holds more than ``min_nodule_voxels`` nodule voxels,
  else 0;
- ``malignancy``: float32, the highest median malignancy (``nodules.csv``) of the
  nodules in the crop, 0 without one;
- ``patient_id``, ``scan_id``: str; ``slice_index``: int, the axial index of the crop's
  centre in the processed volume (counted in the padded volume where it was padded).

Where the volumes live: :class:`CropDataset` holds its crops in memory.
:class:`EpochCropDataset` reads each scan through the array cache
(:mod:`chestssl.data.array_cache`: ``$CHESTSSL_CACHE_DIR/scans``, else ``.cache/scans``):
on first use, a scan's image, mask and nodule-voxel indices are written there
uncompressed, once for all processes, and then memory-mapped read-only, so a crop reads
only its own pages and every DDP rank and DataLoader worker shares the page cache's copy.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose, RandCropByPosNegLabeld, Randomizable, SpatialPadd
from monai.transforms.utils import correct_crop_centers
from monai.utils import MAX_SEED
from torch.utils.data import Dataset, get_worker_info

from chestssl.data.array_cache import cached_arrays, digest, scan_identity
from chestssl.data.datasets import DatasetError
from chestssl.data.processed import SPLITS, load_scan, read_nodules, read_slices
from chestssl.paths import cache_dir

SCAN_ARRAYS = ("image", "mask", "foreground")


def _check_arguments(split: str, size: int, crops_per_scan: int, positive_fraction: float) -> None:
    if split not in SPLITS:
        raise DatasetError(f"split: got {split!r}, expected one of {', '.join(SPLITS)}")
    if not isinstance(size, int) or size < 1:
        raise DatasetError(f"size: got {size!r}, expected a positive integer")
    if not isinstance(crops_per_scan, int) or crops_per_scan < 1:
        raise DatasetError(f"crops_per_scan: got {crops_per_scan!r}, expected a positive integer")
    if not 0.0 <= positive_fraction <= 1.0:
        raise DatasetError(f"positive_fraction: got {positive_fraction!r}, expected a number in [0, 1]")


def _split_scans(processed_dir: Path, split: str) -> pd.DataFrame:
    """The ``scan_id`` and ``patient_id`` of the split's scans, in ``slices.csv`` order."""
    if not (processed_dir / "slices.csv").exists():
        raise FileNotFoundError(
            f"{processed_dir / 'slices.csv'} missing; run the preprocess stage (dvc repro preprocess)"
        )
    slices = read_slices(processed_dir)
    scans = slices.loc[slices["split"] == split, ["scan_id", "patient_id"]].drop_duplicates("scan_id")
    if scans.empty:
        raise DatasetError(
            f"no scans in split {split!r} of {processed_dir}; add scans (data.phantom.num_scans) or "
            "change preprocess.split"
        )
    return scans


def _malignancies(processed_dir: Path) -> dict[tuple[str, int], float]:
    """``{(scan_id, nodule_id): median malignancy}`` of ``nodules.csv``."""
    nodules = read_nodules(processed_dir)
    return {(row.scan_id, int(row.nodule_id)): float(row.malignancy) for row in nodules.itertuples(index=False)}


class CropDataset(Dataset):
    """Random 3D crops of one split's scans, drawn once when it is built, by MONAI's
    ``RandCropByPosNegLabeld`` seeded with ``seed``; the same crops every epoch.

    Every crop is held in memory (float16 images, uint8 masks): ``crops_per_scan`` x C^3
    x 3 bytes per scan.

    Args:
        processed_dir: the ``data/processed`` folder.
        split: ``train``, ``val`` or ``test``.
        size: side C of the cubic crops (``crops.side`` in params.yaml).
        crops_per_scan: crops drawn from each scan (``crops.per_scan``).
        positive_fraction: probability that a crop is centred on a nodule voxel
            (``crops.positive_fraction``).
        seed: seeds the crop positions.
        min_nodule_voxels: a crop with more nodule voxels than this is labelled 1.
    """

    def __init__(
        self,
        processed_dir: str | Path,
        split: str,
        size: int,
        crops_per_scan: int,
        positive_fraction: float = 0.5,
        seed: int = 0,
        min_nodule_voxels: int = 0,
    ) -> None:
        _check_arguments(split, size, crops_per_scan, positive_fraction)
        self.processed_dir = Path(processed_dir)
        self.split, self.size = split, size
        scans = _split_scans(self.processed_dir, split)
        malignancy_of = _malignancies(self.processed_dir)
        spatial = (size, size, size)
        cropper = Compose([
            SpatialPadd(["image", "mask"], spatial_size=spatial, value=0.0),
            RandCropByPosNegLabeld(
                ["image", "mask"], label_key="mask", spatial_size=spatial,
                pos=positive_fraction, neg=1.0 - positive_fraction, num_samples=crops_per_scan,
                allow_smaller=False,
            ),
        ])
        cropper.set_random_state(seed)
        images, masks, labels, malignancy = [], [], [], []
        self.patient_ids: list[str] = []
        self.scan_ids: list[str] = []
        self.slice_indices: list[int] = []
        for scan_id, patient_id in scans.itertuples(index=False):
            scan = load_scan(self.processed_dir, scan_id)
            nodule_ids = torch.from_numpy(scan["mask"].astype(np.int16))[None]  # not uint8: torch indexes with those as masks
            with warnings.catch_warnings():
                # A scan without nodules gets background crops only, as documented above.
                warnings.filterwarnings("ignore", message="Num foregrounds 0")
                crops = cropper({"image": torch.from_numpy(scan["image"])[None], "mask": nodule_ids})
            for crop in crops:
                ids = crop["mask"].as_tensor() if hasattr(crop["mask"], "as_tensor") else crop["mask"]
                present = [int(k) for k in torch.unique(ids) if int(k) > 0]
                voxels = int((ids > 0).sum())
                images.append(crop["image"].as_tensor().to(torch.float16))
                masks.append((ids > 0).to(torch.uint8))
                labels.append(1 if voxels > min_nodule_voxels else 0)
                malignancy.append(max((malignancy_of.get((scan_id, k), 0.0) for k in present), default=0.0))
                self.patient_ids.append(str(patient_id))
                self.scan_ids.append(str(scan_id))
                self.slice_indices.append(int(crop["image"].meta["crop_center"][0]))
        self.images = torch.stack(images)
        self.masks = torch.stack(masks)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.malignancy = torch.tensor(malignancy, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self.images[index].to(torch.float32),
            "mask": self.masks[index].to(torch.float32),
            "label": self.labels[index],
            "malignancy": self.malignancy[index],
            "patient_id": self.patient_ids[index],
            "scan_id": self.scan_ids[index],
            "slice_index": self.slice_indices[index],
        }


class EpochDraws(Randomizable):
    """A dataset whose items draw anew every epoch from ``draw_seed``, which the training loop
    sets through MONAI's ``Randomizable`` (:class:`EpochCropDataset`,
    :class:`~chestssl.data.slice_epochs.EpochSliceDataset`)."""

    draw_seed: int

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None
                         ) -> "EpochDraws":
        """Seed the draws: with ``seed`` (in a DataLoader worker, less the worker's id, so
        that an item's draw does not depend on the worker that reads it), or with a draw
        from ``state``, or unseeded."""
        super().set_random_state(seed, state)
        if seed is not None:
            worker = get_worker_info()
            self.draw_seed = (int(seed) - (worker.id if worker is not None else 0)) % MAX_SEED
        else:
            self.draw_seed = int(self.R.randint(MAX_SEED))
        return self


class EpochCropDataset(Dataset, EpochDraws):
    """Random 3D crops of one split's scans, drawn anew every epoch (seed 003's protocol).

    Item ``i`` is a crop of scan ``i // crops_per_scan``, so each epoch holds
    ``crops_per_scan`` crops of every scan (seed 003: one). Its position is drawn when the
    item is read, by a generator seeded with (the dataset's seed, ``i``): the same seed
    gives the same crops, whatever order the items are read in.

    Seeding: the dataset is a MONAI ``Randomizable``; :meth:`set_random_state` sets the
    seed the positions are drawn from (``seed`` until it is first called). The training
    loop (:func:`chestssl.train.loop.fit`) calls it with a seed of the epoch: through
    ``monai.data.utils.set_rnd`` at the start of every epoch when ``num_workers`` is 0, and
    through its ``worker_init_fn`` in every DataLoader worker otherwise. PyTorch seeds
    worker ``k`` with ``base + k``; the worker id is taken off here, so all workers of an
    epoch draw from ``base`` and an item's crop does not depend on which worker reads it
    nor on how many workers there are; without workers the loop passes the same base seed,
    so a run draws the same crops with or without workers. The crops change every epoch
    and are the same on a rerun and on a resumed run.

    Memory: the processed scans are compressed ``.npz`` archives, which cannot be
    memory-mapped, so the first read of a scan (by any process) decompresses it once into
    the array cache (see the module's docstring): ``image`` (float16 as stored, float32 if
    it does not fit), ``mask`` and ``foreground`` (flat indices of its nodule voxels), keyed
    by the scan file's size, modification time and inode. Every read then crops the
    memory-mapped arrays, reading only the crop's pages. Each process (the main one, or
    each DataLoader worker) keeps at most ``cache_scans`` scans open, the least recently
    read dropped first; only a volume smaller than the crop, which is padded, is held in
    memory. The open scans are not copied to workers. Building the dataset reads the
    split's scan list and the nodule table, no volume.

    Args:
        processed_dir, split, size, crops_per_scan, positive_fraction, min_nodule_voxels:
            as for :class:`CropDataset`; ``crops_per_scan`` counts per epoch, and
            ``positive_fraction`` applies to each draw.
        seed: the positions' seed until :meth:`set_random_state` is called.
        cache_scans: scans kept open per process (0: none). Items are read in a shuffled
            order in training, so a scan is rarely read twice in a row.
    """

    def __init__(
        self,
        processed_dir: str | Path,
        split: str,
        size: int,
        crops_per_scan: int,
        positive_fraction: float = 0.5,
        seed: int = 0,
        min_nodule_voxels: int = 0,
        cache_scans: int = 1,
    ) -> None:
        _check_arguments(split, size, crops_per_scan, positive_fraction)
        if not isinstance(cache_scans, int) or cache_scans < 0:
            raise DatasetError(f"cache_scans: got {cache_scans!r}, expected an integer >= 0")
        self.processed_dir = Path(processed_dir)
        self.split, self.size, self.crops_per_scan = split, size, crops_per_scan
        self.positive_fraction, self.min_nodule_voxels = float(positive_fraction), min_nodule_voxels
        self.cache_scans = cache_scans
        self.scan_cache = cache_dir().absolute() / "scans"
        self.scans = [(str(scan_id), str(patient_id))
                      for scan_id, patient_id in _split_scans(self.processed_dir, split).itertuples(index=False)]
        self.malignancy_of = _malignancies(self.processed_dir)
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self.set_random_state(seed)

    def __len__(self) -> int:
        return len(self.scans) * self.crops_per_scan

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # a worker reads its own scans
        return state

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} crops")
        scan_id, patient_id = self.scans[index // self.crops_per_scan]
        image, nodule_ids, foreground = self._volume(scan_id)
        centre = self._draw_centre(nodule_ids, foreground, np.random.default_rng([self.draw_seed, index]))
        window = tuple(slice(c - self.size // 2, c - self.size // 2 + self.size) for c in centre)
        ids = np.array(nodule_ids[window])
        present = [int(k) for k in np.unique(ids) if k > 0]
        voxels = int(np.count_nonzero(ids))
        return {
            "image": torch.from_numpy(np.array(image[window], dtype=np.float32))[None],
            "mask": torch.from_numpy(ids > 0).to(torch.float32)[None],
            "label": torch.tensor(1 if voxels > self.min_nodule_voxels else 0, dtype=torch.int64),
            "malignancy": torch.tensor(max((self.malignancy_of.get((scan_id, k), 0.0) for k in present), default=0.0),
                                       dtype=torch.float32),
            "patient_id": patient_id,
            "scan_id": scan_id,
            "slice_index": int(centre[0]),
        }

    def _volume(self, scan_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The scan's image and nodule ids, padded to the crop side, and the flat indices
        of its nodule voxels; memory-mapped from the array cache, kept open in this process's
        ``_cache``."""
        if scan_id in self._cache:
            self._cache.move_to_end(scan_id)
            return self._cache[scan_id]
        arrays = cached_arrays(
            self.scan_cache, f"{scan_id}-{digest(scan_identity(self.processed_dir, scan_id))[:24]}", SCAN_ARRAYS,
            lambda folder: self._write_scan(scan_id, folder),
            valid=lambda arrays: arrays["image"].shape == arrays["mask"].shape and arrays["image"].ndim == 3,
        )
        image, nodule_ids, foreground = (arrays[name] for name in SCAN_ARRAYS)
        # Centred padding with 0, as MONAI's SpatialPad (symmetric) pads.
        missing = [max(self.size - side, 0) for side in image.shape]
        if any(missing):
            widths = [(m // 2, m - m // 2) for m in missing]
            image, nodule_ids = np.pad(image, widths), np.pad(nodule_ids, widths)
            foreground = np.flatnonzero(nodule_ids)
        volume = (image, nodule_ids, foreground)
        if self.cache_scans:
            self._cache[scan_id] = volume
            while len(self._cache) > self.cache_scans:
                self._cache.popitem(last=False)
        return volume

    def _write_scan(self, scan_id: str, folder: Path) -> None:
        """Decompress the scan into ``folder``: ``image`` (float16 when that holds it exactly,
        as the contract's scans are), ``mask`` and ``foreground``, each an uncompressed ``.npy``."""
        scan = load_scan(self.processed_dir, scan_id)
        image = scan["image"]
        half = image.astype(np.float16)
        np.save(folder / "image.npy", half if np.array_equal(half, image) else image)
        np.save(folder / "mask.npy", scan["mask"])
        np.save(folder / "foreground.npy", np.flatnonzero(scan["mask"]))

    def _draw_centre(self, nodule_ids: np.ndarray, foreground: np.ndarray, rng: np.random.Generator
                     ) -> tuple[int, ...]:
        """A crop centre as ``RandCropByPosNegLabeld`` draws one: a nodule voxel with
        probability ``positive_fraction`` (0 without nodule voxels, 1 without background),
        else a background voxel, each uniformly; then moved to where the crop fits."""
        total = nodule_ids.size
        share = 0.0 if len(foreground) == 0 else 1.0 if len(foreground) == total else self.positive_fraction
        if rng.random() < share:
            flat = int(foreground[rng.integers(len(foreground))])
        else:  # uniform over the background: redraw the rare nodule voxel
            ids = nodule_ids.reshape(-1)
            flat = int(rng.integers(total))
            while ids[flat] != 0:
                flat = int(rng.integers(total))
        centre = [int(c) for c in np.unravel_index(flat, nodule_ids.shape)]
        return tuple(int(c) for c in correct_crop_centers(centre, (self.size,) * 3, nodule_ids.shape))
