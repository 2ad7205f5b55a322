"""Fine-tuning data that replays a recorded routing: rows of token ids, each with the routing
the sampler's forward passes took (moekit.infer.routing_replay's JSON form), so that the
training forward pass routes every token as it was routed when sampled.

A .jsonl line of this kind:

    {"token_ids": [...prompt and completion ids...], "prompt_tokens": 11,
     "routed_experts": {"shape": [T, L, K], "dtype": "uint8", "data": "..."}}

`prompt_tokens` (default 0) tokens come before the targets; `routed_experts` (optional) covers
the first T tokens (T at most the row's length; a routing recorded by `moekit serve` has one
row fewer than prompt + completion, the last token being read by nothing), and tokens past it
route themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.data.loader import RoutedRows
from moekit.infer.routing_replay import decode_routing
from moekit.moe.router import max_top_k


@dataclass
class TokenRow:
    """A line of token ids: the ids, the count of prompt tokens before the targets, the
    recorded routing (JSON form; None: the row routes itself)."""

    ids: list[int]
    prompt_tokens: int = 0
    routed_experts: Any = None


def token_row(row: dict[str, Any], where: str) -> TokenRow:
    """A line of token ids (see the module docstring); ValueError naming `where` for a
    malformed one."""
    ids, prompt = row["token_ids"], row.get("prompt_tokens", 0)
    if (
        not isinstance(ids, list)
        or len(ids) < 2
        or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids)
    ):
        raise ValueError(f"{where}: 'token_ids' must be a list of at least 2 token ids")
    if isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 <= prompt < len(ids):
        raise ValueError(
            f"{where}: 'prompt_tokens' must be an int in [0, {len(ids) - 1}] (the tokens "
            "before the first target)"
        )
    unknown = sorted(set(row) - {"token_ids", "prompt_tokens", "routed_experts"})
    if unknown:
        raise ValueError(
            f"{where}: unknown fields {unknown} next to 'token_ids' (allowed: prompt_tokens, "
            "routed_experts)"
        )
    return TokenRow(ids, prompt, row.get("routed_experts"))


def check_token_ids(rows: list[tuple[str, TokenRow | None]], vocab_size: int) -> None:
    """ValueError naming the example (source, row) whose token ids are outside the
    vocabulary."""
    for source, row in rows:
        if row is not None and max(row.ids) >= vocab_size:
            raise ValueError(
                f"{source}: token id {max(row.ids)} is outside the vocabulary (0..{vocab_size - 1})"
            )


def routed_rows(
    rows: list[tuple[str, TokenRow | None]], width: int, seq_len: int, model: ModelConfig | None
) -> RoutedRows | None:
    """The routing to replay over the training rows (source, token row or None for a text
    example; one row each, `width` wide); None when none of them has one. A routing that
    does not fit the model or its row is a ValueError naming the example."""
    routed = [source for source, r in rows if r is not None and r.routed_experts is not None]
    if not routed:
        return None
    if model is None or model.moe is None:
        raise ValueError(f"{routed[0]}: 'routed_experts' needs a model with experts")
    moe, layers = model.moe, len(model.moe_layers)
    decoded: list[Tensor | None] = []
    for source, r in rows:
        if r is None or r.routed_experts is None:
            decoded.append(None)
            continue
        try:
            experts = decode_routing(
                r.routed_experts, num_experts=moe.num_experts, num_layers=layers,
                max_k=max_top_k(moe),
            )  # fmt: skip
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        if experts.shape[0] > len(r.ids):
            raise ValueError(
                f"{source}: routed_experts has {experts.shape[0]} rows for {len(r.ids)} tokens"
            )
        decoded.append(experts[: seq_len + 1])
    K = max(d.shape[2] for d in decoded if d is not None)
    out = torch.full((len(rows), width, layers, K), -1, dtype=torch.int16)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, d in enumerate(decoded):
        if d is not None:
            out[i, : d.shape[0], :, : d.shape[2]] = d.to(torch.int16)
            mask[i, : d.shape[0]] = True
    return RoutedRows(out, mask)
