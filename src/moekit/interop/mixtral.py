"""Mixtral (MixtralForCausalLM): configs and weights between moekit and transformers.

transformers keeps each layer's experts stacked, gate and up projections fused:
`mlp.experts.gate_up_proj` (E, 2F, D) = [w_gate; w_up] and `mlp.experts.down_proj` (E, D, F).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig


def check_mixtral_compatible(cfg: ModelConfig) -> None:
    """Raise unless transformers' Mixtral represents `cfg` exactly (softmax top-k,
    renormalised, no shared experts, every layer MoE, plain grouped-query attention)."""
    moe = cfg.moe
    problems = []
    if moe is None:
        problems.append("it is dense")
    else:
        if moe.router != "topk" or moe.score_func != "softmax" or not moe.norm_topk_prob:
            problems.append("Mixtral routes by renormalised softmax top-k only")
        if moe.num_shared_experts:
            problems.append("Mixtral has no shared experts")
        if moe.first_dense_layers or moe.layer_step != 1:
            problems.append("every Mixtral layer is an MoE layer")
        if moe.capacity_factor is not None or moe.num_groups > 1:
            problems.append("Mixtral is dropless and has no expert groups")
        if moe.routed_scaling_factor != 1.0 or moe.bias_update_rate:
            problems.append("Mixtral has no routed scaling factor or selection bias")
    if cfg.attention.kind != "gqa" or cfg.attention.qk_norm != "none" or cfg.attention.qkv_bias:
        problems.append("Mixtral attention is plain grouped-query attention")
    if cfg.activation != "swiglu":
        problems.append("Mixtral experts are SwiGLU")
    if problems:
        raise ValueError("this config has no Mixtral equivalent: " + "; ".join(problems))


def hf_config(cfg: ModelConfig) -> Any:
    """A transformers `MixtralConfig` for `cfg`."""
    from transformers import MixtralConfig

    check_mixtral_compatible(cfg)
    moe = cfg.moe
    assert moe is not None
    return MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=moe.expert_hidden,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_weight,
        router_jitter_noise=moe.router_jitter,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def to_hf_state(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """moekit weights -> the state dict of transformers' MixtralForCausalLM."""
    check_mixtral_compatible(cfg)
    out = {
        "model.embed_tokens.weight": state["embed.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = state[ours + "attn_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[ours + "ffn_norm.weight"]
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[hf + f"self_attn.{b}.weight"] = state[ours + f"attn.{a}.weight"]
        out[hf + "mlp.gate.weight"] = state[ours + "ffn.router.weight"]
        out[hf + "mlp.experts.gate_up_proj"] = torch.cat(
            [state[ours + "ffn.experts.w_gate"], state[ours + "ffn.experts.w_up"]], dim=1
        )
        out[hf + "mlp.experts.down_proj"] = state[ours + "ffn.experts.w_down"]
    return out


def to_hf_model(model: torch.nn.Module, cfg: ModelConfig) -> Any:
    """A transformers MixtralForCausalLM holding the same weights as `model`."""
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM(hf_config(cfg)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state(model.state_dict(), cfg), strict=False)
    if missing or unexpected:
        raise ValueError(f"weight map incomplete: missing {missing}, unexpected {unexpected}")
    return hf
