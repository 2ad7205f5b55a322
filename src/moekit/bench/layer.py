"""`moekit bench layer`: the MoE layer against a dense MLP of equal active FLOPs and against
transformers' Mixtral MoE block holding the same weights, all timed in one process.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.bench.timing import fastest, time_interleaved, with_prefix
from moekit.config import MoEConfig
from moekit.moe.layer import DEFAULT_ROUTE, MoELayer, RouteOptions
from moekit.nn.mlp import MLP


@dataclass(frozen=True)
class LayerShape:
    name: str
    num_experts: int
    top_k: int
    hidden_mult: float  # expert hidden = hidden_mult * dim


SHAPES = (
    LayerShape("coarse", num_experts=8, top_k=2, hidden_mult=4.0),
    LayerShape("fine", num_experts=64, top_k=8, hidden_mult=0.25),
)
INFERENCE_ROUTE = RouteOptions(causal=True, stats=False)  # how generation calls the layer
PHASES = ("prefill", "decode")
PASSES = ("fwd", "fwd_bwd")


@dataclass(frozen=True)
class LayerRow:
    """One (shape, phase, pass) of `bench_layer`: median seconds per call of ours, of the dense
    MLP with the same active FLOPs and of each transformers experts implementation that ran
    (`hf_s`, by implementation; empty without transformers), and our output's largest absolute
    difference from transformers' (None without transformers)."""

    shape: str
    phase: str
    pass_: str  # "fwd" or "fwd_bwd"; "pass" in JSON
    tokens: int
    dim: int
    num_experts: int
    top_k: int
    expert_hidden: int
    ours_s: float
    dense_s: float
    hf_s: dict[str, float]
    max_abs_diff_hf: float | None

    @property
    def hf_impl(self) -> str | None:
        """transformers' fastest experts implementation here, or None without transformers."""
        return fastest(self.hf_s)

    @property
    def hf_best_s(self) -> float | None:
        return self.hf_s[self.hf_impl] if self.hf_impl else None

    @property
    def dense_over_ours(self) -> float:
        return self.dense_s / self.ours_s

    @property
    def hf_over_ours(self) -> float | None:
        return self.hf_s[self.hf_impl] / self.ours_s if self.hf_impl else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "phase": self.phase,
            "pass": self.pass_,
            "tokens": self.tokens,
            "dim": self.dim,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "expert_hidden": self.expert_hidden,
            "ours_s": self.ours_s,
            "dense_s": self.dense_s,
            "hf_best_s": self.hf_best_s,
            "hf_impl": self.hf_impl,
            "hf_s": dict(self.hf_s),
            "dense_over_ours": self.dense_over_ours,
            "hf_over_ours": self.hf_over_ours,
            "max_abs_diff_hf": self.max_abs_diff_hf,
        }


@dataclass(frozen=True)
class LayerBench:
    """What `bench_layer` measured: its settings and one row per (shape, phase, pass)."""

    dim: int
    repeats: int
    prefill_tokens: int
    rows: list[LayerRow]

    @property
    def hf_impls(self) -> list[str]:
        """transformers' experts implementations timed in any row, sorted."""
        return sorted({impl for row in self.rows for impl in row.hf_s})

    def to_rows(self) -> list[dict[str, Any]]:
        """The rows as JSON-ready dicts (what `moekit bench layer --json` prints)."""
        return [row.to_dict() for row in self.rows]


def _runner(
    module: nn.Module, call: Callable[[Tensor], Tensor], x: Tensor, backward: bool
) -> Callable[[], None]:
    grad = torch.randn_like(x)

    def run() -> None:
        if backward:
            for p in module.parameters():
                p.grad = None
            xx = x.detach().requires_grad_(True)
            call(xx).backward(grad)
        else:
            with torch.no_grad():
                call(x)

    return run


