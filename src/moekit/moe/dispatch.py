"""Dispatch: lay token copies out so each expert's rows are contiguous, and combine them back.

Shape legend: T tokens, D model dim, E experts, K expert slots per token, S kept token copies
(S <= T * K), C capacity (copies per expert).

A *copy* is one (token, expert) pair chosen by the router, identified by its slot
`t * K + k` in the router's (T, K) output. `plan()` decides which copies are kept (dropless by
default; with a capacity, the lowest-weight copies of an over-full expert are dropped and
counted) and, for backends that want it, orders them expert by expert with a counting sort.
`permute()` gathers the rows; the expert backend scales each copy by its routing weight;
`combine()` sums the copies of each token back into token order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class DispatchPlan(NamedTuple):
    """Where every kept copy goes.

    slot_S: (S,) slot `t * K + k` of each kept copy in the router output; sorted by expert
        (stable: token order within an expert) when planned with `sort=True`.
    token_S: (S,) the token of each kept copy (`slot_S // K`).
    expert_S: (S,) the expert of each kept copy.
    weight_S: (S,) its routing weight.
    tokens_per_expert: (E,) kept copies per expert (the group sizes when sorted).
    routed_per_expert: (E,) copies the router sent to each expert, before the capacity rule.
    num_dropped: () copies dropped by the capacity rule.
    """

    slot_S: Tensor
    token_S: Tensor
    expert_S: Tensor
    weight_S: Tensor
    tokens_per_expert: Tensor
    routed_per_expert: Tensor
    num_dropped: Tensor


def rank_within_expert(expert_S: Tensor, num_experts: int) -> Tensor:
    """For each copy, how many earlier copies (in the given order) went to the same expert.

    General but O(S * E) memory; `counting_sort_by_expert` uses a cheaper token-major count.
    """
    onehot_SE = torch.zeros(
        expert_S.shape[0], num_experts, dtype=torch.int32, device=expert_S.device
    )
    onehot_SE.scatter_(1, expert_S.unsqueeze(1), 1)
    running_SE = onehot_SE.cumsum(dim=0, dtype=torch.int32)
    return running_SE.gather(1, expert_S.unsqueeze(1)).squeeze(1).long() - 1


def counting_sort_by_expert(
    token_S: Tensor, expert_S: Tensor, num_tokens: int, num_experts: int
) -> tuple[Tensor, Tensor]:
    """Stable counting sort of copies by expert id: a histogram, its prefix sum, a scatter.

    Copies must come in token order (as router slots do) with each (token, expert) pair at
    most once, which every router guarantees. Then a copy's rank among its expert's copies is
    the number of earlier tokens that chose that expert: a running count over a (T, E) mask,
    E times smaller than counting over copies. Returns `(order_S, counts_E)`:
    `expert_S[order_S]` is non-decreasing, one expert's copies keep token order, and
    `counts_E` is the histogram.
    """
    mask_TE = torch.zeros(num_tokens, num_experts, dtype=torch.int32, device=expert_S.device)
    mask_TE[token_S, expert_S] = 1
    running_TE = mask_TE.cumsum(dim=0, dtype=torch.int32)
    counts_E = running_TE[-1].long() if num_tokens else mask_TE.sum(0).long()
    rank_S = running_TE[token_S, expert_S].long() - 1
    starts_E = counts_E.cumsum(0) - counts_E
    dest_S = starts_E[expert_S] + rank_S
    order_S = torch.empty_like(expert_S)
    order_S[dest_S] = torch.arange(expert_S.shape[0], device=expert_S.device)
    return order_S, counts_E


def plan(
    experts_TK: Tensor,
    weights_TK: Tensor,
    num_experts: int,
    *,
    capacity: int | None = None,
    priority: str = "weight",
    seq_len: int | None = None,
    sort: bool = True,
) -> DispatchPlan:
    """Decide which copies are kept and in what order.

    `experts_TK` holds expert ids, or -1 for an empty slot. With `capacity`, an expert keeps
    at most that many copies and the rest are dropped: with `priority="weight"` it keeps the
    highest-weight copies of the whole batch (earlier tokens win ties); with
    `priority="position"` the capacity applies to each sequence of `seq_len` tokens (default:
    the whole batch is one sequence) and the earliest tokens are kept, so a token's fate
    never depends on later tokens or on other sequences. With `sort=True` the kept copies are
    ordered expert by expert; otherwise they stay in slot order.
    """
    T, K = experts_TK.shape
    expert_S = experts_TK.reshape(-1)
    weight_S = weights_TK.reshape(-1)
    slot_S = torch.arange(T * K, device=experts_TK.device)
    valid_S = expert_S >= 0
    if not bool(valid_S.all()):
        slot_S, expert_S, weight_S = slot_S[valid_S], expert_S[valid_S], weight_S[valid_S]
    routed_E = torch.bincount(expert_S, minlength=num_experts)
    kept_E = routed_E
    num_dropped = torch.zeros((), dtype=torch.long, device=experts_TK.device)

    if capacity is not None and int(routed_E.max()) > capacity:
        if priority == "position":
            token_S = torch.div(slot_S, K, rounding_mode="floor")
            mask_TE = torch.zeros(T, num_experts, dtype=torch.int32, device=expert_S.device)
            mask_TE[token_S, expert_S] = 1
            per_seq = seq_len or T
            running_TE = mask_TE.view(-1, per_seq, num_experts).cumsum(1, dtype=torch.int32)
            keep_S = running_TE.view(T, num_experts)[token_S, expert_S] <= capacity
        else:
            # Heaviest copies first; a stable sort keeps earlier tokens first on ties. Only this
            # path pays for a comparison sort.
            prio_S = torch.sort(weight_S.detach(), descending=True, stable=True).indices
            keep_prio = rank_within_expert(expert_S[prio_S], num_experts) < capacity
            keep_S = torch.empty_like(keep_prio)
            keep_S[prio_S] = keep_prio
        num_dropped = (~keep_S).sum()
        slot_S, expert_S, weight_S = slot_S[keep_S], expert_S[keep_S], weight_S[keep_S]
        kept_E = torch.bincount(expert_S, minlength=num_experts)

    token_S = torch.div(slot_S, K, rounding_mode="floor")
    if sort:
        order_S, _ = counting_sort_by_expert(token_S, expert_S, T, num_experts)
        slot_S, token_S = slot_S[order_S], token_S[order_S]
        expert_S, weight_S = expert_S[order_S], weight_S[order_S]
    return DispatchPlan(
        slot_S=slot_S,
        token_S=token_S,
        expert_S=expert_S,
        weight_S=weight_S,
        tokens_per_expert=kept_E,
        routed_per_expert=routed_E,
        num_dropped=num_dropped,
    )


def permute(x_TD: Tensor, p: DispatchPlan) -> Tensor:
    """Rows of `x_TD` for every kept copy, in plan order: (S, D)."""
    return x_TD.index_select(0, p.token_S)


def combine(y_SD: Tensor, p: DispatchPlan, num_tokens: int) -> Tensor:
    """Sum the (already weighted) expert outputs of each token's copies: (T, D)."""
    out_TD = y_SD.new_zeros(num_tokens, y_SD.shape[1])
    return out_TD.index_add(0, p.token_S, y_SD)
