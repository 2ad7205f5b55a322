"""Router cost: flat top-k against hierarchical routing at the same experts and top-k, timed
in one process (`python -m moekit.bench.routers`).

Each router maps the same (T, D) tokens to its RouterOutput, forward only (as generation runs
it) and forward + backward through its weights (as training runs it, with the layer's balance
losses). The figure is microseconds per token; the ratio is hierarchical over flat.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from functools import partial

import torch

from moekit.bench.timing import time_interleaved
from moekit.config import MoEConfig
from moekit.moe import losses
from moekit.moe.router import HierarchicalRouter, Router, build_router


@dataclass(frozen=True)
class RouterRow:
    """One pass of both routers: microseconds per token, and hierarchical / flat."""

    phase: str  # "fwd" or "fwd_bwd"
    flat_us: float
    hierarchical_us: float
    ratio: float


def _step(router: Router, x_TD: torch.Tensor, backward: bool) -> None:
    if not backward:
        with torch.no_grad():
            router(x_TD)
        return
    out = router(x_TD)
    probs_TE = out.logits.softmax(dim=-1)
    loss = losses.load_balancing_loss(probs_TE, out.experts) + losses.z_loss(out.logits)
    if isinstance(router, HierarchicalRouter):
        loss = loss + losses.group_balance_loss(probs_TE, out.experts, router.groups)
    loss.backward()


def bench_routers(
    *,
    dim: int = 192,
    tokens: int = 4096,
    num_experts: int = 8,
    top_k: int = 2,
    router_groups: int = 2,
    group_top_k: int = 1,
    repeats: int = 20,
) -> list[RouterRow]:
    """Time a flat softmax top-k router and a hierarchical one (`router_groups` groups,
    `group_top_k` of them per token) with the same `num_experts` and `top_k` on `tokens`
    random tokens of width `dim`, interleaved in this process."""
    flat = build_router(dim, MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=1))
    hier = build_router(
        dim,
        MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=1, router="hierarchical",
                  router_groups=router_groups, group_top_k=group_top_k),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for r in (flat, hier):
        r.init_weights(0.02, gen)
    x_TD = torch.randn(tokens, dim, generator=gen)
    rows = []
    for phase in ("fwd", "fwd_bwd"):
        back = phase == "fwd_bwd"
        times = time_interleaved(
            {"flat": partial(_step, flat, x_TD, back), "hier": partial(_step, hier, x_TD, back)},
            repeats,
        )
        f, h = (1e6 * times[k] / tokens for k in ("flat", "hier"))
        rows.append(RouterRow(phase, f, h, h / f))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moekit.bench.routers", description=__doc__)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--group-top-k", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    rows = bench_routers(
        dim=a.dim, tokens=a.tokens, num_experts=a.experts, top_k=a.top_k,
        router_groups=a.groups, group_top_k=a.group_top_k, repeats=a.repeats,
    )  # fmt: skip
    for row in rows:
        print(json.dumps(asdict(row)))


if __name__ == "__main__":
    main()
