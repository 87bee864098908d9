"""vqgan: seed 000's (VQ) autoencoders with L1 / perceptual / codebook / hinge PatchGAN losses."""

from __future__ import annotations

import copy
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chestssl.methods import VQGANAutoencoderPretraining, build_method
from chestssl.io import file_sha256
from chestssl.models.perceptual import save_feature_network
from chestssl.models.vqgan import AutoencoderOutput
from shipped_params import problem_starting_with, read_shipped_params
from tiny_configs import CNN_ATTENTION, DECODER, LOSS, QUANTIZER, SWIN

SIZE = {"cnn_attention": 32, "swin": 64}


def _cfg(backbone: dict = CNN_ATTENTION, **loss) -> dict:
    return {
        "method": "vqgan",
        "backbone": copy.deepcopy(backbone),
        "decoder": dict(DECODER),
        "quantizer": dict(QUANTIZER),
        "loss": {**LOSS, **loss},
    }


def _method(backbone: dict = CNN_ATTENTION, seed: int = 0, name: str = "ae_tiny", **loss) -> VQGANAutoencoderPretraining:
    method = build_method(name, _cfg(backbone, **loss), seed=seed)
    assert isinstance(method, VQGANAutoencoderPretraining)
    return method


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    """Smooth blobs in [0, 1] (B, 1, size, size): structure an autoencoder can learn quickly."""
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centres = torch.rand(n, 2, generator=generator) - 0.5
    blobs = [torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.1) for cy, cx in centres]
    return (0.2 + 0.7 * torch.stack(blobs)[:, None]).clamp(0, 1)


def _discriminator(method: VQGANAutoencoderPretraining) -> nn.Module:
    assert method.objective.adversarial is not None
    return method.objective.adversarial.discriminator


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _changed(module: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, p in module.named_parameters() if not torch.equal(p.detach(), before[name])]


