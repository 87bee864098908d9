"""Study-level ``mae`` and ``diffmae``: masked pretraining over radiograph studies (seed 004).

Seed 004 (RadDiffusion) pretrains its masked autoencoders on studies of 2-5 views: each
view is masked on its own, but the encoder shares one CLS token among the views of a study
(the bottleneck CLS, :mod:`chestssl.models.study_vit`), so the visible patches of one view
inform the reconstruction of another only through that token. The decoders, targets,
losses, masks and seeds are those of :mod:`chestssl.methods.mae`, unchanged: the classes
here differ from :class:`~chestssl.methods.mae.MaskedAutoencoderPretraining` and
:class:`~chestssl.methods.mae.DiffusionMaskedAutoencoderPretraining` only in their
``encode_visible`` hook, which calls :func:`~chestssl.models.study_vit.encode_study_visible`
inside a study step. They are built by :func:`chestssl.methods.build_method` with
``level="study"`` from the same ``methods`` entry as their image-level forms.

Batches are those of :func:`~chestssl.data.radiograph_datasets.collate_radiograph_studies`:
``images`` (V, 1, S, S), all views of the batch's studies, and ``study_index`` (V,), the
study of each view; a batch may hold studies with different numbers of views. Masks are
drawn per view (V masks). With one view per study the losses equal the image-level
methods' exactly (same seed, same batch), as the bottleneck is then the identity.

The exported encoder is the plain ViT (``ViTEncoder``), loadable wherever a ``mae``
encoder is; only :func:`~chestssl.models.study_vit.study_representation` reads it at study
level.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch

from chestssl.methods.mae import (
    DiffusionMaskedAutoencoderPretraining,
    MaskedAutoencoderPretraining,
    MaskedPatchPretraining,
)
from chestssl.models.study_vit import encode_study_visible

__all__ = [
    "StudyDiffusionMaskedAutoencoder",
    "StudyMaskedAutoencoder",
]

#: Study batch keys the methods read.
BATCH_KEYS = ("images", "study_index")


class _StudyEncoding(MaskedPatchPretraining):
    """The study context of one step: ``encode_visible`` shares the CLS within each study.

    ``training_step`` and ``validation_step`` take a study batch (``images``,
    ``study_index``); inside them :meth:`encode_visible` runs the bottleneck-CLS encoder.
    Outside a step (``reconstruct``, a plain image batch) it is the per-view encoder.
    """

    _study_index: torch.Tensor | None = None

    def encode_visible(self, image: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K, D) encoder tokens of ``image`` (B, 1, *S) keeping the ``visible`` (B, K) patches."""
        if self._study_index is None:
            return super().encode_visible(image, visible)
        return encode_study_visible(self.vit, image, visible, self._study_index)

    @contextmanager
    def _studies(self, batch: Mapping[str, Any]) -> Iterator[dict[str, torch.Tensor]]:
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise ValueError(
                f"{self.name}: a study-level batch needs {', '.join(BATCH_KEYS)}, it lacks {', '.join(missing)}; "
                "batch RadiographStudyDataset items with collate_radiograph_studies"
            )
        self._study_index = batch["study_index"]
        try:
            yield {"image": batch["images"]}
        finally:
            self._study_index = None

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        with self._studies(batch) as views:
            return super().training_step(views)

    def validation_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        with self._studies(batch) as views:
            return super().validation_step(views)


class StudyMaskedAutoencoder(_StudyEncoding, MaskedAutoencoderPretraining):
    """``mae`` over studies: He et al., CVPR 2022 (arXiv:2111.06377) with seed 004's bottleneck CLS."""

    level = "study"


class StudyDiffusionMaskedAutoencoder(_StudyEncoding, DiffusionMaskedAutoencoderPretraining):
    """``diffmae`` over studies: Wei et al., ICCV 2023 (arXiv:2304.03283) with seed 004's bottleneck CLS."""

    level = "study"
