"""What a loss needs to know of the process group it may run in (DDP)."""

from __future__ import annotations

import torch.distributed as dist


def distributed_world_size() -> int:
    """The processes of the initialised default process group; 1 outside one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
