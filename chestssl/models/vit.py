"""The ViT backbone: MONAI's classification ``ViT`` without its head, plus masked encoding.

Vision Transformer: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for
Image Recognition at Scale", ICLR 2021 (arXiv:2010.11929), as implemented by MONAI's
:class:`~monai.networks.nets.ViT`. Masked encoding (only the visible patches enter the
encoder): He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022
(arXiv:2111.06377), the encoder of seed 004 (RadDiffusion).

:class:`ViTEncoder` *is* a MONAI ``ViT`` built with ``classification=True`` (so it has a
CLS token) whose ``classification_head`` is removed. Its ``state_dict`` keys are::

    cls_token                                   (1, 1, hidden_size)
    patch_embedding.position_embeddings         (1, N, hidden_size), fixed sin-cos
    patch_embedding.patch_embeddings.{weight,bias}   the patch convolution
    blocks.{i}.{norm1,attn,norm2,mlp,norm_cross_attn}.*   MONAI TransformerBlocks
    norm.{weight,bias}                          the final LayerNorm

exactly those of ``ViT(**encoder.vit_kwargs())`` minus ``classification_head.*``, so it
loads with ``strict=True`` into :meth:`ViTEncoder.monai_equivalent` (that ViT with its
head deleted), and with ``strict=False`` (missing keys: the head only) into a MONAI
classification ``ViT`` of any ``num_classes``. It is not MONAI's
``MaskedAutoEncoderViT`` encoder: that one keeps its final norm inside ``blocks``
(``blocks.{num_layers}.*``) and masks with torch's global generator and a truncated
count, while here masks come from a caller's generator (:mod:`chestssl.methods.mae`).

Fixed choices (the ``backbone`` block does not expose them): convolutional patch
embedding, fixed 2D/3D sin-cos position embeddings (MAE; so ``hidden_size`` must be a
multiple of 4 in 2D and of 6 in 3D), qkv bias (MAE's ViT), no dropout. The CLS token
carries no position embedding (MONAI's ViT). The ``norm_cross_attn`` LayerNorm that
MONAI's ``TransformerBlock`` creates even without cross-attention never enters the
computation; its parameters are frozen (``requires_grad=False``) so that every trainable
parameter receives a gradient (DDP needs no search for unused ones).

Shapes, with ``x`` (B, 1, *S), every side equal to ``img_size``, ``p = patch_size``,
``grid = (img_size / p,) * spatial_dims`` and ``N = prod(grid)`` patches:

- ``forward(x)`` (MONAI's): ``(tokens, hidden_states)``, ``tokens`` (B, 1 + N, hidden)
  after the final norm, ``hidden_states`` the ``num_layers`` block outputs (B, 1 + N,
  hidden) before it (what MONAI's UNETR reads);
- :meth:`feature_maps`: one map per transformer block, the block's patch tokens
  (CLS dropped, before the final norm) as (B, hidden, *grid), shallow to deep;
- :meth:`latent`: the final-norm patch tokens as (B, ``latent_channels`` = hidden,
  *grid), ``latent_stride`` = ``p``;
- :meth:`representation`: the final-norm CLS token, no masking (seed 004's linear-probe
  feature), (B, ``representation_dim`` = hidden);
- :meth:`encode_visible`: CLS + the visible patches only, (B, 1 + K, hidden).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from monai.networks.nets import ViT

from chestssl.checks import positive_int
from chestssl.params import SINCOS_MULTIPLE  # what MONAI's sin-cos position embedding needs

#: The ``backbone`` keys the ``vit`` builder reads (besides ``name``).
VIT_KEYS = ("spatial_dims", "img_size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim")


def check_sincos_width(width: int, spatial_dims: int, key: str) -> None:
    """Raise ``ValueError`` unless ``width`` suits a ``spatial_dims`` sin-cos position embedding."""
    multiple = SINCOS_MULTIPLE[spatial_dims]
    if width % multiple:
        raise ValueError(
            f"{key}: got {width}, expected a multiple of {multiple} for {spatial_dims}D sin-cos position "
            f"embeddings (e.g. {multiple * max(1, round(width / multiple))})"
        )


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into flattened non-overlapping patches.

    ``images`` (B, C, *S) with every side a multiple of ``patch_size`` ->
    (B, N, patch_size**D * C), patches in row-major grid order (the order of the patch
    convolution's flattened output, hence of the ViT's tokens), pixels within a patch in
    row-major order with the channel last.
    """
    batch, channels, *spatial = images.shape
    if any(side % patch_size for side in spatial):
        raise ValueError(f"patchify: spatial size {tuple(spatial)} is not divisible by patch_size {patch_size}")
    grid = [side // patch_size for side in spatial]
    dims = len(grid)
    split: list[int] = [batch, channels]
    for cells in grid:
        split += [cells, patch_size]
    order = [0, *(2 + 2 * i for i in range(dims)), *(3 + 2 * i for i in range(dims)), 1]
    return images.reshape(split).permute(order).reshape(batch, math.prod(grid), patch_size**dims * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: Sequence[int], channels: int = 1) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, patch_size**D * C) -> (B, C, *(grid * patch_size))."""
    batch = patches.shape[0]
    dims = len(grid)
    if patches.shape[1] != math.prod(grid) or patches.shape[2] != patch_size**dims * channels:
        raise ValueError(
            f"unpatchify: got patches of shape {tuple(patches.shape)}, expected (B, {math.prod(grid)}, "
            f"{patch_size**dims * channels}) for grid {tuple(grid)} and patch_size {patch_size}"
        )
    x = patches.reshape(batch, *grid, *([patch_size] * dims), channels)
    order = [0, 2 * dims + 1]
    for i in range(dims):
        order += [1 + i, 1 + dims + i]
    return x.permute(order).reshape(batch, channels, *(cells * patch_size for cells in grid))


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` (B, K) of ``tokens`` (B, N, D), per sample -> (B, K, D)."""
    return torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class ViTEncoder(ViT):
    """MONAI's ``ViT(classification=True)`` without ``classification_head`` (module docstring).

    Args:
        spatial_dims: 2 or 3.
        img_size: side of the (square or cubic) input; the position embeddings are built
            for it, so it must equal the data's slice (2D) or crop (3D) size.
        patch_size: side of a patch, dividing ``img_size``.
        hidden_size: token width; a multiple of ``num_heads`` and of 4 (2D) or 6 (3D).
        num_layers: transformer blocks.
        num_heads: attention heads per block.
        mlp_dim: hidden width of each block's MLP.
        in_channels: image channels (1 for CT).
    """

    def __init__(
        self,
        spatial_dims: int,
        img_size: int,
        patch_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        mlp_dim: int,
        in_channels: int = 1,
    ):
        if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        img_size = positive_int(img_size, "img_size")
        patch_size = positive_int(patch_size, "patch_size")
        if img_size % patch_size:
            raise ValueError(f"patch_size: got {patch_size}, which does not divide img_size {img_size}")
        hidden_size = positive_int(hidden_size, "hidden_size")
        num_layers = positive_int(num_layers, "num_layers")
        num_heads = positive_int(num_heads, "num_heads")
        mlp_dim = positive_int(mlp_dim, "mlp_dim")
        in_channels = positive_int(in_channels, "in_channels")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size: got {hidden_size}, which is not divisible by num_heads {num_heads}")
        check_sincos_width(hidden_size, spatial_dims, "hidden_size")
        self.spatial_dims = int(spatial_dims)
        self.in_channels = in_channels
        self.img_size = img_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        super().__init__(**self.vit_kwargs())
        del self.classification_head
        for block in self.blocks:
            block.norm_cross_attn.requires_grad_(False)
        self.grid_size: tuple[int, ...] = (img_size // patch_size,) * self.spatial_dims
        self.num_patches = math.prod(self.grid_size)
        #: Values per flattened patch (:func:`patchify`).
        self.patch_dim = patch_size**self.spatial_dims * in_channels
        self.latent_channels = hidden_size
        self.latent_stride = patch_size
        self.representation_dim = hidden_size

    def vit_kwargs(self, num_classes: int = 2) -> dict[str, Any]:
        """Keyword arguments of the MONAI ``ViT`` this encoder is (with a ``num_classes`` head)."""
        return {
            "in_channels": self.in_channels,
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "mlp_dim": self.mlp_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "proj_type": "conv",
            "pos_embed_type": "sincos",
            "classification": True,
            "num_classes": num_classes,
            "dropout_rate": 0.0,
            "spatial_dims": self.spatial_dims,
            "qkv_bias": True,
        }

    def monai_equivalent(self) -> ViT:
        """A fresh MONAI ``ViT`` (random weights) with this structure: ``classification=True``,
        ``classification_head`` deleted, so this encoder's ``state_dict`` loads into it strictly."""
        network = ViT(**self.vit_kwargs())
        del network.classification_head
        return network

    def config(self) -> dict[str, Any]:
        """The ``backbone`` params block that rebuilds this encoder with :func:`build_vit_encoder`."""
        return {
            "name": "vit",
            "spatial_dims": self.spatial_dims,
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
        }

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (B, in_channels, img_size, ...) with ``spatial_dims`` sides."""
        expected = (self.img_size,) * self.spatial_dims
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ViTEncoder: expected input of shape (B, {self.in_channels}, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}"
            )
        if tuple(x.shape[2:]) != expected:
            raise ValueError(
                f"ViTEncoder: input size {tuple(x.shape[2:])} differs from img_size {self.img_size} "
                "(the position embeddings are built for one size)"
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """MONAI's ``ViT.forward`` without the head: final-norm tokens (B, 1 + N, hidden), CLS first,
        and the ``num_layers`` block outputs (B, 1 + N, hidden)."""
        self.check_input(x)
        return super().forward(x)

    def tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, hidden) in grid order -> a map (B, hidden, *grid)."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid_size)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One map per transformer block, shallow to deep: its patch tokens (before the final
        norm) as (B, hidden, *grid)."""
        _, hidden_states = self.forward(x)
        return [self.tokens_to_map(state[:, 1:]) for state in hidden_states]

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm patch tokens of the last layer as (B, latent_channels, *S / latent_stride)."""
        tokens, _ = self.forward(x)
        return self.tokens_to_map(tokens[:, 1:])

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token after the final norm, no masking: (B, 1, *S) -> (B, representation_dim)."""
        tokens, _ = self.forward(x)
        return tokens[:, 0]

    def encode_visible(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Encode only the visible patches (MAE's encoder).

        Args:
            x: images (B, in_channels, *S).
            visible: indices (B, K) of the patches each sample keeps, into the N grid-order
                patches; the same K for every sample.

        Returns:
            Final-norm tokens (B, 1 + K, hidden): CLS, then the visible patches in the order
            of ``visible``. Each patch keeps its position embedding, so with all N indices in
            grid order this equals ``forward(x)[0]``.
        """
        self.check_input(x)
        if visible.ndim != 2 or visible.shape[0] != x.shape[0]:
            raise ValueError(
                f"ViTEncoder.encode_visible: expected indices of shape ({x.shape[0]}, K), got {tuple(visible.shape)}"
            )
        patches = gather_tokens(self.patch_embedding(x), visible)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


def build_vit_encoder(cfg: Mapping[str, Any]) -> ViTEncoder:
    """Build a :class:`ViTEncoder` from a validated ``backbone`` params block.

    ``cfg``: ``{"name": "vit", "spatial_dims": 2 | 3, "img_size": int, "patch_size": int,
    "hidden_size": int, "num_layers": int, "num_heads": int, "mlp_dim": int}``. Weights
    come from torch's global generator; wrap the call in
    :func:`chestssl.models.seeding.seeded` for a reproducible initialisation.
    """
    return ViTEncoder(**{key: cfg[key] for key in VIT_KEYS}, in_channels=1)
