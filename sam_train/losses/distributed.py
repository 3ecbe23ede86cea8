"""The loss normaliser across processes, kept apart from the pure loss functions."""

from __future__ import annotations

import torch
import torch.distributed as dist


def global_num_objects(m: int, device: torch.device | str = "cpu") -> float:
    """Objects per process to divide summed losses by, so DDP's gradient mean is a global mean.

    Sums `m` over all processes when torch.distributed is initialised and divides by the world
    size (DDP averages gradients over processes, so each process must normalise by the global
    count / world size, as SAM 2 does). Clamped to at least 1. Without torch.distributed it is
    max(m, 1). One all-reduce and one host sync per call: call it once per step.

    Args:
        m: number of objects (masks) in this process's batch.
        device: device of the all-reduce buffer (the process group's device, e.g. cuda for NCCL).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return float(max(m, 1))
    count = torch.tensor(float(m), device=device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return max(count.item() / dist.get_world_size(), 1.0)
