"""Multi-GPU and multi-node training with ``torchrun`` (PyTorch DistributedDataParallel).

``torchrun --nproc_per_node=N stages/finetune.py <run>`` (or ``--nnodes``/``--rdzv-*``
for several machines) starts one process per GPU and sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`setup_distributed` reads
them: with ``WORLD_SIZE > 1`` it joins the process group (NCCL on CUDA, Gloo on the
CPU); otherwise training runs in this one process.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from chestssl.train.devices import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size and its device.

    ``owns_group`` is true when :func:`setup_distributed` created the process group (kept
    for the process's later fits and destroyed when it exits).
    """

    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def setup_distributed(device_choice: str) -> DistContext:
    """Read the ``torchrun`` environment and join the process group if ``WORLD_SIZE > 1``.

    A process group that is already initialised (by the caller) is reused as is.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistContext(1, 0, 0, resolve_device(device_choice))
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise RuntimeError(
                f"a process group of size {dist.get_world_size()} exists but WORLD_SIZE={world_size}"
            )
        return DistContext(world_size, dist.get_rank(), local_rank, device)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {name} is not set; start distributed training with torchrun"
            )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend, rank=rank, world_size=world_size, device_id=device if device.type == "cuda" else None
    )
    # Kept for the process's later fits, destroyed at exit: a stage may train several fits
    # in one process (label fractions, frozen parts), and a group destroyed after each would
    # be created again on the same MASTER_PORT while the other ranks may still be leaving the
    # old one; a rank that joins the store of the group being destroyed waits forever.
    atexit.register(_destroy_process_group)
    return DistContext(world_size, rank, local_rank, device, owns_group=True)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place); a no-op in a single process."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (pickled; for small or one-off objects)."""
    if not ctx.distributed:
        return obj
    holder = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(holder, src=src, device=ctx.device if ctx.device.type == "cuda" else None)
    return holder[0]


def all_gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``n`` takes indices ``r, r + n, r + 2n, ...`` in order, without padding.

    For evaluation: unlike ``DistributedSampler`` no sample is repeated to even out the
    shards, so metrics summed over ranks count every sample exactly once.
    """

    def __init__(self, length: int, num_replicas: int, rank: int) -> None:
        self.length, self.num_replicas, self.rank = length, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))
