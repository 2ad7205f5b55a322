"""DeepSeek-V3 (DeepseekV3ForCausalLM): multi-head latent attention, sigmoid routing with a
selection-only correction bias, group-limited top-k, a routed scaling factor, shared experts,
and dense first layers.

With `rope_interleave: true` (the default, and DeepSeek's own layout) the RoPE part of each
query and key head is rotated as interleaved pairs (x0, x1), (x2, x3), ...; moekit rotates
halves (x0, x_{n/2}), (x1, x_{n/2+1}), .... The two agree once the rows of the projections
that produce those parts are reordered evens-first (`_rope_map`), which is what import does
and export undoes, so the attention is the same function. With `rope_interleave: false`
transformers rotates halves as moekit does and the rows are copied as they are. Export always
writes the interleaved layout with `rope_interleave: true`, the layout DeepSeek's checkpoints
and other runtimes expect.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.interop.hf import (
    Architecture,
    TensorMap,
    UnsupportedError,
    base_hf_fields,
    base_model_fields,
    common_maps,
    copy,
    expert_maps,
    field_of,
    mlp_maps,
    require,
)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    require(hf, "attention_bias", lambda v: not v, "MLA projections have no biases", False)
    require(hf, "rope_interleave", lambda v: v in (None, True, False), "must be a boolean")
    heads = field_of(hf, "num_attention_heads")
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise UnsupportedError(
            f"config.json: num_key_value_heads={kv_heads} must equal num_attention_heads with MLA"
        )
    moe_layer_freq = hf.get("moe_layer_freq", 1)
    if moe_layer_freq not in (None, 1):
        raise UnsupportedError(
            f"config.json: moe_layer_freq={moe_layer_freq} is not supported (MoE on every "
            "layer after the dense ones)"
        )
    n_group = hf.get("n_group") or 1
    topk_method = hf.get("topk_method", "noaux_tc")
    if topk_method not in ("noaux_tc", None):
        raise UnsupportedError(
            f"config.json: topk_method={topk_method!r} is not supported (DeepSeek-V3's "
            "noaux_tc only)"
        )
    fields = base_model_fields(hf)
    return ModelConfig.from_dict(
        {
            **fields,
            "ffn_hidden": field_of(hf, "intermediate_size"),
            "attention": {
                "kind": "mla",
                "q_lora_rank": hf.get("q_lora_rank"),
                "kv_lora_rank": field_of(hf, "kv_lora_rank"),
                "qk_nope_head_dim": field_of(hf, "qk_nope_head_dim"),
                "qk_rope_head_dim": field_of(hf, "qk_rope_head_dim"),
                "v_head_dim": field_of(hf, "v_head_dim"),
            },
            "moe": {
                "num_experts": field_of(hf, "n_routed_experts"),
                "top_k": field_of(hf, "num_experts_per_tok"),
                "expert_hidden": field_of(hf, "moe_intermediate_size"),
                "num_shared_experts": int(hf.get("n_shared_experts") or 0),
                "score_func": "sigmoid",
                "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
                "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
                "num_groups": n_group,
                "topk_groups": hf.get("topk_group") or 1,
                "group_score": "top2_sum",
                "selection_bias": True,
                "aux_loss_weight": 0.0001,
                "first_dense_layers": int(hf.get("first_k_dense_replace") or 0),
            },
        }
    )


def problems(cfg: ModelConfig) -> list[str]:
    moe, out = cfg.moe, []
    if cfg.attention.kind != "mla":
        out.append("DeepSeek-V3 uses multi-head latent attention")
    if moe is None:
        return [*out, "it is dense"]
    if moe.router != "topk" or moe.score_func != "sigmoid":
        out.append("DeepSeek-V3 routes by sigmoid top-k")
    if moe.layer_step != 1:
        out.append("DeepSeek-V3 has MoE on every layer after the dense ones")
    if moe.capacity_factor is not None:
        out.append("DeepSeek-V3 is dropless (capacity_factor must be null)")
    if moe.shared_expert_gate:
        out.append("DeepSeek-V3's shared experts have no gate")
    if moe.num_groups > 1 and moe.group_score != "top2_sum":
        out.append("DeepSeek-V3 scores expert groups by their best two experts")
    if cfg.activation != "swiglu":
        out.append("DeepSeek-V3 experts are SwiGLU")
    return out


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    moe, a = cfg.moe, cfg.attention
    assert moe is not None
    return {
        **base_hf_fields(cfg),
        "intermediate_size": cfg.dense_hidden,
        "moe_intermediate_size": moe.expert_hidden,
        "n_routed_experts": moe.num_experts,
        "n_shared_experts": moe.num_shared_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "n_group": moe.num_groups,
        "topk_group": moe.topk_groups,
        "topk_method": "noaux_tc",
        "first_k_dense_replace": moe.first_dense_layers,
        "q_lora_rank": a.q_lora_rank,
        "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim,
        "rope_interleave": True,
        "attention_bias": False,
        "num_nextn_predict_layers": 0,
    }


def _order(rope: int) -> Tensor:
    return torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])


def _permute_rope_rows(w: Tensor, nope: int, rope: int, period: int, order: Tensor) -> Tensor:
    blocks = w.view(-1, period, *w.shape[1:])  # (heads, period, ...)
    rot = blocks[:, nope : nope + rope][:, order]
    return torch.cat([blocks[:, :nope], rot, blocks[:, nope + rope :]], dim=1).reshape(w.shape)


def _interleaved(hf: dict[str, Any]) -> bool:
    """Whether `hf` rotates RoPE dimensions as interleaved pairs. transformers tests the flag's
    truth (`if config.rope_interleave`), so an explicit null means rotate-half."""
    return bool(hf.get("rope_interleave", True))


def _rope_map(
    ours: str, theirs: str, nope: int, rope: int, period: int, interleaved: bool
) -> TensorMap:
    """A projection whose rows hold, per head of `period` rows, `nope` plain rows then `rope`
    RoPE rows: reordered between the interleaved and rotate-half layouts when `interleaved`,
    copied otherwise."""
    if not interleaved:
        return copy(ours, theirs)
    order = _order(rope)
    inverse = torch.argsort(order)
    return TensorMap(
        ours,
        (theirs,),
        lambda ts: _permute_rope_rows(ts[0], nope, rope, period, order),
        lambda t: [_permute_rope_rows(t, nope, rope, period, inverse)],
    )


def _attention_maps(i: int, cfg: ModelConfig, interleaved: bool) -> list[TensorMap]:
    a = cfg.attention
    ours, theirs = f"layers.{i}.attn", f"model.layers.{i}.self_attn"
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q_rows = (a.qk_nope_head_dim, a.qk_rope_head_dim, qk, interleaved)
    maps = []
    if a.q_lora_rank is None:
        maps.append(_rope_map(f"{ours}.wq.weight", f"{theirs}.q_proj.weight", *q_rows))
    else:
        maps += [
            copy(f"{ours}.wq_a.weight", f"{theirs}.q_a_proj.weight"),
            copy(f"{ours}.q_norm.weight", f"{theirs}.q_a_layernorm.weight"),
            _rope_map(f"{ours}.wq_b.weight", f"{theirs}.q_b_proj.weight", *q_rows),
        ]
    latent = (
        a.kv_lora_rank,
        a.qk_rope_head_dim,
        a.kv_lora_rank + a.qk_rope_head_dim,
        interleaved,
    )
    maps += [
        _rope_map(f"{ours}.wkv_a.weight", f"{theirs}.kv_a_proj_with_mqa.weight", *latent),
        copy(f"{ours}.kv_norm.weight", f"{theirs}.kv_a_layernorm.weight"),
        copy(f"{ours}.wkv_b.weight", f"{theirs}.kv_b_proj.weight"),
        copy(f"{ours}.wo.weight", f"{theirs}.o_proj.weight"),
    ]
    return maps


def tensor_maps(cfg: ModelConfig, hf: dict[str, Any]) -> list[TensorMap]:
    """The tensors of `cfg` and of the DeepSeek-V3 checkpoint configured by `hf` (whose
    `rope_interleave` decides the RoPE rows' layout)."""
    moe = cfg.moe
    assert moe is not None
    interleaved = _interleaved(hf)
    maps = common_maps(cfg)
    for i in range(cfg.num_layers):
        mlp, ffn = f"model.layers.{i}.mlp", f"layers.{i}.ffn"
        maps += _attention_maps(i, cfg, interleaved)
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
        if moe.num_shared_experts:
            maps += mlp_maps(f"{ffn}.shared", f"{mlp}.shared_experts")
    return maps


def ignored(key: str, cfg: ModelConfig) -> bool:
    """Multi-token-prediction layers (numbered after the last decoder layer) are not imported."""
    parts = key.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and int(parts[2]) >= cfg.num_layers


ARCH = Architecture(
    name="DeepseekV3ForCausalLM",
    model_type="deepseek_v3",
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tensor_maps=tensor_maps,
    problems=problems,
    ignored=ignored,
)
