"""Routing replay in the server: `"moekit": {"return_routed_experts": true}` records the experts
each MoE layer chose for every token a request's forward passes read, and
`"moekit": {"routed_experts": {...}}` forces a recorded routing on a later request.

Rows are tokens in order: the prompt's, then the generated ones. A recording has one row per
token the model read: every prompt token and every generated token but the last (nothing
reads the last one; a request that only scores its prompt reads the prompt). A forced routing
covers the first R of those rows (the prompt, and optionally generated tokens: decode step t
takes row prompt + t); past row R the model routes itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.infer.routing_replay import decode_routing, encode_routing, trim_slots
from moekit.model import ModelOutput
from moekit.serve.events import EngineRequest
from moekit.serve.protocol import APIError, MoekitOptions

PARAM = "moekit.routed_experts"


def requested(
    opts: MoekitOptions,
    cfg: ModelConfig,
    max_top_k: int,
    prompts: list[list[int]],
    max_new_tokens: int,
    prompt_only: bool,
) -> Tensor | None:
    """The routing a request forces (None: none), checked against the model and the request:
    an APIError (400) naming the problem otherwise. `prompts`: the request's prompts as ids."""
    if not (opts.routed_experts is not None or opts.return_routed_experts):
        return None
    if cfg.moe is None:
        param = PARAM if opts.routed_experts is not None else "moekit.return_routed_experts"
        raise APIError(400, f"{param}: this model has no experts", param=param)
    if opts.routed_experts is None:
        return None
    try:
        experts = decode_routing(
            opts.routed_experts,
            num_experts=cfg.moe.num_experts,
            num_layers=len(cfg.moe_layers),
            max_k=max_top_k,
            name=PARAM,
        )
    except ValueError as e:
        raise APIError(400, str(e), param=PARAM, code="invalid_value") from None
    if len({tuple(p) for p in prompts}) > 1:
        raise APIError(400, f"{PARAM} needs a single prompt: it routes that prompt", param=PARAM)
    read = len(prompts[0]) + (0 if prompt_only else max_new_tokens - 1)
    if experts.shape[0] > read:
        raise APIError(
            400,
            f"{PARAM} has {experts.shape[0]} rows, but this request reads at most {read} "
            f"tokens ({len(prompts[0])} of prompt"
            + ("" if prompt_only else f", and all but the last of {max_new_tokens} generated")
            + "); is it the routing of another prompt?",
            param=PARAM,
        )
    return experts


def chunk_replay(req: EngineRequest, start: int, end: int) -> dict[str, Tensor]:
    """The model's replay arguments for tokens start..end-1 of `req` (none to replay: {})."""
    forced = req.routed_experts
    if forced is None or start >= forced.shape[0]:
        return {}
    rows = forced[start:end]
    n = end - start
    if rows.shape[0] == n:
        return {"routed_experts": rows[None]}
    padded = torch.cat([rows, rows.new_full((n - rows.shape[0], *rows.shape[1:]), -1)])
    mask = torch.arange(n) < rows.shape[0]
    return {"routed_experts": padded[None], "routed_mask": mask[None]}


def step_replay(reqs: list[EngineRequest | None], rows: list[int]) -> dict[str, Tensor]:
    """The model's replay arguments for a decode step of one token per request (`None`: an
    idle row), request i feeding its token `rows[i]`. Idle rows, whose output nobody reads,
    go to no expert; when every other row replays too, no router makes a choice of its own."""
    forced: list[Tensor | None] = []
    for req, row in zip(reqs, rows, strict=True):
        experts = req.routed_experts if req is not None else None
        forced.append(experts[row] if experts is not None and row < experts.shape[0] else None)
    present = [f for f in forced if f is not None]
    if not present:
        return {}
    M = present[0].shape[0]
    K = max(f.shape[1] for f in present)
    out = torch.full((len(forced), 1, M, K), -1, dtype=torch.long)
    mask = torch.tensor(
        [[req is None or f is not None] for req, f in zip(reqs, forced, strict=True)]
    )
    for i, f in enumerate(forced):
        if f is not None:
            out[i, 0, :, : f.shape[1]] = f
    if bool(mask.all()):
        return {"routed_experts": out}
    return {"routed_experts": out, "routed_mask": mask}


def record(req: EngineRequest, out: ModelOutput, row: int, seq_len: int) -> None:
    """Keep the routing of row `row` of a forward pass (made with `return_routing`) over
    `seq_len` tokens per row, when `req` asked for it."""
    if not req.return_routed_experts:
        return
    layers = [stats.routing for _, stats in sorted(out.moe_stats.items())]
    assert all(r is not None for r in layers), "run the model with return_routing=True"
    pieces = [r.experts[row * seq_len : (row + 1) * seq_len] for r in layers if r is not None]
    K = max(p.shape[1] for p in pieces)
    padded = [torch.nn.functional.pad(p, (0, K - p.shape[1]), value=-1) for p in pieces]
    req.routed_log.append(torch.stack(padded, dim=1).cpu())


def recorded(req: EngineRequest, completion_tokens: int, num_experts: int) -> dict[str, Any] | None:
    """The JSON form of what `record` kept for `req`: one row per token the model read (None
    when it read none: a request that ended before its prompt went through)."""
    read = len(req.prompt_ids) + max(completion_tokens - 1, 0)
    pieces = req.routed_log
    if not pieces:
        return None
    K = max(p.shape[2] for p in pieces)
    rows = torch.cat([torch.nn.functional.pad(p, (0, K - p.shape[2]), value=-1) for p in pieces])
    return encode_routing(trim_slots(rows[:read]), num_experts)
