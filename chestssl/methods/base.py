"""The interface every pretraining method implements.

The training loop only sees a :class:`PretrainMethod`:

- ``training_step(batch) -> dict[str, Tensor]``: the key ``"loss"`` is optimised, the
  other scalar entries are logged;
- ``validation_step(batch) -> dict[str, Tensor]``: scalar metrics of one batch;
- ``validation_epoch_end() -> dict[str, Tensor]``: metrics over the current validation
  pass (every batch validated since the model was put in eval mode; MONAI cumulative
  metrics), optional for the loop;
- ``encoder()``: the backbone handed downstream; ``export()``: its payload
  (:func:`chestssl.models.export_encoder`);
- ``reconstruct(image)``: the method's reconstruction of a batch, or ``None``.

A batch is a dict with ``image`` (B, 1, *S) float in [0, 1], ``mask`` (B, 1, *S) float
binary, ``label`` (B,) int64, and ``patient_id`` / ``scan_id`` lists.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

import torch
from monai.metrics import PSNRMetric, SSIMMetric
from torch import nn

from chestssl.models.backbones import export_encoder
from chestssl.models.stepped import SteppedModule
from chestssl.params import MethodConfig, method_kind

#: What a method trains on per item: one image (or slice, or crop), or one radiograph study.
LEVELS = ("image", "study")
#: Every method class, by level and then by the ``method`` name of its config; filled as
#: the classes are defined (:meth:`PretrainMethod.__init_subclass__`).
REGISTRY: dict[str, dict[str, type["PretrainMethod"]]] = {level: {} for level in LEVELS}


class PretrainMethod(SteppedModule, ABC):
    """Base class of the pretext methods (one subclass per module of this package).

    Args:
        name: the method's entry name under ``methods`` in params.yaml (for messages).
        cfg: the validated params entry (``method``, ``backbone``, method-specific keys).
        seed: seed of the initial weights.
    """

    #: Whether the method has parameters to optimise (``scratch`` does not).
    trainable: ClassVar[bool] = True
    #: Whether ``reconstruct`` returns images (methods with a decoder).
    reconstructs: ClassVar[bool] = False
    #: The validation metric that picks the best epoch, and whether lower or higher is better.
    monitor: ClassVar[tuple[str, str]] = ("val/loss", "min")
    #: The downstream heads the method trains itself (multihead models): ``seg``, ``cls``.
    heads: tuple[str, ...] = ()
    #: The method's params entry (its ``method`` literal names the method); set by each method.
    Config: ClassVar[type[MethodConfig]]
    #: ``image`` or ``study`` (:data:`LEVELS`).
    level: ClassVar[str] = "image"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register a concrete method that declares its ``Config`` or ``level`` in its own body."""
        super().__init_subclass__(**kwargs)
        if inspect.isabstract(cls) or not ({"Config", "level"} & set(vars(cls))):
            return
        if cls.level not in LEVELS:
            raise TypeError(f"{cls.__qualname__}.level: got {cls.level!r}, expected one of {', '.join(LEVELS)}")
        name = method_kind(cls.Config)
        known = REGISTRY[cls.level].get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise TypeError(f"{cls.__qualname__}: method {name!r} ({cls.level} level) is already "
                            f"{known.__module__}.{known.__qualname__}")
        REGISTRY[cls.level][name] = cls

    def __init__(self, name: str, cfg: Mapping[str, Any], seed: int):
        super().__init__()
        self.name = name
        self.cfg = dict(cfg)
        self.seed = int(seed)

    @abstractmethod
    def encoder(self) -> nn.Module:
        """The backbone handed to downstream tasks."""

    @abstractmethod
    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of one training batch; ``"loss"`` is optimised."""

    @abstractmethod
    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Scalar metrics of one validation batch."""

    def validation_epoch_end(self) -> dict[str, torch.Tensor]:
        """Metrics over the current validation pass; none unless a method accumulates some."""
        return {}

    def reconstruct(self, image: torch.Tensor) -> torch.Tensor | None:
        """Reconstruction (B, 1, *S) of ``image`` (B, 1, *S), or None if the method has none."""
        return None

    def track_reconstruction_quality(self, spatial_dims: int) -> None:
        """Accumulate SSIM and PSNR of reconstructions over each validation pass.

        Both at ``data_range`` 1.0 for every method (images are in [0, 1]), unlike seed
        000, whose single-task and multihead PSNRs used different ranges.
        """
        self.ssim_metric = self.register_accumulator(SSIMMetric(spatial_dims=spatial_dims, data_range=1.0))
        self.psnr_metric = self.register_accumulator(PSNRMetric(max_val=1.0))

    def reconstruction_quality(self, reconstruction: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch-mean ``ssim`` and ``psnr`` (dB) of (B, 1, *S) tensors, also accumulated for the pass."""
        return {
            "ssim": self.ssim_metric(reconstruction, image).mean(),
            "psnr": self.psnr_metric(reconstruction, image).mean(),
        }

    def reconstruction_quality_of_pass(self) -> dict[str, torch.Tensor]:
        """Mean ``ssim`` and ``psnr`` over every image of the current validation pass (none yet: {})."""
        if len(self.ssim_metric) == 0:
            return {}
        return {"ssim": self.ssim_metric.aggregate().reshape(()), "psnr": self.psnr_metric.aggregate().reshape(())}

    def export(self) -> dict[str, Any]:
        """The encoder payload written for downstream stages."""
        return export_encoder(self.encoder(), self.cfg["backbone"])
