"""dae: Disruptive Autoencoders (seed 003) on a tiny Swin UNETR, 2D and 3D."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chestssl.methods.dae import DisruptiveAutoencoderPretraining
from chestssl.models.backbones import load_encoder
from chestssl.models.disruptions import PatchEmbeddingChannelDrop
from chestssl.models.swin import swin_unetr_from_parts
from shipped_params import problem_starting_with, read_shipped_params
from tests.tiny_configs import SWIN

# SwinUNETR needs sizes divisible by 32 and more than one element in the deepest map.
SHAPES = {2: (64, 64), 3: (32, 32, 64)}


def _cfg(disruption: str = "all", spatial_dims: int = 2, **overrides) -> dict:
    cfg = {
        "method": "dae",
        "backbone": {**SWIN, "spatial_dims": spatial_dims},
        "disruption": disruption,
        "noise_variance": 0.1,
        "downsample_factor": 4,
        "local_fraction": 0.6,
        "mm_con": 0.03,
        "temperature": 0.5,
        "train": {},
    }
    cfg.update(overrides)
    return cfg


def _dae(disruption: str = "all", spatial_dims: int = 2, seed: int = 0, **overrides) -> DisruptiveAutoencoderPretraining:
    return DisruptiveAutoencoderPretraining(f"dae_{disruption}", _cfg(disruption, spatial_dims, **overrides), seed)


def _images(n: int = 2, spatial_dims: int = 2, seed: int = 0) -> torch.Tensor:
    """Smooth blobs in [0.1, 0.9]."""
    generator = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in SHAPES[spatial_dims]], indexing="ij")
    centres = torch.rand(n, spatial_dims, generator=generator) - 0.5
    blobs = [torch.exp(-sum((axis - c) ** 2 for axis, c in zip(axes, centre)) / 0.1) for centre in centres]
    return 0.1 + 0.8 * torch.stack(blobs)[:, None]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_and_step_outputs(spatial_dims):
    method = _dae("all", spatial_dims)
    image = _images(2, spatial_dims)
    out = method.training_step({"image": image})
    assert set(out) == {"loss", "l1", "mm_con_loss", "mm_con_active"}
    assert all(value.ndim == 0 and torch.isfinite(value) for value in out.values())
    assert out["loss"].requires_grad
    out["loss"].backward()
    assert method.encoder().patch_embed.proj.weight.grad is not None
    assert method.decoder.out.conv.conv.weight.grad is not None
    reconstruction = method.reconstruct(image)
    assert reconstruction.shape == image.shape and not reconstruction.requires_grad
    assert float(reconstruction.min()) > 0.0 and float(reconstruction.max()) < 1.0


@pytest.mark.parametrize("disruption", ["denoise", "superres", "local", "all"])
def test_every_disruption_trains(disruption):
    method = _dae(disruption)
    out = method.training_step({"image": _images(2)})
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


def test_loss_falls_over_a_few_adam_steps():
    torch.manual_seed(0)
    method = _dae("denoise", seed=1).train()
    batch = {"image": _images(2)}
    optimiser = torch.optim.Adam(method.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = method.training_step(batch)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


class _Emits(nn.Module):
    """A stand-in decoder whose logits are fixed: sigmoid(output) == image."""

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.logits = torch.logit(image.clamp(1e-6, 1 - 1e-6))

    def forward(self, x_in: torch.Tensor, hidden_states) -> torch.Tensor:
        return self.logits


def test_l1_target_is_the_clean_image():
    image = _images(2)
    method = _dae("all")
    disrupted = method.disruption.image(image, torch.Generator().manual_seed(0))
    method.decoder = _Emits(image)
    assert float(method.training_step({"image": image})["l1"]) < 1e-5
    method.decoder = _Emits(disrupted.clamp(0, 1))
    assert float(method.training_step({"image": image})["l1"]) > 0.05
    assert float(method.reconstruction_loss(image, image)) == 0.0


def test_decoder_sees_the_disrupted_image_and_the_disturbed_encoder():
    image = _images(2)
    method = _dae("all")
    seen = {}

    class _Records(nn.Module):
        def forward(self, x_in, hidden_states):
            seen["x_in"], seen["hidden"] = x_in, hidden_states
            return torch.zeros_like(x_in)

    clean_hidden = method.encoder()(image)
    method.decoder = _Records()
    method.forward_disrupted(image, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    expected_input = method.disruption.image(image, generator)
    torch.testing.assert_close(seen["x_in"], expected_input, rtol=0, atol=0)
    with PatchEmbeddingChannelDrop(method.encoder(), 0.6, generator):
        expected_hidden = method.encoder()(expected_input)
    for got, expected in zip(seen["hidden"], expected_hidden):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(seen["hidden"][0], clean_hidden[0])


def test_mm_con_is_off_with_one_modality():
    method = _dae("denoise")
    for batch in ({"image": _images(4)}, {"image": _images(4), "modality": ["CT"] * 4}):
        out = method.training_step(batch)
        assert float(out["mm_con_active"]) == 0.0 and float(out["mm_con_loss"]) == 0.0
        torch.testing.assert_close(out["loss"].detach(), out["l1"])
    assert method.mm_con_ever_active is False


def test_mm_con_is_active_and_finite_with_two_modalities():
    method = _dae("denoise")
    out = method.training_step({"image": _images(4), "modality": ["CT", "MR", "CT", "MR"]})
    assert float(out["mm_con_active"]) == 1.0
    assert torch.isfinite(out["mm_con_loss"]) and float(out["mm_con_loss"]) > 0.0
    torch.testing.assert_close(out["loss"].detach(), out["l1"] + 0.03 * out["mm_con_loss"])
    out["loss"].backward()
    assert torch.count_nonzero(method.contrastive_head.weight.grad) > 0
    assert method.mm_con_ever_active is True
    # The flag is a buffer, so a resumed run keeps it.
    restored = _dae("denoise")
    restored.load_state_dict(method.state_dict())
    assert restored.mm_con_ever_active is True
    # Weight 0 switches it off even with two modalities.
    off = _dae("denoise", mm_con=0.0).training_step({"image": _images(4), "modality": ["CT", "MR", "CT", "MR"]})
    assert float(off["mm_con_active"]) == 0.0


def test_mm_con_is_float32_under_autocast():
    method = _dae("denoise")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        hidden = method.encoder()(_images(4))
        term, active = method.contrastive_term(hidden, ["CT", "MR", "CT", "MR"])
    assert active and term.dtype == torch.float32 and torch.isfinite(term)


def test_encoder_and_decoder_are_a_monai_swin_unetr():
    method = _dae("denoise")
    encoder = method.encoder()
    network = encoder.monai_equivalent(out_channels=1)
    network.swinViT.load_state_dict(encoder.state_dict(), strict=True)
    assert type(network).__name__ == "SwinUNETR"
    image = _images(2)
    # The undisrupted reconstruction is exactly sigmoid(SwinUNETR(image)).
    swin_unetr = swin_unetr_from_parts(encoder, method.decoder)
    with torch.no_grad():
        torch.testing.assert_close(method.reconstruct(image), torch.sigmoid(swin_unetr(image)))
    # The exported payload rebuilds the encoder (strict load) downstream.
    rebuilt = load_encoder(method.export())
    torch.testing.assert_close(rebuilt(image)[-1], encoder(image)[-1], rtol=0, atol=0)


def test_encoder_equals_the_scratch_encoder_of_the_same_seed():
    from chestssl.models.backbones import build_backbone
    from chestssl.models.seeding import seeded

    with seeded(5):
        scratch = build_backbone(_cfg()["backbone"])
    for key, value in scratch.state_dict().items():
        torch.testing.assert_close(_dae(seed=5).encoder().state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_validation_is_repeatable_across_passes(spatial_dims):
    method = _dae("all", spatial_dims)
    first, second = _images(2, spatial_dims, seed=1), _images(2, spatial_dims, seed=2)
    passes = []
    for _ in range(2):
        method.train()
        method.eval()
        steps = [method.validation_step({"image": first}), method.validation_step({"image": second})]
        passes.append((steps, method.validation_epoch_end()))
    (steps, epoch), (steps_again, epoch_again) = passes
    assert set(steps[0]) == {"loss", "l1", "ssim", "psnr"}
    for a, b in zip(steps, steps_again):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert set(epoch) == {"ssim", "psnr"}
    torch.testing.assert_close(epoch["psnr"], (steps[0]["psnr"] + steps[1]["psnr"]) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(epoch_again["ssim"], epoch["ssim"], rtol=0, atol=0)
    # Within a pass, batches are disrupted differently: the same images as a second batch
    # give another loss than as the first.
    method.train()
    method.eval()
    as_first = method.validation_step({"image": first})["l1"]
    as_second = method.validation_step({"image": first})["l1"]
    assert float(as_first) != float(as_second)


def test_validation_scores_the_reconstruction_against_the_clean_image():
    image = _images(2)
    method = _dae("all").eval()
    method.decoder = _Emits(image)
    step = method.validation_step({"image": image})
    assert float(step["l1"]) < 1e-5 and float(step["ssim"]) > 0.999 and float(step["psnr"]) > 80


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"backbone": "unet_encoder"},
         "methods.dae_all.backbone: 'unet_encoder' is a 'unet_encoder' backbone, but method 'dae' needs 'swin'"),
        ({"backbone": "swin_patch4"},
         "methods.dae_all.backbone: its patch_size is 4, but the decoder is SwinUNETR's, which needs 2"),
        ({"mm_con": -1.0}, "methods.dae_all.mm_con: got -1.0, expected a number >= 0"),
        ({"temperature": 0.0}, "methods.dae_all.temperature: got 0.0, expected a number > 0"),
        ({"local_fraction": 1.0}, "methods.dae_all.local_fraction: got 1.0, expected a number >= 0 and < 1"),
        ({"local_fraction": -0.1}, "methods.dae_all.local_fraction: got -0.1, expected a number >= 0"),
        ({"disruption": "mask"},
         "methods.dae_all.disruption: got 'mask', expected one of 'denoise', 'superres', 'local', 'all'"),
        ({"downsample_factor": 1}, "methods.dae_all.downsample_factor: got 1, expected an integer >= 2"),
    ],
)
def test_bad_params_are_refused_naming_the_key(changes, problem):
    raw = read_shipped_params()
    raw["backbones"]["unet_encoder"] = {"name": "unet_encoder", "spatial_dims": 2, "features": [4, 8, 8, 16, 16]}
    raw["backbones"]["swin_patch4"] = {**raw["backbones"]["swin"], "patch_size": 4}
    raw["methods"]["dae_all"].update(changes)
    problem_starting_with(raw, problem)


def test_the_decoder_itself_refuses_a_swin_backbone_of_patch_size_4():
    with pytest.raises(ValueError, match=r"SwinUNETR decoder needs an encoder with patch_size 2, got 4"):
        DisruptiveAutoencoderPretraining("dae_all", _cfg("all", backbone={**SWIN, "patch_size": 4}), 0)


def test_modality_list_must_match_the_batch():
    with pytest.raises(ValueError, match=r"batch\['modality'\] has 3 entries for a batch of 4"):
        _dae("denoise").training_step({"image": _images(4), "modality": ["CT", "MR", "CT"]})


def test_local_disturbance_alone_hides_the_clean_image_from_the_decoder_skip():
    # Only the encoder is disturbed, so SwinUNETR's full-resolution skip would carry the
    # clean target to the decoder: it reads a blank image instead.
    local, noisy = _dae("local"), _dae("all")
    assert not local.skip_reads_image and noisy.skip_reads_image
    image = _images(2)
    swin_unetr = swin_unetr_from_parts(local.encoder(), local.decoder)
    with torch.no_grad():
        hidden = local.encoder()(image)
        blank_skip = torch.sigmoid(local.decoder(torch.zeros_like(image), hidden))
        torch.testing.assert_close(local.reconstruct(image), blank_skip)
        assert not torch.allclose(local.reconstruct(image), torch.sigmoid(swin_unetr(image)))
