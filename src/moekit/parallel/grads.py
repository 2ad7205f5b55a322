"""The global gradient norm of a split model, and clipping by it.

With FSDP2 every process holds a different piece of each gradient: a shard of the weights
FSDP2 splits over the world, a shard of its experts (split over the expert-parallel group,
and along their rows over the replicas), so the squared norm of the whole gradient is the
sum over processes of the squared norms of their pieces: one all-reduce. A piece several
processes hold whole (DDP's replicas) is counted once. (`torch.nn.utils.clip_grad_norm_`
cannot do this: its DTensors live on different meshes, and the expert shards are plain
tensors.)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moekit.parallel.expert import ExpertParallelExperts
from moekit.parallel.mesh import Parallel


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, parallel: Parallel) -> float:
    """Scale `model`'s gradients so that their global norm is at most `max_norm` (infinite:
    no clipping) and return the norm before clipping (the same on every process)."""
    experts = {
        id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts)
        for p in m.parameters()
    }  # fmt: skip
    grads, square = [], torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        g = _local(p.grad)
        grads.append(g)
        # A piece held whole by several processes (DDP's replicas) counts once.
        if isinstance(p.grad, DTensor):
            copies = 1
        else:
            copies = parallel.dp if id(p) in experts else parallel.world
        square += g.double().square().sum().cpu() / copies
    dist.all_reduce(square, group=parallel.world_group)
    norm = float(square.sqrt())
    coef = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_ scales
    if math.isfinite(norm) and coef < 1:
        for g in grads:
            g.mul_(coef)
    return norm
