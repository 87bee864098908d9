"""3D crops for volumetric pretraining (seed 003): drawn once, or anew every epoch."""

import hashlib
import pickle

import numpy as np
import pytest
import torch
from monai.data.utils import set_rnd
from torch import nn
from torch.utils.data import DataLoader, get_worker_info

from chestssl.data.crops import CropDataset, EpochCropDataset
from chestssl.data.datasets import DatasetError
from chestssl.data.processed import load_scan
from chestssl.data.views import labelled_view, pretrain_view
from chestssl.train.loop import fit


def test_crop_shapes_labels_and_malignancy(synthetic_processed):
    # 12 slices deep volumes, 16^3 crops: the depth is padded with air.
    data = CropDataset(synthetic_processed, "train", 16, crops_per_scan=4, positive_fraction=1.0, seed=0)
    assert len(data) == 8  # 2 train patients x 4
    item = data[0]
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 16, 16, 16)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    by_patient = {}
    for i in range(len(data)):
        by_patient.setdefault(data[i]["patient_id"], []).append(data[i])
    # p1 has a nodule and every crop is centred on it; p0 has none.
    assert all(int(it["label"]) == 1 and float(it["malignancy"]) == 4.0 for it in by_patient["p1"])
    assert all(int(it["label"]) == 0 and float(it["malignancy"]) == 0.0 for it in by_patient["p0"])
    assert all(float(it["mask"].sum()) > 0 for it in by_patient["p1"])
    # The crop centre is inside the nodule's slices 4..7 (z is padded by 2 above).
    assert all(0 <= it["slice_index"] < 16 for it in by_patient["p1"])


def test_crops_are_seeded(synthetic_processed):
    first = CropDataset(synthetic_processed, "val", 8, crops_per_scan=3, seed=1)
    again = CropDataset(synthetic_processed, "val", 8, crops_per_scan=3, seed=1)
    other = CropDataset(synthetic_processed, "val", 8, crops_per_scan=3, seed=2)
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)


def test_negative_crops_only_leave_nodules_out(synthetic_processed):
    data = CropDataset(synthetic_processed, "test", 8, crops_per_scan=6, positive_fraction=0.0, seed=0)
    centres_on_nodule = [float(data[i]["mask"][0, 4, 4, 4]) for i in range(len(data))]
    assert centres_on_nodule == [0.0] * len(data)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"size": 0}, "size: got 0"), ({"crops_per_scan": 0}, "crops_per_scan: got 0"),
     ({"positive_fraction": 1.5}, r"positive_fraction: got 1\.5, expected a number in \[0, 1\]")],
)
def test_bad_arguments_are_named(synthetic_processed, kwargs, key):
    args = {"size": 8, "crops_per_scan": 2, "positive_fraction": 0.5}
    args.update(kwargs)
    with pytest.raises(DatasetError, match=key):
        CropDataset(synthetic_processed, "train", args["size"], args["crops_per_scan"], args["positive_fraction"])


# ---------------------------------------------------------------- the views and the default


def _view_params(**crops) -> dict:
    return {"seed": 0, "preprocess": {"min_nodule_pixels": 0},
            "crops": {"side": 16, "per_scan": 3, "positive_fraction": 0.5, "draw": "once", **crops}}


ENTRY_3D = {"backbone": {"spatial_dims": 3}}


def _digest(data) -> str:
    h = hashlib.sha256()
    for i in range(len(data)):
        item = data[i]
        h.update(item["image"].to(torch.float16).numpy().tobytes())
        h.update(item["mask"].to(torch.uint8).numpy().tobytes())
        h.update(f"{int(item['label'])},{float(item['malignancy'])},{item['scan_id']},{item['slice_index']};".encode())
    return h.hexdigest()


def test_draw_once_gives_the_crops_it_always_gave(synthetic_processed):
    # Digests of the crops CropDataset drew before `crops.draw` existed: `once` must keep them.
    train = pretrain_view(_view_params(), ENTRY_3D, "train", synthetic_processed)
    assert type(train) is CropDataset
    assert _digest(train) == "8ade84988ce24a938978e327ca0c11fcd1782cc340694ac5016efd6d30ed70c4"
    val = CropDataset(synthetic_processed, "val", 8, crops_per_scan=2, positive_fraction=0.5, seed=3)
    assert _digest(val) == "2881c87bc2f95da3280e184f9aabe7f164c0355fa90ec3ce5ceef534ee40ef32"


