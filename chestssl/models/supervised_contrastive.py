"""Cross-modal contrastive loss: supervised contrastive learning with modality as the class.

Supervised contrastive loss (Khosla et al., "Supervised Contrastive Learning", NeurIPS
2020, arXiv:2004.11362; the ``L_out`` form), used by Disruptive Autoencoders
(Valanarasu et al., arXiv:2307.16896, seed 003) on the bottleneck with the modality of
each sample (CT, MRI, ...) as its class. For L2-normalised embeddings ``z`` and
temperature ``tau``::

    loss = mean over anchors i with P(i) non-empty of
           -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) )

where ``P(i)`` are the other samples of i's modality. Anchors alone in their modality
have no positive and do not count. The loss is only informative when the batch holds at
least two modalities and some modality twice (:meth:`CrossModalContrastiveLoss.informative`):
with a single modality every pair is positive and the loss only pulls all embeddings
together.

Always computed in float32 with autocast off: seed 003's loss went NaN under AMP.

Under DistributedDataParallel each process holds a part of the batch; with
``gather_across_processes`` every process contrasts its anchors with the embeddings of
all processes (gathered with gradient) and the loss is scaled so that DDP's averaged
gradients are those of one process holding the whole batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from chestssl.models.collectives import distributed_world_size


def modality_indices(modalities: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """(B,) int64 class index of each sample's modality (indices in sorted order of the names)."""
    names = sorted(set(modalities))
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[m] for m in modalities], dtype=torch.int64, device=device)


class CrossModalContrastiveLoss(nn.Module):
    """Supervised contrastive loss of embeddings (B, D) with class labels (B,) (module docstring).

    Args:
        temperature: ``tau`` > 0 (seed 003: 0.5).

    ``forward(embeddings, labels)``: embeddings (B, D), any float dtype (normalised here);
    labels (B,) int64 class indices or a list of B modality names. Returns a float32 scalar;
    0 (still attached to ``embeddings``) when no anchor has a positive.
    """

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"CrossModalContrastiveLoss: temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    @staticmethod
    def informative(modalities: Sequence[str] | None) -> bool:
        """Whether a batch with these modalities gives a contrast: at least two distinct
        modalities, and at least one of them on two samples or more (an anchor with a positive)."""
        if modalities is None:
            return False
        counts: dict[str, int] = {}
        for modality in modalities:
            counts[modality] = counts.get(modality, 0) + 1
        return len(counts) >= 2 and max(counts.values()) >= 2

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | Sequence[str],
                gather_across_processes: bool = False) -> torch.Tensor:
        if gather_across_processes and distributed_world_size() > 1:
            return self._across_processes(embeddings, labels)
        if embeddings.ndim != 2:
            raise ValueError(f"CrossModalContrastiveLoss: expected embeddings of shape (B, D), got {tuple(embeddings.shape)}")
        if not isinstance(labels, torch.Tensor):
            labels = modality_indices(list(labels), device=embeddings.device)
        labels = labels.to(embeddings.device).reshape(-1)
        batch = embeddings.shape[0]
        if labels.shape[0] != batch:
            raise ValueError(f"CrossModalContrastiveLoss: {batch} embeddings but {labels.shape[0]} labels")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            z = F.normalize(embeddings.float(), dim=1)
            logits = z @ z.T / self.temperature
            self_pair = torch.eye(batch, dtype=torch.bool, device=z.device)
            log_prob = logits - torch.logsumexp(logits.masked_fill(self_pair, float("-inf")), dim=1, keepdim=True)
            positives = (labels[:, None] == labels[None, :]) & ~self_pair
            positive_counts = positives.sum(dim=1)
            anchors = positive_counts > 0
            if not bool(anchors.any()):
                return logits.sum() * 0.0
            mean_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
            mean_log_prob = mean_log_prob[anchors] / positive_counts[anchors]
            return -mean_log_prob.mean()

    def _across_processes(self, embeddings: torch.Tensor, labels: torch.Tensor | Sequence[str]) -> torch.Tensor:
        """This process's anchors against every process's embeddings (module docstring).

        The loss returned is ``world size x`` (this process's anchor terms) / (all
        processes' anchors): summed over processes it is ``world size`` times the loss of
        the whole batch, which DDP's gradient averaging divides back.
        """
        import torch.distributed as dist
        import torch.distributed.nn.functional as distributed_functional

        world, rank = dist.get_world_size(), dist.get_rank()
        local = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        if embeddings.ndim != 2 or len(local) != embeddings.shape[0]:
            raise ValueError(f"CrossModalContrastiveLoss: embeddings {tuple(embeddings.shape)} and {len(local)} labels")
        every: list = [None] * world
        dist.all_gather_object(every, local)
        sizes = [len(part) for part in every]
        everyone = [label for part in every for label in part]
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            z = F.normalize(embeddings.float(), dim=1)
            # all_gather needs one shape: pad to the largest part, then drop the padding.
            padded = F.pad(z, (0, 0, 0, max(sizes) - z.shape[0]))
            z_all = torch.cat([part[:size] for part, size in zip(distributed_functional.all_gather(padded), sizes)])
            labels_all = (modality_indices(everyone, z.device) if any(isinstance(x, str) for x in everyone)
                          else torch.tensor(everyone, dtype=torch.int64, device=z.device))
            start = sum(sizes[:rank])
            rows = torch.arange(z.shape[0], device=z.device)
            logits = z @ z_all.T / self.temperature  # (B, N): this process's anchors, every candidate
            self_pair = torch.zeros_like(logits, dtype=torch.bool)
            self_pair[rows, start + rows] = True
            log_prob = logits - torch.logsumexp(logits.masked_fill(self_pair, float("-inf")), dim=1, keepdim=True)
            positives = (labels_all[start + rows][:, None] == labels_all[None, :]) & ~self_pair
            positive_counts = positives.sum(dim=1)
            anchors = positive_counts > 0
            total_anchors = anchors.sum().to(torch.float32)
            dist.all_reduce(total_anchors)
            if float(total_anchors) == 0.0:
                return logits.sum() * 0.0
            terms = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)[anchors]
            return -(terms / positive_counts[anchors]).sum() * world / total_anchors
