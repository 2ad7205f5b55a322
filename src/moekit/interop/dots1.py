"""dots.llm1 (Dots1ForCausalLM): Qwen3's attention (grouped-query, an RMSNorm on each query and
key head) with DeepSeek-V3's Mixture-of-Experts (sigmoid routing with a selection-only
correction bias, expert groups scored by their best two, a routed scaling factor, shared
experts, dense first layers). Every piece is one moekit already has, so the family costs
only its tables. Its layers may use a sliding window from `max_window_layers` on; a window at
least as wide as the context is full attention, a narrower one is refused.
"""

from __future__ import annotations

from typing import Any

from moekit.interop.architecture import Architecture
from moekit.interop.deepseek_v3 import (
    PER_EXPERT,
    STACKED,
    leading_dense,
    plain_shared_experts,
    sigmoid_group_routing,
)
from moekit.interop.fields import (
    DECODER_FIELDS,
    NO_ATTENTION_BIAS,
    Const,
    Field,
    Fixed,
    HeadDim,
    HFConfig,
    SlidingWindow,
    dropless,
    swiglu,
)
from moekit.interop.tensors import DECODER, GQA, LAYER, Copy, Weights, mlp


def _window_enabled(hf: HFConfig) -> bool:
    """Whether a layer uses `sliding_window`: as `layer_types` says, else from
    `max_window_layers` on (transformers' rule)."""
    if hf.get("layer_types"):
        return "sliding_attention" in hf["layer_types"]
    layers = hf.get("num_hidden_layers") or 0
    return hf.get("sliding_window") is not None and (hf.get("max_window_layers") or 0) < layers


LABEL = "dots.llm1"
CONFIG = (
    *DECODER_FIELDS,
    HeadDim(),
    NO_ATTENTION_BIAS,
    SlidingWindow(_window_enabled),
    Field("intermediate_size", "ffn_hidden", get=lambda cfg: cfg.dense_hidden),
    Field("moe_intermediate_size", "moe.expert_hidden"),
    Field("n_routed_experts", "moe.num_experts", aliases=("num_local_experts",)),
    Field("num_experts_per_tok", "moe.top_k"),
    Field("n_shared_experts", "moe.num_shared_experts", default=0, cast=int),
    *leading_dense(LABEL),
    Field("norm_topk_prob", "moe.norm_topk_prob", default=False, cast=bool),
    Field("routed_scaling_factor", "moe.routed_scaling_factor", default=1.0, cast=float),
    Const("output_router_logits", False),
    *sigmoid_group_routing(LABEL),
    *plain_shared_experts(LABEL),
    Fixed(
        {"attention.kind": "gqa", "attention.qk_norm": "head", "attention.qkv_bias": False},
        f"{LABEL} attention is grouped-query with a norm on each query and key head",
    ),
    dropless(LABEL),
    swiglu(LABEL),
)


def _weights(experts: Weights) -> Weights:
    table: dict[Any, Any] = {
        **DECODER,
        **GQA,
        **mlp("layers.{i}.ffn", f"{LAYER}.mlp"),  # the dense layers
        "layers.{i}.ffn.router.weight": f"{LAYER}.mlp.gate.weight",
        "layers.{i}.ffn.router.selection_bias": Copy(
            f"{LAYER}.mlp.gate.e_score_correction_bias", optional=True
        ),
        **experts,
        **mlp("layers.{i}.ffn.shared", f"{LAYER}.mlp.shared_experts"),
    }
    return table


ARCH = Architecture(
    name="Dots1ForCausalLM",
    model_type="dots1",
    label=LABEL,
    config=CONFIG,
    weights=_weights(PER_EXPERT),
    live_weights=_weights(STACKED),
)
