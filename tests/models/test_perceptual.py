"""LocalPerceptualLoss: LPIPS-baseline distance through a local TorchScript network."""

from __future__ import annotations

from typing import List

import pytest
import torch
from torch import nn

from chestssl.io import file_sha256
from chestssl.models.perceptual import LocalPerceptualLoss, save_feature_network


class TinyFeatures(nn.Module):
    """Two conv stages with a batch norm; returns both maps, as the file contract asks."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        first = self.stage1(x)
        return [first, self.stage2(first)]


@pytest.fixture
def weights_path(tmp_path):
    torch.manual_seed(0)
    return save_feature_network(TinyFeatures(), tmp_path / "perceptual" / "features.pt")


def test_zero_for_identical_images_positive_otherwise(weights_path):
    loss = LocalPerceptualLoss(weights_path)
    x = torch.rand(2, 1, 16, 16)
    assert float(loss(x, x.clone())) == pytest.approx(0.0, abs=1e-7)
    value = loss(x, torch.rand(2, 1, 16, 16))
    assert value.dim() == 0 and float(value) > 0


@pytest.mark.filterwarnings("ignore:.*torch.jit.load:DeprecationWarning")
def test_matches_the_lpips_baseline_formula(weights_path):
    loss = LocalPerceptualLoss(weights_path)
    network = torch.jit.load(str(weights_path)).eval()
    x, y = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    expected = 0.0
    for fx, fy in zip(network(x), network(y)):
        fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
        fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
        expected = expected + ((fx - fy) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(loss(x, y), expected)


def test_gradient_reaches_the_input_but_not_the_network(weights_path):
    loss = LocalPerceptualLoss(weights_path)
    assert all(not p.requires_grad for p in loss.parameters())
    x = torch.rand(2, 1, 16, 16, requires_grad=True)
    loss(x, torch.rand(2, 1, 16, 16)).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None for p in loss.parameters())


def test_network_stays_in_eval_mode_under_a_training_parent(weights_path):
    parent = nn.ModuleDict({"perceptual": LocalPerceptualLoss(weights_path)})
    parent.train()
    assert parent["perceptual"].training
    assert not parent["perceptual"].network.training
    batch_norm = getattr(parent["perceptual"].network.stage1, "1")
    running_mean = batch_norm.running_mean.clone()
    parent["perceptual"](torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))
    torch.testing.assert_close(batch_norm.running_mean, running_mean)  # eval: statistics untouched


def test_a_single_map_output_is_accepted(tmp_path):
    path = save_feature_network(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh()), tmp_path / "single.pt")
    loss = LocalPerceptualLoss(path)
    x = torch.rand(1, 1, 8, 8)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-7)
    assert float(loss(x, 1 - x)) > 0


def test_missing_file_names_the_key_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError) as error:
        LocalPerceptualLoss(missing, param_key="methods.ae_cnn.loss.perceptual_weights")
    message = str(error.value)
    assert "methods.ae_cnn.loss.perceptual_weights" in message and str(missing) in message
    assert "torch.jit.script" in message and "loss.perceptual to 0" in message


def test_unreadable_file_names_the_key(tmp_path):
    path = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, path)  # a plain checkpoint, not TorchScript
    with pytest.raises(ValueError, match="loss.perceptual_weights.*not a readable TorchScript"):
        LocalPerceptualLoss(path)


def test_the_file_is_checked_against_its_digest_before_it_is_read(tmp_path):
    path = save_feature_network(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh()), tmp_path / "single.pt")
    digest = file_sha256(path)
    assert LocalPerceptualLoss(path, digest.upper()).weights_path == path
    path.write_bytes(path.read_bytes() + b"\0")  # another file at the same path
    with pytest.raises(ValueError, match=f"key.x: .*single.pt' has SHA-256 [0-9a-f]{{64}}, not the {digest} given"):
        LocalPerceptualLoss(path, digest, param_key="key.x")