def test_every_epoch_redraws_only_the_training_crops(synthetic_processed):
    params = _view_params(draw="every_epoch")
    train = pretrain_view(params, ENTRY_3D, "train", synthetic_processed)
    assert type(train) is EpochCropDataset and len(train) == 6  # 2 train scans x 3 per epoch
    # Validation and test crops, and the probes' labelled crops, are drawn once.
    for split in ("val", "test"):
        assert type(pretrain_view(params, ENTRY_3D, split, synthetic_processed)) is CropDataset
    for split in ("train", "val"):
        assert type(labelled_view(params, ENTRY_3D, split, synthetic_processed)) is CropDataset
    fixed_val = pretrain_view(_view_params(), ENTRY_3D, "val", synthetic_processed)
    assert _digest(pretrain_view(params, ENTRY_3D, "val", synthetic_processed)) == _digest(fixed_val)


# ---------------------------------------------------------------- crops drawn every epoch


def _crop_key(item: dict) -> tuple:
    """An item's scan, centre slice and image digest."""
    return item["scan_id"], item["slice_index"], hashlib.sha1(item["image"].numpy().tobytes()).hexdigest()


def _crops_of(data) -> list[tuple]:
    return [_crop_key(data[i]) for i in range(len(data))]


def test_epoch_crops_items_and_where_they_come_from(synthetic_processed):
    data = EpochCropDataset(synthetic_processed, "train", 16, crops_per_scan=4, positive_fraction=1.0, seed=0)
    assert len(data) == 8 and [data[i]["patient_id"] for i in range(8)] == ["p0"] * 4 + ["p1"] * 4
    volumes = {}
    for pid in ("p0", "p1"):
        scan = load_scan(synthetic_processed, pid)
        volumes[pid] = (np.pad(scan["image"], [(2, 2), (0, 0), (0, 0)]),  # 12 slices, padded to 16
                        np.pad(scan["mask"], [(2, 2), (0, 0), (0, 0)]))
    for i in range(len(data)):
        item = data[i]
        assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 16, 16, 16) and item["mask"].dtype == torch.float32
        # The crop is the block of the padded volume centred on slice_index, at some (y, x).
        image, mask = volumes[item["patient_id"]]
        z0 = item["slice_index"] - 8
        assert z0 == 0
        matches = [(y, x) for y in range(33) for x in range(33)
                   if np.array_equal(image[z0:z0 + 16, y:y + 16, x:x + 16], item["image"][0].numpy())]
        assert matches and any(np.array_equal(mask[z0:z0 + 16, y:y + 16, x:x + 16] > 0, item["mask"][0].numpy() > 0)
                               for y, x in matches)
        # Every draw is centred on a nodule voxel where the scan has one (positive_fraction 1).
        expected = (1, 4.0) if item["patient_id"] == "p1" else (0, 0.0)
        assert (int(item["label"]), float(item["malignancy"])) == expected
        assert (float(item["mask"].sum()) > 0) == (item["patient_id"] == "p1")


def test_positive_fraction_applies_to_each_draw(synthetic_processed):
    def with_nodule(fraction: float) -> float:
        data = EpochCropDataset(synthetic_processed, "train", 8, crops_per_scan=200, positive_fraction=fraction)
        return sum(float(data[i]["mask"].sum()) > 0 for i in range(200, 400)) / 200  # p1's crops
    # A crop centred off the nodule seldom reaches it (8^3 crops of 12 x 48 x 48: about 10%).
    assert with_nodule(1.0) == 1.0
    assert with_nodule(0.0) < 0.25 and 0.4 < with_nodule(0.5) < 0.7


def test_epoch_crops_follow_the_seed_not_the_reading_order(synthetic_processed):
    data = EpochCropDataset(synthetic_processed, "train", 8, crops_per_scan=3, seed=5)
    first = _crops_of(data)
    assert first == _crops_of(EpochCropDataset(synthetic_processed, "train", 8, crops_per_scan=3, seed=5))
    assert [_crop_key(data[i]) for i in reversed(range(len(data)))][::-1] == first
    data.set_random_state(seed=6)
    other = _crops_of(data)
    assert other != first
    data.set_random_state(seed=6)
    assert _crops_of(data) == other


def _worker_like_pytorch(base: int):
    """A worker_init_fn seeding as PyTorch does (worker k gets base + k), through MONAI's set_rnd."""
    def init(worker_id: int) -> None:
        info = get_worker_info()
        set_rnd(info.dataset, seed=base + info.id)
    return init


