"""``mae`` and ``diffmae``: masked autoencoders on the ViT backbone (seed 004, RadDiffusion).

Both mask a random ``mask_ratio`` of each image's N patches (seed 004: 0.5), encode the
CLS token and the K visible patches with the ``vit`` backbone
(:meth:`~chestssl.models.vit.ViTEncoder.encode_visible`), and let a light transformer
decoder (``decoder_hidden_size``, ``decoder_num_layers``, ``decoder_num_heads``; MLP width
4x, fixed sin-cos position embeddings, MONAI ``TransformerBlock``\\ s) predict the M =
``round(mask_ratio * N)`` masked patches. Targets are the flattened patches
(:func:`~chestssl.models.vit.patchify`), each normalised by its own mean and standard
deviation when ``norm_pix_loss`` is true (MAE's normalised-pixel target; seed 004: true).
The loss is the mean squared error over the masked patches only.

- ``mae``: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022
  (arXiv:2111.06377). The decoder reads CLS + visible tokens with a shared learned mask
  token at every masked position and predicts every patch; the loss reads the masked ones.
- ``diffmae``: Wei et al., "Diffusion Models as Masked Autoencoders", ICCV 2023
  (arXiv:2304.03283). Only the masked patches are diffused: each sample draws one step
  ``t`` of a ``num_steps`` DDPM schedule (Ho et al., NeurIPS 2020) and its masked
  targets ``x0`` become ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. The decoder
  takes the noised masked patches (plus their position and a sinusoidal embedding of
  ``t``) as queries that self-attend and cross-attend to the CLS + visible encoder tokens
  (MONAI ``TransformerBlock(with_cross_attention=True)``), and predicts ``x0``. The
  schedule is seed 004's, ``beta = linspace(beta_start, beta_end, num_steps) ** 2``
  (1e-4, 0.2, 100), built by MONAI's ``DDPMScheduler`` with its ``scaled_linear_beta``
  schedule (which squares a linspace of the square roots of its arguments, so it is given
  ``beta_start**2`` and ``beta_end**2``). Validation runs the full reverse chain: from pure
  noise for the masked patches, ``num_steps`` steps of x0-prediction followed by the DDPM
  posterior step (``DDPMScheduler.step``, ``prediction_type="sample"``, no clipping),
  vectorised over the batch; ``val/loss`` is the MSE of the final ``x0`` on the masked
  patches. With ``norm_pix_loss`` false the diffusion runs on the pixel values (in [0, 1]).

Two departures from seed 004: its bottleneck CLS (averaging the CLS tokens of the views
of one study) has no counterpart, as a CT slice is a single view; and its DiffMAE decoder
was not told the step, while here each query also carries an embedding of ``t`` (DDPM's
conditioning), since one decoder serves every step of the reverse chain.

Randomness: training step ``s`` of process ``r`` draws its masks (and, for ``diffmae``,
its steps and noise) from a generator seeded with ``(seed, 0, r, s)``; ``s`` is a buffer,
so a resumed run draws exactly as an uninterrupted one. The ``n``-th batch of every
validation pass uses ``(seed, 1, n)``, so validation losses compare across epochs, and
:meth:`~MaskedPatchPretraining.reconstruct` uses ``(seed, 2)``, so the reconstruction
figure always shows the same masks.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.layers import trunc_normal_
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from chestssl.methods.base import PretrainMethod
from chestssl.models.seeding import seeded
from chestssl.models.vit import ViTEncoder, build_vit_encoder, gather_tokens, patchify, unpatchify
from chestssl.params import SINCOS_MULTIPLE, MethodConfig
from chestssl.schema import Bool, Float, Int

#: Seed streams of the random draws: training steps, validation batches, reconstructions.
TRAIN_STREAM, VALIDATION_STREAM, RECONSTRUCTION_STREAM = 0, 1, 2
#: Added to each patch's variance before normalising it (MAE's ``norm_pix_loss``).
NORM_PIX_EPS = 1e-6
#: Decoder MLP width as a multiple of ``decoder_hidden_size`` (MAE's decoder).
DECODER_MLP_RATIO = 4


def _stream_seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _process_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class MAEConfig(MethodConfig):
    """``method: mae``: seed 004's masked autoencoder on a ViT backbone."""

    method: Literal["mae"]
    backbone_names = ("vit",)  # its encoder reads only the visible patch tokens
    mask_ratio: Float(gt=0.0, le=1.0, doc="share of the patches masked; seed 004: 0.5")
    norm_pix_loss: Bool()
    decoder_hidden_size: Int(ge=1, doc="a multiple of decoder_num_heads, and of 4 (2D) or 6 (3D)")
    decoder_num_layers: Int(ge=1)
    decoder_num_heads: Int(ge=1)

    def entry_problems(self, backbone: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The decoder's width against its heads and position embedding, and the masking and
        pixel normalisation against the ViT's patches."""
        problems = []
        dims, side, patch = backbone["spatial_dims"], backbone["img_size"], backbone["patch_size"]
        multiple = SINCOS_MULTIPLE[dims]
        if self.decoder_hidden_size % self.decoder_num_heads:
            problems.append(("decoder_hidden_size", f"got {self.decoder_hidden_size}, which is not divisible by "
                                                    f"decoder_num_heads {self.decoder_num_heads}"))
        elif self.decoder_hidden_size % multiple:
            problems.append(("decoder_hidden_size", f"got {self.decoder_hidden_size}, expected a multiple of "
                                                    f"{multiple} for {dims}D sin-cos position embeddings"))
        patches = (side // patch) ** dims
        if not 0 < round(self.mask_ratio * patches) < patches:
            problems.append(("mask_ratio", f"got {self.mask_ratio:g}, expected a fraction that masks at least one and "
                                           f"leaves at least one of the backbone's {patches} patches "
                                           f"(round(ratio * {patches}) in 1..{patches - 1}); seed 004: 0.5"))
        if self.norm_pix_loss and patch < 2:
            problems.append(("norm_pix_loss", "true needs patches of at least 2 pixels to normalise, but the "
                                              "backbone's patch_size is 1; raise it or set norm_pix_loss to false"))
        return problems


class DiffMAEConfig(MAEConfig):
    """``method: diffmae``: seed 004's diffusion masked autoencoder."""

    method: Literal["diffmae"]
    num_steps: Int(ge=2, doc="diffusion steps; seed 004: 100")
    beta_start: Float(gt=0.0, le=1.0, doc="below beta_end; seed 004: 1e-4")
    beta_end: Float(gt=0.0, le=1.0, doc="seed 004: 0.2")

    def entry_problems(self, backbone: Mapping[str, Any]) -> list[tuple[str, str]]:
        problems = super().entry_problems(backbone)
        if self.beta_start >= self.beta_end:
            problems.append(("", f"beta_start {self.beta_start:g} must be below beta_end {self.beta_end:g}"))
        return problems


@dataclass(frozen=True)
class PatchMask:
    """Which patches of each sample are visible and which are masked.

    ``visible`` (B, K) and ``masked`` (B, M) are int64 indices into the N grid-order
    patches, each row sorted; together they are a permutation of ``0..N-1``.
    """

    visible: torch.Tensor
    masked: torch.Tensor

    @property
    def num_patches(self) -> int:
        return self.visible.shape[1] + self.masked.shape[1]

    def is_masked(self) -> torch.Tensor:
        """(B, N) bool, true at the masked patches."""
        flags = torch.zeros(self.masked.shape[0], self.num_patches, dtype=torch.bool, device=self.masked.device)
        return flags.scatter(1, self.masked, True)


def random_patch_mask(
    batch_size: int, num_patches: int, num_masked: int, generator: torch.Generator, device: torch.device
) -> PatchMask:
    """Mask ``num_masked`` of ``num_patches`` patches per sample, uniformly at random.

    Each sample's patches are ranked by a uniform draw from ``generator`` (on ``device``);
    the ``num_masked`` highest are masked (MAE's per-sample shuffle), so the same generator
    state gives the same masks.
    """
    if not 0 < num_masked < num_patches:
        raise ValueError(f"random_patch_mask: num_masked must be in 1..{num_patches - 1}, got {num_masked}")
    order = torch.argsort(torch.rand(batch_size, num_patches, generator=generator, device=device), dim=1)
    num_visible = num_patches - num_masked
    visible, _ = torch.sort(order[:, :num_visible], dim=1)
    masked, _ = torch.sort(order[:, num_visible:], dim=1)
    return PatchMask(visible=visible, masked=masked)


def scatter_tokens(tokens: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``tokens`` (B, N, D) with rows ``indices`` (B, K) replaced by ``values`` (B, K, D)."""
    return tokens.scatter(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), values)


def patch_targets(
    image: torch.Tensor, patch_size: int, normalise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened patches of ``image`` (B, C, *S) as float32 targets.

    Returns ``(target, mean, scale)``, each over the N patches: ``target`` (B, N, D), and
    ``mean``, ``scale`` (B, N, 1) with ``patches = target * scale + mean``. With
    ``normalise``, ``mean`` is each patch's mean and ``scale`` ``sqrt(var + 1e-6)``
    (unbiased variance, as MAE); otherwise 0 and 1.
    """
    patches = patchify(image.float(), patch_size)
    if not normalise:
        return patches, torch.zeros_like(patches[..., :1]), torch.ones_like(patches[..., :1])
    mean = patches.mean(dim=-1, keepdim=True)
    scale = (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()
    return (patches - mean) / scale, mean, scale


def masked_patch_mse(prediction: torch.Tensor, target: torch.Tensor, mask: PatchMask) -> torch.Tensor:
    """MSE over the masked patches only: ``prediction``, ``target`` (B, N, D), in float32.

    Visible patches do not contribute, whatever their prediction.
    """
    return F.mse_loss(gather_tokens(prediction.float(), mask.masked), gather_tokens(target.float(), mask.masked))


def _decoder_blocks(hidden: int, num_layers: int, num_heads: int, cross_attention: bool) -> nn.ModuleList:
    blocks = nn.ModuleList(
        TransformerBlock(
            hidden, DECODER_MLP_RATIO * hidden, num_heads, qkv_bias=True, with_cross_attention=cross_attention
        )
        for _ in range(num_layers)
    )
    if not cross_attention:
        # MONAI builds this norm even without cross-attention; it never runs.
        for block in blocks:
            block.norm_cross_attn.requires_grad_(False)
    return blocks


class MaskedPatchDecoder(nn.Module):
    """MAE's decoder: encoder tokens plus mask tokens -> every patch.

    Args:
        encoder_hidden: width of the encoder tokens.
        hidden: decoder width (``decoder_hidden_size``).
        num_layers, num_heads: decoder transformer blocks and their heads.
        grid_size: the patch grid, e.g. (8, 8).
        patch_dim: values per flattened patch.

    ``forward(encoded, mask)``: ``encoded`` (B, 1 + K, encoder_hidden), CLS then the
    visible patches in the order of ``mask.visible`` -> predictions (B, N, patch_dim) for
    every patch in grid order. Visible tokens are projected to the decoder width, a learned
    mask token fills the masked positions, fixed sin-cos position embeddings are added to
    all N, and the CLS token is prepended (without one), as in MONAI's
    ``MaskedAutoEncoderViT`` decoder.
    """

    def __init__(
        self,
        encoder_hidden: int,
        hidden: int,
        num_layers: int,
        num_heads: int,
        grid_size: tuple[int, ...],
        patch_dim: int,
    ):
        super().__init__()
        self.embed = nn.Linear(encoder_hidden, hidden)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02, a=-2.0, b=2.0)
        self.position_embeddings = build_sincos_position_embedding(list(grid_size), hidden, len(grid_size))
        self.blocks = _decoder_blocks(hidden, num_layers, num_heads, cross_attention=False)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, patch_dim)

    def forward(self, encoded: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        tokens = self.embed(encoded)
        batch, hidden = tokens.shape[0], tokens.shape[2]
        grid_tokens = self.mask_token.expand(batch, mask.num_patches, hidden).to(tokens.dtype)
        grid_tokens = scatter_tokens(grid_tokens, mask.visible, tokens[:, 1:]) + self.position_embeddings
        tokens = torch.cat([tokens[:, :1], grid_tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens))[:, 1:]


class DiffusionPatchDecoder(nn.Module):
    """DiffMAE's decoder: noised masked patches cross-attend to the encoder tokens -> x0.

    Args: as :class:`MaskedPatchDecoder`.

    ``forward(encoded, visible, noised, masked, timesteps)``:

    - ``encoded`` (B, 1 + K, encoder_hidden): CLS then the visible patches (order of ``visible``);
    - ``visible`` (B, K), ``masked`` (B, M): patch indices;
    - ``noised`` (B, M, patch_dim): the masked patches at diffusion step ``timesteps`` (B,);

    returns the predicted clean masked patches (B, M, patch_dim). The context is the
    encoder tokens projected to the decoder width, the visible ones with their sin-cos
    position embedding; each query is a linear embedding of a noised patch plus its
    position embedding plus an MLP of the sinusoidal embedding of its sample's step
    (DDPM's conditioning). Each block: self-attention among the queries, cross-attention
    to the context, MLP.
    """

    def __init__(
        self,
        encoder_hidden: int,
        hidden: int,
        num_layers: int,
        num_heads: int,
        grid_size: tuple[int, ...],
        patch_dim: int,
    ):
        super().__init__()
        self.hidden = hidden
        self.context_embed = nn.Linear(encoder_hidden, hidden)
        self.patch_embed = nn.Linear(patch_dim, hidden)
        self.time_embed = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.position_embeddings = build_sincos_position_embedding(list(grid_size), hidden, len(grid_size))
        self.blocks = _decoder_blocks(hidden, num_layers, num_heads, cross_attention=True)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, patch_dim)

    def forward(
        self,
        encoded: torch.Tensor,
        visible: torch.Tensor,
        noised: torch.Tensor,
        masked: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        batch = encoded.shape[0]
        positions = self.position_embeddings.expand(batch, -1, -1)
        context = self.context_embed(encoded)
        context = torch.cat([context[:, :1], context[:, 1:] + gather_tokens(positions, visible)], dim=1)
        step = self.time_embed(get_timestep_embedding(timesteps, self.hidden).to(context.dtype))
        queries = self.patch_embed(noised) + gather_tokens(positions, masked) + step[:, None, :]
        for block in self.blocks:
            queries = block(queries, context=context)
        return self.head(self.norm(queries))


class MaskedPatchPretraining(PretrainMethod):
    """What ``mae`` and ``diffmae`` share: the ViT, masking, targets, seeds, reconstruction.

    ``cfg``: ``backbone`` (a ``vit`` block), ``mask_ratio`` (in (0, 1), leaving at least
    one visible and one masked patch), ``norm_pix_loss`` (bool), ``decoder_hidden_size``
    (a multiple of ``decoder_num_heads`` and of 4 in 2D, 6 in 3D), ``decoder_num_layers``,
    ``decoder_num_heads``. The ViT is built first inside the seeded block, so at step 0 it
    equals the ``scratch`` encoder of the same seed and backbone.

    Batches: ``image`` (B, 1, *S) in [0, 1], every side equal to ``backbone.img_size``.
    """

    reconstructs = True
    # Every trainable parameter gets a gradient in every step (the unused MONAI norms are frozen).
    ddp_find_unused_parameters = False

    def __init__(self, name: str, cfg: Mapping[str, Any], seed: int):
        super().__init__(name, cfg, seed)
        backbone = self.cfg["backbone"]
        self.norm_pix_loss = bool(self.cfg["norm_pix_loss"])
        decoder_hidden = int(self.cfg["decoder_hidden_size"])
        decoder_layers = int(self.cfg["decoder_num_layers"])
        decoder_heads = int(self.cfg["decoder_num_heads"])
        with seeded(self.seed):
            self.vit: ViTEncoder = build_vit_encoder(backbone)
            self.mask_ratio, self.num_masked = self._masking(float(self.cfg["mask_ratio"]))
            self.decoder = self._build_decoder(decoder_hidden, decoder_layers, decoder_heads)
        # Optimisation steps taken; a buffer, so a resumed run draws the same masks.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))
        self._validation_batches = 0

    def _masking(self, ratio: float) -> tuple[float, int]:
        """``ratio`` and the number of patches it masks, at least one and leaving one."""
        patches = self.vit.num_patches
        num_masked = round(ratio * patches)
        if not 0 < num_masked < patches:
            raise ValueError(f"mask ratio {ratio:g} masks {num_masked} of {patches} patches; "
                             f"expected 1..{patches - 1}")
        return ratio, num_masked

    @abstractmethod
    def _build_decoder(self, hidden: int, num_layers: int, num_heads: int) -> nn.Module:
        """The method's decoder for ``decoder_hidden_size`` etc. (built inside the seeded block)."""

    @property
    def num_patches(self) -> int:
        return self.vit.num_patches

    def encoder(self) -> nn.Module:
        return self.vit

    def train(self, mode: bool = True) -> "MaskedPatchPretraining":
        if self.training and not mode:
            self._validation_batches = 0
        return super().train(mode)

    def encode_visible(self, image: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K, D) encoder tokens of ``image`` (B, 1, *S) keeping the ``visible`` (B, K) patches.

        Every encoder call of the methods goes through here, so a subclass can change how
        the visible patches are encoded (study level: :mod:`chestssl.methods.study_mae`).
        """
        return self.vit.encode_visible(image, visible)

    def draw_mask(self, batch_size: int, generator: torch.Generator, device: torch.device) -> PatchMask:
        """``round(mask_ratio * N)`` masked patches per sample, drawn from ``generator``."""
        return random_patch_mask(batch_size, self.num_patches, self.num_masked, generator, device)

    def targets(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(target, mean, scale)`` of ``image`` (B, 1, *S); see :func:`patch_targets`."""
        return patch_targets(image, self.vit.patch_size, self.norm_pix_loss)

    def _generator(self, device: torch.device, *entropy: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(_stream_seed(self.seed, *entropy))

    @abstractmethod
    def training_losses(self, image: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Losses of one training batch with masks (and noise) drawn from ``generator``."""

    @abstractmethod
    def predict_masked(self, image: torch.Tensor, mask: PatchMask, generator: torch.Generator) -> torch.Tensor:
        """The method's prediction (B, M, D) of the masked patches of ``image``, in target space."""

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        generator = self._generator(image.device, TRAIN_STREAM, _process_rank(), int(self.steps_done))
        parts = self.training_losses(image, generator)
        self.steps_done += 1
        return parts

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``loss``: MSE of the predicted masked patches (``diffmae``: after the full reverse
        chain) against their targets; the n-th batch of every pass gets the same masks."""
        image = batch["image"]
        generator = self._generator(image.device, VALIDATION_STREAM, self._validation_batches)
        self._validation_batches += 1
        mask = self.draw_mask(image.shape[0], generator, image.device)
        target, _, _ = self.targets(image)
        prediction = self.predict_masked(image, mask, generator).float()
        return {"loss": F.mse_loss(prediction, gather_tokens(target, mask.masked))}

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (B, 1, *S) with its masked patches replaced by the prediction, in [0, 1].

        The masks (and ``diffmae``'s chain noise) come from a fixed seed, so every call on
        the same batch shows the same masks. With ``norm_pix_loss`` the predictions are
        mapped back to pixels with each masked patch's true mean and standard deviation
        (MAE's visualisation), so the figure shows the predicted structure, not the
        patch's brightness.
        """
        generator = self._generator(image.device, RECONSTRUCTION_STREAM)
        mask = self.draw_mask(image.shape[0], generator, image.device)
        _, mean, scale = self.targets(image)
        prediction = self.predict_masked(image, mask, generator).float()
        pixels = prediction * gather_tokens(scale, mask.masked) + gather_tokens(mean, mask.masked)
        patches = scatter_tokens(patchify(image.float(), self.vit.patch_size), mask.masked, pixels)
        recon = unpatchify(patches, self.vit.patch_size, self.vit.grid_size, self.vit.in_channels)
        return recon.clamp(0.0, 1.0).to(image.dtype)


class MaskedAutoencoderPretraining(MaskedPatchPretraining):
    """``mae``: He et al.'s masked autoencoder (module docstring); :class:`MaskedPatchDecoder`."""

    Config = MAEConfig

    decoder: MaskedPatchDecoder

    def _build_decoder(self, hidden: int, num_layers: int, num_heads: int) -> nn.Module:
        vit = self.vit
        return MaskedPatchDecoder(vit.hidden_size, hidden, num_layers, num_heads, vit.grid_size, vit.patch_dim)

    def predict_all(self, image: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        """Decoder output (B, N, D) for every patch of ``image`` (B, 1, *S) masked by ``mask``."""
        return self.decoder(self.encode_visible(image, mask.visible), mask)

    def training_losses(self, image: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``loss``: MSE over the masked patches of the (normalised) patch targets."""
        mask = self.draw_mask(image.shape[0], generator, image.device)
        target, _, _ = self.targets(image)
        return {"loss": masked_patch_mse(self.predict_all(image, mask), target, mask)}

    def predict_masked(self, image: torch.Tensor, mask: PatchMask, generator: torch.Generator) -> torch.Tensor:
        return gather_tokens(self.predict_all(image, mask), mask.masked)


@dataclass(frozen=True)
class NoisedPatches:
    """Patches with only the masked ones diffused: ``patches`` (B, N, D) equal to the input
    at visible positions, ``timesteps`` (B,) int64, ``noise`` (B, M, D) the ``eps`` of the
    masked patches (rows in the order of ``PatchMask.masked``)."""

    patches: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor


class DiffusionMaskedAutoencoderPretraining(MaskedPatchPretraining):
    """``diffmae``: Wei et al.'s diffusion masked autoencoder (module docstring).

    Extra ``cfg``: ``num_steps`` (diffusion steps, >= 2; seed 004: 100), ``beta_start`` and
    ``beta_end`` (0 < beta_start < beta_end <= 1; seed 004: 1e-4 and 0.2), giving
    ``beta = linspace(beta_start, beta_end, num_steps) ** 2``.
    """

    Config = DiffMAEConfig
    decoder: DiffusionPatchDecoder

    def __init__(self, name: str, cfg: Mapping[str, Any], seed: int):
        super().__init__(name, cfg, seed)
        self.num_steps = int(self.cfg["num_steps"])
        self.beta_start = float(self.cfg["beta_start"])
        self.beta_end = float(self.cfg["beta_end"])
        self.scheduler = DDPMScheduler(
            num_train_timesteps=self.num_steps,
            schedule="scaled_linear_beta",
            beta_start=self.beta_start**2,
            beta_end=self.beta_end**2,
            variance_type="fixed_small",
            clip_sample=False,
            prediction_type="sample",
        )

    def _build_decoder(self, hidden: int, num_layers: int, num_heads: int) -> nn.Module:
        vit = self.vit
        return DiffusionPatchDecoder(vit.hidden_size, hidden, num_layers, num_heads, vit.grid_size, vit.patch_dim)

    @property
    def betas(self) -> torch.Tensor:
        """The noise schedule (num_steps,), float32."""
        return self.scheduler.betas

    def noise_patches(self, patches: torch.Tensor, mask: PatchMask, generator: torch.Generator) -> NoisedPatches:
        """Diffuse the masked patches of ``patches`` (B, N, D), one random step per sample.

        ``t`` ~ U{0, ..., num_steps - 1} and ``eps`` ~ N(0, I) from ``generator``; masked
        rows become ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (q(x_t | x_0)), visible rows
        are returned unchanged.
        """
        patches = patches.float()
        clean = gather_tokens(patches, mask.masked)
        timesteps = torch.randint(
            0, self.num_steps, (patches.shape[0],), generator=generator, device=patches.device
        )
        noise = torch.randn(clean.shape, generator=generator, device=patches.device)
        noised = self.scheduler.add_noise(clean, noise, timesteps)
        return NoisedPatches(scatter_tokens(patches, mask.masked, noised), timesteps, noise)

    def training_losses(self, image: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``loss``: MSE of the predicted clean masked patches (x0-prediction)."""
        mask = self.draw_mask(image.shape[0], generator, image.device)
        target, _, _ = self.targets(image)
        diffused = self.noise_patches(target, mask, generator)
        encoded = self.encode_visible(image, mask.visible)
        noised = gather_tokens(diffused.patches, mask.masked)
        prediction = self.decoder(encoded, mask.visible, noised, mask.masked, diffused.timesteps)
        return {"loss": F.mse_loss(prediction.float(), gather_tokens(target, mask.masked))}

    def sample_masked(self, encoded: torch.Tensor, mask: PatchMask, generator: torch.Generator) -> torch.Tensor:
        """The full reverse chain for the masked patches, vectorised over the batch.

        Starts from ``x_T`` ~ N(0, I) (B, M, D) drawn from ``generator``; for ``t`` from
        ``num_steps - 1`` down to 0 the decoder predicts ``x0`` from ``x_t`` and, for
        ``t > 0``, ``DDPMScheduler.step`` draws ``x_{t-1}`` from the posterior
        q(x_{t-1} | x_t, x0). Returns the last ``x0`` prediction (B, M, D), float32.
        """
        batch = encoded.shape[0]
        shape = (batch, mask.masked.shape[1], self.vit.patch_dim)
        sample = torch.randn(shape, generator=generator, device=encoded.device)
        prediction = sample
        for step in self.scheduler.timesteps.tolist():
            timesteps = torch.full((batch,), step, dtype=torch.int64, device=encoded.device)
            prediction = self.decoder(encoded, mask.visible, sample, mask.masked, timesteps).float()
            if step > 0:
                # The posterior mean at t = 0 is x0 itself; float32 rounds abar_0 to 1 (beta_0 = 1e-8),
                # so that step would divide by zero.
                sample, _ = self.scheduler.step(prediction, step, sample, generator=generator)
        return prediction

    def predict_masked(self, image: torch.Tensor, mask: PatchMask, generator: torch.Generator) -> torch.Tensor:
        return self.sample_masked(self.encode_visible(image, mask.visible), mask, generator)