class TinyFeatures(nn.Module):
    """A two-stage feature network standing in for a perceptual (LPIPS) backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        first = self.stage1(x)
        return [first, self.stage2(first)]


# -- training step --------------------------------------------------------------------


@pytest.mark.parametrize("backbone", [CNN_ATTENTION, SWIN], ids=["cnn_attention", "swin"])
def test_training_step_gives_a_scalar_loss_and_logged_parts(backbone):
    method = _method(backbone).train()
    image = _images(2, SIZE[backbone["name"]])
    out = method.training_step({"image": image})
    assert out["loss"].ndim == 0 and out["loss"].requires_grad and torch.isfinite(out["loss"])
    assert {"l1", "vq", "generator", "disc", "adaptive_weight", "ae_loss", "perplexity"} <= set(out)
    assert all(value.ndim == 0 and torch.isfinite(value) for value in out.values())
    assert not out["ae_loss"].requires_grad and not out["disc"].requires_grad
    # The optimised loss is the autoencoder's objective plus the discriminator's.
    torch.testing.assert_close(out["loss"].detach(), out["ae_loss"] + out["disc"])
    # ae = rec + codebook * vq + adaptive generator term (the loss block's weights).
    torch.testing.assert_close(out["ae_loss"], out["l1"].detach() + out["vq"] + out["generator"])
    assert float(out["adaptive_weight"]) > 0.0
    assert 1.0 <= float(out["perplexity"]) <= QUANTIZER["codebook_size"]
    recon = method.reconstruct(image)
    assert recon.shape == image.shape and not recon.requires_grad


def test_one_step_updates_the_autoencoder_and_the_discriminator():
    method = _method(disc_start=0).train()
    optimiser = torch.optim.Adam(method.parameters(), lr=1e-3)
    autoencoder, discriminator = _snapshot(method.autoencoder), _snapshot(_discriminator(method))
    out = method.training_step({"image": _images()})
    optimiser.zero_grad()
    out["loss"].backward()
    optimiser.step()
    assert float(out["disc"]) > 0.0
    changed_ae = _changed(method.autoencoder, autoencoder)
    assert any(name.startswith("encoder.") for name in changed_ae), changed_ae
    assert any(name.startswith("decoder.") for name in changed_ae), changed_ae
    assert any(name.startswith("quantizer.codebook") for name in changed_ae), changed_ae
    assert _changed(_discriminator(method), discriminator) == [
        name for name, _ in _discriminator(method).named_parameters()
    ]


def test_discriminator_gets_no_gradient_before_disc_start():
    method = _method(disc_start=3).train()
    discriminator = _discriminator(method)
    image = _images()
    for step in range(3):
        method.zero_grad()
        out = method.training_step({"image": image})
        out["loss"].backward()
        assert float(out["generator"]) == 0.0 and float(out["disc"]) == 0.0, step
        assert all(p.grad is None or not bool(p.grad.any()) for p in discriminator.parameters()), step
        assert method.encoder().blocks[0].conv.weight.grad is not None
    # Step 3 = disc_start: the adversarial terms switch on and the discriminator learns.
    method.zero_grad()
    out = method.training_step({"image": image})
    out["loss"].backward()
    assert float(out["disc"]) > 0.0 and float(out["generator"]) > 0.0
    grads = [p.grad for p in discriminator.parameters()]
    assert all(g is not None for g in grads) and any(bool(g.any()) for g in grads)


def test_steps_done_counts_steps_and_is_saved():
    method = _method(disc_start=5)
    assert int(method.steps_done) == 0
    for _ in range(2):
        method.training_step({"image": _images()})
    assert int(method.steps_done) == 2
    state = method.state_dict()
    assert int(state["steps_done"]) == 2
    # A resumed run knows the discriminator has (or has not yet) started.
    resumed = _method(disc_start=5)
    resumed.load_state_dict(state, strict=True)
    assert int(resumed.steps_done) == 2
    resumed.steps_done.fill_(5)
    assert float(resumed.training_step({"image": _images()})["disc"]) > 0.0
    assert int(resumed.steps_done) == 6


# -- validation -----------------------------------------------------------------------


def test_validation_metrics_and_monitor():
    assert VQGANAutoencoderPretraining.monitor == ("val/ssim", "max")
    assert VQGANAutoencoderPretraining.reconstructs
    method = _method().eval()
    image = _images(3)
    step = method.validation_step({"image": image})
    assert {"loss", "l1", "ssim", "psnr", "perplexity"} <= set(step)
    assert all(v.ndim == 0 and not v.requires_grad for v in step.values())
    assert -1.0 <= float(step["ssim"]) <= 1.0 and float(step["psnr"]) > 0.0
    recon = method.reconstruct(image)
    mse = F.mse_loss(recon, image, reduction="none").mean(dim=(1, 2, 3))
    assert float(step["psnr"]) == pytest.approx(float((10 * torch.log10(1.0 / mse)).mean()), rel=1e-4)
    second = method.validation_step({"image": image[:1]})
    epoch = method.validation_epoch_end()
    assert set(epoch) == {"ssim", "psnr"} and all(v.ndim == 0 for v in epoch.values())
    assert -1.0 <= float(epoch["ssim"]) <= 1.0
    # Image-weighted mean over the pass: 3 images, then 1.
    assert float(epoch["psnr"]) == pytest.approx(float((3 * step["psnr"] + second["psnr"]) / 4), rel=1e-5)
    method.train()
    method.eval()
    assert method.validation_epoch_end() == {}


def test_identical_images_give_a_perfect_ssim():
    """The metrics compare against the images themselves, not something else of the batch."""
    method = _method().eval()
    image = _images(2)
    # A perfect autoencoder: the reconstruction is the image.
    method.autoencoder.forward = lambda x: AutoencoderOutput(  # type: ignore[method-assign]
        recon=x.clone(), latent=x, vq_loss=torch.zeros(()), perplexity=None
    )
    step = method.validation_step({"image": image})
    assert float(step["ssim"]) == pytest.approx(1.0, abs=1e-4) and float(step["l1"]) == 0.0
    assert float(step["psnr"]) > 60.0


# -- initialisation, configuration and export -------------------------------------------


@pytest.mark.parametrize("backbone", [CNN_ATTENTION, SWIN], ids=["cnn_attention", "swin"])
def test_encoder_at_step_0_equals_the_scratch_encoder(backbone):
    scratch = build_method("scratch_tiny", {"method": "scratch", "backbone": copy.deepcopy(backbone)}, seed=3)
    same, other = _method(backbone, seed=3), _method(backbone, seed=4)
    expected = scratch.encoder().state_dict()
    assert same.encoder().state_dict().keys() == expected.keys()
    assert all(torch.equal(same.encoder().state_dict()[k], v) for k, v in expected.items())
    assert not all(torch.equal(other.encoder().state_dict()[k], v) for k, v in expected.items())


#: A vqgan entry and a multihead entry: the same loss block and rules.
LOSS_BLOCKS = [("methods", "ae_swin"), ("multihead", "multihead_cls")]


@pytest.mark.parametrize("section,name", LOSS_BLOCKS)
def test_perceptual_weight_without_a_file_is_refused(section, name):
    raw = read_shipped_params()
    raw[section][name]["loss"].update(perceptual=0.5, perceptual_weights="")
    problem_starting_with(raw, f"{section}.{name}.loss: perceptual is 0.5, but perceptual_weights is empty")


def test_perceptual_weight_with_a_missing_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"methods\.ae_named\.loss\.perceptual_weights"):
        _method(name="ae_named", perceptual=0.5, perceptual_weights=str(tmp_path / "absent.pt"), perceptual_sha256="0" * 64)


@pytest.mark.parametrize("section,name", LOSS_BLOCKS)
def test_a_feature_network_without_its_digest_is_refused(section, name):
    raw = read_shipped_params()
    raw[section][name]["loss"].update(perceptual=0.5, perceptual_weights="features.pt")
    problem_starting_with(raw, f"{section}.{name}.loss.perceptual_sha256: perceptual_weights is 'features.pt', but "
                               "perceptual_sha256 is empty; give the file's SHA-256")
    raw[section][name]["loss"]["perceptual_sha256"] = "abc"
    problem_starting_with(raw, f"{section}.{name}.loss.perceptual_sha256: got 'abc', expected a str (the SHA-256")


def test_a_feature_network_of_another_digest_is_refused_naming_both(tmp_path):
    path = save_feature_network(TinyFeatures(), tmp_path / "features.pt")
    with pytest.raises(ValueError, match=r"methods\.ae_named\.loss\.perceptual_weights: .* has SHA-256 [0-9a-f]{64}, "
                                         r"not the 0{64} given with it"):
        _method(name="ae_named", perceptual=0.5, perceptual_weights=str(path), perceptual_sha256="0" * 64)


def test_perceptual_term_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    path = save_feature_network(TinyFeatures(), tmp_path / "features.pt")
    method = _method(perceptual=0.5, perceptual_weights=str(path), perceptual_sha256=file_sha256(path),
                     disc_start=100).train()
    out = method.training_step({"image": _images()})
    assert float(out["perceptual"].detach()) > 0.0
    torch.testing.assert_close(out["rec"], out["l1"] + 0.5 * out["perceptual"])
    out["loss"].backward()
    assert method.encoder().blocks[0].conv.weight.grad is not None
    # The feature network is frozen: the training loop optimises only what requires grad.
    perceptual_network = method.objective.perceptual.network
    assert all(not p.requires_grad and p.grad is None for p in perceptual_network.parameters())
    assert not perceptual_network.training


@pytest.mark.parametrize("section,name", LOSS_BLOCKS)
def test_all_reconstruction_weights_zero_is_refused(section, name):
    raw = read_shipped_params()
    raw[section][name]["loss"].update(l1=0.0, ssim=0.0, perceptual=0.0)
    problem_starting_with(raw, f"{section}.{name}.loss: l1, ssim and perceptual are all 0")


def test_exported_cnn_attention_encoder_loads_into_monai_autoencoderkl_encoder():
    from monai.networks.nets.autoencoderkl import Encoder

    method = _method(CNN_ATTENTION)
    _train(method, _images(), steps=1)
    payload = method.export()
    assert payload["backbone"] == CNN_ATTENTION
    encoder = method.encoder()
    monai_encoder = encoder.monai_equivalent()
    assert type(monai_encoder) is Encoder
    monai_encoder.load_state_dict(payload["state_dict"], strict=True)
    image = _images()
    encoder.eval(), monai_encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(monai_encoder(image), encoder.latent(image))


def test_exported_swin_encoder_loads_into_monai_swin_unetr_swinvit():
    from monai.networks.nets import SwinUNETR

    method = _method(SWIN)
    _train(method, _images(2, 64), steps=1)
    payload = method.export()
    assert payload["backbone"] == SWIN
    encoder = method.encoder()
    swin_unetr = encoder.monai_equivalent()
    assert isinstance(swin_unetr, SwinUNETR)
    swin_unetr.swinViT.load_state_dict(payload["state_dict"], strict=True)
    image = _images(1, 64)
    with torch.no_grad():
        expected = encoder.feature_maps(image)
        hidden = swin_unetr.swinViT(image, swin_unetr.normalize)
    assert len(hidden) == len(expected) == 5
    for got, want in zip(hidden, expected):
        torch.testing.assert_close(got, want)


def test_export_holds_the_trained_weights():
    method = _method()
    initial = method.export()["state_dict"]
    _train(method, _images(), steps=2)
    trained = method.export()["state_dict"]
    current = method.encoder().state_dict()
    assert all(torch.equal(trained[k], current[k]) for k in current)
    assert not all(torch.equal(trained[k], initial[k]) for k in initial)


# -- optimisation -----------------------------------------------------------------------


def _train(method: VQGANAutoencoderPretraining, image: torch.Tensor, steps: int, lr: float = 1e-3) -> list[dict]:
    """``steps`` Adam steps on one batch, as the training loop does; the logged parts per step."""
    method.train()
    optimiser = torch.optim.Adam(method.parameters(), lr=lr, betas=(0.5, 0.9))
    history = []
    for _ in range(steps):
        out = method.training_step({"image": image})
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        history.append({k: float(v.detach()) for k, v in out.items()})
    return history


def test_short_optimisation_reduces_the_reconstruction_error():
    torch.manual_seed(0)
    method = _method(disc_start=10)
    history = _train(method, _images(4), steps=20, lr=1e-2)
    l1 = [h["l1"] for h in history]
    assert sum(l1[-5:]) / 5 < 0.5 * l1[0], l1
    # The adversarial terms are off for the first 10 steps and on after.
    assert all(h["disc"] == 0.0 for h in history[:10]) and all(h["disc"] > 0.0 for h in history[10:])
    assert int(method.steps_done) == 20
