"""Global, not per-process, balancing: the routing counts behind the load-balancing loss, the
aux-loss-free bias update and the load statistics are summed over every process's tokens.

With data parallelism each process routes a different share of the batch; balancing on each
share alone would differ from training on the whole batch (and the replicated routers'
biases would drift apart). The counts are summed over the world, the data-parallel group of
the replicated routers, so every process sees the counts of the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.model import Transformer
from moekit.parallel.mesh import Parallel


def balance_globally(model: Transformer, parallel: Parallel) -> None:
    """Make every MoE layer's load-balancing loss take its expert fractions from the global
    batch (in place; each process's router probabilities stay its own, so the mean of the
    processes' gradients is the gradient on the whole batch)."""
    group = parallel.world_group

    def reduce(counts_E: Tensor) -> Tensor:
        total = counts_E.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    for layer in model.moe_layers().values():
        layer.reduce_counts = reduce


def global_counts(counts: dict[int, Tensor], parallel: Parallel) -> dict[int, Tensor]:
    """Per MoE layer, routed copies per expert summed over every process (one all-reduce for
    all layers): what the aux-loss-free bias update and the load statistics take."""
    if not counts:
        return {}
    layers = sorted(counts)
    stacked = torch.stack([counts[i] for i in layers])
    dist.all_reduce(stacked, group=parallel.world_group)
    return {i: stacked[n] for n, i in enumerate(layers)}
