"""Study-level ViT encoding with a bottleneck CLS token (seed 004, RadDiffusion).

Seed 004 pretrains on radiograph *studies* of 2-5 views: after every transformer block
of the encoder, the CLS tokens of all views of one study are averaged and the mean is
written back to each view's CLS token ("bottleneck CLS"). The patch tokens of a view
never see another view directly; information crosses views only through the shared CLS,
so views of different studies never mix.

A batch holds a variable number of views per study. It is described by ``study_index``
(B,) int64: the study number of each view, 0..S-1 with no gap; the views of one study
need not be contiguous. :func:`chestssl.data.radiograph_datasets.collate_studies` builds
such batches from per-study samples.

The encoder is the project's :class:`~chestssl.models.vit.ViTEncoder` (MONAI's ``ViT``
without its head); :func:`encode_study` and :func:`encode_study_visible` run its patch
embedding, CLS token, blocks and final norm exactly as ``ViTEncoder.forward`` and
``ViTEncoder.encode_visible`` do (Dosovitskiy et al., ICLR 2021, arXiv:2010.11929; MAE
encoder: He et al., CVPR 2022, arXiv:2111.06377), with :func:`study_mean_cls` after every
block. With one view per study the mean is the view's own CLS, so the outputs equal the
plain encoder's bit for bit.

Shapes: ``x`` (B, C, *S); N patches; K visible patches; D = ``hidden_size``; S studies.
"""

from __future__ import annotations

import torch

from chestssl.models.vit import ViTEncoder, gather_tokens

__all__ = [
    "encode_study",
    "encode_study_visible",
    "first_view_of_study",
    "study_mean_cls",
    "study_representation",
    "views_per_study",
]


def views_per_study(study_index: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Validate a batch's study numbers and count the views of each study.

    Args:
        study_index: (B,) integer tensor, the study number of each view, 0..S-1; every
            number below the largest must occur (no study without views).
        batch_size: when given, the required length B (the number of views in the batch).

    Returns:
        (S,) int64 on ``study_index``'s device: the number of views of study 0..S-1.

    Raises:
        ValueError: naming the problem (not an integer tensor, not 1-D, wrong length,
            empty, a negative number, or study numbers that no view carries).
    """
    if not isinstance(study_index, torch.Tensor):
        raise ValueError(
            f"study_index: expected a 1-D integer tensor of study numbers, got {type(study_index).__name__}"
        )
    if study_index.is_floating_point() or study_index.is_complex() or study_index.dtype == torch.bool:
        raise ValueError(
            f"study_index: expected an integer tensor (study numbers 0..S-1, e.g. int64), got dtype {study_index.dtype}"
        )
    if study_index.ndim != 1:
        raise ValueError(
            f"study_index: expected a 1-D tensor (one study number per view), got shape {tuple(study_index.shape)}"
        )
    if batch_size is not None and study_index.shape[0] != batch_size:
        raise ValueError(
            f"study_index: got shape {tuple(study_index.shape)}, expected shape ({batch_size},) "
            "(one study number per view of the batch)"
        )
    if study_index.numel() == 0:
        raise ValueError("study_index: empty; a batch needs at least one view")
    study_index = study_index.to(torch.int64)
    smallest = int(study_index.min())
    if smallest < 0:
        position = int((study_index < 0).nonzero()[0, 0])
        raise ValueError(
            f"study_index: negative study index {smallest} at batch position {position}; "
            "study numbers must be 0..S-1"
        )
    counts = torch.bincount(study_index)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"study_index: studies {missing} have no views; number the studies of a batch 0..S-1 without gaps "
            f"(got study numbers up to {counts.shape[0] - 1}; collate_studies numbers them so)"
        )
    return counts


def study_mean_cls(
    tokens: torch.Tensor, study_index: torch.Tensor, num_views: torch.Tensor | None = None
) -> torch.Tensor:
    """Replace each view's CLS token by the mean CLS of its study (seed 004's bottleneck CLS).

    The per-study sum is an ``index_add`` over the batch and the mean is copied back to
    every view with ``index_select``: differentiable, no loop over studies. The sum is
    accumulated in at least float32, so half-precision tokens keep an accurate mean.

    Args:
        tokens: (B, 1 + K, D), CLS at position 0.
        study_index: (B,) integer study numbers 0..S-1 (see :func:`views_per_study`).
        num_views: (S,) views per study as returned by :func:`views_per_study`; when given,
            ``study_index`` is taken as already validated.

    Returns:
        (B, 1 + K, D) in ``tokens``' dtype: position 0 holds the study's mean CLS, the patch
        tokens are ``tokens[:, 1:]`` unchanged.
    """
    if tokens.ndim != 3 or tokens.shape[1] < 1:
        raise ValueError(f"study_mean_cls: expected tokens of shape (B, 1 + K, D), got {tuple(tokens.shape)}")
    if num_views is None:
        num_views = views_per_study(study_index, tokens.shape[0])
    study_index = study_index.to(device=tokens.device, dtype=torch.int64)
    accumulate = torch.promote_types(tokens.dtype, torch.float32)
    cls_tokens = tokens[:, 0].to(accumulate)
    sums = cls_tokens.new_zeros(num_views.shape[0], tokens.shape[2]).index_add(0, study_index, cls_tokens)
    means = sums / num_views.to(device=tokens.device, dtype=accumulate).unsqueeze(1)
    shared = means.index_select(0, study_index).to(tokens.dtype)
    return torch.cat([shared.unsqueeze(1), tokens[:, 1:]], dim=1)


def _blocks_with_shared_cls(
    encoder: ViTEncoder, tokens: torch.Tensor, study_index: torch.Tensor, num_views: torch.Tensor
) -> list[torch.Tensor]:
    """Run ``encoder.blocks`` on (B, 1 + K, D) tokens, averaging the CLS per study after each
    block; returns the ``num_layers`` outputs (B, 1 + K, D), before the final norm."""
    hidden_states = []
    for block in encoder.blocks:
        tokens = study_mean_cls(block(tokens), study_index, num_views)
        hidden_states.append(tokens)
    return hidden_states


def _prepend_cls(encoder: ViTEncoder, patch_tokens: torch.Tensor) -> torch.Tensor:
    """(B, K, D) patch tokens -> (B, 1 + K, D) with the encoder's CLS token first."""
    return torch.cat([encoder.cls_token.expand(patch_tokens.shape[0], -1, -1), patch_tokens], dim=1)


