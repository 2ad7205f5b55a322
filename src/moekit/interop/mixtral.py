"""Mixtral (MixtralForCausalLM): softmax top-k routing with renormalised weights, no shared
experts, every layer MoE. Checkpoints store experts one by one as
`block_sparse_moe.experts.{e}.w1` (gate), `w3` (up) and `w2` (down)."""

from __future__ import annotations

from typing import Any

import torch

from moekit.config import ModelConfig
from moekit.interop.hf import (
    Architecture,
    TensorMap,
    base_hf_fields,
    base_model_fields,
    check_sliding_window,
    common_maps,
    copy,
    expert_maps,
    field_of,
    gqa_maps,
    head_dim_field,
)


def problems(cfg: ModelConfig) -> list[str]:
    """What keeps Mixtral from representing `cfg` exactly (empty: nothing)."""
    moe, out = cfg.moe, []
    if moe is None:
        return ["it is dense"]
    if moe.router != "topk" or moe.score_func != "softmax" or not moe.norm_topk_prob:
        out.append("Mixtral routes by renormalised softmax top-k only")
    if moe.num_shared_experts:
        out.append("Mixtral has no shared experts")
    if moe.first_dense_layers or moe.layer_step != 1:
        out.append("every Mixtral layer is an MoE layer")
    if moe.capacity_factor is not None:
        out.append("Mixtral is dropless (capacity_factor must be null)")
    if (
        moe.num_groups > 1
        or moe.routed_scaling_factor != 1.0
        or moe.selection_bias
        or moe.bias_update_rate
    ):
        out.append("Mixtral has no expert groups, routed scaling or selection bias")
    a = cfg.attention
    if a.kind != "gqa" or a.qk_norm != "none" or a.qkv_bias:
        out.append("Mixtral attention is plain grouped-query attention")
    if cfg.activation != "swiglu":
        out.append("Mixtral experts are SwiGLU")
    return out


def check_mixtral_compatible(cfg: ModelConfig) -> None:
    """Raise unless transformers' Mixtral represents `cfg` exactly."""
    found = problems(cfg)
    if found:
        raise ValueError("this config has no Mixtral equivalent: " + "; ".join(found))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_sliding_window(hf, enabled=True)
    hidden = field_of(hf, "intermediate_size")
    return ModelConfig.from_dict(
        {
            **base_model_fields(hf),
            "ffn_hidden": hidden,
            "attention": {"head_dim": head_dim_field(hf)},
            "moe": {
                "num_experts": field_of(hf, "num_local_experts"),
                "top_k": field_of(hf, "num_experts_per_tok"),
                "expert_hidden": hidden,
                "norm_topk_prob": True,
                "aux_loss_weight": float(hf.get("router_aux_loss_coef", 0.02)),
                "router_jitter": float(hf.get("router_jitter_noise", 0.0)),
            },
        }
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    assert moe is not None
    return {
        **base_hf_fields(cfg),
        "head_dim": cfg.head_dim,
        "intermediate_size": moe.expert_hidden,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss_weight,
        "router_jitter_noise": moe.router_jitter,
        "output_router_logits": False,
        "sliding_window": None,
    }


def tensor_maps(cfg: ModelConfig, hf: dict[str, Any] | None = None) -> list[TensorMap]:
    """The tensors of `cfg` and of a Mixtral checkpoint (whose layout `hf` does not change)."""
    moe = cfg.moe
    assert moe is not None
    maps = common_maps(cfg)
    for i in range(cfg.num_layers):
        block = f"model.layers.{i}.block_sparse_moe"
        maps += gqa_maps(i, cfg)
        maps.append(copy(f"layers.{i}.ffn.router.weight", f"{block}.gate.weight"))
        maps += expert_maps(
            f"layers.{i}.ffn.experts", block + ".experts.{e}", moe.num_experts, ("w1", "w3", "w2")
        )
    return maps


ARCH = Architecture(
    name="MixtralForCausalLM",
    model_type="mixtral",
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tensor_maps=tensor_maps,
    problems=problems,
)


# ---- transformers models in memory (benchmarks) ------------------------------------------


def hf_config(cfg: ModelConfig) -> Any:
    """A transformers `MixtralConfig` for `cfg`."""
    from transformers import MixtralConfig

    check_mixtral_compatible(cfg)
    fields = config_to_hf(cfg)
    fields.pop("rope_theta")
    return MixtralConfig(**fields)


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """moekit weights -> the in-memory state dict of transformers' MixtralForCausalLM (which
    fuses each layer's experts as gate_up_proj (E, 2F, D) and down_proj (E, D, F))."""
    check_mixtral_compatible(cfg)
    out = {}
    for m in tensor_maps(cfg):
        if ".experts." in m.ours:
            continue
        out[m.theirs[0]] = state[m.ours]
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}.ffn.experts.", f"model.layers.{i}.mlp."
        out[hf + "experts.gate_up_proj"] = torch.cat(
            [state[ours + "w_gate"], state[ours + "w_up"]], dim=1
        )
        out[hf + "experts.down_proj"] = state[ours + "w_down"]
        out[hf + "gate.weight"] = out.pop(f"model.layers.{i}.block_sparse_moe.gate.weight")
    return out


def to_hf_model(model: torch.nn.Module, cfg: ModelConfig) -> Any:
    """A transformers MixtralForCausalLM holding the same weights as `model`."""
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM(hf_config(cfg)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state(model.state_dict(), cfg), strict=False)
    if missing or unexpected:
        raise ValueError(f"weight map incomplete: missing {missing}, unexpected {unexpected}")
    return hf
