"""Router losses as pure functions, and the aux-loss-free bias update.

Shape legend: T tokens, E experts, K expert slots per token.

None of these keep state: the MoE layer returns its losses in `MoEStats`, the model sums them,
and the trainer applies `update_selection_bias` after the optimizer step, outside autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def load_balancing_loss(
    probs_TE: Tensor, experts_TK: Tensor, reduce_counts: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Switch/GShard load-balancing loss: `E * sum_e f_e * P_e`.

    `f_e` is the fraction of routed copies that went to expert e (empty slots, expert -1, are
    not copies) and `P_e` the mean router probability of e over tokens. Equals 1 when both are
    uniform; the gradient flows through `P_e` only. `reduce_counts` maps this batch's copy
    counts per expert to the counts `f_e` is taken from (data parallelism: the sum over every
    process's batch, so the fractions are global).
    """
    E = probs_TE.shape[-1]
    valid = experts_TK >= 0
    counts_E = torch.zeros(E, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.index_add_(
        0, experts_TK[valid], torch.ones_like(experts_TK[valid], dtype=probs_TE.dtype)
    )
    if reduce_counts is not None:
        counts_E = reduce_counts(counts_E)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    P_E = probs_TE.mean(dim=0)
    return E * (f_E.detach() * P_E).sum()


def group_balance_loss(
    probs_TE: Tensor,
    experts_TK: Tensor,
    groups: int,
    reduce_counts: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The load-balancing loss one level up (hierarchical routing): `G * sum_g f_g * P_g`.

    The E experts form `groups` equal contiguous groups. `f_g` is the fraction of the tokens'
    group choices that went to group g (a token counts once per group it uses) and `P_g` the
    mean probability of g, the sum of `probs_TE` over g's experts. 1 when both are uniform;
    the gradient flows through `P_g` only. `reduce_counts` as in `load_balancing_loss`.
    """
    T, E = probs_TE.shape
    valid_TK = experts_TK >= 0
    used_TG = torch.zeros(T, groups, device=probs_TE.device, dtype=probs_TE.dtype)
    group_TK = experts_TK.clamp_min(0) // (E // groups)
    used_TG.scatter_reduce_(1, group_TK, valid_TK.to(probs_TE.dtype), reduce="amax")
    counts_G = used_TG.sum(dim=0)
    if reduce_counts is not None:
        counts_G = reduce_counts(counts_G)
    f_G = counts_G / counts_G.sum().clamp_min(1.0)
    P_G = probs_TE.view(T, groups, -1).sum(dim=-1).mean(dim=0)
    return groups * (f_G.detach() * P_G).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of `logsumexp(logits)^2`; keeps logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def router_entropy(probs_TE: Tensor) -> Tensor:
    """Mean entropy (nats) of the per-token routing distribution; log(E) is uniform, 0 collapsed."""
    p = probs_TE.float().clamp_min(1e-12)
    return -(p * p.log()).sum(dim=-1).mean()


@torch.no_grad()
def update_selection_bias(bias_E: Tensor, tokens_per_expert_E: Tensor, rate: float) -> Tensor:
    """Aux-loss-free balancing (DeepSeek-V3): nudge the selection bias toward balanced load.

    Each expert's bias moves by `rate` up when it received fewer copies than the mean and down
    when it received more (`bias += rate * sign(mean - load)`), in place. Call after the
    optimizer step with the counts summed over the step's micro-batches. Returns `bias_E`.
    """
    load = tokens_per_expert_E.to(bias_E.dtype)
    bias_E.add_(rate * torch.sign(load.mean() - load))
    return bias_E
