"""`parallelize`: expert parallelism, global balancing and data parallelism (FSDP2 or DDP)
applied to a built model."""

from __future__ import annotations

from moekit.model import Transformer
from moekit.parallel.balance import balance_globally
from moekit.parallel.data import apply_ddp, apply_fsdp
from moekit.parallel.expert import shard_experts
from moekit.parallel.mesh import Parallel

DATA_PARALLEL = ("fsdp", "ddp")


def parallelize(
    model: Transformer, parallel: Parallel, *, data_parallel: str = "fsdp",
    local_backend: str = "auto",
) -> Transformer:  # fmt: skip
    """Split `model` (built whole, with the same weights on every process) over `parallel`:
    its routed experts sharded over the expert-parallel group (`shard_experts`), its routers
    balanced on global counts (`balance_globally`), and data parallelism over the rest with
    FSDP2 (`apply_fsdp`: weights, gradients and optimizer state sharded) or DDP
    (`apply_ddp`: replicated). In place; returns the model."""
    if data_parallel not in DATA_PARALLEL:
        raise ValueError(f"data_parallel must be one of {DATA_PARALLEL}, got {data_parallel!r}")
    shard_experts(model, parallel, local_backend=local_backend)
    balance_globally(model, parallel)
    if parallel.world > 1:
        (apply_fsdp if data_parallel == "fsdp" else apply_ddp)(model, parallel)
    return model
