"""The checks on the routing sample: dead experts, load imbalance, router collapse.

Dead, nearly dead and imbalance follow the one rule of `moekit.analysis.routing.load_stats`,
as `moekit analyze`, the training report and the training metrics do; `dead_share` is that
rule's `nearly_dead_fraction`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from moekit.analysis.doctor.check import Check, ids, not_applicable, pct
from moekit.analysis.doctor.sample import RoutingSample, unmeasured

if TYPE_CHECKING:
    from moekit.config import ModelConfig


def check_dead_experts(sample: RoutingSample | str, dead_share: float) -> Check:
    """dead_experts: an expert with no routed copy is a problem; one below `dead_share` of an
    even share (copies / E) a warning."""
    from moekit.analysis.routing import load_stats

    name = "dead_experts"
    if isinstance(sample, str):
        return unmeasured(name, sample)
    layers: dict[str, Any] = {}
    dead_words, nearly_words = [], []
    lowest: tuple[float, int, int] | None = None
    for layer, copies in sample.copies.items():
        stats = load_stats(copies, dead_share)
        even = sum(copies) / len(copies)
        shares = [c / even if even else 0.0 for c in copies]
        layers[str(layer)] = {
            "copies": copies,
            "min_share": min(shares),
            "dead": stats.dead,
            "nearly_dead": stats.dying,
        }
        low = min(range(len(shares)), key=shares.__getitem__)
        if lowest is None or shares[low] < lowest[0]:
            lowest = (shares[low], layer, low)
        if stats.dead:
            dead_words.append(f"layer {layer}: expert(s) {ids(stats.dead)} got no token")
        if stats.dying:
            low_words = [f"expert {e} got {pct(shares[e])} of an even share" for e in stats.dying]
            nearly_words.append(f"layer {layer}: " + ", ".join(low_words))
    data = {"tokens": sample.tokens, "dead_share": dead_share, "layers": layers}
    where = sample.words()
    advice = (
        "Dead experts hold parameters that do no work. Train with a load-balancing signal "
        "(model.moe.aux_loss_weight around 0.01, or aux-loss-free balancing with "
        "model.moe.bias_update_rate around 0.001); in a trained model, re-initialise a dead "
        "expert from a live one plus noise and train on, or prune it. A sample that is far "
        "from the training data can starve experts that are fine: try --tokens with more text."
    )
    if dead_words:
        evidence = f"{where}, " + "; ".join(dead_words + nearly_words) + "."
        return Check(name, "problem", evidence, advice, data)
    if nearly_words:
        evidence = f"{where}, " + "; ".join(nearly_words) + f" (below {pct(dead_share)})."
        return Check(name, "warning", evidence, advice, data)
    assert lowest is not None
    evidence = (
        f"{where}, every expert of the {len(layers)} MoE layer(s) got at least "
        f"{pct(dead_share)} of an even share (lowest: layer {lowest[1]} expert {lowest[2]} "
        f"with {pct(lowest[0])})."
    )
    return Check(name, "ok", evidence, "", data)


def check_imbalance(
    sample: RoutingSample | str, cfg: ModelConfig, warn: float, problem: float
) -> Check:
    """load_imbalance: max over mean copies per expert above `warn` is a warning, above
    `problem` a problem."""
    from moekit.analysis.routing import load_stats

    name = "load_imbalance"
    if isinstance(sample, str):
        return unmeasured(name, sample)
    layers: dict[str, Any] = {}
    worst: tuple[float, int, int] = (0.0, -1, -1)
    for layer, copies in sample.copies.items():
        stats = load_stats(copies)
        layers[str(layer)] = {"imbalance": stats.imbalance, "heaviest_expert": stats.heaviest}
        if stats.imbalance > worst[0]:
            worst = (stats.imbalance, layer, stats.heaviest)
    num_experts = len(next(iter(sample.copies.values())))
    most = num_experts / sample.top_k
    data = {
        "tokens": sample.tokens,
        "warning_above": warn,
        "problem_above": problem,
        "most_possible": most,
        "layers": layers,
    }
    ratio, layer, heaviest = worst
    summary = (
        f"{sample.words()}, max/mean copies per expert is "
        + ", ".join(f"{v['imbalance']:.2f}" for v in layers.values())
        + f" by layer (worst: layer {layer}, expert {heaviest} takes {ratio:.2f}x an even share;"
        f" the most possible with {num_experts} experts and top-{sample.top_k} is {most:.2f})."
    )
    advice = (
        "The busiest expert sets the step time and its capacity drops tokens. Raise "
        "model.moe.aux_loss_weight (or use aux-loss-free balancing, model.moe.bias_update_rate) "
        "and train on; if the sample is unlike the training data, check with more --tokens."
    )
    if ratio > problem:
        return Check(name, "problem", summary, advice, data)
    if ratio > warn:
        return Check(name, "warning", summary, advice, data)
    return Check(name, "ok", summary, "", data)


def check_collapse(sample: RoutingSample | str, threshold: float) -> Check:
    """router_collapse: a layer whose mean routing entropy is below `threshold` of log(E)
    is a problem."""
    name = "router_collapse"
    if isinstance(sample, str):
        return unmeasured(name, sample)
    layers: dict[str, Any] = {}
    collapsed = []
    for layer, copies in sample.copies.items():
        num_experts = len(copies)
        if num_experts < 2:
            continue
        normalised = sample.entropy[layer] / math.log(num_experts)
        total = sum(copies) or 1
        busiest = sorted(copies, reverse=True)[: sample.top_k]
        layers[str(layer)] = {
            "entropy_nats": sample.entropy[layer],
            "normalised_entropy": normalised,
            "busiest_share": sum(busiest) / total,
        }
        if normalised < threshold:
            collapsed.append(layer)
    if not layers:
        return not_applicable(name, "every MoE layer has a single expert")
    data = {"tokens": sample.tokens, "problem_below": threshold, "layers": layers}
    by_layer = ", ".join(f"{v['normalised_entropy']:.2f}" for v in layers.values())
    if collapsed:
        details = "; ".join(
            f"layer {i}: {layers[str(i)]['entropy_nats']:.3f} nats "
            f"({layers[str(i)]['normalised_entropy']:.3f} of log E), the busiest "
            f"{sample.top_k} expert(s) take {pct(layers[str(i)]['busiest_share'])} of copies"
            for i in collapsed
        )
        evidence = (
            f"{sample.words()}, the router is near-certain on every token ({details}; "
            f"below {threshold:.2f} of log E counts as collapsed)."
        )
        advice = (
            "A collapsed router gives each token a one-hot distribution: its softmax saturates, "
            "its gradient vanishes and it stops learning. Lower the learning rate, add a router "
            "z-loss (model.moe.z_loss_weight=0.001) and a load-balancing loss, and retrain from "
            "a checkpoint before the collapse; router weights of huge norm are the usual sign."
        )
        return Check(name, "problem", evidence, advice, data)
    evidence = (
        f"{sample.words()}, mean routing entropy is {by_layer} of log(E) by layer "
        f"(collapse below {threshold:.2f})."
    )
    return Check(name, "ok", evidence, "", data)
