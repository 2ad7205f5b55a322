"""The check on hierarchical routing's expert groups: a group that no token chooses.

A group's load is the routed copies of its experts on the routing sample (every token that
picks a group sends it the same number of copies), judged by the rule of `dead_experts`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moekit.analysis.doctor.check import Check, ids, not_applicable, pct
from moekit.analysis.doctor.sample import RoutingSample, unmeasured

if TYPE_CHECKING:
    from moekit.config import ModelConfig


def check_dead_groups(sample: RoutingSample | str, cfg: ModelConfig, dead_share: float) -> Check:
    """dead_groups: with hierarchical routing, a group of experts with no routed copy is a
    problem; one below `dead_share` of an even share (copies / groups) a warning."""
    from moekit.analysis.routing import load_stats

    name = "dead_groups"
    moe = cfg.moe
    if moe is None or moe.router != "hierarchical":
        return not_applicable(name, "the model has no hierarchical router")
    if isinstance(sample, str):
        return unmeasured(name, sample)
    per_group = moe.num_experts // moe.router_groups
    layers: dict[str, Any] = {}
    dead_words, low_words = [], []
    for layer, copies in sample.copies.items():
        groups = [
            sum(copies[g * per_group : (g + 1) * per_group]) for g in range(moe.router_groups)
        ]
        stats = load_stats(groups, dead_share)
        even = sum(groups) / len(groups)
        shares = [c / even if even else 0.0 for c in groups]
        layers[str(layer)] = {"copies": groups, "dead": stats.dead, "nearly_dead": stats.dying}
        if stats.dead:
            dead_words.append(f"layer {layer}: group(s) {ids(stats.dead)} got no token")
        if stats.dying:
            low = ", ".join(f"group {g} got {pct(shares[g])} of an even share" for g in stats.dying)
            low_words.append(f"layer {layer}: {low}")
    data = {"tokens": sample.tokens, "dead_share": dead_share, "layers": layers}
    advice = (
        "A dead group takes every one of its experts out of the model. Balance the group router: "
        "model.moe.group_aux_loss_weight around 0.01, or aux-loss-free balancing of the groups "
        "with model.moe.group_bias_update_rate around 0.001, then train on. A sample far from "
        "the training data can starve a group that is fine: try --tokens with more text."
    )
    where = sample.words()
    if dead_words:
        return Check(name, "problem", f"{where}, " + "; ".join(dead_words + low_words) + ".",
                     advice, data)  # fmt: skip
    if low_words:
        evidence = f"{where}, " + "; ".join(low_words) + f" (below {pct(dead_share)})."
        return Check(name, "warning", evidence, advice, data)
    evidence = (
        f"{where}, every one of the {moe.router_groups} expert groups of the {len(layers)} MoE "
        f"layer(s) got at least {pct(dead_share)} of an even share."
    )
    return Check(name, "ok", evidence, "", data)