def _encode_study_tokens(
    encoder: ViTEncoder, x: torch.Tensor, study_index: torch.Tensor, num_views: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`encode_study` for an already validated ``study_index``."""
    tokens = _prepend_cls(encoder, encoder.patch_embedding(x))
    hidden_states = _blocks_with_shared_cls(encoder, tokens, study_index, num_views)
    return encoder.norm(hidden_states[-1]), hidden_states


def encode_study(
    encoder: ViTEncoder, x: torch.Tensor, study_index: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``ViTEncoder.forward`` with the bottleneck CLS after every block (seed 004).

    Args:
        encoder: the ViT backbone; its weights are used as they are.
        x: views (B, C, *S), each of the encoder's ``img_size``.
        study_index: (B,) integer study number of each view, 0..S-1.

    Returns:
        ``(tokens, hidden_states)``: final-norm tokens (B, 1 + N, D), CLS first (shared by
        the views of a study), and the ``num_layers`` block outputs (B, 1 + N, D) after the
        per-study mean, before the final norm (as ``ViTEncoder.forward`` returns them).
    """
    encoder.check_input(x)
    num_views = views_per_study(study_index, x.shape[0])
    return _encode_study_tokens(encoder, x, study_index, num_views)


def encode_study_visible(
    encoder: ViTEncoder, x: torch.Tensor, visible: torch.Tensor, study_index: torch.Tensor
) -> torch.Tensor:
    """``ViTEncoder.encode_visible`` (MAE's encoder) with the bottleneck CLS after every block.

    Args:
        encoder: the ViT backbone.
        x: views (B, C, *S).
        visible: (B, K) indices of the patches each view keeps, into its N grid-order
            patches; the same K for every view.
        study_index: (B,) integer study number of each view, 0..S-1.

    Returns:
        Final-norm tokens (B, 1 + K, D): the study's shared CLS, then the visible patches in
        the order of ``visible``.
    """
    encoder.check_input(x)
    if visible.ndim != 2 or visible.shape[0] != x.shape[0]:
        raise ValueError(
            f"encode_study_visible: expected visible patch indices of shape ({x.shape[0]}, K), "
            f"got {tuple(visible.shape)}"
        )
    num_views = views_per_study(study_index, x.shape[0])
    tokens = _prepend_cls(encoder, gather_tokens(encoder.patch_embedding(x), visible))
    return encoder.norm(_blocks_with_shared_cls(encoder, tokens, study_index, num_views)[-1])


def first_view_of_study(study_index: torch.Tensor, num_studies: int) -> torch.Tensor:
    """Batch position of each study's first view.

    Args:
        study_index: (B,) validated study numbers 0..``num_studies``-1.
        num_studies: S.

    Returns:
        (S,) int64 on ``study_index``'s device: the smallest batch position holding study s.
    """
    study_index = study_index.to(torch.int64)
    positions = torch.arange(study_index.shape[0], device=study_index.device)
    beyond_batch = torch.full((num_studies,), study_index.shape[0], dtype=torch.int64, device=study_index.device)
    return beyond_batch.scatter_reduce(0, study_index, positions, reduce="amin")


def study_representation(encoder: ViTEncoder, x: torch.Tensor, study_index: torch.Tensor) -> torch.Tensor:
    """The study-level feature for linear probing (seed 004): the shared CLS after the final norm.

    No masking. After the last block every view of a study carries the same CLS and the
    final LayerNorm acts per token, so the feature is read at each study's first view.

    Args:
        encoder: the ViT backbone.
        x: views (B, C, *S).
        study_index: (B,) integer study number of each view, 0..S-1.

    Returns:
        (S, D): row s is study s's feature, in study-number order.
    """
    encoder.check_input(x)
    num_views = views_per_study(study_index, x.shape[0])
    tokens, _ = _encode_study_tokens(encoder, x, study_index, num_views)
    first_views = first_view_of_study(study_index, num_views.shape[0]).to(tokens.device)
    return tokens[:, 0].index_select(0, first_views)
