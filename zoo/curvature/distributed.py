"""torch.distributed glue: who this process is, and summing the partial sums of all ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(tensors: list[Tensor]) -> None:
    """Sum each tensor over all ranks in place (gloo on CPU, nccl on GPU: whatever the group uses).

    Tensors are packed per dtype into one flat buffer, so the reduction is a few large messages.
    """
    _, world = rank_and_world()
    if world == 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
