"""ae: L1 + SSIM autoencoder pretraining."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.metrics import SSIMMetric

from chestssl.methods import AutoencoderPretraining, build_method
from shipped_params import problem_starting_with, read_shipped_params, validate_with_method_configs

BACKBONE = {"name": "unet_encoder", "spatial_dims": 2, "features": [4, 8, 8, 16, 16]}


def _ae(l1: float = 1.0, ssim: float = 1.0, spatial_dims: int = 2, seed: int = 0) -> AutoencoderPretraining:
    cfg = {"method": "ae", "backbone": {**BACKBONE, "spatial_dims": spatial_dims}, "loss": {"l1": l1, "ssim": ssim}}
    method = build_method("ae", cfg, seed=seed)
    assert isinstance(method, AutoencoderPretraining)
    return method


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    """Smooth blobs in [0, 1]: structure that SSIM can see."""
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centres = torch.rand(n, 2, generator=generator) - 0.5
    blobs = [torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.1) for cy, cx in centres]
    return (0.2 + 0.7 * torch.stack(blobs)[:, None]).clamp(0, 1)


def test_loss_is_zero_for_identical_images():
    image = _images()
    parts = _ae().losses(image, image)
    assert float(parts["loss"]) == pytest.approx(0.0, abs=1e-5)


def test_weights_are_applied():
    image = _images()
    other = (image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    l1 = F.l1_loss(other, image)
    one_minus_ssim = 1.0 - SSIMMetric(spatial_dims=2, data_range=1.0)(other, image).mean()
    only_l1 = _ae(l1=2.0, ssim=0.0).losses(other, image)
    only_ssim = _ae(l1=0.0, ssim=3.0).losses(other, image)
    both = _ae(l1=0.5, ssim=0.25).losses(other, image)
    torch.testing.assert_close(only_l1["loss"], 2.0 * l1)
    torch.testing.assert_close(only_ssim["loss"], 3.0 * one_minus_ssim, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both["loss"], 0.5 * l1 + 0.25 * one_minus_ssim, atol=1e-5, rtol=1e-5)
    assert float(one_minus_ssim) > 0.05


def test_zero_weights_are_refused_by_the_params_check():
    raw = read_shipped_params()
    raw["methods"]["ae"] = {"method": "ae", "backbone": "cnn_attention", "recipe": "autoencoder",
                            "loss": {"l1": 0.0, "ssim": 1.0}}
    assert validate_with_method_configs(raw)["methods"]["ae"]["loss"] == {"l1": 0.0, "ssim": 1.0}
    raw["methods"]["ae"]["loss"]["ssim"] = 0.0
    problem_starting_with(raw, "methods.ae.loss: l1 and ssim are both 0, so there is nothing to optimise")


def test_validation_metrics_and_epoch_aggregate():
    method = _ae().eval()
    image = _images()
    step = method.validation_step({"image": image})
    assert set(step) == {"loss", "l1", "ssim", "psnr"}
    assert all(v.ndim == 0 for v in step.values())
    reconstruction = method.reconstruct(image)
    assert reconstruction.shape == image.shape and not reconstruction.requires_grad
    mse = F.mse_loss(reconstruction, image, reduction="none").mean(dim=(1, 2, 3))
    assert float(step["psnr"]) == pytest.approx(float((10 * torch.log10(1.0 / mse)).mean()), rel=1e-4)
    second = method.validation_step({"image": image[:2]})
    epoch = method.validation_epoch_end()
    assert epoch["ssim"].ndim == 0 and -1.0 <= float(epoch["ssim"]) <= 1.0
    # Image-weighted over the pass: 4 images of the first batch, 2 of the second.
    expected_psnr = (4 * step["psnr"] + 2 * second["psnr"]) / 6
    assert float(epoch["psnr"]) == pytest.approx(float(expected_psnr), rel=1e-5)
    # The next validation pass starts afresh.
    method.train()
    method.eval()
    assert method.validation_epoch_end() == {}


def test_short_optimisation_reduces_the_loss():
    torch.manual_seed(0)
    method = _ae(seed=1).train()
    batch = {"image": _images(4, 32)}
    optimiser = torch.optim.Adam(method.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = method.training_step(batch)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_3d_training_step():
    method = _ae(spatial_dims=3)
    image = torch.rand(2, 1, 32, 32, 32)
    out = method.training_step({"image": image})
    out["loss"].backward()
    assert method.encoder().conv_0_0.conv_0.conv.weight.grad is not None
    assert method.reconstruct(image).shape == image.shape