def _hf_block(layer: MoELayer, impl: str) -> nn.Module | None:
    """transformers' MixtralSparseMoeBlock with `layer`'s weights, or None without transformers."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    ex = layer.experts
    assert ex.w_gate is not None
    cfg = MixtralConfig(
        hidden_size=ex.dim,
        intermediate_size=ex.hidden,
        num_local_experts=ex.num_experts,
        num_experts_per_tok=layer.cfg.top_k,
    )
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ex.w_gate, ex.w_up], dim=1))
        block.experts.down_proj.copy_(ex.w_down)
    return block


HF_IMPLS = ("eager", "batched_mm", "grouped_mm")
# Implementations that gather one weight copy per token copy are skipped where that copy
# would not fit comfortably in memory.
GATHER_LIMIT_BYTES = 2 * 2**30


def _gather_bytes(tokens: int, cfg: MoEConfig, dim: int) -> int:
    return tokens * cfg.top_k * 3 * cfg.expert_hidden * dim * 4


def bench_layer(
    dim: int = 512,
    repeats: int = 5,
    shapes: tuple[str, ...] = ("coarse", "fine"),
    phases: tuple[str, ...] = ("prefill", "decode"),
    backend: str = "auto",
    prefill_tokens: int = 4096,
    seed: int = 0,
) -> LayerBench:
    """Time ours, the dense equivalent and transformers' best for each shape, phase and pass.

    Returns a LayerBench with one row per (shape, phase, pass), times in seconds (medians of
    `repeats`):
    `ours_s`, `dense_s` (a SwiGLU MLP of hidden K*F: the same active FLOPs), `hf_best_s` (the
    fastest of transformers' expert implementations, None without transformers; `hf_impl`
    names it), and `max_abs_diff_hf` (our output against transformers', as a sanity check).
    """
    _check_arguments(dim, repeats, shapes, phases, prefill_tokens)
    tokens = {"prefill": prefill_tokens, "decode": 1}
    torch.manual_seed(seed)
    rows: list[LayerRow] = []
    for shape in SHAPES:
        if shape.name in shapes:
            rows += _bench_shape(shape, dim, backend, {p: tokens[p] for p in phases}, repeats)
    return LayerBench(dim=dim, repeats=repeats, prefill_tokens=prefill_tokens, rows=rows)


def _check_arguments(
    dim: int, repeats: int, shapes: tuple[str, ...], phases: tuple[str, ...], prefill_tokens: int
) -> None:
    known = {s.name for s in SHAPES}
    if unknown := set(shapes) - known:
        raise ValueError(f"unknown shape(s) {sorted(unknown)}; choose from {sorted(known)}")
    if unknown := set(phases) - set(PHASES):
        raise ValueError(f"unknown phase(s) {sorted(unknown)}; choose from {list(PHASES)}")
    if dim <= 0 or dim % 4 or prefill_tokens <= 0 or repeats <= 0:
        raise ValueError(
            f"need a positive dim divisible by 4 (got {dim}), prefill_tokens > 0 "
            f"(got {prefill_tokens}) and repeats > 0 (got {repeats})"
        )


def _bench_shape(
    shape: LayerShape, dim: int, backend: str, tokens: dict[str, int], repeats: int
) -> list[LayerRow]:
    """The rows of one shape: each phase (with its number of tokens), each pass."""
    hidden = int(shape.hidden_mult * dim)
    cfg = MoEConfig(
        num_experts=shape.num_experts, top_k=shape.top_k, expert_hidden=hidden, backend=backend
    )
    layer = MoELayer(dim, cfg)
    layer.init_weights(0.02, 0.02)
    dense = MLP(dim, shape.top_k * hidden)
    dense.init_weights(0.02, 0.02)
    hf = {impl: _hf_block(layer, impl) for impl in HF_IMPLS}

    def ours(x: Tensor) -> Tensor:
        # Without autograd, route as inference does (causal, no statistics): the decode rows
        # then time the path generation takes.
        route = DEFAULT_ROUTE if torch.is_grad_enabled() else INFERENCE_ROUTE
        return layer(x, route=route)[0]

    rows = []
    for phase, n in tokens.items():
        x = torch.randn(1, n, dim)
        diff = None
        if (eager := hf["eager"]) is not None:
            with torch.no_grad():
                diff = float((ours(x) - eager(x)).abs().max())
        gather_fits = _gather_bytes(n, cfg, dim) <= GATHER_LIMIT_BYTES
        for pass_ in PASSES:
            bwd = pass_ == "fwd_bwd"
            fns = {"ours": _runner(layer, ours, x, bwd), "dense": _runner(dense, dense, x, bwd)}
            for impl, block in hf.items():
                if block is not None and (impl != "batched_mm" or gather_fits):
                    fns[f"hf_{impl}"] = _runner(block, block, x, bwd)
            times = time_interleaved(fns, repeats)
            rows.append(
                LayerRow(
                    shape=shape.name,
                    phase=phase,
                    pass_=pass_,
                    tokens=n,
                    dim=dim,
                    num_experts=shape.num_experts,
                    top_k=shape.top_k,
                    expert_hidden=hidden,
                    ours_s=times["ours"],
                    dense_s=times["dense"],
                    hf_s=with_prefix(times, "hf_"),
                    max_abs_diff_hf=diff,
                )
            )
    return rows
