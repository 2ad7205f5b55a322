"""Llama 4 text models in GGUF: llama.cpp's "llama4" architecture.

Tensors are stored as llama.cpp's converter stores a Llama 4 checkpoint: each head's query
and key rows in adjacent-pair RoPE order (the checkpoint's own, so moekit's rotate-half rows
are interleaved on the way out), the stacked experts split into gate and up, the shared
expert and the dense layers' MLPs under their own names.

llama.cpp's graph fixes much of Llama 4's attention: NoPE layers exactly every fourth layer
(3, 7, ...), chunked attention on the others in chunks of 8192 positions, query temperature
tuning on the NoPE layers with floor scale 8192 and scale 0.1, weightless L2 q/k norms on the
RoPE layers unless the model has 128 experts (Maverick's shape, which has none), and MoE
layers every `interleave_moe_layer_step`-th layer. A model computed differently within its
own context length is refused by name: llama.cpp's chunks first act at position 8192 and its
temperature at position 8191, so a model whose context is at most 8192 (chunks) or 8191
(temperature) positions long may state other values for them.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop import llama4
from moekit.interop.fields import UnsupportedError
from moekit.interop.gguf_arch import (
    GgufArch,
    Interleaved,
    moe_weights,
    periodic_sliding,
    refuse_swa_rope_base,
    shared_expert_weights,
    sliding_layers,
    tensor,
)
from moekit.interop.tensors import Weights
from moekit.irope import every_nth_nope

CHUNK = 8192  # llama.cpp's chunk size for chunked attention, and the temperature floor scale
ATTN_SCALE = 0.1
NOPE_INTERVAL = 4
QK_NORM_OFF_EXPERTS = 128  # llama.cpp turns the q/k norms off for exactly this expert count


def _weights() -> Weights:
    table: Weights = {
        **moe_weights(),
        **shared_expert_weights(),
        "layers.{i}.attn.wq.weight": Interleaved(tensor("ATTN_Q"), kv=False),
        "layers.{i}.attn.wk.weight": Interleaved(tensor("ATTN_K"), kv=True),
        "layers.{i}.attn.wv.weight": tensor("ATTN_V"),
        "layers.{i}.attn.wo.weight": tensor("ATTN_OUT"),
        "layers.{i}.ffn.w_gate.weight": tensor("FFN_GATE"),  # the dense layers
        "layers.{i}.ffn.w_up.weight": tensor("FFN_UP"),
        "layers.{i}.ffn.w_down.weight": tensor("FFN_DOWN"),
    }
    return table


def moe_step(cfg: ModelConfig) -> int | None:
    """The step s with MoE layers exactly at (i + 1) % s == 0, or None when there is none."""
    moe = set(cfg.moe_layers)
    for step in range(1, cfg.num_layers + 1):
        if moe == {i for i in range(cfg.num_layers) if (i + 1) % step == 0}:
            return step
    return None


def _meta(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "{arch}.interleave_moe_layer_step": moe_step(cfg) or 1,
        "{arch}.rope.dimension_count": cfg.head_dim,
    }


def _hf(meta: dict[str, Any]) -> dict[str, Any]:
    """config.json fields from a llama4 file's metadata: what llama.cpp's graph fixes. A file
    that moves it (no chunked attention, chunked layers other than all but every fourth, a
    RoPE base of their own) is refused by name."""
    if meta.get("llama4.attention.sliding_window") == 0:
        raise UnsupportedError(
            "GGUF metadata llama4.attention.sliding_window=0 is not supported: it turns off "
            "llama.cpp's chunked attention and temperature tuning and makes only the last "
            "layer NoPE, a layout moekit does not read"
        )
    refuse_swa_rope_base(meta, "llama4")
    layers = int(meta["llama4.block_count"])
    chunked = sliding_layers(meta, "llama4", period=NOPE_INTERVAL)
    if chunked != periodic_sliding(layers, NOPE_INTERVAL):
        raise UnsupportedError(
            "GGUF metadata llama4.attention.sliding_window_pattern is not supported: moekit "
            f"chunks attention exactly on the RoPE layers (all but every {NOPE_INTERVAL}th)"
        )
    experts = meta.get("llama4.expert_count")
    return {
        "interleave_moe_layer_step": meta.get("llama4.interleave_moe_layer_step", 1),
        "no_rope_layer_interval": NOPE_INTERVAL,
        "attention_chunk_size": CHUNK,
        "attn_temperature_tuning": True,
        "floor_scale": CHUNK,
        "attn_scale": ATTN_SCALE,
        "use_qk_norm": experts != QK_NORM_OFF_EXPERTS,
    }


def _temperature_matches(cfg: ModelConfig) -> bool:
    """Whether moekit's query temperature equals llama.cpp's at every position below the
    context length (llama.cpp's is 1 below position 8191)."""
    irope = cfg.irope
    assert irope is not None
    if (irope.temperature_tuning, irope.floor_scale, irope.attn_scale) == (True, CHUNK, 0.1):
        return True
    ours_is_one = not irope.temperature_tuning or irope.attn_scale == 0
    ours_is_one = ours_is_one or cfg.max_seq_len < irope.floor_scale
    return cfg.max_seq_len < CHUNK and ours_is_one


def _problems(cfg: ModelConfig) -> list[str]:
    found = []
    if moe_step(cfg) is None:
        found.append(
            "llama.cpp's llama4 graph places MoE layers every interleave_moe_layer_step-th "
            f"layer (not at layers {cfg.moe_layers})"
        )
    irope = cfg.irope
    nope = every_nth_nope(cfg.num_layers, NOPE_INTERVAL)
    if irope is None or irope.nope_layers != nope:
        found.append(
            f"llama.cpp's llama4 graph has NoPE layers exactly every {NOPE_INTERVAL}th layer "
            f"({nope}; this model: {irope.nope_layers if irope else []})"
        )
        return found
    chunk = irope.chunk_size
    if chunk != CHUNK and not (cfg.max_seq_len <= CHUNK and (chunk or CHUNK) >= cfg.max_seq_len):
        found.append(
            f"llama.cpp's llama4 graph chunks attention by {CHUNK} positions (chunk_size "
            f"{chunk} acts within this model's context of {cfg.max_seq_len})"
        )
    if not _temperature_matches(cfg):
        found.append(
            f"llama.cpp's llama4 graph tunes the NoPE layers' query temperature with floor "
            f"scale {CHUNK} and scale {ATTN_SCALE} (not temperature_tuning="
            f"{irope.temperature_tuning}, floor_scale={irope.floor_scale}, "
            f"attn_scale={irope.attn_scale})"
        )
    experts = cfg.moe.num_experts if cfg.moe else 0
    norms = experts != QK_NORM_OFF_EXPERTS
    if irope.qk_l2_norm != norms:
        found.append(
            f"llama.cpp's llama4 graph uses L2 q/k norms exactly when there are not "
            f"{QK_NORM_OFF_EXPERTS} experts (qk_l2_norm must be {str(norms).lower()})"
        )
    return found


LLAMA4 = GgufArch(
    name="llama4",
    hf=llama4.ARCH,
    keys={
        "{arch}.vocab_size": "vocab_size",
        "{arch}.feed_forward_length": "intermediate_size_mlp",  # the dense layers' width
        "{arch}.expert_count": "num_local_experts",
        "{arch}.expert_feed_forward_length": "intermediate_size",
        "{arch}.attention.key_length": "head_dim",
        "{arch}.attention.value_length": "head_dim",
    },
    weights=_weights(),
    norm_topk_prob=None,  # Llama 4 fixes it (sigmoid weights, not renormalised)
    stepped_dense=True,
    meta_of=_meta,
    hf_of=_hf,
    more_problems=_problems,
    notes=(
        f"NoPE layers every {NOPE_INTERVAL}th layer",
        f"chunks of {CHUNK} and temperature tuning (floor scale {CHUNK}, scale {ATTN_SCALE}) "
        f"as Llama 4 states them, or a context shorter than {CHUNK}",
        f"L2 q/k norms unless there are {QK_NORM_OFF_EXPERTS} experts",
    ),
)
