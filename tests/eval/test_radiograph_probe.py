"""Linear probing of radiograph encoders: the folder's labels (unknown ones left out), one
feature per image or per study (the shared CLS, whatever the batch), and the monitor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chestssl.eval.linear_probe import LinearProbeMonitor, validation_scores
from chestssl.eval.radiograph_probe import extract_image_features, extract_study_features, probe_label_dict
from chestssl.models.seeding import seeded
from chestssl.models.study_vit import study_representation
from chestssl.models.vit import build_vit_encoder

VIT = {"name": "vit", "spatial_dims": 2, "img_size": 32, "patch_size": 8, "hidden_size": 16, "num_layers": 2,
       "num_heads": 2, "mlp_dim": 32}


class _Items(torch.utils.data.Dataset):
    items: list[dict]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class _Studies(_Items):
    """Studies of 1 to 3 views with labels: nodule on odd studies, malignant on every third."""

    label_names = ["nodule", "malignant"]

    def __init__(self, count: int, offset: int = 0):
        generator = torch.Generator().manual_seed(offset)
        self.items = [
            {"images": torch.rand(1 + index % 3, 1, 32, 32, generator=generator),
             "labels": torch.tensor([index % 2, float(index % 3 == 0)], dtype=torch.float32),
             "patient_id": f"p{offset + index}", "study_id": f"s{offset + index}"}
            for index in range(count)
        ]


class _Images(_Items):
    """The first view of each of :class:`_Studies`' studies, as image items."""

    label_names = _Studies.label_names

    def __init__(self, count: int, offset: int = 0):
        self.items = [{"image": study["images"][0], "labels": study["labels"], "patient_id": study["patient_id"]}
                      for study in _Studies(count, offset).items]


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
    method = _Method()
    for level, data in (("study", _Studies), ("image", _Images)):
        features = extract_study_features if level == "study" else extract_image_features
        monitor = LinearProbeMonitor(data(12), data(8, offset=100), every_epochs=2, C=1.0, max_iter=200, seed=0,
                                     features=features)
        assert monitor(method, 1) == {}
        scores = monitor(method, 2)
        assert set(scores) == {"probe/nodule/auroc", "probe/malignant/auroc", "probe/mean_auroc"}
        assert all(0.0 <= value <= 1.0 for value in scores.values())
        assert scores["probe/mean_auroc"] == pytest.approx((scores["probe/nodule/auroc"]
                                                            + scores["probe/malignant/auroc"]) / 2)


def test_image_features_are_the_representation_with_the_items_labels():
    encoder = _Method().vit
    data = _Images(5)
    features = extract_image_features(encoder, data, device="cpu", batch_size=2)
    encoder.eval()
    with torch.no_grad():
        expected = encoder.representation(torch.stack([item["image"] for item in data.items]))
    np.testing.assert_allclose(features.features, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert features.labels["nodule"].tolist() == [index % 2 for index in range(5)]


def test_unknown_labels_become_not_probed_and_the_columns_must_match():
    labels = np.array([[1.0, np.nan], [0.0, 1.0]])
    assert {k: v.tolist() for k, v in probe_label_dict(labels, ["a", "b"]).items()} == {"a": [1, 0], "b": [-1, 1]}
    with pytest.raises(ValueError, match="3 columns, expected one per label name \\(2\\)"):
        probe_label_dict(np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="no label_names"):
        extract_image_features(_Method().vit, torch.utils.data.TensorDataset(torch.zeros(2, 1, 32, 32)), device="cpu")


def test_validation_scores_leave_out_skipped_labels():
    result = {"nodule": {"auroc": {"value": 0.7}}, "malignant": {"skipped": "one class"},
              "mean": {"auroc": 0.7, "labels": ["nodule"]}}
    assert validation_scores(result) == {"probe/nodule/auroc": 0.7, "probe/mean_auroc": 0.7}


def test_an_empty_split_is_named():
    with pytest.raises(ValueError, match="no studies to probe"):
        extract_study_features(_Method().vit, _Studies(0), device="cpu")
