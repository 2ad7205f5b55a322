"""Qwen2-MoE (Qwen2MoeForCausalLM) and Qwen3-MoE (Qwen3MoeForCausalLM).

Qwen2-MoE: q/k/v biases, one shared expert scaled by a learned sigmoid gate, softmax top-k
(renormalised or not). Qwen3-MoE: RMSNorm on each query and key head, no shared expert. Both
store experts one by one as `mlp.experts.{e}.gate_proj / up_proj / down_proj` and place MoE
layers with `mlp_only_layers` and `decoder_sparse_step`.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.hf import (
    Architecture,
    TensorMap,
    UnsupportedError,
    base_hf_fields,
    base_model_fields,
    check_sliding_window,
    common_maps,
    copy,
    expert_maps,
    field_of,
    gqa_maps,
    head_dim_field,
    mlp_maps,
    require_no_attention_bias,
)


def _placement(hf: dict[str, Any]) -> dict[str, int]:
    """moekit's (first_dense_layers, layer_step) for Qwen's mlp_only_layers and sparse step."""
    dense = sorted(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step") or 1)
    if dense != list(range(len(dense))):
        raise UnsupportedError(
            f"config.json: mlp_only_layers={dense} is not supported: moekit places dense layers "
            "first (mlp_only_layers must be 0..n-1)"
        )
    if dense and step != 1:
        raise UnsupportedError("config.json: mlp_only_layers together with decoder_sparse_step > 1")
    return {"first_dense_layers": len(dense), "layer_step": step}


def _moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_experts": field_of(hf, "num_experts"),
        "top_k": field_of(hf, "num_experts_per_tok"),
        "expert_hidden": field_of(hf, "moe_intermediate_size"),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "aux_loss_weight": float(hf.get("router_aux_loss_coef", 0.001)),
        **_placement(hf),
    }


def _common_problems(cfg: ModelConfig, name: str) -> list[str]:
    moe, out = cfg.moe, []
    if moe is None:
        return ["it is dense"]
    if moe.router != "topk" or moe.score_func != "softmax":
        out.append(f"{name} routes by softmax top-k only")
    if moe.capacity_factor is not None:
        out.append(f"{name} is dropless (capacity_factor must be null)")
    if (
        moe.num_groups > 1
        or moe.routed_scaling_factor != 1.0
        or moe.selection_bias
        or moe.bias_update_rate
    ):
        out.append(f"{name} has no expert groups, routed scaling or selection bias")
    if moe.first_dense_layers and moe.layer_step != 1:
        out.append(f"{name} cannot combine leading dense layers with a layer step")
    if cfg.attention.kind != "gqa":
        out.append(f"{name} attention is grouped-query attention")
    if cfg.activation != "swiglu":
        out.append(f"{name} experts are SwiGLU")
    return out


def _hf_moe(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    assert moe is not None
    return {
        "intermediate_size": cfg.dense_hidden,
        "moe_intermediate_size": moe.expert_hidden,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
        "router_aux_loss_coef": moe.aux_loss_weight,
        "output_router_logits": False,
        "mlp_only_layers": list(range(moe.first_dense_layers)),
        "decoder_sparse_step": moe.layer_step,
        "use_sliding_window": False,
        "sliding_window": None,
    }


def _maps(cfg: ModelConfig, shared: bool) -> list[TensorMap]:
    moe = cfg.moe
    assert moe is not None
    maps = common_maps(cfg)
    for i in range(cfg.num_layers):
        mlp, ffn = f"model.layers.{i}.mlp", f"layers.{i}.ffn"
        maps += gqa_maps(i, cfg)
        if not cfg.is_moe_layer(i):
            maps += mlp_maps(ffn, mlp)
            continue
        maps.append(copy(f"{ffn}.router.weight", f"{mlp}.gate.weight"))
        maps += expert_maps(
            f"{ffn}.experts",
            mlp + ".experts.{e}",
            moe.num_experts,
            ("gate_proj", "up_proj", "down_proj"),
        )
        if shared:
            maps += mlp_maps(f"{ffn}.shared", f"{mlp}.shared_expert")
            maps.append(copy(f"{ffn}.shared_gate.weight", f"{mlp}.shared_expert_gate.weight"))
    return maps


def _check_window(hf: dict[str, Any]) -> None:
    """Qwen applies `sliding_window` only with `use_sliding_window` (Qwen2-MoE: on the layers
    `layer_types` marks "sliding_attention"); a window as wide as the context is accepted."""
    enabled = bool(hf.get("use_sliding_window")) or "sliding_attention" in (
        hf.get("layer_types") or []
    )
    check_sliding_window(hf, enabled=enabled)


# ---- Qwen2-MoE -------------------------------------------------------------------------------


def qwen2_from_hf(hf: dict[str, Any]) -> ModelConfig:
    _check_window(hf)
    shared = field_of(hf, "shared_expert_intermediate_size")
    return ModelConfig.from_dict(
        {
            **base_model_fields(hf),
            "ffn_hidden": field_of(hf, "intermediate_size"),
            "attention": {
                "head_dim": head_dim_field(hf),
                "qkv_bias": bool(hf.get("qkv_bias", True)),
            },
            "moe": {
                **_moe_fields(hf),
                "num_shared_experts": 1,
                "shared_expert_hidden": shared,
                "shared_expert_gate": True,
            },
        }
    )


def qwen2_problems(cfg: ModelConfig) -> list[str]:
    out = _common_problems(cfg, "Qwen2-MoE")
    moe = cfg.moe
    if moe is not None and not (moe.num_shared_experts == 1 and moe.shared_expert_gate):
        out.append("Qwen2-MoE has exactly one shared expert with a sigmoid gate")
    if cfg.attention.qk_norm != "none":
        out.append("Qwen2-MoE has no q/k norms")
    return out


def qwen2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    assert moe is not None
    return {
        **base_hf_fields(cfg),
        **_hf_moe(cfg),
        "head_dim": cfg.head_dim,
        "qkv_bias": cfg.attention.qkv_bias,
        "shared_expert_intermediate_size": moe.shared_hidden_total,
    }


QWEN2_MOE = Architecture(
    name="Qwen2MoeForCausalLM",
    model_type="qwen2_moe",
    config_from_hf=qwen2_from_hf,
    config_to_hf=qwen2_to_hf,
    tensor_maps=lambda cfg, hf: _maps(cfg, shared=True),
    problems=qwen2_problems,
)


# ---- Qwen3-MoE -------------------------------------------------------------------------------


def qwen3_from_hf(hf: dict[str, Any]) -> ModelConfig:
    _check_window(hf)
    require_no_attention_bias(hf)
    return ModelConfig.from_dict(
        {
            **base_model_fields(hf),
            "ffn_hidden": field_of(hf, "intermediate_size"),
            "attention": {"head_dim": head_dim_field(hf), "qk_norm": "head"},
            "moe": _moe_fields(hf),
        }
    )


def qwen3_problems(cfg: ModelConfig) -> list[str]:
    out = _common_problems(cfg, "Qwen3-MoE")
    if cfg.moe is not None and cfg.moe.num_shared_experts:
        out.append("Qwen3-MoE has no shared experts")
    if cfg.attention.qk_norm != "head":
        out.append("Qwen3-MoE normalises each query and key head (qk_norm='head')")
    if cfg.attention.qkv_bias:
        out.append(
            "Qwen3-MoE's attention_bias would give o_proj a bias too, which this model lacks "
            "(qkv_bias must be false)"
        )
    return out


def qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **base_hf_fields(cfg),
        **_hf_moe(cfg),
        "head_dim": cfg.head_dim,
        "attention_bias": False,
    }


QWEN3_MOE = Architecture(
    name="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    config_from_hf=qwen3_from_hf,
    config_to_hf=qwen3_to_hf,
    tensor_maps=lambda cfg, hf: _maps(cfg, shared=False),
    problems=qwen3_problems,
)
