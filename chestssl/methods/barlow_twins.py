"""``barlow_twins``: redundancy-reduction pretraining on two augmented views (seed 001).

Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML
2021 (arXiv:2103.03230), as seed 001 (Barlow Twins for chest X-ray) used it: a ResNet's
global average pool ``h`` (B, R), a projector ``z = BN(W h)`` (one bias-free linear layer
R -> P, then batch normalisation without affine parameters), and the loss on the
cross-correlation ``C = z1^T z2 / B`` (P, P) of the two views' projections::

    loss = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2        (lambda: 5e-3)
         = on_diag            + lambda * off_diag

The batch normalisation is the only standardisation, as in the paper's reference code:
it always uses the batch's statistics (no running estimates), in training and in
validation alike, so ``C_ii`` is exactly the correlation of feature ``i`` across the two
views. MONAI's ``BarlowTwinsLoss`` is not used: it standardises its inputs again with
the *unbiased* standard deviation but divides by ``B``, so ``C_ii`` can reach only
``(B - 1) / B`` and the loss never falls below ``P / B**2`` (0.5 for P = 512 at B = 32),
which hides whether the views agree; it also returns the sum only. Under DDP the
cross-correlation is summed over the processes (differentiably) before the loss, so the
loss and its gradient are those of the global batch.

The two views come from :class:`chestssl.data.augment.TwoViewAugment` (crop, flips,
equalisation, blur, perspective, noise). Training step ``t`` of process ``r`` draws
them from a generator seeded with ``(seed, r, t)``; ``t`` is a buffer, so a resumed run
augments exactly as an uninterrupted one. The ``n``-th batch of every validation pass
gets the same views, so validation losses compare across epochs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, field_validator
from torch import nn

from chestssl.data.augment import TwoViewAugment
from chestssl.methods.base import PretrainMethod
from chestssl.params import MethodConfig
from chestssl.schema import Config, Float, Int, List, problem
from chestssl.models.backbones import build_backbone
from chestssl.models.collectives import distributed_world_size
from chestssl.models.seeding import seeded

#: Streams of the augmentation seeds: training steps and validation batches.
TRAIN_STREAM, VALIDATION_STREAM = 0, 1


def _stream_seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> np.uint64(1))


class BarlowTwinsObjective(nn.Module):
    """The Barlow Twins loss of two batches of standardised projections.

    Args:
        lambd: weight of the off-diagonal (redundancy-reduction) term, >= 0.

    ``forward(z1, z2, reduce_across_processes=False)`` with ``z1``, ``z2`` of shape
    (B, P), each feature standardised over the batch (mean 0, biased variance 1, e.g.
    the output of ``BatchNorm1d(P, affine=False)`` on the batch), returns scalars
    ``loss = on_diag + lambd * off_diag``, ``on_diag = sum_i (1 - C_ii)^2`` and
    ``off_diag = sum_{i != j} C_ij^2`` (the latter two detached) with
    ``C = z1^T z2 / B``. With ``reduce_across_processes`` and an initialised process
    group of several processes, ``C`` is summed over the processes and divided by the
    global batch size. Computed in float32.
    """

    def __init__(self, lambd: float):
        super().__init__()
        self.lambd = float(lambd)

    def cross_correlation(
        self, z1: torch.Tensor, z2: torch.Tensor, reduce_across_processes: bool = False
    ) -> torch.Tensor:
        """``C = z1^T z2 / B`` (P, P) in float32 for (B, P) inputs."""
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(
                f"BarlowTwinsObjective: expected two (B, P) projections of the same shape, got "
                f"{tuple(z1.shape)} and {tuple(z2.shape)}"
            )
        if z1.shape[0] < 2:
            raise ValueError(
                f"BarlowTwinsObjective: a batch of {z1.shape[0]} has no cross-correlation; "
                "use a batch size of at least 2 (train.batch_size)"
            )
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1, z2 = z1.float(), z2.float()
            correlation = z1.t() @ z2
            count = torch.tensor(float(z1.shape[0]), device=z1.device)
            if reduce_across_processes and distributed_world_size() > 1:
                import torch.distributed.nn.functional as distributed_functional

                correlation = distributed_functional.all_reduce(correlation)
                dist.all_reduce(count)
            return correlation / count

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, reduce_across_processes: bool = False
    ) -> dict[str, torch.Tensor]:
        correlation = self.cross_correlation(z1, z2, reduce_across_processes)
        diagonal = torch.diagonal(correlation)
        on_diag = (1.0 - diagonal).pow(2).sum()
        off_diag = correlation.pow(2).sum() - diagonal.pow(2).sum()
        return {"loss": on_diag + self.lambd * off_diag, "on_diag": on_diag.detach(), "off_diag": off_diag.detach()}


class AugmentConfig(Config):
    """The two views' augmentations (:class:`~chestssl.data.augment.TwoViewAugment`)."""

    p: Float(ge=0.0, le=1.0, doc="probability of each augmentation")
    crop_scale: List(Float(gt=0.0, le=1.0), length=2)
    blur_sigma: List(Float(ge=0.0), length=2)
    perspective: Float(ge=0.0, le=0.5, doc="corner displacement, a fraction of the side")
    noise_std: Float(ge=0.0)

    @field_validator("crop_scale", "blur_sigma")
    @classmethod
    def _min_then_max(cls, bounds: list[float]) -> list[float]:
        if bounds[0] > bounds[1]:
            raise problem(f"got {bounds!r}, expected [min, max] with min <= max")
        return bounds


