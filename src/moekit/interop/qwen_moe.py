"""Qwen2-MoE (Qwen2MoeForCausalLM) and Qwen3-MoE (Qwen3MoeForCausalLM).

Qwen2-MoE: q/k/v biases, one shared expert scaled by a learned sigmoid gate, softmax top-k
(renormalised or not). Qwen3-MoE: RMSNorm on each query and key head, no shared expert. Both
store experts one by one as `mlp.experts.{e}.gate_proj / up_proj / down_proj` (stacked and
fused in memory) and place MoE layers with `mlp_only_layers` (any set of dense layers) and
`decoder_sparse_step`.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.architecture import Architecture
from moekit.interop.fields import (
    DECODER_FIELDS,
    NO_ATTENTION_BIAS,
    Const,
    Entry,
    Field,
    Fixed,
    HeadDim,
    HFConfig,
    SlidingWindow,
    dropless,
    hf_value,
    placed_by_step,
    placement,
    plain_routing,
    swiglu,
    unsupported,
)
from moekit.interop.tensors import DECODER, GQA, LAYER, Weights, mlp, per_expert, stacked_experts


class Placement(Entry):
    """Which layers are MoE, as Qwen's `mlp_only_layers` (any set of dense layers) and
    `decoder_sparse_step` (layer i is MoE when `(i + 1) % step == 0`, unless listed there).
    Import states the set in the plainest moekit form (`first_dense_layers`, `layer_step`, or
    an explicit `dense_layers`); export writes a layer step alone when that is the layout, else
    the dense layers as `mlp_only_layers`."""

    def hf_names(self) -> tuple[str, ...]:
        return ("mlp_only_layers", "decoder_sparse_step")

    def ours_paths(self) -> tuple[str, ...]:
        return ("moe.first_dense_layers", "moe.layer_step", "moe.dense_layers")

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        layers = int(hf_value(hf, "num_hidden_layers"))
        listed = hf.get("mlp_only_layers") or []
        step = int(hf.get("decoder_sparse_step") or 1)
        if not all(isinstance(i, int) and 0 <= i < layers for i in listed):
            raise unsupported(
                "mlp_only_layers", listed, f"it must list layer indices below {layers}"
            )
        dense = [i for i in range(layers) if i in listed or (i + 1) % step]
        ours.update(placement(dense, layers, step))

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        plain_step = placed_by_step(cfg)
        assert cfg.moe is not None
        hf["mlp_only_layers"] = [] if plain_step else cfg.dense_layer_indices
        hf["decoder_sparse_step"] = cfg.moe.layer_step if plain_step else 1


def _window_enabled(hf: HFConfig) -> bool:
    """Qwen applies `sliding_window` only with `use_sliding_window` (Qwen2-MoE: on the layers
    `layer_types` marks "sliding_attention")."""
    return bool(hf.get("use_sliding_window")) or "sliding_attention" in (
        hf.get("layer_types") or []
    )


def _common(label: str) -> tuple[Entry, ...]:
    return (
        *DECODER_FIELDS,
        HeadDim(),
        SlidingWindow(_window_enabled),
        Const("use_sliding_window", False),
        Field("intermediate_size", "ffn_hidden", get=lambda cfg: cfg.dense_hidden),
        Field("moe_intermediate_size", "moe.expert_hidden"),
        Field("num_experts", "moe.num_experts", aliases=("num_local_experts",)),
        Field("num_experts_per_tok", "moe.top_k"),
        Field("norm_topk_prob", "moe.norm_topk_prob", default=False, cast=bool),
        Field("router_aux_loss_coef", "moe.aux_loss_weight", default=0.001, cast=float),
        Const("output_router_logits", False),
        Placement(),
        Fixed(
            {"moe.router": "topk", "moe.score_func": "softmax"},
            f"{label} routes by softmax top-k only",
        ),
        dropless(label),
        plain_routing(label),
        Fixed({"attention.kind": "gqa"}, f"{label} attention is grouped-query attention"),
        swiglu(label),
    )


def _weights(experts: Weights, shared: bool) -> Weights:
    table = {
        **DECODER,
        **GQA,
        **mlp("layers.{i}.ffn", f"{LAYER}.mlp"),  # the dense layers
        "layers.{i}.ffn.router.weight": f"{LAYER}.mlp.gate.weight",
        **experts,
    }
    if shared:
        table |= {
            **mlp("layers.{i}.ffn.shared", f"{LAYER}.mlp.shared_expert"),
            "layers.{i}.ffn.shared_gate.weight": f"{LAYER}.mlp.shared_expert_gate.weight",
        }
    return table


_PER_EXPERT = per_expert(f"{LAYER}.mlp.experts.{{e}}")
_STACKED = stacked_experts(f"{LAYER}.mlp.experts")

# ---- Qwen2-MoE -------------------------------------------------------------------------------

QWEN2_MOE = Architecture(
    name="Qwen2MoeForCausalLM",
    model_type="qwen2_moe",
    label="Qwen2-MoE",
    config=(
        *_common("Qwen2-MoE"),
        Field("qkv_bias", "attention.qkv_bias", default=True, cast=bool),
        Field(
            "shared_expert_intermediate_size",
            "moe.shared_expert_hidden",
            get=lambda cfg: cfg.moe.shared_hidden_total if cfg.moe else None,
        ),
        Fixed(
            {"moe.num_shared_experts": 1, "moe.shared_expert_gate": True},
            "Qwen2-MoE has exactly one shared expert with a sigmoid gate",
        ),
        Fixed({"attention.qk_norm": "none"}, "Qwen2-MoE has no q/k norms"),
    ),
    weights=_weights(_PER_EXPERT, shared=True),
    live_weights=_weights(_STACKED, shared=True),
)

# ---- Qwen3-MoE -------------------------------------------------------------------------------

QWEN3_MOE = Architecture(
    name="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    label="Qwen3-MoE",
    config=(
        *_common("Qwen3-MoE"),
        NO_ATTENTION_BIAS,
        Fixed({"moe.num_shared_experts": 0}, "Qwen3-MoE has no shared experts"),
        Fixed(
            {"attention.qk_norm": "head"},
            "Qwen3-MoE normalises each query and key head (qk_norm='head')",
        ),
        Fixed(
            {"attention.qkv_bias": False},
            "Qwen3-MoE's attention_bias would give o_proj a bias too, which this model lacks "
            "(qkv_bias must be false)",
        ),
    ),
    weights=_weights(_PER_EXPERT, shared=False),
    live_weights=_weights(_STACKED, shared=False),
)
