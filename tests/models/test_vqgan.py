"""LatentAutoencoder: shapes, quantizer on/off, latent adapter, gradients, range."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chestssl.models.quantizer import QuantizerOutput
from chestssl.models.unet import UNetEncoder
from chestssl.models.vqgan import AutoencoderOutput, LatentAutoencoder


class StridedEncoder(nn.Module):
    """Smallest backbone of the protocol: one strided convolution to the latent."""

    def __init__(self, spatial_dims: int, latent_channels: int, stride: int):
        super().__init__()
        self.spatial_dims, self.in_channels = spatial_dims, 1
        self.latent_channels, self.latent_stride = latent_channels, stride
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.conv = conv(1, latent_channels, kernel_size=stride, stride=stride)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.conv(x)]

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _decoder(multipliers=(1, 2), latent_channels=4) -> dict:
    return {
        "channels": 8,
        "channel_multipliers": list(multipliers),
        "num_res_blocks": 1,
        "norm_num_groups": 4,
        "latent_channels": latent_channels,
    }


QUANTIZER_ON = {"enabled": True, "codebook_size": 16, "dim": 3, "beta": 0.25}
QUANTIZER_OFF = {"enabled": False}


@pytest.mark.parametrize("quantizer_cfg", [QUANTIZER_ON, QUANTIZER_OFF])
@pytest.mark.parametrize("spatial_dims,size", [(2, 16), (3, 8)])
def test_shapes_range_and_quantizer(spatial_dims, size, quantizer_cfg):
    torch.manual_seed(0)
    encoder = StridedEncoder(spatial_dims, latent_channels=6, stride=2)
    autoencoder = LatentAutoencoder(encoder, _decoder(), quantizer_cfg)
    assert autoencoder.encoder is encoder
    x = torch.rand((2, 1) + (size,) * spatial_dims)
    with torch.no_grad():
        out = autoencoder(x)
    assert isinstance(out, AutoencoderOutput)
    assert out.recon.shape == x.shape
    assert float(out.recon.min()) > 0.0 and float(out.recon.max()) < 1.0
    assert out.latent.shape == (2, 4) + (size // 2,) * spatial_dims
    assert out.vq_loss.dim() == 0
    z_q, quantized = autoencoder.quantize(out.latent)
    assert z_q.shape == out.latent.shape
    if quantizer_cfg["enabled"]:
        assert isinstance(quantized, QuantizerOutput) and quantized.indices.shape == (2,) + (size // 2,) * spatial_dims
        assert float(out.vq_loss) > 0 and out.perplexity is not None and out.perplexity.dim() == 0
    else:
        assert quantized is None and z_q is out.latent
        assert float(out.vq_loss) == 0.0 and out.perplexity is None


def test_adapter_upsamples_a_deeper_encoder_latent():
    torch.manual_seed(0)
    encoder = UNetEncoder(2, 1, (4, 8, 8, 16, 16))  # latent stride 16
    autoencoder = LatentAutoencoder(encoder, _decoder(multipliers=(1, 2)), QUANTIZER_OFF)  # decoder stride 2
    deconvs = [m for m in autoencoder.adapter.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(deconvs) == 3 and all(m.stride == (2, 2) for m in deconvs)
    assert deconvs[0].in_channels == 16 and deconvs[-1].out_channels == 4
    assert sum(isinstance(m, nn.GroupNorm) for m in autoencoder.adapter.modules()) == 2
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert autoencoder.encode(x).shape == (2, 4, 16, 16)
        assert autoencoder(x).recon.shape == x.shape


def test_adapter_is_a_1x1_conv_for_equal_strides():
    encoder = StridedEncoder(2, latent_channels=6, stride=4)
    autoencoder = LatentAutoencoder(encoder, _decoder(multipliers=(1, 2, 2)), QUANTIZER_OFF)  # stride 4
    assert isinstance(autoencoder.adapter, nn.Conv2d)
    assert autoencoder.adapter.kernel_size == (1, 1) and autoencoder.adapter.in_channels == 6


@pytest.mark.parametrize("stride,multipliers", [(2, (1, 2, 2)), (6, (1, 2))])
def test_incompatible_strides_are_reported(stride, multipliers):
    encoder = StridedEncoder(2, latent_channels=6, stride=stride)
    with pytest.raises(ValueError, match=f"decoder up-samples by .* latent has stride {stride}.*power-of-2"):
        LatentAutoencoder(encoder, _decoder(multipliers=multipliers), QUANTIZER_OFF)


def test_size_not_divisible_by_encoder_stride_is_reported():
    autoencoder = LatentAutoencoder(StridedEncoder(2, 6, stride=4), _decoder((1, 2, 2)), QUANTIZER_OFF)
    with pytest.raises(ValueError, match="divisible by the encoder's latent stride 4"):
        autoencoder(torch.rand(1, 1, 18, 18))


def test_one_backward_reaches_encoder_decoder_codebook_and_adapter():
    torch.manual_seed(0)
    encoder = StridedEncoder(2, latent_channels=6, stride=4)
    autoencoder = LatentAutoencoder(encoder, _decoder(multipliers=(1, 2)), QUANTIZER_ON)
    x = torch.rand(2, 1, 16, 16)
    out = autoencoder(x)
    (F.l1_loss(out.recon, x) + out.vq_loss).backward()
    parts = {
        "encoder": encoder.conv.weight,
        "adapter": autoencoder.adapter[0].deconv.weight,
        "codebook": autoencoder.quantizer.codebook.weight,
        "decoder": autoencoder.last_layer_weight(),
    }
    for name, weight in parts.items():
        assert weight.grad is not None and float(weight.grad.abs().sum()) > 0, name
    assert autoencoder.last_layer_weight() is autoencoder.decoder.blocks[-1].conv.weight
    assert autoencoder.last_layer_weight().shape[0] == 1
