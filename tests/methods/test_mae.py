"""mae and diffmae: masking, masked-only losses, DiffMAE noising and reverse chain, learning."""

from __future__ import annotations

import pytest
import torch

from chestssl.methods.mae import (
    DiffusionMaskedAutoencoderPretraining,
    MaskedAutoencoderPretraining,
    masked_patch_mse,
    patch_targets,
    random_patch_mask,
)
from chestssl.models.seeding import seeded
from chestssl.models.vit import build_vit_encoder, gather_tokens, patchify
from shipped_params import problem_starting_with, read_shipped_params
from tests.tiny_configs import DIFFMAE as TINY_DIFFMAE, MAE as TINY_MAE, VIT as TINY_VIT

VIT = {**TINY_VIT, "num_layers": 1}
VIT_3D = {**VIT, "spatial_dims": 3, "img_size": 16, "patch_size": 4, "hidden_size": 24}
MAE = {**TINY_MAE, "backbone": VIT}
DIFFMAE = {**TINY_DIFFMAE, "backbone": VIT}
METHODS = [(MaskedAutoencoderPretraining, MAE), (DiffusionMaskedAutoencoderPretraining, DIFFMAE)]
IDS = ["mae", "diffmae"]


def _images(batch: int = 4, size: int = 32, dims: int = 2) -> torch.Tensor:
    """Smooth structured images in [0, 1], (B, 1, *S)."""
    axes = torch.meshgrid(*[torch.linspace(-1, 1, size)] * dims, indexing="ij")
    return torch.stack(
        [0.5 + 0.4 * torch.sin(3 * (i + 1) * axes[-1] + 2 * axes[0]) for i in range(batch)]
    ).unsqueeze(1)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cls,cfg", METHODS, ids=IDS)
def test_2d_step_validation_and_reconstruction_shapes(cls, cfg):
    method = cls("m", cfg, seed=0)
    image = _images()
    out = method.training_step({"image": image})
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert int(method.steps_done) == 1
    method.eval()
    assert method.validation_step({"image": image})["loss"].ndim == 0
    recon = method.reconstruct(image)
    assert tuple(recon.shape) == (4, 1, 32, 32) and 0.0 <= recon.min() and recon.max() <= 1.0
    assert method.reconstructs and method.encoder() is method.vit


@pytest.mark.parametrize("cls,cfg", METHODS, ids=IDS)
def test_3d_step_and_reconstruction(cls, cfg):
    method = cls("m", {**cfg, "backbone": VIT_3D, "decoder_hidden_size": 12}, seed=0)
    image = _images(batch=2, size=16, dims=3)
    assert torch.isfinite(method.training_step({"image": image})["loss"])
    assert tuple(method.reconstruct(image).shape) == (2, 1, 16, 16, 16)
    assert (method.num_patches, method.num_masked) == (64, 32)


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.5, 0.75])
def test_each_sample_masks_round_ratio_times_n_patches(ratio):
    method = MaskedAutoencoderPretraining("m", {**MAE, "mask_ratio": ratio}, seed=0)
    expected = round(ratio * 16)
    assert method.num_masked == expected
    mask = method.draw_mask(6, _generator(1), torch.device("cpu"))
    assert tuple(mask.masked.shape) == (6, expected) and tuple(mask.visible.shape) == (6, 16 - expected)
    every_patch = torch.sort(torch.cat([mask.visible, mask.masked], dim=1), dim=1).values
    assert torch.equal(every_patch, torch.arange(16).expand(6, -1))
    assert torch.equal(mask.is_masked().sum(dim=1), torch.full((6,), expected))
    assert len({tuple(row.tolist()) for row in mask.masked}) > 1, "samples share one mask"


def test_masks_are_reproducible_from_the_generator():
    first = random_patch_mask(3, 16, 8, _generator(4), torch.device("cpu"))
    again = random_patch_mask(3, 16, 8, _generator(4), torch.device("cpu"))
    other = random_patch_mask(3, 16, 8, _generator(5), torch.device("cpu"))
    assert torch.equal(first.masked, again.masked) and torch.equal(first.visible, again.visible)
    assert not torch.equal(first.masked, other.masked)


def test_loss_counts_only_masked_patches():
    target = torch.randn(2, 16, 64)
    mask = random_patch_mask(2, 16, 8, _generator(0), torch.device("cpu"))
    prediction = torch.randn(2, 16, 64)
    loss = masked_patch_mse(prediction, target, mask)
    visible_changed = prediction.clone()
    visible_changed[~mask.is_masked()] += 10.0
    torch.testing.assert_close(masked_patch_mse(visible_changed, target, mask), loss, rtol=0, atol=0)
    masked_changed = prediction.clone()
    masked_changed[mask.is_masked()] += 1.0
    assert masked_patch_mse(masked_changed, target, mask) > loss
    expected = ((prediction - target) ** 2).mean(dim=-1)[mask.is_masked()].mean()
    torch.testing.assert_close(loss, expected)


