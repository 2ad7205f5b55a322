"""`parallelize`: expert parallelism, global balancing and FSDP2 applied to a built model."""

from __future__ import annotations

from moekit.model import Transformer
from moekit.parallel.balance import balance_globally
from moekit.parallel.data import apply_fsdp
from moekit.parallel.expert import shard_experts
from moekit.parallel.mesh import Parallel


def parallelize(
    model: Transformer, parallel: Parallel, *, local_backend: str = "auto"
) -> Transformer:
    """Split `model` (built whole, with the same weights on every process) over `parallel`:
    its routed experts sharded over the expert-parallel group (`shard_experts`), its routers
    balanced on global counts (`balance_globally`), and everything sharded for data
    parallelism with FSDP2 (`apply_fsdp`). In place; returns the model."""
    shard_experts(model, parallel, local_backend=local_backend)
    balance_globally(model, parallel)
    if parallel.world > 1:
        apply_fsdp(model, parallel)
    return model
