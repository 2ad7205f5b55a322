"""Inference with a model split over processes: each MoE layer's experts sharded over all of
them (expert parallelism), everything else replicated.

Every process runs the same generation on the same prompts, so every MoE layer's exchanges
happen in step; each process computes the copies routed to its own experts, for every
process. The next-token logits of the main process are broadcast to the others at each step
(`Generator.logits_hook`), so that all of them choose the same tokens (with the same seeds)
and stop together, whatever the last bits of their own sums.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from moekit.infer.generate import Generator
from moekit.parallel.expert import shard_experts
from moekit.parallel.mesh import Parallel


def split_generator(generator: Generator, parallel: Parallel) -> Generator:
    """Shard `generator`'s model's experts over every process of `parallel` (its
    expert-parallel size must be the number of processes) and keep the processes in step;
    in place, returns the generator. Every process must then make the same calls."""
    if parallel.dp != 1:
        raise ValueError(
            f"inference splits the experts over every process: the expert-parallel size "
            f"({parallel.ep}) must equal the number of processes ({parallel.world})"
        )
    shard_experts(generator.model, parallel)
    group = parallel.world_group

    def main_logits(logits: Tensor) -> Tensor:
        dist.broadcast(logits, src=0, group=group)
        return logits

    generator.logits_hook = main_logits
    return generator
