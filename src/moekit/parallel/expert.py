"""Expert parallelism: each MoE layer's routed experts sharded over an expert-parallel group,
token copies sent to the process that holds their expert and their outputs sent back.

Shape legend: S token copies, D model dim, E routed experts (all of them), P processes in the
expert-parallel group, L = E / P experts held here, R copies received.

`shard_experts(model, parallel)` replaces every MoE layer's `Experts` by an
`ExpertParallelExperts` holding experts `[ep_rank * L, (ep_rank + 1) * L)`: the same class
with L experts (its parameters keep their names, `...experts.w_up` etc., and hold those
experts' rows of the full stacked tensors). The MoE layer does not change: routing, the
dispatch plan and the combine run as on one process, over all E experts; only `compute`, the
step that runs the experts on the dispatched copies, differs. There, for the copies sorted by
expert (so each destination's copies are contiguous):

1. the per-expert copy counts are exchanged (`all_to_all_single`), so each process knows how
   many copies it receives from each other process for each of its experts;
2. the copies travel to their experts' processes (`all_to_all_single` with those split sizes;
   autograd-aware, so gradients take the reverse trip);
3. the received copies are grouped by local expert and computed by the usual backends;
4. the outputs travel back in the reverse exchange, land in the order the copies left, and
   are scaled by their routing weights here, where the weights' gradients belong.

Every process of the group must run each MoE layer's forward (and backward) in step, even
with no copies to send: the exchanges are collective.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from moekit.model import Transformer
from moekit.moe.experts import ExpertBackend, Experts
from moekit.moe.layer import MoELayer
from moekit.nn.mlp import Activation
from moekit.parallel.mesh import Parallel, check_sizes


def _not_called(*args: object) -> Tensor:
    raise RuntimeError("expert-parallel copies are computed by ExpertParallelExperts.compute")


# What `backend_for` returns: the dispatch plan must sort copies by expert (each destination's
# copies contiguous); `compute` does the rest.
EXPERT_PARALLEL = ExpertBackend(
    "expert_parallel", _not_called, needs_sorted=True,
    description="copies exchanged with the processes holding their experts",
)  # fmt: skip


@dataclass
class ExchangeTimer:
    """Wall time spent in the all-to-all exchanges (forward and backward), for benchmarks."""

    seconds: float = 0.0
    calls: int = 0


def _all_to_all(
    x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup,
    timer: ExchangeTimer | None,
) -> Tensor:  # fmt: skip
    t0 = time.perf_counter()
    out = funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), out_splits, in_splits, group))
    if timer is not None:
        timer.seconds += time.perf_counter() - t0
        timer.calls += 1
    return out


class _Exchange(torch.autograd.Function):
    """`all_to_all_single` with variable splits whose backward is the reverse exchange."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int],
        group: dist.ProcessGroup, timer: ExchangeTimer | None,
    ) -> Tensor:  # fmt: skip
        ctx.splits, ctx.group, ctx.timer = (out_splits, in_splits), group, timer
        return _all_to_all(x, out_splits, in_splits, group, timer)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        out_splits, in_splits = ctx.splits
        return (
            _all_to_all(grad, in_splits, out_splits, ctx.group, ctx.timer),
            None,
            None,
            None,
            None,
        )


