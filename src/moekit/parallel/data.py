"""Data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`), or with DDP (PyTorch's
composable `replicate`) where FSDP2 does not run, composed with expert parallelism.

Each process computes the loss of its own share of the global batch (a mean over its
tokens), so the gradient of the global mean loss is the mean of the processes' gradients:

- weights outside the routed experts are replicated over all W processes: FSDP2 shards them
  (and their gradients and optimizer state) over the whole world and averages gradients over
  it;
- an expert shard is held by the W / P replicas of one expert-parallel position, and its
  gradient on one replica already sums the contributions of all P processes of that
  replica's group (the copies came from all of them). The mean over the world is then the
  sum over replicas divided by W: FSDP2 shards the experts over their replicas with
  gradient divide factor W; with a single replica (W = P) the gradient is divided by W as it
  is accumulated.

With DDP (`apply_ddp`) the weights outside the experts are replicated whole on every process
and their gradients averaged over the world in buckets; an expert shard's gradient is summed
over its replicas as it is computed and divided by W.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import Shard

from moekit.model import Transformer
from moekit.nn.fuse import keep_unfused
from moekit.parallel.mesh import Parallel


def expert_parameters(model: Transformer) -> set[nn.Parameter]:
    """The parameters of every routed expert (the expert-parallel shards)."""
    return {p for layer in model.moe_layers().values() for p in layer.experts.parameters()}


def apply_fsdp(
    model: Transformer, parallel: Parallel, *, reshard_after_forward: bool = True
) -> None:
    """Shard `model` (its experts already split by `moekit.parallel.expert.shard_experts`
    when ep > 1) with FSDP2, in place: one FSDP unit per block and one for the rest (embedding,
    final norm, head); at ep > 1, the experts of each MoE layer a unit of their own over their
    replicas. Parameters become DTensors; `model(...)` is used as before."""
    keep_unfused(model)  # FSDP2 swaps the parameters' storage: no fused copies of them
    experts = expert_parameters(model) if parallel.ep > 1 else set()
    for layer in model.moe_layers().values() if parallel.ep > 1 else ():
        if parallel.dp > 1:
            # Sharded along their rows (dim 1), not over experts (dim 0, already split by
            # expert parallelism): a shard is then a plain block of the full (E, F, D) tensor
            # on the (dp, ep) mesh, which distributed checkpoints can reshard.
            fully_shard(
                layer.experts, mesh=parallel.mesh["dp"],
                reshard_after_forward=reshard_after_forward,
                shard_placement_fn=lambda _: Shard(1),
            )  # fmt: skip
            layer.experts.set_gradient_divide_factor(float(parallel.world))  # type: ignore[operator]
            layer.experts.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
            # The MoE layer calls `compute`, not `forward`: gather the shard around it.
            register_fsdp_forward_method(layer.experts, "compute")
        else:
            for p in layer.experts.parameters():
                p.register_hook(_divide_by(parallel.world))
    for block in model.blocks():
        own = {p for p in block.parameters() if p in experts}
        fully_shard(
            block, mesh=parallel.world_mesh, reshard_after_forward=reshard_after_forward,
            ignored_params=own if parallel.dp == 1 else None,
        )  # fmt: skip
    fully_shard(
        model, mesh=parallel.world_mesh, reshard_after_forward=reshard_after_forward,
        ignored_params=experts if parallel.dp == 1 else None,
    )  # fmt: skip


def _divide_by(n: int) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        return grad / n

    return hook


def my_rows(batch: Tensor, parallel: Parallel) -> Tensor:
    """This process's rows of a global batch (the same on every process): an equal, contiguous
    share, in rank order, so that the processes together see the whole batch once."""
    rows = batch.shape[0]
    if rows % parallel.world:
        raise ValueError(
            f"a batch of {rows} rows does not split evenly over {parallel.world} processes: "
            "make train.batch_size a multiple of the number of processes"
        )
    share = rows // parallel.world
    return batch[parallel.rank * share : (parallel.rank + 1) * share]


def apply_ddp(model: Transformer, parallel: Parallel) -> None:
    """Data parallelism without sharding (DDP, as PyTorch's composable `replicate`), in place:
    every weight outside the experts whole on every process, gradients averaged over the
    world; at ep > 1 the expert shards are left to DDP's care and their gradients summed over
    their replicas (one all-reduce per expert tensor per backward) and divided by the world."""
    import torch.distributed as dist
    from torch.distributed._composable.replicate import replicate

    keep_unfused(model)
    experts = [layer.experts for layer in model.moe_layers().values()] if parallel.ep > 1 else []

    def replicas_mean(grad: Tensor) -> Tensor:
        if parallel.dp > 1:
            grad = grad.clone()
            dist.all_reduce(grad, group=parallel.dp_group)
        return grad / parallel.world

    for module in experts:
        for p in module.parameters():
            p.register_hook(replicas_mean)
    replicate(model, ignored_modules=experts, process_group=parallel.world_group)
