"""Inference with a model's experts split over processes (expert parallelism): the main
process runs the model (generation, the server's engine) and every process serves its share
of each MoE layer's experts.

Each of the N processes holds E / N experts of every MoE layer. The main process (rank 0)
runs everything as on one process; whenever it runs the model, the others join each MoE
layer's exchanges in step (`serve_experts`): they send no token copies of their own, receive
the main process's copies for their experts, compute them and send the outputs back. So
only the main process needs the attention, the KV caches and the requests; the others hold
experts. The main process announces each MoE layer's exchange just before it (a
one-element broadcast naming the layer), so a forward pass that fails on the main process
part way (a prompt too long, a full cache) leaves the others waiting for the next
announcement, not inside an exchange; `release_experts` tells them to stop. Run them in a
process group with a long timeout (`INFERENCE_TIMEOUT`): a server may sit idle for hours.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import torch
import torch.distributed as dist

from moekit.model import Transformer
from moekit.parallel.expert import EXPERT_PARALLEL, ExpertParallelExperts, shard_experts
from moekit.parallel.mesh import Parallel

_STOP = 0  # announcements: 0 stops, i + 1 runs MoE layer i's exchange

# The processes serving experts wait for the next announcement as long as this (a server can
# be idle for hours; a main process that dies closes its connections and ends them at once).
INFERENCE_TIMEOUT = datetime.timedelta(days=365)


def split_model(model: Transformer, parallel: Parallel) -> Transformer:
    """Keep this process's share of `model`'s experts (its expert-parallel size must be the
    number of processes) and, on the main process, announce each MoE layer's exchange to the
    others; in place, returns the model. The others then call `serve_experts`."""
    if parallel.dp != 1:
        raise ValueError(
            f"inference splits the experts over every process: the expert-parallel size "
            f"({parallel.ep}) must equal the number of processes ({parallel.world})"
        )
    shard_experts(model, parallel)
    if parallel.is_main:
        group = parallel.world_group
        for i, layer in enumerate(model.moe_layers().values()):
            assert isinstance(layer.experts, ExpertParallelExperts)
            layer.experts.before_exchange = _announcer(i + 1, group)
    return model


def _announcer(signal: int, group: dist.ProcessGroup) -> Callable[[], None]:
    def announce() -> None:
        dist.broadcast(torch.tensor([signal]), src=0, group=group)

    return announce


@torch.inference_mode()
def serve_experts(model: Transformer, parallel: Parallel) -> int:
    """On a process other than the main one: take part in every MoE layer exchange the main
    process announces until it calls `release_experts`. Returns the number of exchanges
    served."""
    layers = [layer.experts for layer in model.moe_layers().values()]
    if not all(isinstance(ex, ExpertParallelExperts) for ex in layers):
        raise ValueError("serve_experts needs a model split by split_model")
    device = next(model.parameters()).device
    signal = torch.zeros(1, dtype=torch.long)
    served = 0
    while True:
        dist.broadcast(signal, src=0, group=parallel.world_group)
        if int(signal) == _STOP:
            return served
        ex = layers[int(signal) - 1]
        assert isinstance(ex, ExpertParallelExperts)
        none = torch.zeros(0, ex.dim, device=device, dtype=ex.w_up.dtype)
        ids = torch.zeros(0, dtype=torch.long, device=device)
        counts = torch.zeros(ex.num_global, dtype=torch.long, device=device)
        ex.compute(EXPERT_PARALLEL, none, ids, counts, none.new_zeros(0))
        served += 1


def release_experts(parallel: Parallel) -> None:
    """On the main process: tell the others that no more forward passes come."""
    dist.broadcast(torch.tensor([_STOP]), src=0, group=parallel.world_group)
