"""The global gradient norm of a split model, and clipping by it.

Every process holds a different piece of each gradient: a shard of the weights FSDP2 splits
over the world, a shard of its experts (split over the expert-parallel group, and along
their rows over the replicas). Each piece belongs to exactly one process, so the squared
norm of the whole gradient is the sum over processes of the squared norms of their pieces:
one all-reduce. (`torch.nn.utils.clip_grad_norm_` cannot do this: its DTensors live on
different meshes, and the expert shards are plain tensors.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moekit.parallel.mesh import Parallel


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float, parallel: Parallel) -> float:
    """Scale the gradients so that their global norm is at most `max_norm` (infinite: no
    clipping) and return the norm before clipping (the same on every process)."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    square = torch.zeros((), dtype=torch.float64)
    for g in grads:
        square += g.double().square().sum().cpu()
    dist.all_reduce(square, group=parallel.world_group)
    norm = float(square.sqrt())
    coef = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_ scales
    if math.isfinite(norm) and coef < 1:
        for g in grads:
            g.mul_(coef)
    return norm