def test_workers_draw_the_crops_of_the_main_process(synthetic_processed):
    data = EpochCropDataset(synthetic_processed, "train", 8, crops_per_scan=5, seed=0)
    base = 2**40 + 12345  # PyTorch's base seeds are 64-bit
    data.set_random_state(seed=base % 2**32)
    expected = _crops_of(data)
    for workers in (1, 2):
        loader = DataLoader(data, batch_size=3, num_workers=workers, worker_init_fn=_worker_like_pytorch(base),
                            collate_fn=lambda items: items)
        assert [_crop_key(item) for batch in loader for item in batch] == expected, f"{workers} worker(s)"


def test_at_most_cache_scans_volumes_are_kept(synthetic_processed):
    for cache_scans in (0, 1):
        data = EpochCropDataset(synthetic_processed, "train", 8, crops_per_scan=2, cache_scans=cache_scans)
        crops = _crops_of(data)
        assert len(data._cache) == cache_scans
        copy = pickle.loads(pickle.dumps(data))  # what a spawned worker receives
        assert len(copy._cache) == 0 and _crops_of(copy) == crops
    with pytest.raises(DatasetError, match="cache_scans: got -1"):
        EpochCropDataset(synthetic_processed, "train", 8, crops_per_scan=2, cache_scans=-1)


# ---------------------------------------------------------------- through the training loop


class CropRecorder(nn.Module):
    """Records the crops of every training and validation batch; ``fail_at_call`` raises
    on that training step (an interrupted run)."""

    def __init__(self, fail_at_call: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.fail_at_call, self.calls = fail_at_call, 0
        self.trained: list[list[tuple]] = []
        self.validated: list[list[tuple]] = []

    @staticmethod
    def _crops(batch: dict) -> list[tuple]:
        return sorted((scan, int(z), hashlib.sha1(image.numpy().tobytes()).hexdigest())
                      for scan, z, image in zip(batch["scan_id"], batch["slice_index"], batch["image"]))

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise RuntimeError("simulated interruption")
        self.trained.append(self._crops(batch))
        return {"loss": self.weight * batch["image"].mean()}

    def validation_step(self, batch: dict) -> dict[str, torch.Tensor]:
        self.validated.append(self._crops(batch))
        return {"loss": self.weight * batch["image"].mean()}


def _fit(processed, where, num_workers: int, model: CropRecorder, batch_size: int = 6) -> CropRecorder:
    """Three epochs over 6 training crops (2 scans x 3); with batch_size 6 a training step is an epoch."""
    params = _view_params(side=8, per_scan=3, draw="every_epoch")
    cfg = dict(epochs=3, batch_size=batch_size, lr=0.01, weight_decay=0.0, optimizer="adam", betas=[0.9, 0.999],
               scheduler="none", grad_clip=0.0, max_steps=0, amp=False, num_workers=num_workers, log_every=1,
               device="cpu")
    fit(model, pretrain_view(params, ENTRY_3D, "train", processed), pretrain_view(params, ENTRY_3D, "val", processed),
        cfg, where / "live", where / "ckpt.pt", seed=0)
    return model


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """The working directory of the fits (dvclive then finds no DVC repo)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path / "runs"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_loop_draws_new_crops_every_epoch_and_the_same_on_a_rerun_or_resume(synthetic_processed, runs,
                                                                                  num_workers):
    reference = _fit(synthetic_processed, runs / "reference", num_workers, CropRecorder())
    epochs = reference.trained
    assert len(epochs) == 3 and all(len(crops) == 6 for crops in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert reference.validated[0] == reference.validated[1] == reference.validated[2], "validation crops are fixed"

    # A rerun interrupted in its second epoch, then resumed: every epoch draws what the reference drew.
    interrupted = CropRecorder(fail_at_call=2)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _fit(synthetic_processed, runs / "run", num_workers, interrupted)
    assert interrupted.trained == epochs[:1]
    resumed = _fit(synthetic_processed, runs / "run", num_workers, CropRecorder())
    assert resumed.trained == epochs[1:]


def test_the_loop_draws_the_same_crops_with_no_one_or_two_workers(synthetic_processed, runs):
    # Batches of 2: the two workers read alternate batches.
    one = _fit(synthetic_processed, runs / "one", 1, CropRecorder(), batch_size=2)
    assert len(one.trained) == 9
    assert one.trained == _fit(synthetic_processed, runs / "two", 2, CropRecorder(), batch_size=2).trained
    assert one.trained == _fit(synthetic_processed, runs / "none", 0, CropRecorder(), batch_size=2).trained
