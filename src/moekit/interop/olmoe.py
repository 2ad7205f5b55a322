"""OLMoE (OlmoeForCausalLM): RMSNorm over the whole query and key projections (before the
heads are split), softmax top-k without renormalisation by default, every layer MoE, experts
stored one by one as `mlp.experts.{e}.gate_proj / up_proj / down_proj`."""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.hf import (
    Architecture,
    TensorMap,
    base_hf_fields,
    base_model_fields,
    common_maps,
    copy,
    expert_maps,
    field_of,
    gqa_maps,
    require,
    require_no_attention_bias,
)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    require(hf, "clip_qkv", lambda v: v is None, "q/k/v clipping is not implemented")
    require_no_attention_bias(hf)
    hidden = field_of(hf, "intermediate_size")
    return ModelConfig.from_dict(
        {
            **base_model_fields(hf),
            "ffn_hidden": hidden,
            "attention": {"qk_norm": "full"},
            "moe": {
                "num_experts": field_of(hf, "num_experts"),
                "top_k": field_of(hf, "num_experts_per_tok"),
                "expert_hidden": hidden,
                "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
                "aux_loss_weight": float(hf.get("router_aux_loss_coef", 0.01)),
            },
        }
    )


def problems(cfg: ModelConfig) -> list[str]:
    moe, out = cfg.moe, []
    if moe is None:
        return ["it is dense"]
    if moe.router != "topk" or moe.score_func != "softmax":
        out.append("OLMoE routes by softmax top-k only")
    if moe.num_shared_experts or moe.first_dense_layers or moe.layer_step != 1:
        out.append("OLMoE has no shared experts and every layer is MoE")
    if moe.capacity_factor is not None:
        out.append("OLMoE is dropless (capacity_factor must be null)")
    if (
        moe.num_groups > 1
        or moe.routed_scaling_factor != 1.0
        or moe.selection_bias
        or moe.bias_update_rate
    ):
        out.append("OLMoE has no expert groups, routed scaling or selection bias")
    a = cfg.attention
    if (
        a.kind != "gqa"
        or a.qk_norm != "full"
        or a.qkv_bias
        or a.head_dim not in (None, cfg.dim // cfg.num_heads)
    ):
        out.append(
            "OLMoE attention normalises the whole q/k projections (qk_norm='full'), no biases"
        )
    if cfg.activation != "swiglu":
        out.append("OLMoE experts are SwiGLU")
    return out


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    assert moe is not None
    return {
        **base_hf_fields(cfg),
        "intermediate_size": moe.expert_hidden,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
        "router_aux_loss_coef": moe.aux_loss_weight,
        "output_router_logits": False,
        "attention_bias": False,
        "clip_qkv": None,
    }


def tensor_maps(cfg: ModelConfig, hf: dict[str, Any] | None = None) -> list[TensorMap]:
    """The tensors of `cfg` and of an OLMoE checkpoint (whose layout `hf` does not change)."""
    moe = cfg.moe
    assert moe is not None
    maps = common_maps(cfg)
    for i in range(cfg.num_layers):
        mlp = f"model.layers.{i}.mlp"
        maps += gqa_maps(i, cfg)
        maps.append(copy(f"layers.{i}.ffn.router.weight", f"{mlp}.gate.weight"))
        maps += expert_maps(
            f"layers.{i}.ffn.experts",
            mlp + ".experts.{e}",
            moe.num_experts,
            ("gate_proj", "up_proj", "down_proj"),
        )
    return maps


ARCH = Architecture(
    name="OlmoeForCausalLM",
    model_type="olmoe",
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tensor_maps=tensor_maps,
    problems=problems,
)
