"""The Swin transformer backbone, and SwinUNETR networks built around a pretrained one.

Swin transformer: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows", ICCV 2021 (arXiv:2103.14030). SwinUNETR: Hatamizadeh et al., "Swin
UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI Images",
BrainLes 2021 (arXiv:2201.01266). Both as implemented by MONAI's
:class:`~monai.networks.nets.SwinUNETR`.

:class:`SwinEncoder` *is* MONAI's ``SwinTransformer`` built with exactly the arguments
``SwinUNETR`` gives its ``swinViT``, so its ``state_dict`` loads with ``strict=True`` into
``SwinUNETR(...).swinViT`` and a pretrained encoder drops into a segmentation network
unchanged. :class:`SwinUNETRSegHead` is the rest of SwinUNETR (the convolutional
encoder blocks on the skips and the decoder) for a model whose Swin encoder is shared
with other heads, as in seed 000's multi-task autoencoder.

Size rules (with the usual ``patch_size`` 2):

* the encoder needs every spatial size divisible by ``latent_stride`` = 32
  (patch embedding, then four 2x patch mergings);
* the SwinUNETR decoder normalises the deepest map with instance norm, which needs more
  than one element there: a 32x32 slice (1x1 deepest map) is too small, 64x64 works;
* SwinUNETR's last up-sampling joins the full-resolution skip, which only lines up for
  ``patch_size`` 2.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import MERGING_MODE, SwinTransformer
from monai.utils import ensure_tuple_rep
from torch import nn

from chestssl.checks import positive_int
from chestssl.models.seeding import seeded

#: Stages of the Swin transformer; MONAI's ``SwinTransformer.forward`` is written for four.
SWIN_STAGES = 4
#: ``SwinUNETR`` requires ``feature_size`` to be a multiple of this.
FEATURE_SIZE_MULTIPLE = 12
#: The only patch size for which SwinUNETR's decoder lines up with its full-resolution skip.
SWIN_UNETR_PATCH_SIZE = 2
#: Hidden states returned by the Swin transformer: the patch embedding and one per stage.
NUM_HIDDEN_STATES = SWIN_STAGES + 1
#: SwinUNETR's decoder normalisation (its default), used by :class:`SwinUNETRSegHead` too.
SWIN_UNETR_NORM = "instance"


def _stage_ints(values: Any, key: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != SWIN_STAGES:
        raise ValueError(f"{key}: got {values!r}, expected a list of {SWIN_STAGES} positive integers (one per stage)")
    return tuple(positive_int(value, f"{key}[{stage}]") for stage, value in enumerate(values))


class SwinEncoder(SwinTransformer):
    """MONAI's ``SwinTransformer`` exactly as ``SwinUNETR`` builds its ``swinViT``.

    Patch embedding (a ``patch_size`` strided convolution to ``feature_size`` channels),
    then four stages of (shifted-)window attention blocks, each ending in a 2x patch
    merging that doubles the channels. Same arguments as ``SwinUNETR`` passes: MLP ratio 4,
    qkv bias, no dropout or drop path, ``LayerNorm``, no patch norm, ``"merging"``
    down-sampling, not v2, windowed attention (no Hyena stages).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for CT).
        feature_size: embedding width, a multiple of 12 (SwinUNETR's rule).
        patch_size: patch embedding size and stride (2 for SwinUNETR).
        window_size: attention window (clipped by MONAI to the map size on small maps).
        depths: Swin blocks per stage, 4 entries.
        num_heads: attention heads per stage, 4 entries; stage ``k`` has
            ``feature_size * 2**k`` channels, which must be divisible by ``num_heads[k]``.
        normalize: layer-normalise every hidden state (``SwinUNETR``'s ``normalize``).
        use_checkpoint: gradient checkpointing (MONAI's ``use_checkpoint``): each Swin block's
            activations are recomputed in the backward pass instead of kept, which gives the
            same numbers with less memory for more compute (a SwinUNETR 3D of feature size 12
            on 64^3 crops on a CPU: 0.85x the memory, 1.4x the time per step;
            ``benchmarks/swin_checkpointing.py``).

    ``forward(x)`` / :meth:`feature_maps` with ``x`` of shape (B, in_channels, *S) return
    the five hidden states ``[h0, ..., h4]``, ``hk`` of shape
    (B, feature_size * 2**k, *S / (patch_size * 2**k)); :meth:`latent` is ``h4``, e.g.
    (B, 384, 2, 2) for a 64x64 slice with ``feature_size`` 24; :meth:`representation` is
    the global average pool of ``h4`` (layer-normalised when ``normalize``), (B,
    ``representation_dim``) with ``representation_dim = latent_channels = feature_size * 16``.
    Every spatial size must be divisible by ``latent_stride`` = ``patch_size * 2**4``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        feature_size: int = 24,
        patch_size: int = 2,
        window_size: int = 7,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        normalize: bool = True,
        use_checkpoint: bool = False,
    ):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        in_channels = positive_int(in_channels, "in_channels")
        feature_size = positive_int(feature_size, "feature_size")
        if feature_size % FEATURE_SIZE_MULTIPLE:
            raise ValueError(
                f"feature_size: got {feature_size}, expected a multiple of {FEATURE_SIZE_MULTIPLE} "
                "(SwinUNETR's rule), e.g. 12, 24 or 48"
            )
        patch_size = positive_int(patch_size, "patch_size")
        window_size = positive_int(window_size, "window_size")
        depths = _stage_ints(depths, "depths")
        num_heads = _stage_ints(num_heads, "num_heads")
        for stage, heads in enumerate(num_heads):
            width = feature_size * 2**stage
            if width % heads:
                raise ValueError(
                    f"num_heads[{stage}]: got {heads}, but stage {stage} has {width} channels "
                    f"(feature_size {feature_size} x 2**{stage}), which must be divisible by its number of heads"
                )
        super().__init__(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=ensure_tuple_rep(window_size, spatial_dims),
            patch_size=ensure_tuple_rep(patch_size, spatial_dims),
            depths=depths,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.0,
            norm_layer=nn.LayerNorm,
            patch_norm=False,
            use_checkpoint=bool(use_checkpoint),
            spatial_dims=spatial_dims,
            downsample=MERGING_MODE["merging"],
            use_v2=False,
        )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.feature_size = feature_size
        # MONAI's tuples of these two are read only while building; expose the params' scalars.
        self.patch_size = patch_size
        self.window_size = window_size
        self.depths = depths
        self.num_heads = num_heads
        self.normalize = bool(normalize)
        self.use_checkpoint = bool(use_checkpoint)
        self.latent_channels = feature_size * 2**SWIN_STAGES
        self.representation_dim = self.latent_channels
        self.latent_stride = patch_size * 2**SWIN_STAGES

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (B, in_channels, *S) with every size a multiple of ``latent_stride``."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SwinEncoder: expected input of shape (B, {self.in_channels}, *S) with {self.spatial_dims} "
                f"spatial dims, got {tuple(x.shape)}"
            )
        spatial = tuple(int(size) for size in x.shape[2:])
        if any(size % self.latent_stride for size in spatial):
            raise ValueError(
                f"SwinEncoder: spatial size {spatial} is not divisible by {self.latent_stride} "
                f"(patch_size {self.patch_size} x 2**{SWIN_STAGES} patch mergings)"
            )

    def forward(self, x: torch.Tensor, normalize: bool | None = None) -> list[torch.Tensor]:
        """The five hidden states (see the class docstring); ``normalize`` defaults to the constructor's."""
        self.check_input(x)
        return super().forward(x, self.normalize if normalize is None else normalize)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states shallow to deep: ``[h0, ..., h4]``, ``hk`` of shape
        (B, feature_size * 2**k, *S / (patch_size * 2**k)).
        """
        return self.forward(x)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest hidden state (B, latent_channels, *S / latent_stride)."""
        return self.forward(x)[-1]

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool of the deepest hidden state ``h4``: (B, latent_channels)."""
        return self.latent(x).flatten(2).mean(dim=2)

    def config(self) -> dict[str, Any]:
        """The ``backbone`` params block that rebuilds this encoder with :func:`build_swin_encoder`.

        ``normalize`` appears only when it is off (the params block's default is on),
        ``use_checkpoint`` only when it is on.
        """
        block: dict[str, Any] = {
            "name": "swin",
            "spatial_dims": self.spatial_dims,
            "feature_size": self.feature_size,
            "patch_size": self.patch_size,
            "window_size": self.window_size,
            "depths": list(self.depths),
            "num_heads": list(self.num_heads),
        }
        if not self.normalize:
            block["normalize"] = False
        if self.use_checkpoint:
            block["use_checkpoint"] = True
        return block

    def swin_unetr_kwargs(self, out_channels: int = 2) -> dict[str, Any]:
        """Keyword arguments of the ``SwinUNETR`` whose ``swinViT`` this encoder matches."""
        return {
            "in_channels": self.in_channels,
            "out_channels": out_channels,
            "patch_size": self.patch_size,
            "depths": self.depths,
            "num_heads": self.num_heads,
            "window_size": self.window_size,
            "qkv_bias": True,
            "mlp_ratio": 4.0,
            "feature_size": self.feature_size,
            "norm_name": SWIN_UNETR_NORM,
            "drop_rate": 0.0,
            "attn_drop_rate": 0.0,
            "dropout_path_rate": 0.0,
            "normalize": self.normalize,
            "norm_layer": nn.LayerNorm,
            "patch_norm": False,
            "use_checkpoint": self.use_checkpoint,
            "spatial_dims": self.spatial_dims,
            "downsample": "merging",
            "use_v2": False,
        }

    def monai_equivalent(self, out_channels: int = 2) -> SwinUNETR:
        """A fresh MONAI ``SwinUNETR`` (random weights) whose ``.swinViT`` has this encoder's structure."""
        return SwinUNETR(**self.swin_unetr_kwargs(out_channels))


def build_swin_encoder(cfg: Mapping[str, Any]) -> SwinEncoder:
    """Build a :class:`SwinEncoder` from a validated ``backbone`` params block.

    ``cfg``: ``{"name": "swin", "spatial_dims": 2 | 3, "feature_size": int,
    "patch_size": int, "window_size": int, "depths": [4 ints], "num_heads": [4 ints]}``,
    optionally ``"normalize": bool`` (default true) and ``"use_checkpoint": bool`` (default
    false). Weights come from torch's global
    generator; wrap the call in :func:`chestssl.models.seeding.seeded` for a reproducible
    initialisation.
    """
    return SwinEncoder(
        spatial_dims=cfg["spatial_dims"],
        in_channels=1,
        feature_size=cfg["feature_size"],
        patch_size=cfg["patch_size"],
        window_size=cfg["window_size"],
        depths=cfg["depths"],
        num_heads=cfg["num_heads"],
        normalize=cfg.get("normalize", True),
        use_checkpoint=cfg.get("use_checkpoint", False),
    )


def _require_swin_unetr_patch(encoder: SwinEncoder) -> None:
    if encoder.patch_size != SWIN_UNETR_PATCH_SIZE:
        raise ValueError(
            f"a SwinUNETR decoder needs an encoder with patch_size {SWIN_UNETR_PATCH_SIZE}, got {encoder.patch_size} "
            "(its last up-sampling must reach the full-resolution skip)"
        )


def check_decoder_input(spatial_shape: Sequence[int], latent_stride: int) -> None:
    """Raise ``ValueError`` unless a SwinUNETR decoder can run on slices of ``spatial_shape``.

    Every size must be a multiple of ``latent_stride``, and the deepest map
    (``S / latent_stride``) must hold more than one element for the instance norm of
    ``encoder10`` (torch refuses one element, in training and in evaluation alike).
    """
    spatial = tuple(int(size) for size in spatial_shape)
    if any(size % latent_stride for size in spatial):
        raise ValueError(
            f"SwinUNETR: spatial size {spatial} is not divisible by {latent_stride}, the encoder's latent stride"
        )
    deepest = tuple(size // latent_stride for size in spatial)
    if math.prod(deepest) < 2:
        raise ValueError(
            f"SwinUNETR: spatial size {spatial} leaves a deepest map of {deepest}, but the decoder's instance "
            f"norm needs more than one element there, so a size of at least {2 * latent_stride}"
        )


class CheckedSwinUNETR(SwinUNETR):
    """MONAI's ``SwinUNETR`` whose input check also covers the decoder's smallest size.

    Identical modules, weights and ``forward``; only :meth:`_check_input_size` differs: on a
    bad size it raises a ``ValueError`` that says which sizes work (see
    :func:`check_decoder_input`) instead of failing inside an instance norm.
    """

    @torch.jit.unused
    def _check_input_size(self, spatial_shape: Sequence[int]) -> None:
        super()._check_input_size(spatial_shape)
        check_decoder_input(spatial_shape, self.patch_size * 2**SWIN_STAGES)


def swin_unetr_from_encoder(encoder: SwinEncoder, out_channels: int = 2, seed: int = 0) -> SwinUNETR:
    """A MONAI ``SwinUNETR`` whose ``swinViT`` is a copy of ``encoder``.

    The convolutional blocks (``encoder1..4``, ``encoder10``, ``decoder1..5``, ``out``) are
    initialised at random from ``seed``; ``swinViT`` receives the encoder's weights (copied,
    so training the SwinUNETR never changes ``encoder``). ``forward(x)``: x (B, in_channels,
    *S) -> logits (B, out_channels, *S); every size a multiple of 32 and at least one of
    them at least 64 (see :func:`check_decoder_input`).

    Args:
        encoder: a (pretrained) :class:`SwinEncoder` with ``patch_size`` 2.
        out_channels: output channels (2 for background/nodule with softmax).
        seed: seed of the decoder's initialisation.
    """
    _require_swin_unetr_patch(encoder)
    with seeded(seed):
        network = CheckedSwinUNETR(**encoder.swin_unetr_kwargs(out_channels))
    network.swinViT.load_state_dict(encoder.state_dict(), strict=True)
    return network


class SwinUNETRSegHead(nn.Module):
    """SwinUNETR's segmentation side for a Swin encoder shared with other heads.

    The submodules of ``SwinUNETR`` other than ``swinViT``, with the same names and
    arguments: ``encoder1`` (on the image), ``encoder2..4`` (on hidden states 0-2),
    ``encoder10`` (on hidden state 4), ``decoder5..1`` (up-sampling blocks joining the
    skips) and ``out`` (1x1 convolution to ``out_channels``). Its ``state_dict`` keys are
    SwinUNETR's minus ``swinViT.*``, so the head and the encoder together load into a
    ``SwinUNETR`` (:func:`swin_unetr_from_parts`). Used by seed 000's multi-task
    autoencoder, whose segmentation head is the SwinUNETR decoder.

    Args:
        encoder: the shared :class:`SwinEncoder` (``patch_size`` 2); only its configuration
            is read, the head does not hold it.
        out_channels: output channels (2 for background/nodule with softmax).

    ``forward(x_in, hidden_states)``: the image x_in (B, in_channels, *S) and
    ``encoder.feature_maps(x_in)`` -> logits (B, out_channels, *S), exactly what
    ``SwinUNETR.forward`` computes after its ``swinViT`` call.
    """

    def __init__(self, encoder: SwinEncoder, out_channels: int = 2):
        super().__init__()
        _require_swin_unetr_patch(encoder)
        dims, size, norm = encoder.spatial_dims, encoder.feature_size, SWIN_UNETR_NORM
        self.spatial_dims = dims
        self.in_channels = encoder.in_channels
        self.feature_size = size
        self.out_channels = positive_int(out_channels, "SwinUNETRSegHead out_channels")
        self.latent_stride = encoder.latent_stride

        def basic(in_channels: int, out_channels: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(
                dims, in_channels, out_channels, kernel_size=3, stride=1, norm_name=norm, res_block=True
            )

        def up(in_channels: int, out_channels: int) -> UnetrUpBlock:
            return UnetrUpBlock(
                dims, in_channels, out_channels, kernel_size=3, upsample_kernel_size=2, norm_name=norm, res_block=True
            )

        self.encoder1 = basic(encoder.in_channels, size)
        self.encoder2 = basic(size, size)
        self.encoder3 = basic(2 * size, 2 * size)
        self.encoder4 = basic(4 * size, 4 * size)
        self.encoder10 = basic(16 * size, 16 * size)
        self.decoder5 = up(16 * size, 8 * size)
        self.decoder4 = up(8 * size, 4 * size)
        self.decoder3 = up(4 * size, 2 * size)
        self.decoder2 = up(2 * size, size)
        self.decoder1 = up(size, size)
        self.out = UnetOutBlock(dims, size, self.out_channels)

    def forward(self, x_in: torch.Tensor, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(hidden_states) != NUM_HIDDEN_STATES:
            raise ValueError(
                f"SwinUNETRSegHead: expected the {NUM_HIDDEN_STATES} hidden states of SwinEncoder.feature_maps, "
                f"got {len(hidden_states)}"
            )
        check_decoder_input(x_in.shape[2:], self.latent_stride)
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(hidden_states[0])
        enc2 = self.encoder3(hidden_states[1])
        enc3 = self.encoder4(hidden_states[2])
        dec4 = self.encoder10(hidden_states[4])
        dec3 = self.decoder5(dec4, hidden_states[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        out = self.decoder1(dec0, enc0)
        return self.out(out)


def swin_unetr_from_parts(encoder: SwinEncoder, seg_head: SwinUNETRSegHead) -> SwinUNETR:
    """One MONAI ``SwinUNETR`` holding copies of a shared encoder and its segmentation head.

    Turns the segmentation branch of a multi-head model into a stand-alone network with
    the same outputs: ``swin_unetr_from_parts(e, h)(x) == h(x, e.feature_maps(x))``.
    """
    if (seg_head.spatial_dims, seg_head.in_channels, seg_head.feature_size) != (
        encoder.spatial_dims,
        encoder.in_channels,
        encoder.feature_size,
    ):
        raise ValueError(
            f"swin_unetr_from_parts: the head was built for spatial_dims={seg_head.spatial_dims}, "
            f"in_channels={seg_head.in_channels}, feature_size={seg_head.feature_size}, the encoder has "
            f"{encoder.spatial_dims}, {encoder.in_channels}, {encoder.feature_size}"
        )
    # The initial weights are all overwritten; the seed only keeps the caller's random stream intact.
    with seeded(0):
        network = CheckedSwinUNETR(**encoder.swin_unetr_kwargs(seg_head.out_channels))
    network.swinViT.load_state_dict(encoder.state_dict(), strict=True)
    missing, unexpected = network.load_state_dict(seg_head.state_dict(), strict=False)
    leftover = [key for key in missing if not key.startswith("swinViT.")]
    if leftover or unexpected:
        raise ValueError(
            f"swin_unetr_from_parts: head weights do not fit SwinUNETR (missing {leftover}, unexpected {unexpected})"
        )
    return network
