"""GGUF architectures: how a moekit model is laid out in a GGUF file that llama.cpp runs.

Each `GgufArch` pairs a llama.cpp architecture ("llama", "qwen2moe", ...) with the Hugging Face
architecture of the same family (moekit.interop.hf): the model's hyperparameters travel as
that architecture's config.json fields, renamed to GGUF metadata keys, so import and export
reuse its config table (and refuse what it refuses). Tensor names come from the `gguf`
package's own naming table (`gguf.TENSOR_NAMES`, the one llama.cpp's converter writes), in a
weight table like the Hugging Face ones (moekit.interop.tensors), so `bind` maps exactly the
tensors a model has.

What llama.cpp computes differently from the Hugging Face architecture is stated here and
refused by name: its graphs fix whether the chosen experts' weights are renormalised (llama and
qwen3moe do, qwen2moe and olmoe do not), and its "llama" graph rotates interleaved pairs, so
the query and key rows are permuted on the way out (`Interleaved`) and back on the way in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from moekit.config import ModelConfig
from moekit.interop import gpt_oss, mixtral, olmoe, qwen_moe
from moekit.interop.architecture import Architecture
from moekit.interop.fields import UnsupportedError
from moekit.interop.gguf_rope import rope_problems
from moekit.interop.tensors import Binding, Spec, TensorMap, Weights, at_layer

# ---- tensor names ------------------------------------------------------------------------------


def tensor(kind: str, suffix: str = "weight") -> str:
    """The GGUF name of tensor `kind` (a `gguf.MODEL_TENSOR` member name), with `{i}` for the
    layer, e.g. tensor("ATTN_Q") == "blk.{i}.attn_q.weight"."""
    import gguf

    return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]].replace("{bid}", "{i}") + f".{suffix}"


def _interleave(w: Tensor, heads: int) -> Tensor:
    """Rows of each head from rotate-half order (x0..x_{n/2-1}, x_{n/2}..) to interleaved pairs
    (x0, x_{n/2}, x1, ...): the layout llama.cpp's "llama" graph rotates."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def _deinterleave(w: Tensor, heads: int) -> Tensor:
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


@dataclass(frozen=True)
class Interleaved(Spec):
    """A query or key projection (or its bias) stored with each head's rows interleaved, as
    llama.cpp's converter writes them for the "llama" architecture; `kv` says which head
    count applies (the key/value heads for keys)."""

    theirs: str
    kv: bool

    def bind(self, ours: tuple[str, ...], layer: int | None, ctx: Binding) -> TensorMap:
        heads = ctx.cfg.kv_heads if self.kv else ctx.cfg.num_heads
        return TensorMap(
            ours,
            (at_layer(self.theirs, layer),),
            lambda ts: [_deinterleave(ts[0], heads).contiguous()],
            lambda ts: [_interleave(ts[0], heads).contiguous()],
        )


def moe_weights() -> Weights:
    """Embeddings, norms, the router and the routed experts: every architecture here."""
    return {
        "embed.weight": tensor("TOKEN_EMBD"),
        "norm.weight": tensor("OUTPUT_NORM"),
        "lm_head.weight": tensor("OUTPUT"),
        "layers.{i}.attn_norm.weight": tensor("ATTN_NORM"),
        "layers.{i}.ffn_norm.weight": tensor("FFN_NORM"),
        "layers.{i}.ffn.router.weight": tensor("FFN_GATE_INP"),
        # Stacked [E, F, D] and [E, D, F], as llama.cpp's converter stacks the experts.
        "layers.{i}.ffn.experts.w_gate": tensor("FFN_GATE_EXP"),
        "layers.{i}.ffn.experts.w_up": tensor("FFN_UP_EXP"),
        "layers.{i}.ffn.experts.w_down": tensor("FFN_DOWN_EXP"),
    }


def shared_expert_weights() -> Weights:
    """Shared experts (one dense MLP every token passes through)."""
    return {
        "layers.{i}.ffn.shared.w_gate.weight": tensor("FFN_GATE_SHEXP"),
        "layers.{i}.ffn.shared.w_up.weight": tensor("FFN_UP_SHEXP"),
        "layers.{i}.ffn.shared.w_down.weight": tensor("FFN_DOWN_SHEXP"),
    }


