"""DeepSeek-V3 (DeepseekV3ForCausalLM): multi-head latent attention, sigmoid routing with a
selection-only correction bias, group-limited top-k, a routed scaling factor, shared experts,
and dense first layers.

With `rope_interleave: true` (the default, and DeepSeek's own layout) the RoPE part of each
query and key head is rotated as interleaved pairs (x0, x1), (x2, x3), ...; moekit rotates
halves (x0, x_{n/2}), (x1, x_{n/2+1}), .... The two agree once the rows of the projections
that produce those parts are reordered evens-first (`RopeRows`), which is what import does
and export undoes, so the attention is the same function. With `rope_interleave: false`
transformers rotates halves as moekit does and the rows are copied as they are. Export always
writes the interleaved layout with `rope_interleave: true`, the layout DeepSeek's checkpoints
and other runtimes expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.interop.architecture import Architecture
from moekit.interop.fields import (
    DECODER_FIELDS,
    Check,
    Const,
    Entry,
    Field,
    Fixed,
    OnImport,
    Only,
    dropless,
    swiglu,
)
from moekit.interop.tensors import (
    DECODER,
    LAYER,
    Binding,
    Copy,
    Spec,
    TensorMap,
    Weights,
    at_layer,
    mlp,
    per_expert,
    stacked_experts,
)


def leading_dense(label: str) -> tuple[Entry, ...]:
    """Dense first layers as `first_k_dense_replace` (DeepSeek's and dots.llm1's placement)."""
    return (
        Field(
            "first_k_dense_replace",
            "moe.first_dense_layers",
            default=0,
            cast=int,
            get=lambda cfg: cfg.leading_dense_layers,
        ),
        Check(
            f"{label}'s dense layers are the first ones (first_k_dense_replace)",
            lambda cfg: cfg.leading_dense_layers is not None,
            ("moe.first_dense_layers", "moe.dense_layers"),
        ),
    )


def plain_shared_experts(label: str) -> tuple[Entry, ...]:
    """Shared experts without a gate, as wide as the routed ones."""
    return (
        Fixed({"moe.shared_expert_gate": False}, f"{label}'s shared experts have no gate"),
        Check(
            f"{label}'s shared experts are as wide as the routed ones (shared_expert_hidden "
            "must be null or expert_hidden)",
            lambda cfg: (
                cfg.moe is None or cfg.moe.shared_expert_hidden in (None, cfg.moe.expert_hidden)
            ),
            ("moe.shared_expert_hidden",),
        ),
    )


def sigmoid_group_routing(label: str) -> tuple[Entry, ...]:
    """DeepSeek-V3's routing (also dots.llm1's): sigmoid top-k in expert groups scored by their
    best two, and a selection-only correction bias."""
    return (
        Field("n_group", "moe.num_groups", default=1, cast=lambda v: v or 1),
        Field("topk_group", "moe.topk_groups", default=1, cast=lambda v: v or 1),
        Fixed(
            {"moe.router": "topk", "moe.score_func": "sigmoid"}, f"{label} routes by sigmoid top-k"
        ),
        OnImport({"moe.group_score": "top2_sum"}, "groups are scored by their best two experts"),
        Check(
            f"{label} scores expert groups by their best two experts",
            lambda cfg: (
                cfg.moe is None or cfg.moe.num_groups == 1 or cfg.moe.group_score == "top2_sum"
            ),
            ("moe.num_groups", "moe.group_score"),
        ),
        OnImport(
            {"moe.selection_bias": True, "moe.aux_loss_weight": 0.0001},
            "the checkpoint's routers carry a correction bias (e_score_correction_bias) and "
            "balance with it rather than with a large auxiliary loss",
        ),
    )


def mla_config(label: str) -> tuple[Entry, ...]:
    """What DeepSeek-V2 and V3 state the same way: the decoder, multi-head latent attention,
    the expert sizes and the dense first layers. `label` names the architecture in reasons."""
    return (
        *DECODER_FIELDS,
        Only("attention_bias", (None, False), "MLA projections have no biases", write_value=False),
        Only(
            "num_key_value_heads",
            lambda v, hf: v in (None, hf.get("num_attention_heads")),
            "it must equal num_attention_heads with multi-head latent attention",
        ),
        Only("moe_layer_freq", (None, 1), "MoE is on every layer after the dense ones"),
        Field("intermediate_size", "ffn_hidden", get=lambda cfg: cfg.dense_hidden),
        Fixed({"attention.kind": "mla"}, f"{label} uses multi-head latent attention"),
        Field("q_lora_rank", "attention.q_lora_rank", default=None),
        Field("kv_lora_rank", "attention.kv_lora_rank"),
        Field("qk_nope_head_dim", "attention.qk_nope_head_dim"),
        Field("qk_rope_head_dim", "attention.qk_rope_head_dim"),
        Field("v_head_dim", "attention.v_head_dim"),
        Field("n_routed_experts", "moe.num_experts"),
        Field("num_experts_per_tok", "moe.top_k"),
        Field("moe_intermediate_size", "moe.expert_hidden"),
        *leading_dense(label),
        Field("routed_scaling_factor", "moe.routed_scaling_factor", default=1.0, cast=float),
        *plain_shared_experts(label),
        dropless(label),
        swiglu(label),
    )


CONFIG = (
    *mla_config("DeepSeek-V3"),
    Only("rope_interleave", (None, True, False), "it must be a boolean", write_value=True),
    Only("topk_method", ("noaux_tc", None), "DeepSeek-V3's noaux_tc only", write_value="noaux_tc"),
    Field("n_shared_experts", "moe.num_shared_experts", default=1, cast=int),  # transformers'
    Field("norm_topk_prob", "moe.norm_topk_prob", default=True, cast=bool),
    Const("num_nextn_predict_layers", 0),
    *sigmoid_group_routing("DeepSeek-V3"),
)


def _evens_first(rope: int) -> Tensor:
    return torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])


def _permute_rope_rows(w: Tensor, nope: int, rope: int, period: int, order: Tensor) -> Tensor:
    blocks = w.view(-1, period, *w.shape[1:])  # (heads, period, ...)
    rot = blocks[:, nope : nope + rope][:, order]
    return torch.cat([blocks[:, :nope], rot, blocks[:, nope + rope :]], dim=1).reshape(w.shape)


@dataclass(frozen=True)
class RopeRows(Spec):
    """A projection whose rows hold, per head, plain rows then RoPE rows: the queries' (`part`
    "q": qk_nope_head_dim then qk_rope_head_dim rows per head) or the compressed keys' ("kv":
    kv_lora_rank latent rows then the shared RoPE rows). Reordered between the interleaved and
    rotate-half layouts when the checkpoint's `rope_interleave` is true (transformers tests
    the flag's truth, so an explicit null means rotate-half), copied otherwise. `flagged`
    false: always interleaved (DeepSeek-V2, which has no such flag)."""

    theirs: str
    part: str
    flagged: bool = True

    def bind(self, ours: tuple[str, ...], layer: int | None, ctx: Binding) -> TensorMap:
        theirs = at_layer(self.theirs, layer)
        if self.flagged and not ctx.hf.get("rope_interleave", True):
            return TensorMap(ours, (theirs,))
        a = ctx.cfg.attention
        rope = a.qk_rope_head_dim
        nope = a.qk_nope_head_dim if self.part == "q" else a.kv_lora_rank
        order = _evens_first(rope)
        inverse = torch.argsort(order)
        return TensorMap(
            ours,
            (theirs,),
            lambda ts: [_permute_rope_rows(ts[0], nope, rope, nope + rope, order)],
            lambda ts: [_permute_rope_rows(ts[0], nope, rope, nope + rope, inverse)],
        )


_ATTN = f"{LAYER}.self_attn"


def mla_weights(experts: Weights, *, flagged: bool = True) -> Weights:
    """DeepSeek's weight table: MLA (RoPE rows interleaved, or by `rope_interleave` when
    `flagged`), dense first layers, a router (with its optional correction bias), `experts`
    and shared experts."""
    return {
        **DECODER,
        "layers.{i}.attn.wq.weight": RopeRows(f"{_ATTN}.q_proj.weight", "q", flagged),
        "layers.{i}.attn.wq_a.weight": f"{_ATTN}.q_a_proj.weight",  # ... or low-rank queries
        "layers.{i}.attn.q_norm.weight": f"{_ATTN}.q_a_layernorm.weight",
        "layers.{i}.attn.wq_b.weight": RopeRows(f"{_ATTN}.q_b_proj.weight", "q", flagged),
        "layers.{i}.attn.wkv_a.weight": RopeRows(
            f"{_ATTN}.kv_a_proj_with_mqa.weight", "kv", flagged
        ),
        "layers.{i}.attn.kv_norm.weight": f"{_ATTN}.kv_a_layernorm.weight",
        "layers.{i}.attn.wkv_b.weight": f"{_ATTN}.kv_b_proj.weight",
        "layers.{i}.attn.wo.weight": f"{_ATTN}.o_proj.weight",
        **mlp("layers.{i}.ffn", f"{LAYER}.mlp"),  # the dense layers
        "layers.{i}.ffn.router.weight": f"{LAYER}.mlp.gate.weight",
        # A checkpoint without the bias routes as with a zero one.
        "layers.{i}.ffn.router.selection_bias": Copy(
            f"{LAYER}.mlp.gate.e_score_correction_bias", optional=True
        ),
        **experts,
        **mlp("layers.{i}.ffn.shared", f"{LAYER}.mlp.shared_experts"),
    }


PER_EXPERT = per_expert(f"{LAYER}.mlp.experts.{{e}}")
STACKED = stacked_experts(f"{LAYER}.mlp.experts")


def _multi_token_prediction(key: str, cfg: ModelConfig) -> bool:
    """Multi-token-prediction layers (numbered after the last decoder layer) are not imported."""
    parts = key.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and int(parts[2]) >= cfg.num_layers


ARCH = Architecture(
    name="DeepseekV3ForCausalLM",
    model_type="deepseek_v3",
    label="DeepSeek-V3",
    config=CONFIG,
    weights=mla_weights(PER_EXPERT),
    live_weights=mla_weights(STACKED),
    ignore=_multi_token_prediction,
)
