"""OLMoE (OlmoeForCausalLM): RMSNorm over the whole query and key projections (before the
heads are split), softmax top-k without renormalisation by default, every layer MoE, experts
stored one by one as `mlp.experts.{e}.gate_proj / up_proj / down_proj` (stacked and fused in
memory)."""

from __future__ import annotations

from moekit.interop.architecture import Architecture
from moekit.interop.fields import (
    DECODER_FIELDS,
    NO_ATTENTION_BIAS,
    Check,
    Const,
    Field,
    Fixed,
    Only,
    dropless,
    plain_routing,
    swiglu,
)
from moekit.interop.tensors import DECODER, GQA, LAYER, Weights, per_expert, stacked_experts

CONFIG = (
    *DECODER_FIELDS,
    NO_ATTENTION_BIAS,
    Only("clip_qkv", (None,), "q/k/v clipping is not implemented", write_value=None),
    # No dense layers: one hidden size serves the experts (and the unused dense default).
    Field("intermediate_size", ("moe.expert_hidden", "ffn_hidden")),
    Field("num_experts", "moe.num_experts", aliases=("num_local_experts",)),
    Field("num_experts_per_tok", "moe.top_k"),
    Field("norm_topk_prob", "moe.norm_topk_prob", default=False, cast=bool),
    Field("router_aux_loss_coef", "moe.aux_loss_weight", default=0.01, cast=float),
    Const("output_router_logits", False),
    Fixed(
        {"moe.router": "topk", "moe.score_func": "softmax"}, "OLMoE routes by softmax top-k only"
    ),
    Fixed(
        {
            "moe.num_shared_experts": 0,
            "moe.first_dense_layers": 0,
            "moe.layer_step": 1,
            "moe.dense_layers": None,
        },
        "OLMoE has no shared experts and every layer is MoE",
    ),
    dropless("OLMoE"),
    plain_routing("OLMoE"),
    Fixed(
        {"attention.kind": "gqa", "attention.qk_norm": "full", "attention.qkv_bias": False},
        "OLMoE attention normalises the whole q/k projections (qk_norm='full'), no biases",
    ),
    Check(
        "OLMoE heads are hidden_size / num_attention_heads wide (no head_dim of their own)",
        lambda cfg: cfg.attention.head_dim in (None, cfg.dim // cfg.num_heads),
        ("attention.head_dim",),
    ),
    swiglu("OLMoE"),
)

_ROUTER: Weights = {"layers.{i}.ffn.router.weight": f"{LAYER}.mlp.gate.weight"}

ARCH = Architecture(
    name="OlmoeForCausalLM",
    model_type="olmoe",
    label="OLMoE",
    config=CONFIG,
    weights={**DECODER, **GQA, **_ROUTER, **per_expert(f"{LAYER}.mlp.experts.{{e}}")},
    live_weights={**DECODER, **GQA, **_ROUTER, **stacked_experts(f"{LAYER}.mlp.experts")},
)
