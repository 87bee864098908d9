"""chestssl.data.views.evenly_per_patient: a fixed number of items per patient."""

from __future__ import annotations

import pytest
from torch.utils.data import Dataset

from chestssl.data.views import evenly_per_patient


class _Items(Dataset):
    def __init__(self, patient_ids):
        self.patient_ids = list(patient_ids)

    def __len__(self):
        return len(self.patient_ids)

    def __getitem__(self, index):
        return {"patient_id": self.patient_ids[index], "index": index}


def test_each_patient_keeps_its_first_last_and_evenly_spaced_items_in_order():
    items = _Items(["a"] * 9 + ["b"] * 2 + ["c"] * 5)
    thinned = evenly_per_patient(items, 3)
    assert [thinned[i]["index"] for i in range(len(thinned))] == [0, 4, 8, 9, 10, 11, 13, 15]


def test_zero_keeps_the_dataset_and_a_negative_count_is_refused():
    items = _Items(["a", "a"])
    assert evenly_per_patient(items, 0) is items
    with pytest.raises(ValueError, match="per_patient: got -1"):
        evenly_per_patient(items, -1)