class ExpertParallelExperts(Experts):
    """The experts `first .. first + num_experts - 1` of a layer of `num_global` experts,
    computed for the whole expert-parallel `group` (see the module docstring). `timer`, when
    set, accumulates the time spent in the exchanges."""

    timer: ExchangeTimer | None = None
    # Called before the exchanges of each `compute` (inference: the main process tells the
    # processes serving experts that an exchange follows; moekit.parallel.inference).
    before_exchange: Callable[[], None] | None = None

    def __init__(
        self,
        num_global: int,
        dim: int,
        hidden: int,
        activation: str | Activation,
        *,
        group: dist.ProcessGroup,
        local_backend: str = "auto",
        bias: bool = False,
    ) -> None:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        check_sizes(size, size, num_global)
        super().__init__(num_global // size, dim, hidden, activation, bias=bias)
        self.num_global, self.group, self.group_size = num_global, group, size
        self.first = rank * self.num_experts
        self.local_backend = local_backend

    def backend_for(
        self, name: str, copies: int, num_experts: int, device: torch.device
    ) -> ExpertBackend:
        return EXPERT_PARALLEL

    def can_decode(self) -> bool:
        return False  # decoding runs per process; every exchange must be collective

    def compute(
        self, backend: ExpertBackend, x_SD: Tensor, expert_S: Tensor, counts_E: Tensor,
        scale_S: Tensor,
    ) -> Tensor:  # fmt: skip
        P, L = self.group_size, self.num_experts
        if self.before_exchange is not None:
            self.before_exchange()
        # 1. How many copies each process sends to each of this process's experts.
        recv_PL = torch.empty(P, L, dtype=torch.long)
        dist.all_to_all_single(recv_PL, counts_E.detach().cpu().view(P, L), group=self.group)
        send_splits = counts_E.view(P, L).sum(1).tolist()
        recv_splits = recv_PL.sum(1).tolist()
        # 2. The copies to their experts' processes.
        x_RD = self._exchange(x_SD, recv_splits, send_splits)
        # 3. Grouped by local expert: received in (source, expert) blocks.
        local_R = torch.repeat_interleave(torch.arange(L).repeat(P), recv_PL.reshape(-1)).to(
            x_SD.device
        )
        order_R = torch.sort(local_R, stable=True).indices
        counts_L = recv_PL.sum(0).to(x_SD.device)
        local = super().backend_for(self.local_backend, int(counts_L.sum()), L, x_SD.device)
        ones_R = x_RD.new_ones(x_RD.shape[0])
        y_RD = local.fn(x_RD[order_R], local_R[order_R], counts_L, ones_R, self)
        if not y_RD.shape[0]:
            # Nothing arrived: keep the output tied to the arrivals anyway, so that backward
            # takes the reverse of the first exchange here too (it is collective), and to the
            # weights, whose gradient is then zero (as on one process) rather than missing.
            y_RD = x_RD * 0.0 + sum(p.sum() for p in self.parameters()) * 0.0
        y_RD = y_RD.index_select(0, torch.argsort(order_R))  # back to arrival order
        # 4. The outputs back to where their copies came from.
        y_SD = self._exchange(y_RD, send_splits, recv_splits)
        return y_SD * scale_S.to(y_SD.dtype).unsqueeze(1)

    def _exchange(self, x: Tensor, out_splits: list[int], in_splits: list[int]) -> Tensor:
        out: Tensor = _Exchange.apply(x, out_splits, in_splits, self.group, self.timer)
        return out

    def extra_repr(self) -> str:
        return (
            f"experts {self.first}..{self.first + self.num_experts - 1} of {self.num_global}, "
            f"{super().extra_repr()}"
        )


@torch.no_grad()
def shard_experts(model: Transformer, parallel: Parallel, *, local_backend: str = "auto") -> None:
    """Give every MoE layer of `model` (built whole, the same on every process) the experts
    this process holds in `parallel`'s expert-parallel group, in place; a no-op at ep = 1."""
    if parallel.ep == 1:
        return
    for layer in model.moe_layers().values():
        layer.experts = _local_experts(layer, parallel, local_backend)


def _local_experts(layer: MoELayer, parallel: Parallel, local_backend: str) -> Experts:
    full = layer.experts
    if type(full) is not Experts:
        raise ValueError(
            f"expert parallelism needs plain float experts, not {type(full).__name__} "
            "(quantised or paged experts are for inference on one process)"
        )
    if len(full.adapters):
        raise ValueError("expert parallelism does not shard expert adapters (LoRA) yet")
    local = ExpertParallelExperts(
        full.num_experts, full.dim, full.hidden, full.act_fn,
        group=parallel.ep_group, local_backend=local_backend, bias=full.b_up is not None,
    )  # fmt: skip
    rows = slice(local.first, local.first + local.num_experts)
    for name, param in full.named_parameters(recurse=False):
        setattr(local, name, nn.Parameter(param[rows].clone(), requires_grad=param.requires_grad))
    return local.to(full.w_up.device)