def _common() -> Weights:
    """`moe_weights` and grouped-query attention (q/k/v/o, biases, q/k norms)."""
    table: Weights = {
        **moe_weights(),
        "layers.{i}.attn.wo.weight": tensor("ATTN_OUT"),
        "layers.{i}.attn.q_norm.weight": tensor("ATTN_Q_NORM"),
        "layers.{i}.attn.k_norm.weight": tensor("ATTN_K_NORM"),
    }
    for p, kind in (("q", "ATTN_Q"), ("k", "ATTN_K"), ("v", "ATTN_V")):
        table[f"layers.{{i}}.attn.w{p}.weight"] = tensor(kind)
        table[f"layers.{{i}}.attn.w{p}.bias"] = tensor(kind, "bias")
    return table


def _llama_weights() -> Weights:
    table = _common()
    for p, kind, kv in (("q", "ATTN_Q", False), ("k", "ATTN_K", True)):
        table[f"layers.{{i}}.attn.w{p}.weight"] = Interleaved(tensor(kind), kv)
        table[f"layers.{{i}}.attn.w{p}.bias"] = Interleaved(tensor(kind, "bias"), kv)
    return table


def _shared_expert_weights() -> Weights:
    return {
        **_common(),
        **shared_expert_weights(),
        "layers.{i}.ffn.shared_gate.weight": tensor("FFN_GATE_INP_SHEXP"),
    }


# ---- metadata ----------------------------------------------------------------------------------

# GGUF metadata key (with `{arch}`) -> the config.json field it carries, for every architecture.
COMMON_KEYS: dict[str, str] = {
    "{arch}.context_length": "max_position_embeddings",
    "{arch}.embedding_length": "hidden_size",
    "{arch}.block_count": "num_hidden_layers",
    "{arch}.feed_forward_length": "intermediate_size",
    "{arch}.attention.head_count": "num_attention_heads",
    "{arch}.attention.head_count_kv": "num_key_value_heads",
    "{arch}.rope.freq_base": "rope_theta",
    "{arch}.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "{arch}.expert_used_count": "num_experts_per_tok",
}


def _nothing(_: Any) -> dict[str, Any]:
    return {}


def _no_problems(_: ModelConfig) -> list[str]:
    return []


@dataclass(frozen=True)
class GgufArch:
    """One llama.cpp architecture: `name` as GGUF's general.architecture says it, the Hugging
    Face architecture `hf` whose config fields carry the hyperparameters, the metadata `keys`
    beyond `COMMON_KEYS` (GGUF key -> config field), the weight table, and what llama.cpp's
    graph fixes: `norm_topk_prob` (whether the chosen weights are renormalised; None: the
    file states it), `leading_dense` (dense layers allowed, first ones only)."""

    name: str
    hf: Architecture
    keys: dict[str, str]
    weights: Weights
    norm_topk_prob: bool | None
    # config.json fields the file does not state (llama.cpp's graph fixes them), on import.
    implied: dict[str, Any] = field(default_factory=dict)
    # config.json fields read from which tensors the file holds, on import.
    from_tensors: Callable[[set[str]], dict[str, Any]] = _nothing
    leading_dense: bool = False
    # Dense layers allowed between MoE layers placed by a step (`more_problems` checks it).
    stepped_dense: bool = False
    # Metadata computed from the config (keys with `{arch}`), on export; and config.json
    # fields computed from the metadata (keys with the architecture's name), on import.
    meta_of: Callable[[ModelConfig], dict[str, Any]] = _nothing
    hf_of: Callable[[dict[str, Any]], dict[str, Any]] = _nothing
    # Whether a file of this `name` is this architecture (several share one name).
    accepts: Callable[[dict[str, Any]], bool] = lambda meta: True
    more_problems: Callable[[ModelConfig], list[str]] = _no_problems
    # What `more_problems` requires, in words (`moekit convert --list`).
    notes: tuple[str, ...] = ()

    def all_keys(self) -> dict[str, str]:
        return {k.replace("{arch}", self.name): v for k, v in {**COMMON_KEYS, **self.keys}.items()}

    def problems(self, cfg: ModelConfig) -> list[str]:
        """What keeps llama.cpp's graph for this architecture from computing `cfg` exactly."""
        found = self.hf.problems(cfg)
        if found or cfg.moe is None:
            return found
        norm = self.norm_topk_prob
        if norm is not None and cfg.moe.norm_topk_prob != norm:
            state = "renormalises" if norm else "does not renormalise"
            found.append(
                f"llama.cpp's {self.name} graph {state} the chosen experts' weights "
                f"(norm_topk_prob must be {str(norm).lower()})"
            )
        if cfg.dense_layer_indices and not (self.leading_dense or self.stepped_dense):
            found.append(f"llama.cpp's {self.name} graph has no dense layers")
        found += self.more_problems(cfg)
        found += rope_problems(cfg, self.name)
        return found


