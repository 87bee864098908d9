"""Seed 002's STN training objective, as a module the project's training loop fits.

Seed 002 (chest X-ray alignment; Jaderberg et al., "Spatial Transformer Networks",
NeurIPS 2015, arXiv:1506.02025) trains an STN (:class:`~chestssl.models.stn.AlignmentSTN`)
to map radiographs, moved by a random affine and jittered in intensity on the fly
(:class:`~chestssl.data.affine.AlignmentAugmentation`), onto the canonical chest
(:func:`~chestssl.data.canonical_chest.canonical_chest`) under
:class:`~chestssl.models.losses.AlignmentLoss` (``pixel_weight`` x pixel MSE + MSE of
a frozen feature network's features). :class:`STNAlignment` wraps the three so that
:func:`chestssl.train.loop.fit` trains it like every other model: optimiser, AMP,
DistributedDataParallel, per-step curves and a resumable checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from chestssl.data.affine import AlignmentAugmentation
from chestssl.eval.alignment import alignment_parameter_error
from chestssl.models.losses import AlignmentLoss
from chestssl.models.stepped import SteppedModule
from chestssl.models.stn import AlignmentSTN

#: An augmentation: ``(images (B, 1, H, W), generator or None) -> images (B, 1, H, W)``, e.g.
#: seed 002's :class:`~chestssl.data.affine.AlignmentAugmentation`.
Augmentation = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]


class STNAlignment(SteppedModule):
    """The STN with its loss, canonical chest and augmentation: ``training_step`` / ``validation_step``.

    Args:
        stn: the network to train (its weights are this module's ``stn.*`` state).
        loss: :class:`~chestssl.models.losses.AlignmentLoss`. Its frozen feature network
            is not part of this module's state: not in ``state_dict`` (so neither in
            checkpoints nor in the weights returned by the loop), not among its
            parameters (so never optimised nor synchronised by DDP); it follows the
            module to its device and dtype, and stays in eval mode.
        canonical: the canonical chest (1, H', W'), H', W' the STN's output size; a buffer.
        augmentation: applied to every training batch (default seed 002's
            :class:`~chestssl.data.affine.AlignmentAugmentation`); it draws from torch's
            global CPU generator, which the loop seeds and checkpoints, so a resumed run
            draws what an uninterrupted one would. None trains on the images as given.

    Batches: ``image`` (B, 1, H, W) float; optionally ``index`` (B,), the items' dataset
    positions, and, for validation, ``applied`` (B, 5), a known misalignment the images
    were moved by (:class:`~chestssl.data.radiograph_datasets.IndexedImages` items).

    - ``training_step``: the batch is put in dataset order (by ``index``), so the random
      misalignment each image gets does not depend on the sampler's order within the
      batch; augmented; aligned; ``{"loss", "pixel", "feature"}``.
    - ``validation_step``: ``{"loss", "pixel", "feature"}`` of the images as given and,
      with ``applied``, ``before_px`` / ``after_px``: the mean corner displacement in
      pixels of the known misalignment and of it chained with the STN's prediction
      (:func:`~chestssl.eval.alignment.alignment_parameter_error`).
    """

    #: Every STN parameter takes part in every step.
    ddp_find_unused_parameters = False

    def __init__(
        self,
        stn: AlignmentSTN,
        loss: AlignmentLoss,
        canonical: torch.Tensor,
        augmentation: Augmentation | None = AlignmentAugmentation(),
    ):
        super().__init__()
        if canonical.ndim != 3 or canonical.shape[0] != 1:
            raise ValueError(f"canonical: expected the canonical chest of shape (1, H, W), got {tuple(canonical.shape)}")
        self.stn = stn
        self.register_buffer("canonical", canonical.detach().to(torch.float32).clone())
        self.augmentation = augmentation
        # Kept out of the module's registered children: see the class docstring.
        self.__dict__["loss"] = loss

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.loss._apply(fn, recurse)
        return self

    def _in_dataset_order(self, batch: Mapping[str, Any]) -> torch.Tensor:
        images = batch["image"]
        index = batch.get("index")
        if isinstance(index, torch.Tensor) and index.ndim == 1 and index.shape[0] == images.shape[0]:
            images = images[torch.argsort(index).to(images.device)]
        return images

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """{loss, pixel, feature} of one augmented batch; ``loss`` is optimised."""
        images = self._in_dataset_order(batch)
        if self.augmentation is not None:
            images = self.augmentation(images, None)
        return self.loss(self.stn(images).aligned, self.canonical)

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """{loss, pixel, feature[, before_px, after_px]} of one batch as given (no augmentation)."""
        images = batch["image"]
        output = self.stn(images)
        metrics = dict(self.loss(output.aligned, self.canonical))
        if "applied" in batch:
            error = alignment_parameter_error(output.params.float(), batch["applied"].float(),
                                              image_size=tuple(images.shape[-2:]))
            metrics["before_px"] = error.before.mean()
            metrics["after_px"] = error.after.mean()
        return metrics
