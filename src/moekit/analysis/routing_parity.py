"""Routing parity: how often two routing traces of the same tokens pick the same experts.

Two models that should agree (a float32 model and its quantised copy, moekit and transformers
on the same checkpoint, a model before and after fine-tuning) are each traced on the same
token ids (`moekit.analysis.routing`); these pure functions compare the traces layer by layer.
Per MoE layer, over the N tokens (K slots each):

  set_match   share of tokens whose sets of K chosen experts are equal (order ignored)
  overlap     mean over tokens of |A ∩ B| / K, the chosen experts the two sides share
  top1        share of tokens whose highest-weight expert is the same on both sides
  near_ties   tokens that either side chose with a selection margin below `margin`: the gap
              between its K-th and (K+1)-th best selection score (softmax probability, or
              sigmoid score plus selection bias). Float rounding alone can flip such a choice.
  decisive    the other tokens; set_match_decisive is set_match over them

A token diverges at a layer when its sets differ there and it is decisive there (with
`margin=0` every difference counts). `first_divergence` of a layer counts the tokens whose
first divergence, in layer order, is that layer; the comparison's first divergent layer is the
first MoE layer whose set_match_decisive falls below `threshold`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.routing import LayerTrace, RoutingTrace

DEFAULT_MARGIN = 1e-4  # selection-score gap below which a choice counts as a near tie
DEFAULT_THRESHOLD = 0.99  # set agreement below which a layer counts as divergent

MEASURES = {
    "set_match": "share of tokens whose K chosen experts are the same set on both sides",
    "overlap": "mean over tokens of |A ∩ B| / K",
    "top1": "share of tokens whose highest-weight chosen expert is the same on both sides",
    "near_ties": "tokens either side chose with a K-th vs (K+1)-th selection-score gap < margin",
    "set_match_decisive": "set_match over the tokens that are not near ties",
    "diverging": "decisive tokens whose sets differ",
    "first_divergence": "tokens whose first diverging layer (in layer order) is this one",
    "first_divergent_layer": "the first MoE layer whose set_match_decisive < threshold",
}


@dataclass(frozen=True)
class LayerAgreement:
    """How two traces agree at one MoE layer (the measures are defined in `MEASURES`);
    `set_match_decisive` is None when every token is a near tie."""

    layer: int
    set_match: float
    overlap: float
    top1: float
    near_ties: int
    set_match_decisive: float | None
    diverging: int
    first_divergence: int


@dataclass(frozen=True)
class Agreement:
    """The layer-by-layer comparison of two traces of the same `tokens` token ids.
    `never_diverging`: tokens decisive-or-equal at every layer."""

    tokens: int
    top_k: int
    margin: float
    threshold: float
    layers: list[LayerAgreement]
    first_divergent_layer: int | None
    never_diverging: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def same_sets(a: Tensor, b: Tensor) -> Tensor:
    """(N,) bool: whether each token's row of expert ids (N, K) holds the same set on both
    sides (-1 slots compare as empty slots)."""
    return (a.long().sort(dim=1).values == b.long().sort(dim=1).values).all(dim=1)


def shared_experts(a: Tensor, b: Tensor) -> Tensor:
    """(N,) how many of the experts in each row of `a` (N, K) also appear in the row of `b`."""
    a, b = a.long(), b.long()
    hit = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2) & (a >= 0)
    return hit.sum(dim=1)


def top_expert(experts: Tensor, weights: Tensor | None) -> Tensor:
    """(N,) each token's chosen expert with the largest routing weight (the first slot when
    the trace holds no weights)."""
    if weights is None:
        return experts[:, 0].long()
    slot = weights.masked_fill(experts < 0, -math.inf).argmax(dim=1, keepdim=True)
    return experts.long().gather(1, slot).squeeze(1)


def _margin(trace: LayerTrace, n: int) -> Tensor:
    return trace.margin if trace.margin is not None else torch.full((n,), math.inf)


def compare_traces(
    a: RoutingTrace,
    b: RoutingTrace,
    *,
    margin: float = DEFAULT_MARGIN,
    threshold: float = DEFAULT_THRESHOLD,
) -> Agreement:
    """Compare two traces of the same token ids, layer by layer (the measures of this
    module's docstring). ValueError when they hold different layers, token counts, expert
    counts or experts per token."""
    if not margin >= 0 or not 0 <= threshold <= 1:
        raise ValueError(f"margin={margin} must be >= 0 and threshold={threshold} in [0, 1]")
    if list(a.layers) != list(b.layers):
        raise ValueError(f"the MoE layers differ: {list(a.layers)} and {list(b.layers)}")
    if a.num_experts != b.num_experts:
        raise ValueError(f"the number of experts differs: {a.num_experts} and {b.num_experts}")
    first = next(iter(a.layers))
    n, k = a.layers[first].experts.shape
    if b.layers[first].experts.shape != (n, k):
        raise ValueError(
            f"the traces differ in shape (tokens, experts per token): {(n, k)} and "
            f"{tuple(b.layers[first].experts.shape)}"
        )
    diverged = torch.zeros(n, dtype=torch.bool)
    rows, chosen_layer = [], None
    for i in a.layers:
        la, lb = a.layers[i], b.layers[i]
        same = same_sets(la.experts, lb.experts)
        tie = (_margin(la, n) < margin) | (_margin(lb, n) < margin)
        diverging = ~same & ~tie
        decisive = int((~tie).sum())
        set_match_decisive = float((same & ~tie).sum()) / decisive if decisive else None
        rows.append(
            LayerAgreement(
                layer=i,
                set_match=float(same.double().mean()) if n else 1.0,
                overlap=float(shared_experts(la.experts, lb.experts).double().mean() / k)
                if n
                else 1.0,
                top1=float((top_expert(la.experts, la.weights) ==
                            top_expert(lb.experts, lb.weights)).double().mean()) if n else 1.0,
                near_ties=int(tie.sum()),
                set_match_decisive=set_match_decisive,
                diverging=int(diverging.sum()),
                first_divergence=int((diverging & ~diverged).sum()),
            )
        )  # fmt: skip
        diverged |= diverging
        below = set_match_decisive is not None and set_match_decisive < threshold
        if chosen_layer is None and below:
            chosen_layer = i
    return Agreement(
        tokens=n,
        top_k=k,
        margin=margin,
        threshold=threshold,
        layers=rows,
        first_divergent_layer=chosen_layer,
        never_diverging=int((~diverged).sum()),
    )
