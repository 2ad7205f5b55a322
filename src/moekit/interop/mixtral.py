"""Mixtral (MixtralForCausalLM): softmax top-k routing with renormalised weights, no shared
experts, every layer MoE. Checkpoints store experts one by one as
`block_sparse_moe.experts.{e}.w1` (gate), `w3` (up) and `w2` (down); transformers holds them
stacked and fused in memory, under `mlp`."""

from __future__ import annotations

from typing import Any

import torch

from moekit.config import ModelConfig
from moekit.interop import live
from moekit.interop.architecture import Architecture
from moekit.interop.fields import (
    DECODER_FIELDS,
    Const,
    Field,
    Fixed,
    HeadDim,
    SlidingWindow,
    dropless,
    plain_routing,
    swiglu,
)
from moekit.interop.tensors import DECODER, GQA, LAYER, per_expert, stacked_experts

CONFIG = (
    *DECODER_FIELDS,
    HeadDim(),
    SlidingWindow(),
    # No dense layers: one hidden size serves the experts (and the unused dense default).
    Field("intermediate_size", ("moe.expert_hidden", "ffn_hidden")),
    Field("num_local_experts", "moe.num_experts", aliases=("num_experts",)),
    Field("num_experts_per_tok", "moe.top_k"),
    Field("router_aux_loss_coef", "moe.aux_loss_weight", default=0.02, cast=float),
    Field("router_jitter_noise", "moe.router_jitter", default=0.0, cast=float),
    Const("output_router_logits", False),
    Fixed(
        {"moe.router": "topk", "moe.score_func": "softmax", "moe.norm_topk_prob": True},
        "Mixtral routes by renormalised softmax top-k only",
    ),
    Fixed({"moe.num_shared_experts": 0}, "Mixtral has no shared experts"),
    Fixed(
        {"moe.first_dense_layers": 0, "moe.layer_step": 1, "moe.dense_layers": None},
        "every Mixtral layer is an MoE layer",
    ),
    dropless("Mixtral"),
    plain_routing("Mixtral"),
    Fixed(
        {"attention.kind": "gqa", "attention.qk_norm": "none", "attention.qkv_bias": False},
        "Mixtral attention is plain grouped-query attention",
    ),
    swiglu("Mixtral"),
)

_MOE = f"{LAYER}.block_sparse_moe"

WEIGHTS = {
    **DECODER,
    **GQA,
    "layers.{i}.ffn.router.weight": f"{_MOE}.gate.weight",
    **per_expert(f"{_MOE}.experts.{{e}}", ("w1", "w3", "w2")),
}

LIVE_WEIGHTS = {
    **DECODER,
    **GQA,
    "layers.{i}.ffn.router.weight": f"{LAYER}.mlp.gate.weight",
    **stacked_experts(f"{LAYER}.mlp.experts"),
}

ARCH = Architecture(
    name="MixtralForCausalLM",
    model_type="mixtral",
    label="Mixtral",
    config=CONFIG,
    weights=WEIGHTS,
    live_weights=LIVE_WEIGHTS,
)


# ---- transformers models in memory (benchmarks) ------------------------------------------


def check_mixtral_compatible(cfg: ModelConfig) -> None:
    """Raise ValueError unless transformers' Mixtral represents `cfg` exactly."""
    ARCH.check(cfg)


def hf_config(cfg: ModelConfig) -> Any:
    """A transformers `MixtralConfig` for `cfg`."""
    return live.hf_config(ARCH, cfg)


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """moekit weights -> the in-memory state dict of transformers' MixtralForCausalLM (which
    fuses each layer's experts as gate_up_proj (E, 2F, D) and down_proj (E, D, F))."""
    return live.to_hf_state(ARCH, state, cfg)


def to_hf_model(model: torch.nn.Module, cfg: ModelConfig) -> Any:
    """A transformers MixtralForCausalLM holding the same weights as `model`."""
    return live.to_hf_model(ARCH, model, cfg)
