"""gpt-oss (GptOssForCausalLM): grouped-query attention with q/k/v/o biases and a learned sink
logit per head, sliding-window and full attention by layer (`layer_types`), a router with a
bias choosing top-k by softmax, and experts with biases and a clamped SwiGLU.

transformers stores the experts of a layer stacked and transposed for `x @ W`:
`mlp.experts.gate_up_proj` (E, D, 2F) with the gate and up columns interleaved (gate at even
columns, up at odd ones), `gate_up_proj_bias` (E, 2F) interleaved the same way, `down_proj`
(E, F, D) and `down_proj_bias` (E, D). OpenAI's checkpoints store the two expert weights in
MXFP4 (`*_blocks`, `*_scales`, rows as moekit lays them out), which import dequantises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.interop import mxfp4
from moekit.interop.architecture import Architecture
from moekit.interop.fields import (
    DECODER_FIELDS,
    Check,
    Const,
    Entry,
    Field,
    Fixed,
    HeadDim,
    HFConfig,
    Only,
    dropless,
    hf_value,
    plain_routing,
    unsupported,
)
from moekit.interop.tensors import DECODER, GQA, LAYER, Binding, Spec, TensorMap, at_layer

SLIDING, FULL = "sliding_attention", "full_attention"


class LayerTypes(Entry):
    """`layer_types` (each layer "sliding_attention" or "full_attention"; transformers'
    default alternates, sliding first) and `sliding_window` as moekit's `sliding_window` and
    `sliding_layers`."""

    def hf_names(self) -> tuple[str, ...]:
        return ("layer_types", "sliding_window")

    def ours_paths(self) -> tuple[str, ...]:
        return ("attention.sliding_window", "attention.sliding_layers")

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        layers = int(hf_value(hf, "num_hidden_layers"))
        types = hf.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(layers)]
        unknown = sorted(set(types) - {SLIDING, FULL})
        if unknown or len(types) != layers:
            raise unsupported(
                "layer_types", types,
                f"moekit reads one of {SLIDING!r} or {FULL!r} per layer ({layers} layers)",
            )  # fmt: skip
        sliding = [i for i, kind in enumerate(types) if kind == SLIDING]
        window: Any = hf.get("sliding_window")
        if sliding and window is None:
            raise unsupported("sliding_window", None, f"layer_types has {SLIDING!r} layers")
        ours["attention.sliding_window"] = int(window) if sliding else None
        ours["attention.sliding_layers"] = sliding if sliding else None

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        a = cfg.attention
        hf["layer_types"] = [
            SLIDING if a.is_sliding_layer(i) else FULL for i in range(cfg.num_layers)
        ]
        # No sliding layer: any window is unused; the context length hides nothing.
        hf["sliding_window"] = a.sliding_window or cfg.max_seq_len


def _mxfp4(hf: HFConfig) -> bool:
    q = hf.get("quantization_config") or {}
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


@dataclass(frozen=True)
class GateUp(Spec):
    """moekit's (gate, up) pair as one transformers tensor with gate and up interleaved along
    the last dimension: weights (E, D, 2F) from (E, F, D) each (`transposed`), or biases
    (E, 2F) from (E, F) each. An MXFP4 checkpoint stores the weight as `theirs`_blocks and
    `theirs`_scales of rows (E, 2F, D), interleaved the same way."""

    theirs: str
    transposed: bool

    def bind(self, ours: tuple[str, ...], layer: int | None, ctx: Binding) -> TensorMap:
        name = at_layer(self.theirs, layer)
        t = self.transposed

        def split(both: Tensor) -> list[Tensor]:  # (E, 2F, ...) -> gate, up (E, F, ...)
            return [both[:, 0::2].contiguous(), both[:, 1::2].contiguous()]

        def to_theirs(ts: list[Tensor]) -> list[Tensor]:
            both = torch.stack(ts, dim=2).flatten(1, 2)  # (E, 2F, ...): rows g0 u0 g1 u1 ...
            return [both.transpose(1, 2).contiguous() if t else both]

        if t and _mxfp4(ctx.hf):
            quantised = (f"{name}_blocks", f"{name}_scales")
            return TensorMap(ours, quantised, lambda ts: split(_dequantized(ts, name)), to_theirs)
        return TensorMap(
            ours, (name,), lambda ts: split(ts[0].transpose(1, 2) if t else ts[0]), to_theirs
        )


@dataclass(frozen=True)
class Down(Spec):
    """moekit's w_down (E, D, F) as transformers' down_proj (E, F, D), or in an MXFP4
    checkpoint as `theirs`_blocks / _scales of rows (E, D, F)."""

    theirs: str

    def bind(self, ours: tuple[str, ...], layer: int | None, ctx: Binding) -> TensorMap:
        name = at_layer(self.theirs, layer)

        def flip(ts: list[Tensor]) -> list[Tensor]:
            return [ts[0].transpose(1, 2).contiguous()]

        if _mxfp4(ctx.hf):
            quantised = (f"{name}_blocks", f"{name}_scales")
            return TensorMap(ours, quantised, lambda ts: [_dequantized(ts, name)], flip)
        return TensorMap(ours, (name,), flip, flip)


def _dequantized(ts: list[Tensor], name: str) -> Tensor:
    """MXFP4 blocks and scales as a bfloat16 weight, rows as stored (every MXFP4 value is
    exact in bf16)."""
    return mxfp4.dequantize(ts[0], ts[1], name).to(torch.bfloat16)


CONFIG = (
    *DECODER_FIELDS,
    HeadDim(),
    LayerTypes(),
    # No dense layers: one hidden size serves the experts (and the unused dense default).
    Field("intermediate_size", ("moe.expert_hidden", "ffn_hidden")),
    Field("num_local_experts", "moe.num_experts", aliases=("num_experts",)),
    Field("num_experts_per_tok", "moe.top_k"),
    Field("router_aux_loss_coef", "moe.aux_loss_weight", default=0.001, cast=float),
    Field("swiglu_alpha", "swiglu_alpha", default=1.702, cast=float),
    Field("swiglu_limit", "swiglu_limit", default=7.0, cast=float),
    Field("attention_bias", ("attention.qkv_bias", "attention.o_bias"), default=True, cast=bool),
    Check(
        "gpt-oss gives all of q/k/v/o a bias or none (qkv_bias must equal o_bias)",
        lambda cfg: cfg.attention.qkv_bias == cfg.attention.o_bias,
        ("attention.qkv_bias", "attention.o_bias"),
    ),
    Only(
        "quantization_config",
        lambda value, hf: value is None or _mxfp4(hf),
        "the only quantisation moekit reads from gpt-oss checkpoints is MXFP4 experts",
    ),
    Const("output_router_logits", False),
    Fixed(
        {"moe.router": "topk", "moe.score_func": "softmax", "moe.norm_topk_prob": True},
        "gpt-oss routes by softmax over the top-k logits (renormalised softmax top-k)",
    ),
    Fixed(
        {"moe.router_bias": True, "moe.expert_bias": True},
        "gpt-oss routers and experts have biases (router_bias and expert_bias must be true)",
    ),
    Fixed({"moe.num_shared_experts": 0}, "gpt-oss has no shared experts"),
    Fixed(
        {"moe.first_dense_layers": 0, "moe.layer_step": 1, "moe.dense_layers": None},
        "every gpt-oss layer is an MoE layer",
    ),
    dropless("gpt-oss"),
    plain_routing("gpt-oss"),
    Fixed(
        {"attention.kind": "gqa", "attention.qk_norm": "none", "attention.sinks": True},
        "gpt-oss attention is grouped-query attention with sinks and no q/k norms",
    ),
    Fixed(
        {"activation": "clamped_swiglu"},
        "gpt-oss experts use the clamped SwiGLU (activation='clamped_swiglu')",
    ),
)

_EXPERTS = f"{LAYER}.mlp.experts"
_OURS = "layers.{i}.ffn.experts"

WEIGHTS = {
    **DECODER,
    **GQA,
    "layers.{i}.attn.wo.bias": f"{LAYER}.self_attn.o_proj.bias",
    "layers.{i}.attn.sinks": f"{LAYER}.self_attn.sinks",
    "layers.{i}.ffn.router.weight": f"{LAYER}.mlp.router.weight",
    "layers.{i}.ffn.router.bias": f"{LAYER}.mlp.router.bias",
    (f"{_OURS}.w_gate", f"{_OURS}.w_up"): GateUp(f"{_EXPERTS}.gate_up_proj", transposed=True),
    (f"{_OURS}.b_gate", f"{_OURS}.b_up"): GateUp(f"{_EXPERTS}.gate_up_proj_bias", transposed=False),
    f"{_OURS}.w_down": Down(f"{_EXPERTS}.down_proj"),
    f"{_OURS}.b_down": f"{_EXPERTS}.down_proj_bias",
}

ARCH = Architecture(
    name="GptOssForCausalLM",
    model_type="gpt_oss",
    label="gpt-oss",
    config=CONFIG,
    weights=WEIGHTS,
    live_weights=WEIGHTS,  # transformers holds them as its checkpoints store them
)
