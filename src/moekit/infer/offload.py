"""Generation under a memory budget: attention, norms, embeddings and routers stay in memory,
the routed experts are paged from the model's safetensors files into a per-layer cache
(`moekit.infer.expert_cache`) whose size the budget sets.

`load_paged_model(model_dir, OffloadConfig(max_memory=parse_size("6GiB")))` returns a model that
generates exactly what the fully loaded model generates; `offload_metrics(model)` reports, per
MoE layer, the cache's hit rate, the bytes read and the time stalled on reads.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.files import format_bytes
from moekit.files import parse_size as parse_size  # re-exported for budgets written as text
from moekit.validate import check_choice

if TYPE_CHECKING:
    import torch

    from moekit.infer.expert_cache import LayerMetrics, Pager, SlotCache
    from moekit.model import Transformer


@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """Page the routed experts under `max_memory` bytes of weights (resident weights plus the
    expert cache; activations and the KV cache come on top). `policy`: which expert a full
    cache drops, "lru" (least recently used) or "lfu" (least frequently used). `prefetch`:
    guess the next layer's experts and read them on a background thread."""

    max_memory: int
    policy: str = "lru"
    prefetch: bool = True

    def __post_init__(self) -> None:
        from moekit.infer.expert_cache import POLICIES

        check_choice("OffloadConfig", "policy", self.policy, POLICIES)
        if self.max_memory <= 0:
            raise ValueError(f"OffloadConfig.max_memory must be positive, got {self.max_memory}")


@dataclass(frozen=True)
class BudgetPlan:
    """How a budget divides: `resident` bytes held always, `expert` bytes of one expert of
    each MoE layer, `slots` experts per layer held in the cache, `minimum` the smallest budget
    that works (resident weights plus one expert per MoE layer)."""

    resident: int
    expert: dict[int, int]
    experts_per_layer: int
    slots: int
    minimum: int

    @property
    def cache(self) -> int:
        return self.slots * sum(self.expert.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "resident_bytes": self.resident,
            "cache_bytes": self.cache,
            "slots_per_layer": self.slots,
            "experts_per_layer": self.experts_per_layer,
            "minimum_bytes": self.minimum,
        }


def plan_budget(model: Transformer, max_memory: int) -> BudgetPlan:
    """Divide `max_memory` for `model` (on the meta device): ValueError with the minimum when
    it cannot hold the resident weights and one expert per MoE layer."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("the model has no MoE layers: there are no experts to page")
    per_expert = {}
    paged = 0
    for i, layer in layers.items():
        size = sum(t.numel() * t.element_size() for t in layer.experts.state_dict().values())
        per_expert[i] = size // layer.experts.num_experts
        paged += size
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    resident = total - paged
    minimum = resident + sum(per_expert.values())
    experts = max(layer.experts.num_experts for layer in layers.values())
    if max_memory < minimum:
        raise ValueError(
            f"a memory budget of {format_bytes(max_memory)} is too small for this model: it "
            f"needs at least {format_bytes(minimum)} ({minimum} bytes): "
            f"{format_bytes(resident)} of weights that stay in memory and one expert per MoE "
            f"layer ({len(layers)} x {format_bytes(max(per_expert.values()))})"
        )
    slots = min(experts, (max_memory - resident) // sum(per_expert.values()))
    return BudgetPlan(resident, per_expert, experts, slots, minimum)


def load_paged_model(
    model_dir: str | Path,
    offload: OffloadConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """The model in `model_dir` with its routed experts paged from its safetensors files under
    `offload.max_memory` (see `OffloadConfig`); every other weight is read into memory. The
    checks of `ModelDir.load_model` apply (names and shapes from the headers, memory); a budget
    below the minimum is a ValueError that says the minimum."""
    from moekit.infer.expert_cache import ExpertFiles, Pager
    from moekit.model_dir import ModelDir, read_into
    from moekit.runtime import resolve_device

    directory = ModelDir(model_dir)
    target = resolve_device(device)
    model, stored = directory.meta_model(dtype=dtype)
    plan = plan_budget(model, offload.max_memory)
    pager = Pager(ExpertFiles(stored), policy=offload.policy, prefetch=offload.prefetch)
    layers = model.moe_layers()
    for i, layer in layers.items():
        paged = _paged_store(i, layer.experts, plan.slots, pager)
        setattr(layer, "experts", paged)  # noqa: B010 (a paged store stands in for Experts)
        pager.layers[i] = paged
        pager.routers[i] = layer.router
    order = sorted(layers)
    pager.following = dict(itertools.pairwise(order))
    directory.check_memory(model, target)
    model.to_empty(device=target)
    paged_prefixes = tuple(f"layers.{i}.ffn.experts." for i in layers)
    state = model.state_dict()
    read_into({k: v for k, v in state.items() if not k.startswith(paged_prefixes)}, stored)
    model.offload_plan = plan  # type: ignore[assignment]  # what `offload_report` shows
    return model


def _paged_store(layer: int, experts: Any, slots: int, pager: Pager) -> SlotCache:
    """A paged stand-in (on the meta device) for MoE layer `layer`'s `experts`."""
    import torch

    from moekit.infer.expert_cache import PagedExperts, PagedQuantExperts
    from moekit.quant.experts import QuantExperts

    ex = experts
    with torch.device("meta"):
        if isinstance(ex, QuantExperts):
            return PagedQuantExperts(layer, ex.num_experts, slots, ex, pager)
        paged = PagedExperts(
            layer, ex.num_experts, slots, ex.dim, ex.hidden, ex.act_fn, pager,
            bias=ex.b_up is not None,
        )  # fmt: skip
    return paged.to(ex.w_up.dtype)


def pager_of(model: Any) -> Pager | None:
    """The pager of a model loaded by `load_paged_model`, or None."""
    from moekit.infer.expert_cache import SlotCache

    for module in model.modules():
        if isinstance(module, SlotCache):
            return module.pager
    return None


def offload_metrics(model: Any) -> list[LayerMetrics]:
    """Per MoE layer, what its expert cache did since loading (or the last reset); [] for a
    model whose experts are all in memory."""
    pager = pager_of(model)
    return pager.metrics() if pager is not None else []


def offload_report(model: Any) -> dict[str, Any] | None:
    """The budget, the totals and the per-layer metrics as JSON-ready data (None when the
    model's experts are not paged)."""
    pager = pager_of(model)
    if pager is None:
        return None
    layers = pager.metrics()
    hits, misses = sum(m.hits for m in layers), sum(m.misses for m in layers)
    right = sum(m.guessed_right for m in layers)
    after_guess = sum(m.needed_after_guess for m in layers)
    plan: BudgetPlan = model.offload_plan
    return {
        **plan.to_dict(),
        "policy": pager.policy,
        "prefetch": pager.prefetch,
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        "bytes_read": sum(m.bytes_read for m in layers),
        "stall_s": round(sum(m.stall_s for m in layers), 6),
        "prefetch_accuracy": right / after_guess if after_guess else None,
        "layers": [m.to_dict() for m in layers],
    }
