"""Device choice, mixed precision and moving batches to the device."""

from __future__ import annotations

import sys
from typing import Any

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """The device named by ``train.device``.

    ``auto`` is CUDA when a GPU is visible, else the CPU. Under ``torchrun`` each process
    takes the GPU of its ``LOCAL_RANK``.
    """
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"unknown device choice {choice!r}; known: {', '.join(DEVICE_CHOICES)}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "train.device is 'cuda' but no CUDA GPU is visible to PyTorch "
            f"(torch {torch.__version__}); set train.device to 'auto' or 'cpu', or install a CUDA build of torch"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible; "
            f"start torchrun with --nproc_per_node <= {count}"
        )
    return torch.device("cuda", local_rank)


def amp_enabled(requested: bool, device: torch.device, announce: bool = True) -> bool:
    """Automatic mixed precision runs on CUDA only; on the CPU training stays in fp32."""
    if requested and device.type != "cuda":
        if announce:
            print("train.amp is true but training runs on the CPU: using fp32", file=sys.stderr)
        return False
    return bool(requested)


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor in a (nested) dict/list/tuple batch to ``device``; other values stay."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {key: move_to_device(value, device, non_blocking) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in batch):
        moved = [move_to_device(value, device, non_blocking) for value in batch]
        return type(batch)(moved) if isinstance(batch, list) else tuple(moved)
    return batch


def batch_size_of(batch: Any) -> int:
    """Number of samples in a collated batch: the leading size of its first tensor or list."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    for value in values:
        if isinstance(value, (list, tuple)):
            return len(value)
    raise ValueError(
        "cannot tell the batch size: the batch holds no tensor with a batch dimension and no list; "
        f"got keys/types {_describe(batch)}"
    )


def _describe(batch: Any) -> str:
    if isinstance(batch, dict):
        return ", ".join(f"{k}: {type(v).__name__}" for k, v in batch.items())
    return type(batch).__name__
