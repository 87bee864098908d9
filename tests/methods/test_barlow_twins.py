"""Barlow Twins: the objective's parts, the method's steps, reproducible views, DDP reduction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.losses import BarlowTwinsLoss
from torch import nn

from chestssl.methods.barlow_twins import BarlowTwinsConfig, BarlowTwinsObjective, BarlowTwinsPretraining
from chestssl.models import backbones
from chestssl.models.backbones import load_encoder
from chestssl.models.resnet import ResNetBackbone, build_resnet_encoder
from shipped_params import problem_starting_with, read_shipped_params
from tiny_configs import CNN_ATTENTION

LAMBDA = 5e-3


def _config(**overrides) -> dict:
    cfg = {
        "method": "barlow_twins",
        "backbone": {"name": "resnet18", "spatial_dims": 2, "block_inplanes": [8, 8, 16, 16]},
        "projector_dim": 32,
        "lambda": LAMBDA,
        "augment": {"p": 0.5, "crop_scale": [0.5, 1.0], "blur_sigma": [0.1, 2.0], "perspective": 0.15, "noise_std": 0.05},
        "train": {},
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(autouse=True)
def resnet_backbones(monkeypatch):
    for name in ("resnet18", "resnet50"):
        monkeypatch.setitem(backbones.BACKBONES, name, build_resnet_encoder)


def _blobs(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Discs of random centre, radius and background in [0, 1], (B, 1, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    images = []
    for _ in range(batch):
        centre = torch.rand(2, generator=generator) * size * 0.6 + size * 0.2
        radius = float(torch.rand(1, generator=generator)) * size * 0.2 + size * 0.1
        disc = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2).float()
        images.append(0.7 * disc + 0.2 * float(torch.rand(1, generator=generator)))
    return torch.stack(images)[:, None]


def _standardised(batch: int, features: int, seed: int = 0) -> torch.Tensor:
    z = torch.randn(batch, features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean(0)) / z.std(0, unbiased=False)


# -- the objective ---------------------------------------------------------------------------


def test_identical_standardised_views_have_zero_on_diagonal_part_and_the_correlations_remain():
    z = _standardised(16, 6)
    parts = BarlowTwinsObjective(LAMBDA)(z, z.clone())
    assert abs(float(parts["on_diag"])) < 1e-10
    correlations = np.corrcoef(z.numpy(), rowvar=False)
    expected_off_diag = float((correlations**2).sum() - np.trace(correlations**2))
    assert float(parts["off_diag"]) == pytest.approx(expected_off_diag, rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(LAMBDA * expected_off_diag, rel=1e-5)


def test_identical_decorrelated_views_have_zero_loss():
    centred = torch.randn(16, 6, dtype=torch.float64)
    centred = centred - centred.mean(0)
    orthonormal, _ = torch.linalg.qr(centred)  # columns orthonormal and orthogonal to the ones vector
    z = orthonormal * 16**0.5
    parts = BarlowTwinsObjective(LAMBDA)(z, z)
    assert float(parts["loss"]) == pytest.approx(0.0, abs=1e-9)


def test_independent_views_score_about_the_number_of_features_on_the_diagonal():
    parts = BarlowTwinsObjective(LAMBDA)(_standardised(4096, 8, seed=1), _standardised(4096, 8, seed=2))
    assert float(parts["on_diag"]) == pytest.approx(8.0, rel=0.05)


def test_equals_monai_barlow_twins_loss_up_to_its_unbiased_standardisation():
    batch, lambd = 8, 0.1
    z1, z2 = _standardised(batch, 5, seed=3), _standardised(batch, 5, seed=4)
    correlation = BarlowTwinsObjective(lambd).cross_correlation(z1, z2).double()
    # MONAI standardises again with the unbiased std but divides by B: C shrinks by (B - 1) / B.
    shrunk = correlation * (batch - 1) / batch
    diagonal = torch.diagonal(shrunk)
    expected = ((1 - diagonal) ** 2).sum() + lambd * ((shrunk**2).sum() - (diagonal**2).sum())
    monai = BarlowTwinsLoss(lambd=lambd)(z1.float(), z2.float())
    assert float(monai) == pytest.approx(float(expected), rel=1e-4)
    # ...so identical views keep a floor of P / B**2 there, and none here.
    assert float(BarlowTwinsLoss(lambd=0.0)(z1.float(), z1.float())) == pytest.approx(5 / batch**2, rel=1e-3)
    assert float(BarlowTwinsObjective(0.0)(z1, z1)["loss"]) == pytest.approx(0.0, abs=1e-10)


def test_objective_refuses_single_samples_and_mismatched_shapes():
    objective = BarlowTwinsObjective(LAMBDA)
    with pytest.raises(ValueError, match="a batch of 1 has no cross-correlation"):
        objective(torch.zeros(1, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"same shape, got \(4, 3\) and \(4, 2\)"):
        objective(torch.zeros(4, 3), torch.zeros(4, 2))


def _distributed_worker(rank: int, world: int, init_file: str, x1, x2, weight, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        shared = nn.Parameter(weight.clone())
        half = x1.shape[0] // world
        rows = slice(rank * half, (rank + 1) * half)
        parts = BarlowTwinsObjective(LAMBDA)(x1[rows] @ shared, x2[rows] @ shared, reduce_across_processes=True)
        parts["loss"].backward()
        grad = shared.grad.clone()
        dist.all_reduce(grad)  # what DDP does: average the gradients over the processes
        results[rank] = (float(parts["loss"].detach()), grad / world)
    finally:
        dist.destroy_process_group()


def test_under_ddp_loss_and_averaged_gradients_are_those_of_the_global_batch(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    weight = torch.randn(5, 3, generator=generator)
    shared = nn.Parameter(weight.clone())
    full = BarlowTwinsObjective(LAMBDA)(x1 @ shared, x2 @ shared)
    full["loss"].backward()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(2, str(tmp_path / "pg"), x1, x2, weight, results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        loss, grad = results[rank]
        assert loss == pytest.approx(float(full["loss"].detach()), rel=1e-5)
        torch.testing.assert_close(grad, shared.grad, rtol=1e-4, atol=1e-6)


# -- the method -------------------------------------------------------------------------------


def test_steps_return_the_loss_and_its_parts_and_every_parameter_learns():
    method = BarlowTwinsPretraining("bt", _config(), seed=0)
    out = method.training_step({"image": _blobs(4)})
    assert set(out) == {"loss", "on_diag", "off_diag"}
    assert out["loss"].requires_grad and out["loss"].ndim == 0
    torch.testing.assert_close(out["loss"].detach(), out["on_diag"] + LAMBDA * out["off_diag"])
    out["loss"].backward()
    assert all(p.grad is not None for p in method.parameters())  # ddp_find_unused_parameters = False
    assert method.ddp_find_unused_parameters is False
    assert type(method).reconstructs is False and method.reconstruct(_blobs(2)) is None


def test_loss_on_fixed_views_falls_over_20_adam_steps():
    method = BarlowTwinsPretraining("bt", _config(), seed=0)
    images = _blobs(16)

    def fixed_views_loss() -> float:
        """Mean loss over four fixed pairs of views: the training views change every step."""
        with torch.no_grad():
            return sum(float(method.losses(images, torch.Generator().manual_seed(s))["loss"]) for s in range(4)) / 4

    before = fixed_views_loss()
    optimizer = torch.optim.Adam(method.parameters(), lr=2e-3)  # seed 001's learning rate
    for _ in range(20):
        optimizer.zero_grad()
        method.training_step({"image": images})["loss"].backward()
        optimizer.step()
    assert fixed_views_loss() < 0.75 * before
    assert int(method.steps_done) == 20


def test_training_views_are_reproducible_and_change_every_step():
    images = _blobs(4)
    first, second = (BarlowTwinsPretraining("bt", _config(), seed=5) for _ in range(2))
    torch.testing.assert_close(first.training_step({"image": images}), second.training_step({"image": images}))
    step0 = BarlowTwinsPretraining("bt", _config(), seed=5).training_step({"image": images})
    step1 = first.training_step({"image": images})  # same weights, next step's views
    assert not torch.allclose(step0["loss"], step1["loss"])
    # The step count is a buffer, so a method restored from a checkpoint draws the next step's views.
    restored = BarlowTwinsPretraining("bt", _config(), seed=5)
    restored.load_state_dict(BarlowTwinsPretraining("bt", _config(), seed=5).state_dict() | {"steps_done": torch.tensor(1)})
    torch.testing.assert_close(restored.training_step({"image": images}), step1)


def test_validation_views_are_fixed_per_batch_across_passes():
    method = BarlowTwinsPretraining("bt", _config(), seed=0)
    batches = [_blobs(4, seed=1), _blobs(4, seed=2)]
    method.eval()
    first_pass = [method.validation_step({"image": b}) for b in batches]
    method.train()
    method.eval()
    second_pass = [method.validation_step({"image": b}) for b in batches]
    for a, b in zip(first_pass, second_pass):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(first_pass[0]) == {"loss", "on_diag", "off_diag"}
    # The second batch of a pass gets other views than the first.
    method.train()
    method.eval()
    method.validation_step({"image": batches[0]})
    assert not torch.allclose(method.validation_step({"image": batches[0]})["loss"], first_pass[0]["loss"])
    assert method.validation_step({"image": batches[0][:1]}) == {}


def test_encoder_is_the_resnet_at_the_scratch_initialisation_and_exports():
    method = BarlowTwinsPretraining("bt", _config(), seed=3)
    encoder = method.encoder()
    assert isinstance(encoder, ResNetBackbone) and encoder.representation_dim == 16
    from chestssl.models.seeding import seeded

    with seeded(3):
        scratch = build_resnet_encoder(_config()["backbone"])
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), scratch.state_dict().values()))
    rebuilt = load_encoder(method.export()).eval()
    x = _blobs(2)
    torch.testing.assert_close(rebuilt.representation(x), encoder.eval().representation(x))


def test_projector_is_one_bias_free_linear_layer_then_batch_norm_without_affine():
    method = BarlowTwinsPretraining("bt", _config(projector_dim=24), seed=0)
    linear, norm = method.projector
    assert isinstance(linear, nn.Linear) and linear.bias is None
    assert (linear.in_features, linear.out_features) == (16, 24)
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine


def test_3d_resnet50_step():
    cfg = _config(backbone={"name": "resnet50", "spatial_dims": 3, "block_inplanes": [4, 4, 8, 8]}, projector_dim=8)
    method = BarlowTwinsPretraining("bt3d", cfg, seed=0)
    out = method.training_step({"image": torch.rand(2, 1, 16, 16, 16)})
    assert torch.isfinite(out["loss"]) and method.encoder().representation_dim == 32


@pytest.mark.parametrize(
    "key,value,problem",
    [
        ("projector_dim", 0, "methods.barlow_twins.projector_dim: got 0, expected an integer >= 1"),
        ("lambda", -1.0, "methods.barlow_twins.lambda: got -1.0, expected a number >= 0"),
        ("augment.p", 2.0, "methods.barlow_twins.augment.p: got 2.0, expected a number >= 0 and <= 1"),
        ("augment.crop_scale", [1.0, 0.5],
         "methods.barlow_twins.augment.crop_scale: got [1.0, 0.5], expected [min, max] with min <= max"),
        ("augment.blur_sigma", [2.0, 0.1],
         "methods.barlow_twins.augment.blur_sigma: got [2.0, 0.1], expected [min, max] with min <= max"),
    ],
)
def test_bad_params_are_refused_naming_the_key(key, value, problem):
    raw = read_shipped_params()
    *parents, last = key.split(".")
    block = raw["methods"]["barlow_twins"]
    for parent in parents:
        block = block[parent]
    block[last] = value
    problem_starting_with(raw, problem)


def test_every_backbone_preset_has_the_global_representation_the_projector_reads():
    assert BarlowTwinsConfig.backbone_names is None  # any backbone: each has a representation
    for name, backbone in read_shipped_params()["backbones"].items():
        method = BarlowTwinsPretraining("bt", _config(backbone=backbone), seed=0)
        assert method.projector[0].in_features == method.encoder().representation_dim, name


def test_backbone_without_a_representation_and_single_image_batches_are_refused(monkeypatch):
    monkeypatch.setitem(backbones.BACKBONES, "plain", lambda cfg: nn.Conv2d(1, 4, 3))
    with pytest.raises(ValueError, match=r"Barlow Twins needs a backbone with a global representation.*Conv2d has none"):
        BarlowTwinsPretraining("bt", _config(backbone={"name": "plain", "spatial_dims": 2}), seed=0)
    method = BarlowTwinsPretraining("bt", _config(), seed=0)
    with pytest.raises(ValueError, match=r"at least 2 images per batch.*methods\.bt\.train\.batch_size"):
        method.training_step({"image": _blobs(1)})