def _qwen2_from_tensors(names: set[str]) -> dict[str, Any]:
    return {"qkv_bias": "blk.0.attn_q.bias" in names}


# ---- gpt-oss -----------------------------------------------------------------------------------


def _gpt_oss_weights() -> Weights:
    """Grouped-query attention with q/k/v/o biases and a sink logit per head, the router's
    bias and the experts' biases; the norm before the experts is llama.cpp's post-attention
    norm (`post_attention_norm`)."""
    table = {
        k: v for k, v in _common().items() if ".attn.q_norm" not in k and ".attn.k_norm" not in k
    }
    table |= {
        "layers.{i}.ffn_norm.weight": tensor("ATTN_POST_NORM"),
        "layers.{i}.attn.wo.bias": tensor("ATTN_OUT", "bias"),
        "layers.{i}.attn.sinks": tensor("ATTN_SINKS"),
        "layers.{i}.ffn.router.bias": tensor("FFN_GATE_INP", "bias"),
        "layers.{i}.ffn.experts.b_gate": tensor("FFN_GATE_EXP", "bias"),  # [E, F]
        "layers.{i}.ffn.experts.b_up": tensor("FFN_UP_EXP", "bias"),
        "layers.{i}.ffn.experts.b_down": tensor("FFN_DOWN_EXP", "bias"),  # [E, D]
    }
    return table


def periodic_sliding(layers: int, n: int) -> list[bool]:
    """llama.cpp's sliding-window layers for a period n: every layer but the last of each n
    (0: every layer). gpt-oss's default is 2 (the even layers), llama4's 4."""
    return [n == 0 or i % n < n - 1 for i in range(layers)]


def _gpt_oss_meta(cfg: ModelConfig) -> dict[str, Any]:
    """The sliding layers as a per-layer list, when they are not llama.cpp's default. A model
    without sliding layers keeps the default layout with a window as wide as its context,
    which hides nothing (llama.cpp's gpt-oss graph cannot run without sliding layers)."""
    sliding = [cfg.attention.is_sliding_layer(i) for i in range(cfg.num_layers)]
    if not any(sliding):  # whatever window the config states, none of its layers uses it
        return {"{arch}.attention.sliding_window": cfg.max_seq_len}
    if sliding == periodic_sliding(cfg.num_layers, 2):
        return {}
    return {"{arch}.attention.sliding_window_pattern": sliding}


def sliding_layers(meta: dict[str, Any], arch: str, period: int) -> list[bool]:
    """Which layers llama.cpp gives sliding-window (or chunked) attention: the file's
    `attention.sliding_window_pattern` (a per-layer list, or a period n whose last layer of
    each n is full attention; 0: every layer), else the architecture's default `period`."""
    layers = int(meta[f"{arch}.block_count"])
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", period)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise UnsupportedError(
                f"GGUF metadata {arch}.attention.sliding_window_pattern has {len(pattern)} "
                f"entries for {layers} layers"
            )
        return [bool(x) for x in pattern]
    return periodic_sliding(layers, int(pattern))


def refuse_swa_rope_base(meta: dict[str, Any], arch: str) -> None:
    """A separate RoPE base for the sliding-window layers (`rope.freq_base_swa`), which moekit
    does not have, is refused unless it equals the other layers'."""
    swa, base = meta.get(f"{arch}.rope.freq_base_swa"), meta.get(f"{arch}.rope.freq_base")
    if swa is not None and swa != base:
        raise UnsupportedError(
            f"GGUF metadata {arch}.rope.freq_base_swa={swa} is not supported: moekit uses one "
            f"RoPE base ({arch}.rope.freq_base={base}) for every layer"
        )


