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
from moekit.moe.layer import MoELayer
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
PHASES = ("prefill", "decode")


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
) -> list[dict[str, Any]]:
    """Time ours, the dense equivalent and transformers' best for each shape, phase and pass.

    Returns one row per (shape, phase, pass) with times in seconds (medians of `repeats`):
    `ours_s`, `dense_s` (a SwiGLU MLP of hidden K*F: the same active FLOPs), `hf_best_s` (the
    fastest of transformers' expert implementations, None without transformers; `hf_impl`
    names it), and `max_abs_diff_hf` (our output against transformers', as a sanity check).
    """
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
    tokens = {"prefill": prefill_tokens, "decode": 1}
    torch.manual_seed(seed)
    rows: list[dict[str, Any]] = []
    for shape in SHAPES:
        if shape.name not in shapes:
            continue
        hidden = int(shape.hidden_mult * dim)
        cfg = MoEConfig(
            num_experts=shape.num_experts, top_k=shape.top_k, expert_hidden=hidden, backend=backend
        )
        layer = MoELayer(dim, cfg)
        layer.init_weights(0.02, 0.02)
        dense = MLP(dim, shape.top_k * hidden)
        dense.init_weights(0.02, 0.02)
        hf = {impl: _hf_block(layer, impl) for impl in HF_IMPLS}

        def ours(x: Tensor, layer: MoELayer = layer) -> Tensor:
            return layer(x)[0]

        for phase in phases:
            x = torch.randn(1, tokens[phase], dim)
            diff = None
            if hf["eager"] is not None:
                with torch.no_grad():
                    diff = float((ours(x) - hf["eager"](x)).abs().max())
            gather_fits = _gather_bytes(tokens[phase], cfg, dim) <= GATHER_LIMIT_BYTES
            for pass_ in ("fwd", "fwd_bwd"):
                bwd = pass_ == "fwd_bwd"
                fns = {"ours": _runner(layer, ours, x, bwd), "dense": _runner(dense, dense, x, bwd)}
                for impl, block in hf.items():
                    if block is not None and (impl != "batched_mm" or gather_fits):
                        fns[f"hf_{impl}"] = _runner(block, block, x, bwd)
                times = time_interleaved(fns, repeats)
                hf_times = with_prefix(times, "hf_")
                best = fastest(hf_times)
                rows.append(
                    {
                        "shape": shape.name,
                        "phase": phase,
                        "pass": pass_,
                        "tokens": tokens[phase],
                        "dim": dim,
                        "num_experts": shape.num_experts,
                        "top_k": shape.top_k,
                        "expert_hidden": hidden,
                        "ours_s": times["ours"],
                        "dense_s": times["dense"],
                        "hf_best_s": hf_times[best] if best else None,
                        "hf_impl": best,
                        "hf_s": hf_times,
                        "dense_over_ours": times["dense"] / times["ours"],
                        "hf_over_ours": hf_times[best] / times["ours"] if best else None,
                        "max_abs_diff_hf": diff,
                    }
                )
    return rows
