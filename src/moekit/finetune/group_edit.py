"""Expert edits that respect groups of experts: the plans of moekit.finetune.expert_edit for a
hierarchically routed model (`router="hierarchical"`), and for a flat one (one group).

A hierarchical router splits its E experts into G = `router_groups` equal contiguous groups
(expert e is in group e // (E / G)); a group router (`group_weight`, `group_selection_bias`)
scores the groups, and the expert router's logits are softmaxed within each group: p(e|g).
An edit keeps that shape:
- every new expert is made of experts of one group and sits inside that group, so the new
  order is group 0's experts, then group 1's, and so on;
- every group gains or loses the same number of experts, so the groups stay equal;
- the group router and its bias are not touched, nor `router_groups`.

Because p(e|g) is a softmax inside the group, a copy placed in its original's group shares
its probability exactly as in a flat router (with a router logit bias: -ln(parts) on each
part): the joint probability p(g) * p(e|g) of every other expert is unchanged, and the parts
sum to their original's.

The rules, per MoE layer:
- add N: N a multiple of G; each group gets N / G copies of its own busiest experts;
- split E,F,...: the named experts give every group the same number of copies;
- merge: each merged set lies inside one group, and every group loses the same number;
- prune to N: N a multiple of G; each group keeps its N / G most important experts, and at
  least the top_k // group_top_k experts a token takes in each chosen group.

With one group (a flat router) these are the flat plans of moekit.finetune.expert_edit
(`merge_in_groups` also takes several sets at once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from moekit.finetune.expert_edit import (
    Groups,
    Plan,
    Source,
    busiest,
    check_group_plan,
    check_ids,
    check_merge,
    expert_groups,
    prune_plan,
    split_plan,
)

__all__ = [
    "Groups",
    "busiest_in_groups",
    "check_group_plan",
    "expert_groups",
    "merge_in_groups",
    "prune_in_groups",
    "split_in_groups",
]


def _counts(per_group: Sequence[int]) -> str:
    return ", ".join(f"group {g}: {c}" for g, c in enumerate(per_group))


def split_in_groups(
    layers: Sequence[int], groups: Groups, ids: Mapping[int, Sequence[int]]
) -> Plan:
    """Every expert kept and one copy of each of `ids[layer]`, each copy placed at the end of
    its original's group; a ValueError naming the groups when they would become unequal."""
    if groups.count == 1:
        return split_plan(layers, groups.num_experts, ids)
    plan: Plan = {}
    for layer in layers:
        chosen = list(ids[layer])
        check_ids(chosen, groups.num_experts, "splitting")
        per_group = [sum(groups.of(e) == g for e in chosen) for g in range(groups.count)]
        if len(set(per_group)) > 1:
            raise ValueError(
                f"splitting experts {chosen} gives the {groups.count} expert groups unequal "
                f"numbers of copies ({_counts(per_group)}), which would make the groups "
                "unequal: split as many experts in every group"
            )
        sources: list[Source] = []
        for g in range(groups.count):
            sources += [Source((e,)) for e in groups.members(g)]
            sources += [Source((e,), copy=True) for e in chosen if groups.of(e) == g]
        plan[layer] = sources
    return plan


def busiest_in_groups(
    frequency: Mapping[int, Tensor], n: int, groups: Groups
) -> dict[int, list[int]]:
    """The experts to copy when adding `n`: in each group, its n / G busiest (most routed
    copies), group by group; a ValueError when `n` is not a multiple of G up to E."""
    if groups.count == 1:
        return busiest(frequency, n)
    if n < 1 or n % groups.count or n // groups.count > groups.size:
        raise ValueError(
            f"adding {n} experts is invalid: each of the {groups.count} expert groups gets "
            f"the same number of copies of its own busiest experts, so add a multiple of "
            f"{groups.count} up to {groups.num_experts}"
        )
    per = n // groups.count
    out: dict[int, list[int]] = {}
    for layer, f in frequency.items():
        out[layer] = []
        for g in range(groups.count):
            members = list(groups.members(g))
            order = f[members].argsort(descending=True, stable=True)[:per].tolist()
            out[layer] += [members[i] for i in order]
    return out


def prune_in_groups(scores: Mapping[int, Tensor], keep: int, groups: Groups, top_k: int) -> Plan:
    """The `keep` / G highest-scoring experts of each group, in their order; a ValueError
    naming the problem (below top_k, nothing removed, unequal groups, a group left with fewer
    experts than a token takes from it)."""
    if groups.count == 1:
        return prune_plan(scores, keep, top_k)
    if keep < top_k:
        raise ValueError(
            f"pruning to {keep} experts is below top_k={top_k}: every token picks top_k experts"
        )
    if keep >= groups.num_experts:
        raise ValueError(
            f"pruning to {keep} experts removes none: the model has {groups.num_experts}"
        )
    if keep % groups.count:
        raise ValueError(
            f"pruning to {keep} experts is invalid: the {groups.count} expert groups must stay "
            f"equal, so keep a multiple of {groups.count} (the same number in each group)"
        )
    per = keep // groups.count
    if per < groups.per_token:
        raise ValueError(
            f"pruning to {keep} experts leaves each of the groups 0 .. {groups.count - 1} "
            f"{per}, fewer than the {groups.per_token} experts a token takes in each group it "
            "chooses (top_k // group_top_k)"
        )
    plan: Plan = {}
    for layer, s in scores.items():
        sources: list[Source] = []
        for g in range(groups.count):
            members = list(groups.members(g))
            kept = sorted(s[members].argsort(descending=True, stable=True)[:per].tolist())
            sources += [Source((members[i],)) for i in kept]
        plan[layer] = sources
    return plan


def merge_in_groups(layers: Sequence[int], groups: Groups, sets: Sequence[Sequence[int]]) -> Plan:
    """In every layer, each set of `sets` merged into one expert at the place of its first;
    with groups, each set inside one group and every group losing as many experts. A
    ValueError names what cannot work."""
    if not sets:
        raise ValueError("merging needs a set of two experts or more")
    seen: set[int] = set()
    for s in sets:
        check_merge(s, groups.num_experts)
        if seen & set(s):
            raise ValueError(f"merging: experts {sorted(seen & set(s))} are named in two sets")
        seen |= set(s)
        named = sorted({groups.of(e) for e in s})
        if len(named) > 1:
            raise ValueError(
                f"merging experts {list(s)} is invalid: they are in groups "
                f"{', '.join(map(str, named))}, and a merged expert must belong to one group"
            )
    lost = [0] * groups.count
    for s in sets:
        lost[groups.of(s[0])] += len(s) - 1
    if len(set(lost)) > 1:
        raise ValueError(
            f"merging {[list(s) for s in sets]} removes unequal numbers of experts from the "
            f"{groups.count} expert groups ({_counts(lost)}), which would make the groups "
            "unequal: merge as many in every group"
        )
    if groups.count > 1 and groups.size - lost[0] < groups.per_token:
        raise ValueError(
            f"merging {[list(s) for s in sets]} leaves each group {groups.size - lost[0]} "
            f"experts, fewer than the {groups.per_token} a token takes from a group"
        )
    first = {min(s): Source(tuple(sorted(s))) for s in sets}
    sources = [
        first.get(e, Source((e,))) for e in range(groups.num_experts) if e not in seen or e in first
    ]
    return {layer: list(sources) for layer in layers}
