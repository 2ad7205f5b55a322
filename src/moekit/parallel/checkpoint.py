"""Checkpoints of a model split over processes, with PyTorch's Distributed Checkpoint (DCP).

Every process writes its own shards into one directory (`torch.distributed.checkpoint.save`)
along with a metadata file that records each tensor's global shape and where each piece lies
in it; loading (`torch.distributed.checkpoint.load`) reads whatever pieces the loading
process's own shards cover. So a checkpoint saved by W processes with expert-parallel size P
loads into any other W' and P' (resharding), and into a single process.

For that, every tensor is described by its global shape: the weights outside the experts are
FSDP2's DTensors already (sharded over the world); an expert shard, held as a plain (E/P, F,
D) block (sharded again by FSDP2 along its rows when replicated), is described as a DTensor of
the full (E, F, D) tensor on the ("dp", "ep") mesh, placements (Shard(1), Shard(0))
(with DDP, (Replicate(), Shard(0)): each replica holds its block whole). The
optimizer's state (AdamW's moments) is described the same way as its parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from moekit.parallel.expert import ExpertParallelExperts
from moekit.parallel.mesh import Parallel


def _expert_names(model: nn.Module) -> set[str]:
    """The names of the expert-parallel shards among `model`'s parameters."""
    return {
        f"{prefix}.{name}"
        for prefix, module in model.named_modules()
        if isinstance(module, ExpertParallelExperts)
        for name, _ in module.named_parameters(recurse=False)
    }


def _global(t: Tensor, parallel: Parallel) -> DTensor:
    """An expert shard (or its optimizer state) as the DTensor of the full tensor: sharded
    along its rows over the replicas by FSDP2 (a DTensor), or whole on each (DDP)."""
    E = t.shape[0] * parallel.ep
    if isinstance(t, DTensor):
        local = t.to_local()
        # FSDP2 shards dim 1 in chunks of ceil(size / dp); the full row count is the sum.
        rows = torch.tensor([local.shape[1]])
        torch.distributed.all_reduce(rows, group=parallel.dp_group)
        shape = torch.Size([E, int(rows), *local.shape[2:]])
        placements: list[Placement] = [Shard(1), Shard(0)]
    else:
        local, shape, placements = t, torch.Size([E, *t.shape[1:]]), [Replicate(), Shard(0)]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, parallel.mesh, placements, run_check=False, shape=shape, stride=stride
    )


def sharded_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, parallel: Parallel | None
) -> dict[str, Any]:
    """What a distributed checkpoint holds: {"model": name -> tensor, "optim": name ->
    {state name -> tensor}}, every tensor this process's shard of a tensor of global shape
    (see the module docstring), sharing storage with the live ones (loading into it loads
    the model and the optimizer). The optimizer's state is created first when it is empty
    (no step taken yet)."""
    experts = _expert_names(model) if parallel is not None and parallel.ep > 1 else set()
    state: dict[str, Any] = {"model": {}}
    for name, t in model.state_dict().items():
        state["model"][name] = _global(t, parallel) if name in experts else t  # type: ignore[arg-type]
    if optimizer is not None:
        _init_optimizer_state(optimizer)
        state["optim"] = {}
        for name, p in model.named_parameters():
            entries = optimizer.state.get(p, {})
            state["optim"][name] = {
                k: _global(v, parallel) if name in experts and v.dim() else v  # type: ignore[arg-type]
                for k, v in entries.items()
            }
    return state


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter without optimizer state its state (a step with zero gradients at
    learning rate 0 over those parameters only, which leaves their weights as they are and
    their moments zero; the parameters that have state are left out of it)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    fresh = {p for p in params if p not in optimizer.state}
    if not fresh:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p) if p in fresh else None
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad
    for p in fresh:  # the step above does not count
        st = optimizer.state[p]
        if "step" in st:
            st["step"] = torch.zeros_like(st["step"]) if isinstance(st["step"], Tensor) else 0


def save_sharded(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, parallel: Parallel
) -> None:
    """Every process writes its shards of the model (and optimizer) into `path` (collective)."""
    dcp.save(sharded_state(model, optimizer, parallel), checkpoint_id=str(path))


def load_sharded(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, parallel: Parallel | None
) -> None:
    """Load a checkpoint of `save_sharded`, saved by any number of processes and any
    expert-parallel size, into this process's shards (collective when `parallel` is set)."""
    state = sharded_state(model, optimizer, parallel)
    dcp.load(state, checkpoint_id=str(path))


def full_state_dict(model: nn.Module, parallel: Parallel) -> dict[str, Tensor] | None:
    """The whole model's state dict (plain tensors, the single-process names and shapes),
    gathered on the main process (None elsewhere); every process must call it."""
    out: dict[str, Tensor] = {}
    for name, t in sharded_state(model, None, parallel)["model"].items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if parallel.is_main:
            out[name] = full.detach().cpu()
    return out if parallel.is_main else None
