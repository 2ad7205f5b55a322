"""DeepSeek-V2 and V3 in GGUF: llama.cpp's "deepseek2" architecture (both families).

Multi-head latent attention is stored as llama.cpp's converter stores it: the query and
compressed-key projections with their RoPE rows interleaved (DeepSeek's own layout), the
key/value up-projection split per head into `attn_k_b` (transposed: latent x nope) and
`attn_v_b`, and `head_count_kv` 1 (every head shares the latent). The metadata states what
the graph needs: the ranks, the per-head key and value widths with and without the latent,
leading dense layers, shared experts, the routed scaling, whether the chosen weights are
renormalised, and the gating function (softmax: V2; sigmoid with the selection bias
`exp_probs_b`: V3). Expert groups are scored by their best two experts in llama.cpp, so a
V2 model with groups scored by their best expert is refused, as is an RMS epsilon other than
1e-6 (llama.cpp uses it for the latent norms too, where DeepSeek's code fixes 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.interop import deepseek_v2, deepseek_v3, dots1
from moekit.interop.deepseek_v3 import RopeRows
from moekit.interop.gguf_arch import GgufArch, moe_weights, shared_expert_weights, tensor
from moekit.interop.tensors import Binding, Spec, TensorMap, Weights, at_layer

SOFTMAX, SIGMOID = 1, 2  # llama.cpp's expert gating functions


@dataclass(frozen=True)
class SplitKVB(Spec):
    """The key/value up-projection [heads * (nope + v), latent] as llama.cpp's two tensors:
    `attn_k_b` [heads, latent, nope] and `attn_v_b` [heads, v, latent]."""

    def bind(self, ours: tuple[str, ...], layer: int | None, ctx: Binding) -> TensorMap:
        a, heads = ctx.cfg.attention, ctx.cfg.num_heads
        nope, v = a.qk_nope_head_dim, a.v_head_dim

        def split(ts: list[Tensor]) -> list[Tensor]:
            kv = ts[0].view(heads, nope + v, ts[0].shape[-1])
            k, value = kv.split([nope, v], dim=1)
            return [k.transpose(1, 2).contiguous(), value.contiguous()]

        def join(ts: list[Tensor]) -> list[Tensor]:
            k, value = ts[0].transpose(1, 2), ts[1]
            return [torch.cat([k, value], dim=1).reshape(heads * (nope + v), -1).contiguous()]

        names = (at_layer(tensor("ATTN_K_B"), layer), at_layer(tensor("ATTN_V_B"), layer))
        return TensorMap(ours, names, join, split)


def _weights() -> Weights:
    return {
        **moe_weights(),
        **shared_expert_weights(),
        "layers.{i}.attn.wq.weight": RopeRows(tensor("ATTN_Q"), "q", flagged=False),
        "layers.{i}.attn.wq_a.weight": tensor("ATTN_Q_A"),
        "layers.{i}.attn.q_norm.weight": tensor("ATTN_Q_A_NORM"),
        "layers.{i}.attn.wq_b.weight": RopeRows(tensor("ATTN_Q_B"), "q", flagged=False),
        "layers.{i}.attn.wkv_a.weight": RopeRows(tensor("ATTN_KV_A_MQA"), "kv", flagged=False),
        "layers.{i}.attn.kv_norm.weight": tensor("ATTN_KV_A_NORM"),
        "layers.{i}.attn.wkv_b.weight": SplitKVB(),
        "layers.{i}.attn.wo.weight": tensor("ATTN_OUT"),
        "layers.{i}.ffn.w_gate.weight": tensor("FFN_GATE"),  # the leading dense layers
        "layers.{i}.ffn.w_up.weight": tensor("FFN_UP"),
        "layers.{i}.ffn.w_down.weight": tensor("FFN_DOWN"),
        "layers.{i}.ffn.router.selection_bias": tensor("FFN_EXP_PROBS_B", "bias"),
    }


def _meta(cfg: ModelConfig) -> dict[str, Any]:
    """Metadata computed from the config (beyond the config.json fields carried as they are)."""
    a, moe = cfg.attention, cfg.moe
    assert moe is not None
    meta: dict[str, Any] = {
        "{arch}.attention.head_count_kv": 1,  # one latent shared by every head
        "{arch}.leading_dense_block_count": cfg.leading_dense_layers or 0,
        "{arch}.attention.kv_lora_rank": a.kv_lora_rank,
        "{arch}.attention.key_length": a.kv_lora_rank + a.qk_rope_head_dim,
        "{arch}.attention.value_length": a.kv_lora_rank,
        "{arch}.attention.key_length_mla": a.qk_nope_head_dim + a.qk_rope_head_dim,
        "{arch}.attention.value_length_mla": a.v_head_dim,
        "{arch}.rope.dimension_count": a.qk_rope_head_dim,
        "{arch}.expert_shared_count": moe.num_shared_experts,
        "{arch}.expert_weights_scale": float(moe.routed_scaling_factor),
        "{arch}.expert_weights_norm": moe.norm_topk_prob,
        "{arch}.expert_gating_func": SIGMOID if moe.score_func == "sigmoid" else SOFTMAX,
        "{arch}.expert_group_count": moe.num_groups,
        "{arch}.expert_group_used_count": moe.topk_groups,
    }
    # 0: full-rank queries (llama.cpp reads the key unless the layer count says "lite").
    meta["{arch}.attention.q_lora_rank"] = a.q_lora_rank or 0
    return meta


def _hf(meta: dict[str, Any]) -> dict[str, Any]:
    """config.json fields from a deepseek2 file's metadata."""

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"deepseek2.{key}", default)

    rope = get("rope.dimension_count")
    groups = get("expert_group_count", 1)
    hf: dict[str, Any] = {
        "num_key_value_heads": get("attention.head_count"),
        "first_k_dense_replace": get("leading_dense_block_count", 0),
        "q_lora_rank": get("attention.q_lora_rank") or None,
        "kv_lora_rank": get("attention.kv_lora_rank"),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": get("attention.key_length_mla", 0) - (rope or 0),
        "v_head_dim": get("attention.value_length_mla"),
        "n_shared_experts": get("expert_shared_count", 0),
        "routed_scaling_factor": get("expert_weights_scale", 1.0),
        "norm_topk_prob": bool(get("expert_weights_norm", False)),
        "n_group": groups,
        "topk_group": get("expert_group_used_count", 1),
    }
    if get("expert_gating_func") == SIGMOID:
        hf |= {"topk_method": "noaux_tc", "rope_interleave": True}
    else:
        hf["topk_method"] = "group_limited_greedy" if groups > 1 else "greedy"
    return hf