def test_mae_training_loss_reads_only_the_masked_predictions():
    method = MaskedAutoencoderPretraining("m", MAE, seed=0)
    image = _images()
    mask = method.draw_mask(4, _generator(9), torch.device("cpu"))
    prediction = method.predict_all(image, mask)
    prediction.retain_grad()
    target, _, _ = method.targets(image)
    loss = masked_patch_mse(prediction, target, mask)
    loss.backward()
    is_masked = mask.is_masked()
    assert torch.count_nonzero(prediction.grad[~is_masked]) == 0
    assert torch.count_nonzero(prediction.grad[is_masked]) > 0
    # The training step computes exactly this loss for the masks its generator draws.
    with torch.no_grad():
        torch.testing.assert_close(method.training_losses(image, _generator(9))["loss"], loss.detach())


def test_normalised_targets_and_reconstruction_keeps_visible_patches():
    image = _images()
    target, mean, scale = patch_targets(image, 8, normalise=True)
    torch.testing.assert_close(target.mean(dim=-1), torch.zeros(4, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.std(dim=-1), torch.ones(4, 16), atol=1e-3, rtol=0)
    torch.testing.assert_close(target * scale + mean, patchify(image, 8))
    method = MaskedAutoencoderPretraining("m", MAE, seed=0)
    recon = method.reconstruct(image)
    torch.testing.assert_close(method.reconstruct(image), recon, rtol=0, atol=0)
    changed = (patchify(recon, 8) != patchify(image, 8)).any(dim=-1)
    assert torch.equal(changed.sum(dim=1), torch.full((4,), method.num_masked))


def test_diffmae_schedule_is_seed_004s():
    method = DiffusionMaskedAutoencoderPretraining("m", {**DIFFMAE, "num_steps": 100}, seed=0)
    torch.testing.assert_close(method.betas, torch.linspace(1e-4, 0.2, 100) ** 2, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(method.scheduler.alphas_cumprod, torch.cumprod(1 - method.betas, dim=0))


def test_diffusion_noises_only_masked_patches_with_q_xt_given_x0():
    method = DiffusionMaskedAutoencoderPretraining("m", DIFFMAE, seed=0)
    batch, value = 2000, 0.7
    patches = torch.full((batch, 16, 64), value)
    patches[:, :, ::2] = -value  # x0 alternates +-0.7 within each patch
    mask = random_patch_mask(batch, 16, 8, _generator(0), torch.device("cpu"))
    noised = method.noise_patches(patches, mask, _generator(1))
    is_masked = mask.is_masked()
    assert torch.equal(noised.patches[~is_masked], patches[~is_masked])
    timesteps = noised.timesteps
    assert timesteps.min() == 0 and timesteps.max() == method.num_steps - 1
    # beta_0 = 1e-8 leaves step 0 noise-free in float32; every later step moves every masked value.
    moved = noised.patches != patches
    assert moved[(timesteps > 0)[:, None].expand(-1, 16) & is_masked].all()
    alpha_bar = method.scheduler.alphas_cumprod.float()
    x0 = gather_tokens(patches, mask.masked)
    xt = gather_tokens(noised.patches, mask.masked)
    # The returned eps reproduces x_t, and is standard normal.
    a = alpha_bar[timesteps].view(-1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * noised.noise)
    assert abs(noised.noise.mean()) < 0.01 and abs(noised.noise.std() - 1) < 0.01
    # Empirical moments of x_t per step match q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I).
    for step in (1, method.num_steps // 2, method.num_steps - 1):
        at_step = xt[timesteps == step] * x0[timesteps == step].sign()
        assert at_step.numel() > 10_000
        std = float((1 - alpha_bar[step]).sqrt())
        assert abs(float(at_step.mean()) - float(alpha_bar[step].sqrt()) * value) < 0.02 * max(std, 0.05)
        assert abs(float(at_step.std()) / std - 1) < 0.03


def test_validation_runs_the_full_vectorised_reverse_chain():
    method = DiffusionMaskedAutoencoderPretraining("m", DIFFMAE, seed=0).eval()
    calls: list[torch.Tensor] = []
    samples: list[torch.Tensor] = []

    def record(module, args, output):
        calls.append(args[4].clone())
        samples.append(args[2].clone())

    method.decoder.register_forward_hook(record)
    image = _images(batch=3)
    loss = method.validation_step({"image": image})["loss"]
    assert len(calls) == method.num_steps == 10
    assert [int(t[0]) for t in calls] == list(range(9, -1, -1))
    assert all(tuple(t.shape) == (3,) and bool((t == t[0]).all()) for t in calls)
    assert all(tuple(x.shape) == (3, 8, 64) and bool(torch.isfinite(x).all()) for x in samples)
    assert torch.isfinite(loss)


def test_reverse_chain_returns_the_last_x0_prediction_and_its_loss_is_validation_loss():
    method = DiffusionMaskedAutoencoderPretraining("m", DIFFMAE, seed=0).eval()
    outputs: list[torch.Tensor] = []
    method.decoder.register_forward_hook(lambda module, args, output: outputs.append(output.clone()))
    image = _images(batch=2)
    mask = method.draw_mask(2, _generator(3), torch.device("cpu"))
    with torch.no_grad():
        x0 = method.predict_masked(image, mask, _generator(4))
    torch.testing.assert_close(x0, outputs[-1])
    method.train()
    method.eval()
    first = method.validation_step({"image": image})["loss"]
    method.train()
    method.eval()
    torch.testing.assert_close(method.validation_step({"image": image})["loss"], first, rtol=0, atol=0)


@pytest.mark.parametrize("cls,cfg", METHODS, ids=IDS)
def test_loss_falls_over_20_adam_steps(cls, cfg):
    method = cls("m", cfg, seed=0)
    image = _images()

    def probe() -> float:
        with torch.no_grad():
            return float(method.training_losses(image, _generator(123))["loss"])

    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    before = probe()
    for _ in range(20):
        loss = method.training_step({"image": image})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert probe() < 0.9 * before


@pytest.mark.parametrize("cls,cfg", METHODS, ids=IDS)
def test_every_trainable_parameter_gets_a_gradient(cls, cfg):
    method = cls("m", cfg, seed=0)
    method.training_step({"image": _images()})["loss"].backward()
    trainable = {name for name, p in method.named_parameters() if p.requires_grad}
    assert {name for name, p in method.named_parameters() if p.grad is not None} == trainable
    assert method.ddp_find_unused_parameters is False


@pytest.mark.parametrize("cls,cfg", METHODS, ids=IDS)
def test_encoder_equals_scratch_and_steps_are_reproducible(cls, cfg):
    method = cls("m", cfg, seed=3)
    with seeded(3):
        scratch = build_vit_encoder(VIT)
    assert all(torch.equal(v, method.encoder().state_dict()[k]) for k, v in scratch.state_dict().items())
    image = _images()
    twin = cls("m", cfg, seed=3)
    twin.load_state_dict(method.state_dict())
    first = method.training_step({"image": image})["loss"]
    torch.testing.assert_close(twin.training_step({"image": image})["loss"], first, rtol=0, atol=0)
    # A later step draws new masks; a copy resumed at that step draws the same ones.
    resumed = cls("m", cfg, seed=3)
    resumed.load_state_dict(method.state_dict())
    second = method.training_step({"image": image})["loss"]
    assert not torch.equal(second, first)
    torch.testing.assert_close(resumed.training_step({"image": image})["loss"], second, rtol=0, atol=0)


MASKS_ONE_AND_LEAVES_ONE = "expected a fraction that masks at least one and leaves at least one of the backbone's 64"


@pytest.mark.parametrize(
    "changes,problem",
    [
        ({"mask_ratio": 0.995}, f"methods.diffmae.mask_ratio: got 0.995, {MASKS_ONE_AND_LEAVES_ONE}"),
        ({"mask_ratio": 0.005}, f"methods.diffmae.mask_ratio: got 0.005, {MASKS_ONE_AND_LEAVES_ONE}"),
        ({"mask_ratio": 0.0}, "methods.diffmae.mask_ratio: got 0.0, expected a number > 0 and <= 1"),
        ({"decoder_hidden_size": 18, "decoder_num_heads": 4},
         "methods.diffmae.decoder_hidden_size: got 18, which is not divisible by decoder_num_heads 4"),
        ({"decoder_hidden_size": 18, "decoder_num_heads": 2},
         "methods.diffmae.decoder_hidden_size: got 18, expected a multiple of 4 for 2D sin-cos position embeddings"),
        ({"norm_pix_loss": "yes"}, "methods.diffmae.norm_pix_loss: got 'yes', expected true or false"),
        ({"backbone": "vit_patch1"}, "methods.diffmae.norm_pix_loss: true needs patches of at least 2 pixels"),
        ({"backbone": "swin"}, "methods.diffmae.backbone: 'swin' is a 'swin' backbone, but method 'diffmae' needs 'vit'"),
        ({"beta_start": 0.3}, "methods.diffmae: beta_start 0.3 must be below beta_end 0.2"),
        ({"num_steps": 1}, "methods.diffmae.num_steps: got 1, expected an integer >= 2"),
    ],
)
def test_bad_params_are_refused_naming_the_key(changes, problem):
    raw = read_shipped_params()  # the shipped ViT: 64 patches of 8x8
    raw["backbones"]["vit_patch1"] = {**raw["backbones"]["vit"], "patch_size": 1}
    raw["methods"]["diffmae"].update(changes)
    problem_starting_with(raw, problem)


def test_mask_ratio_message_states_the_allowed_range():
    with pytest.raises(ValueError, match=r"1\.\.15") as error:
        MaskedAutoencoderPretraining("m", {**MAE, "mask_ratio": 0.01}, seed=0)
    assert "0.01" in str(error.value)
