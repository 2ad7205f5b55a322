"""Replaying a recorded routing in training: the routing of rows of token ids
(moekit.data.token_rows), decoded and checked against the model, laid over the training rows
so that the training forward pass routes every token as it was routed when sampled.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.data.loader import RoutedRows, RoutingOf
from moekit.data.token_rows import TokenRow
from moekit.infer.routing_replay import decode_routing
from moekit.moe.router import max_top_k


def routing_decoder(model: ModelConfig | None) -> RoutingOf:
    """The decoder of recorded routings for `model` (moekit.data.loader.RoutingOf): a row's
    routing as (T, M, K) int16 expert ids, -1 in empty slots; a routing that does not fit the
    model or its row is a ValueError naming the source."""

    def decode(source: str, row: TokenRow) -> Tensor:
        if model is None or model.moe is None:
            raise ValueError(f"{source}: 'routed_experts' needs a model with experts")
        moe = model.moe
        try:
            experts = decode_routing(
                row.routed_experts, num_experts=moe.num_experts,
                num_layers=len(model.moe_layers), max_k=max_top_k(moe),
            )  # fmt: skip
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        if experts.shape[0] > len(row.ids):
            raise ValueError(
                f"{source}: routed_experts has {experts.shape[0]} rows for {len(row.ids)} tokens"
            )
        return experts.to(torch.int16)

    return decode


def routed_rows(
    rows: list[tuple[str, TokenRow | None]], width: int, seq_len: int, model: ModelConfig | None
) -> RoutedRows | None:
    """The routing to replay over the training rows (source, token row or None for a text
    example; one row each, `width` wide); None when none of them has one. A routing that
    does not fit the model or its row is a ValueError naming the example."""
    decode = routing_decoder(model)
    decoded = [
        decode(source, r)[: seq_len + 1] if r is not None and r.routed_experts is not None else None
        for source, r in rows
    ]
    known = [d for d in decoded if d is not None]
    if not known:
        return None
    layers, K = known[0].shape[1], max(d.shape[2] for d in known)
    out = torch.full((len(rows), width, layers, K), -1, dtype=torch.int16)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, d in enumerate(decoded):
        if d is not None:
            out[i, : d.shape[0], :, : d.shape[2]] = d
            mask[i, : d.shape[0]] = True
    return RoutedRows(out, mask)