def _gpt_oss_hf(meta: dict[str, Any]) -> dict[str, Any]:
    """`layer_types` from the sliding-window pattern (llama.cpp's default: even layers); a
    window as wide as the context hides nothing, and comes back as full attention."""
    refuse_swa_rope_base(meta, "gpt-oss")
    sliding = sliding_layers(meta, "gpt-oss", period=2)
    window, context = (
        meta.get(f"gpt-oss.{k}") for k in ("attention.sliding_window", "context_length")
    )
    if window is not None and context is not None and window >= context:
        sliding = [False] * len(sliding)
    return {"layer_types": [gpt_oss.SLIDING if s else gpt_oss.FULL for s in sliding]}


def _gpt_oss_problems(cfg: ModelConfig) -> list[str]:
    found = []
    if (cfg.swiglu_alpha, cfg.swiglu_limit) != (1.702, 7.0):
        found.append(
            "llama.cpp's gpt-oss graph fixes the clamped SwiGLU at swiglu_alpha 1.702 and "
            f"swiglu_limit 7 (not {cfg.swiglu_alpha:g} and {cfg.swiglu_limit:g})"
        )
    if not cfg.attention.o_bias:
        found.append("llama.cpp's gpt-oss graph needs attention biases (o_bias must be true)")
    if cfg.tie_embeddings:
        found.append(
            "llama.cpp's gpt-oss graph needs an output head of its own (tie_embeddings must "
            "be false)"
        )
    return found


GPT_OSS = GgufArch(
    name="gpt-oss",
    hf=gpt_oss.ARCH,
    keys={
        "{arch}.expert_count": "num_local_experts",
        "{arch}.expert_feed_forward_length": "intermediate_size",
        "{arch}.attention.key_length": "head_dim",
        "{arch}.attention.value_length": "head_dim",
        "{arch}.attention.sliding_window": "sliding_window",
    },
    weights=_gpt_oss_weights(),
    norm_topk_prob=True,
    from_tensors=lambda names: {"attention_bias": "blk.0.attn_output.bias" in names},
    meta_of=_gpt_oss_meta,
    hf_of=_gpt_oss_hf,
    more_problems=_gpt_oss_problems,
    notes=(
        "the clamped SwiGLU's swiglu_alpha 1.702 and swiglu_limit 7",
        "attention biases and an output head of its own",
    ),
)


GGUF_ARCHITECTURES: tuple[GgufArch, ...] = (
    GgufArch(
        name="llama",
        hf=mixtral.ARCH,
        keys={
            "{arch}.expert_count": "num_local_experts",
            "{arch}.vocab_size": "vocab_size",
            "{arch}.rope.dimension_count": "head_dim",
            "{arch}.attention.key_length": "head_dim",
            "{arch}.attention.value_length": "head_dim",
        },
        weights=_llama_weights(),
        norm_topk_prob=True,
    ),
    GgufArch(
        name="qwen3moe",
        hf=qwen_moe.QWEN3_MOE,
        keys={
            "{arch}.expert_count": "num_experts",
            "{arch}.expert_feed_forward_length": "moe_intermediate_size",
            "{arch}.attention.key_length": "head_dim",
            "{arch}.attention.value_length": "head_dim",
        },
        weights=_common(),
        norm_topk_prob=True,
        implied={"norm_topk_prob": True},
    ),
    GgufArch(
        name="olmoe",
        hf=olmoe.ARCH,
        keys={"{arch}.expert_count": "num_experts"},
        weights=_common(),
        norm_topk_prob=False,
        implied={"norm_topk_prob": False},
    ),
    GgufArch(
        name="qwen2moe",
        hf=qwen_moe.QWEN2_MOE,
        keys={
            "{arch}.expert_count": "num_experts",
            "{arch}.expert_feed_forward_length": "moe_intermediate_size",
            "{arch}.expert_shared_feed_forward_length": "shared_expert_intermediate_size",
            "{arch}.attention.key_length": "head_dim",
            "{arch}.attention.value_length": "head_dim",
        },
        weights=_shared_expert_weights(),
        norm_topk_prob=False,
        implied={"norm_topk_prob": False},
        from_tensors=_qwen2_from_tensors,
    ),
)
