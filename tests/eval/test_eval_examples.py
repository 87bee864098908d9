"""Example arrays for the report: saving, loading, choosing which slices to show."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chestssl.eval import choose_example_indices, example_kind, load_examples, save_examples


def test_segmentation_examples_roundtrip_without_pickle(tmp_path):
    path = tmp_path / "examples" / "seg.npz"
    image = np.random.default_rng(0).random((3, 1, 16, 16)).astype(np.float32)
    save_examples(
        path,
        image=image,
        mask=(image > 0.5).astype(np.uint8),
        prob=torch.from_numpy(image),
        patient_id=np.array(["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"], dtype=object),
        slice_index=np.array([4, 5, 9]),
    )
    arrays = load_examples(path)
    np.testing.assert_array_equal(arrays["image"], image)
    np.testing.assert_array_equal(arrays["prob"], image)
    assert arrays["patient_id"].tolist() == ["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"]
    assert example_kind(arrays) == "segmentation"
    assert [p.name for p in path.parent.iterdir()] == ["seg.npz"]  # no temporary file left behind


def test_reconstruction_examples_kind(tmp_path):
    save_examples(tmp_path / "ae.npz", image=np.zeros((2, 8, 8)), recon=np.ones((2, 8, 8)))
    assert example_kind(load_examples(tmp_path / "ae.npz")) == "reconstruction"
    with pytest.raises(ValueError, match="neither segmentation examples"):
        example_kind({"image": np.zeros(2)})


def test_save_examples_rejects_inconsistent_arrays(tmp_path):
    with pytest.raises(ValueError, match=r"disagree on the number of examples.*'image': 2, 'recon': 3"):
        save_examples(tmp_path / "x.npz", image=np.zeros((2, 8, 8)), recon=np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="no arrays"):
        save_examples(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="'threshold' is a scalar"):
        save_examples(tmp_path / "x.npz", image=np.zeros((2, 8, 8)), threshold=np.float32(0.5))
    assert not (tmp_path / "x.npz").exists()


def test_load_examples_names_the_missing_file(tmp_path):
    missing = tmp_path / "reports" / "eval" / "run" / "examples.npz"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_examples(missing)


def test_choose_example_indices_spreads_over_patients_by_priority():
    ids = np.array(["a", "a", "a", "b", "b", "c"])
    priority = np.array([5, 9, 1, 7, 8, 0])
    # Patients ordered by their best item (a: 9, b: 8, c: 0), each giving its best remaining item.
    assert choose_example_indices(ids, priority, 4).tolist() == [1, 4, 5, 0]
    assert choose_example_indices(ids, priority, 100).tolist() == [1, 4, 5, 0, 3, 2]
    with pytest.raises(ValueError, match="count must be >= 1"):
        choose_example_indices(ids, priority, 0)