def _problems(cfg: ModelConfig) -> list[str]:
    found = []
    if cfg.norm_eps != 1e-6:
        found.append(
            f"llama.cpp's deepseek2 graph uses rms_norm_eps for the latent norms too, which "
            f"DeepSeek fixes at 1e-6 (norm_eps must be 1e-6, not {cfg.norm_eps})"
        )
    moe = cfg.moe
    if moe is not None and moe.num_groups > 1 and moe.group_score != "top2_sum":
        found.append(
            "llama.cpp scores expert groups by their best two experts (group_score must be "
            "'top2_sum' with expert groups)"
        )
    return found


_KEYS = {
    "{arch}.vocab_size": "vocab_size",
    "{arch}.expert_count": "n_routed_experts",
    "{arch}.expert_feed_forward_length": "moe_intermediate_size",
}


def _gating(kind: int) -> Any:
    return lambda meta: meta.get("deepseek2.expert_gating_func", SOFTMAX) == kind


def _deepseek2(hf: Any, gating: int) -> GgufArch:
    """llama.cpp's deepseek2 for the Hugging Face architecture `hf`, told apart on import by
    the gating function (`gating`: SOFTMAX for V2, SIGMOID for V3)."""
    return GgufArch(
        name="deepseek2",
        hf=hf,
        keys=_KEYS,
        weights=_weights(),
        norm_topk_prob=None,
        leading_dense=True,
        meta_of=_meta,
        hf_of=_hf,
        accepts=_gating(gating),
        more_problems=_problems,
        notes=("rms_norm_eps 1e-6", "expert groups scored by their best two experts"),
    )


DEEPSEEK2_V2 = _deepseek2(deepseek_v2.ARCH, SOFTMAX)
DEEPSEEK2_V3 = _deepseek2(deepseek_v3.ARCH, SIGMOID)


# ---- dots.llm1: Qwen3's attention with DeepSeek-V3's routing -------------------------------------


def _dots1_weights() -> Weights:
    """Grouped-query attention with per-head q/k norms, and DeepSeek's feed-forward layers."""
    table = {k: v for k, v in _weights().items() if ".attn." not in k}
    for p, kind in (("q", "ATTN_Q"), ("k", "ATTN_K"), ("v", "ATTN_V"), ("o", "ATTN_OUT")):
        table[f"layers.{{i}}.attn.w{p}.weight"] = tensor(kind)
    table["layers.{i}.attn.q_norm.weight"] = tensor("ATTN_Q_NORM")
    table["layers.{i}.attn.k_norm.weight"] = tensor("ATTN_K_NORM")
    return table


def _dots1_meta(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    assert moe is not None
    return {
        "{arch}.leading_dense_block_count": cfg.leading_dense_layers or 0,
        "{arch}.expert_shared_count": moe.num_shared_experts,
        "{arch}.expert_weights_scale": float(moe.routed_scaling_factor),
        "{arch}.expert_weights_norm": moe.norm_topk_prob,
        "{arch}.expert_gating_func": SIGMOID,
        "{arch}.expert_group_count": moe.num_groups,
        "{arch}.expert_group_used_count": moe.topk_groups,
    }


def _dots1_hf(meta: dict[str, Any]) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"dots1.{key}", default)

    return {
        "first_k_dense_replace": get("leading_dense_block_count", 0),
        "n_shared_experts": get("expert_shared_count", 0),
        "routed_scaling_factor": get("expert_weights_scale", 1.0),
        "norm_topk_prob": bool(get("expert_weights_norm", False)),
        "n_group": get("expert_group_count", 1),
        "topk_group": get("expert_group_used_count", 1),
    }


DOTS1 = GgufArch(
    name="dots1",
    hf=dots1.ARCH,
    keys={
        **_KEYS,
        "{arch}.attention.key_length": "head_dim",
        "{arch}.attention.value_length": "head_dim",
    },
    weights=_dots1_weights(),
    norm_topk_prob=None,
    leading_dense=True,
    meta_of=_dots1_meta,
    hf_of=_dots1_hf,
    notes=("as many key/value heads as query heads",),
    more_problems=lambda cfg: (
        []
        if cfg.kv_heads == cfg.num_heads
        else [
            "llama.cpp's dots1 graph gives keys and values as many heads as queries "
            f"(num_kv_heads must be {cfg.num_heads}, not {cfg.kv_heads})"
        ]
    ),
)
