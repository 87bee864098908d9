"""Seed 003's disruptions change the input by exactly the configured amount."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chestssl.models.disruptions import (
    Disruption,
    PatchEmbeddingChannelDrop,
    add_gaussian_noise,
    channel_drop_mask,
    nearest_down_up,
)
from chestssl.models.seeding import seeded
from chestssl.models.swin import SwinEncoder

CFG = {"disruption": "all", "noise_variance": 0.1, "downsample_factor": 4, "local_fraction": 0.6}


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _encoder(spatial_dims: int = 2) -> SwinEncoder:
    with seeded(0):
        return SwinEncoder(spatial_dims, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))


@pytest.mark.parametrize("shape", [(4, 1, 64, 64), (2, 1, 16, 32, 32)])
@pytest.mark.parametrize("variance", [0.1, 0.02])
def test_noise_has_the_set_variance(shape, variance):
    image = torch.rand(shape, generator=_generator(1))
    noisy = add_gaussian_noise(image, variance, _generator())
    noise = noisy - image
    assert noisy.shape == image.shape and noisy.dtype == image.dtype
    # 16k samples: the sample variance is within ~2% of the truth (5 sigma below 6%).
    assert float(noise.var()) == pytest.approx(variance, rel=0.06)
    assert abs(float(noise.mean())) < 5 * (variance / noise.numel()) ** 0.5


def test_noise_is_reproducible_and_zero_variance_is_identity():
    image = torch.rand(2, 1, 32, 32, generator=_generator(1))
    torch.testing.assert_close(add_gaussian_noise(image, 0.1, _generator(3)), add_gaussian_noise(image, 0.1, _generator(3)))
    assert not torch.equal(add_gaussian_noise(image, 0.1, _generator(3)), add_gaussian_noise(image, 0.1, _generator(4)))
    torch.testing.assert_close(add_gaussian_noise(image, 0.0, _generator()), image, rtol=0, atol=0)
    with pytest.raises(ValueError, match="variance"):
        add_gaussian_noise(image, -0.1, _generator())


@pytest.mark.parametrize("factor", [2, 4])
def test_down_up_is_the_block_constant_nearest_image_2d(factor):
    image = torch.rand(2, 1, 32, 32, generator=_generator(2))
    out = nearest_down_up(image, factor)
    # Block-constant: every factor x factor block holds its first (top-left) pixel.
    first = image[:, :, ::factor, ::factor]
    expected = first[:, :, :, None, :, None].expand(2, 1, 32 // factor, factor, 32 // factor, factor).reshape(2, 1, 32, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # The same as torch's nearest interpolation down by 1/factor and back up.
    down = F.interpolate(image, scale_factor=1 / factor, mode="nearest")
    torch.testing.assert_close(out, F.interpolate(down, size=(32, 32), mode="nearest"), rtol=0, atol=0)
    assert not torch.equal(out, image)


def test_down_up_3d_and_uneven_sizes():
    image = torch.rand(1, 1, 8, 12, 16, generator=_generator(3))
    out = nearest_down_up(image, 4)
    down = F.interpolate(image, scale_factor=0.25, mode="nearest")
    torch.testing.assert_close(out, F.interpolate(down, size=(8, 12, 16), mode="nearest"), rtol=0, atol=0)
    # A size that factor does not divide: the last, shorter block follows the same rule.
    uneven = torch.arange(10.0).reshape(1, 1, 1, 10)
    assert nearest_down_up(uneven, 4).flatten().tolist() == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]
    torch.testing.assert_close(nearest_down_up(image, 1), image, rtol=0, atol=0)
    with pytest.raises(ValueError, match="factor"):
        nearest_down_up(image, 0)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.6, 0.65, 0.95])
def test_channel_drop_mask_counts(fraction):
    mask = channel_drop_mask(5, 12, fraction, _generator())
    assert mask.shape == (5, 12) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [round(fraction * 12)] * 5


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_local_disturbance_zeroes_exactly_the_fraction_per_sample(spatial_dims):
    encoder = _encoder(spatial_dims)
    shape = (4, 1, 64, 64) if spatial_dims == 2 else (4, 1, 32, 32, 32)
    image = torch.rand(shape, generator=_generator(5))
    captured = []
    with torch.no_grad():  # no gradient is checked: the 3D autograd graphs would take 0.7 GB
        clean_embedding = encoder.patch_embed(image)
        clean_states = encoder(image)
        with PatchEmbeddingChannelDrop(encoder, 0.6, _generator()) as disturbance:
            capture = encoder.patch_embed.register_forward_hook(lambda m, a, out: captured.append(out))
            disturbed_states = encoder(image)
            capture.remove()
    embedding = captured[0]
    channels = encoder.feature_size
    dropped = disturbance.last_dropped
    assert dropped.shape == (4, channels)
    assert dropped.sum(dim=1).tolist() == [round(0.6 * channels)] * 4  # 7 of 12
    for sample in range(4):
        zeroed = embedding[sample, dropped[sample]]
        kept = embedding[sample, ~dropped[sample]]
        assert torch.count_nonzero(zeroed) == 0
        torch.testing.assert_close(kept, clean_embedding[sample, ~dropped[sample]], rtol=0, atol=0)
        assert torch.count_nonzero(clean_embedding[sample, dropped[sample]]) > 0
    # Drawn per sample: not the same channels for the whole batch.
    assert not all(torch.equal(dropped[0], row) for row in dropped[1:])
    # The disturbance reaches the encoder's outputs; once closed, the encoder is clean again.
    assert not torch.allclose(disturbed_states[-1], clean_states[-1])
    with torch.no_grad():
        torch.testing.assert_close(encoder(image)[-1], clean_states[-1], rtol=0, atol=0)
    assert len(encoder.patch_embed._forward_hooks) == 0


def test_local_disturbance_is_reproducible_and_validated():
    encoder = _encoder()
    image = torch.rand(2, 1, 64, 64, generator=_generator(6))
    outputs = []
    for _ in range(2):
        with PatchEmbeddingChannelDrop(encoder, 0.5, _generator(9)):
            outputs.append(encoder(image)[0])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        PatchEmbeddingChannelDrop(encoder, 1.0, _generator())
    with pytest.raises(TypeError, match="patch_embed"):
        PatchEmbeddingChannelDrop(torch.nn.Linear(2, 2), 0.5, _generator())


def test_disruption_kinds_apply_their_parts_in_order():
    image = torch.rand(2, 1, 64, 64, generator=_generator(7))
    every = Disruption.from_cfg(CFG)
    assert every.parts == ("noise", "downsample", "local")
    expected = nearest_down_up(add_gaussian_noise(image, 0.1, _generator(8)), 4)
    torch.testing.assert_close(every.image(image, _generator(8)), expected, rtol=0, atol=0)
    assert isinstance(every.in_encoder(_encoder(), _generator()), PatchEmbeddingChannelDrop)

    denoise = Disruption.from_cfg({**CFG, "disruption": "denoise"})
    torch.testing.assert_close(denoise.image(image, _generator(8)), add_gaussian_noise(image, 0.1, _generator(8)))
    assert not isinstance(denoise.in_encoder(_encoder(), _generator()), PatchEmbeddingChannelDrop)
    superres = Disruption.from_cfg({**CFG, "disruption": "superres"})
    torch.testing.assert_close(superres.image(image, _generator(8)), nearest_down_up(image, 4), rtol=0, atol=0)
    local = Disruption.from_cfg({**CFG, "disruption": "local"})
    torch.testing.assert_close(local.image(image, _generator(8)), image, rtol=0, atol=0)
    assert isinstance(local.in_encoder(_encoder(), _generator()), PatchEmbeddingChannelDrop)
