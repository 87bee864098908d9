"""Study-level linear probing: one feature per study (the shared CLS), whatever the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chestssl.models.seeding import seeded
from chestssl.models.vit import build_vit_encoder
from chestssl.xray.study_probe import StudyProbeMonitor, extract_study_features, validation_scores
from chestssl.xray.study_vit import study_representation

VIT = {"name": "vit", "spatial_dims": 2, "img_size": 32, "patch_size": 8, "hidden_size": 16, "num_layers": 2,
       "num_heads": 2, "mlp_dim": 32}


class _Studies(torch.utils.data.Dataset):
    """Studies of 1 to 3 views with labels: nodule on odd studies, malignant on every third."""

    def __init__(self, count: int, offset: int = 0):
        generator = torch.Generator().manual_seed(offset)
        self.items = [
            {"images": torch.rand(1 + index % 3, 1, 32, 32, generator=generator),
             "label": torch.tensor(index % 2), "malignancy": torch.tensor(5.0 if index % 3 == 0 else 2.0),
             "patient_id": f"p{offset + index}", "study_id": f"s{offset + index}"}
            for index in range(count)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class _Method(torch.nn.Module):
    def __init__(self):
        super().__init__()
        with seeded(0):
            self.vit = build_vit_encoder(VIT)

    def encoder(self):
        return self.vit


def test_each_study_gets_its_own_shared_cls_whatever_the_batch():
    studies = _Studies(7)
    encoder = _Method().vit.train()
    features = extract_study_features(encoder, studies, device="cpu", batch_size=3)
    assert encoder.training  # the mode is restored
    encoder.eval()
    with torch.no_grad():
        alone = torch.cat([study_representation(encoder, item["images"], torch.zeros(len(item["images"]),
                                                                                    dtype=torch.int64))
                           for item in studies.items])
    np.testing.assert_allclose(features.features, alone.numpy(), rtol=1e-5, atol=1e-6)
    assert features.labels["nodule"].tolist() == [index % 2 for index in range(7)]
    assert features.labels["malignant"].tolist() == [int(index % 3 == 0) for index in range(7)]
    assert features.patient_ids.tolist() == [f"p{index}" for index in range(7)]


def test_the_monitor_probes_on_the_schedule_and_logs_the_image_level_names():
    monitor = StudyProbeMonitor(_Studies(12), _Studies(8, offset=100), every_epochs=2, C=1.0, max_iter=200, seed=0)
    method = _Method()
    assert monitor(method, 1) == {}
    scores = monitor(method, 2)
    assert set(scores) == {"probe/nodule/auroc", "probe/malignant/auroc", "probe/mean_auroc"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert scores["probe/mean_auroc"] == pytest.approx((scores["probe/nodule/auroc"]
                                                        + scores["probe/malignant/auroc"]) / 2)


def test_validation_scores_leave_out_skipped_labels():
    result = {"nodule": {"auroc": {"value": 0.7}}, "malignant": {"skipped": "one class"},
              "mean": {"auroc": 0.7, "labels": ["nodule"]}}
    assert validation_scores(result) == {"probe/nodule/auroc": 0.7, "probe/mean_auroc": 0.7}


def test_an_empty_split_is_named():
    with pytest.raises(ValueError, match="no studies to probe"):
        extract_study_features(_Method().vit, _Studies(0), device="cpu")