class BarlowTwinsConfig(MethodConfig):
    """``method: barlow_twins``: seed 001's Barlow Twins on a backbone with a global representation."""

    method: Literal["barlow_twins"]
    projector_dim: Int(ge=1, doc="output of the bias-free linear projector")
    lambda_: Annotated[Float(ge=0.0, doc="weight of the off-diagonal (redundancy) term; seed 001: 5e-3"),
                       Field(alias="lambda")]
    augment: AugmentConfig


class BarlowTwinsPretraining(PretrainMethod):
    """A backbone and a linear projector trained with :class:`BarlowTwinsObjective`.

    ``cfg``: ``backbone`` (any backbone with ``representation`` / ``representation_dim``;
    seed 001: ``resnet18``), ``projector_dim`` (P), ``lambda``, ``augment`` (``p``,
    ``crop_scale``, ``blur_sigma``, ``perspective``, ``noise_std``; see
    :class:`~chestssl.data.augment.TwoViewAugment`) and ``train`` (read by the loop).
    The backbone is built first inside the seeded block, so at step 0 it equals the
    ``scratch`` encoder of the same seed and backbone.

    ``training_step`` / ``validation_step`` read ``batch["image"]`` (B, 1, *S) in [0, 1],
    B >= 2, and return scalars ``loss``, ``on_diag`` and ``off_diag``.
    """

    Config = BarlowTwinsConfig
    reconstructs = False

    # The backbone (no fc) and the projector both feed the loss in every step.
    ddp_find_unused_parameters = False

    def __init__(self, name: str, cfg: Mapping[str, Any], seed: int):
        super().__init__(name, cfg, seed)
        projector_dim = int(self.cfg["projector_dim"])
        lambd = float(self.cfg["lambda"])
        spatial_dims = int(self.cfg["backbone"]["spatial_dims"])
        self.augment = TwoViewAugment.from_config(self.cfg["augment"], spatial_dims, seed=self.seed)
        with seeded(self.seed):
            self.backbone = build_backbone(self.cfg["backbone"])
            if not hasattr(self.backbone, "representation_dim"):
                raise ValueError(f"Barlow Twins needs a backbone with a global representation (representation_dim); "
                                 f"{type(self.backbone).__name__} has none")
            self.projector = nn.Sequential(
                nn.Linear(int(self.backbone.representation_dim), projector_dim, bias=False),
                nn.BatchNorm1d(projector_dim, affine=False, track_running_stats=False),
            )
        self.objective = BarlowTwinsObjective(lambd)
        # Optimisation steps taken; a buffer, so a resumed run draws the views it would have drawn.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))
        self._validation_batches = 0

    def encoder(self) -> nn.Module:
        return self.backbone

    def train(self, mode: bool = True) -> "BarlowTwinsPretraining":
        if self.training and not mode:
            self._validation_batches = 0
        return super().train(mode)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised projections (B, projector_dim), float32, of images (B, 1, *S)."""
        features = self.backbone.representation(images)
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.projector(features.float())

    def losses(
        self, images: torch.Tensor, generator: torch.Generator, reduce_across_processes: bool = False
    ) -> dict[str, torch.Tensor]:
        """``loss``, ``on_diag`` and ``off_diag`` of two views of ``images`` drawn with ``generator``."""
        view1, view2 = self.augment(images, generator)
        return self.objective(self.project(view1), self.project(view2), reduce_across_processes)

    def _check_batch(self, images: torch.Tensor) -> None:
        if images.shape[0] < 2:
            raise ValueError(
                f"methods.{self.name}: Barlow Twins needs at least 2 images per batch (batch statistics), "
                f"got {images.shape[0]}; raise methods.{self.name}.train.batch_size"
            )

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``loss`` (optimised), ``on_diag`` and ``off_diag`` of this step's two views of the batch."""
        images = batch["image"]
        self._check_batch(images)
        rank = dist.get_rank() if distributed_world_size() > 1 else 0
        generator = torch.Generator().manual_seed(
            _stream_seed(self.seed, TRAIN_STREAM, rank, int(self.steps_done))
        )
        parts = self.losses(images, generator, reduce_across_processes=True)
        self.steps_done += 1
        return parts

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``loss``, ``on_diag`` and ``off_diag`` of the batch's fixed pair of views.

        A batch of a single image has no batch statistics and gives no metrics.
        """
        images = batch["image"]
        index = self._validation_batches
        self._validation_batches += 1
        if images.shape[0] < 2:
            return {}
        generator = torch.Generator().manual_seed(_stream_seed(self.seed, VALIDATION_STREAM, index))
        return self.losses(images, generator)
