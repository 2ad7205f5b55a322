"""Llama 4 text models (Llama4ForCausalLM, model_type "llama4_text": Scout and Maverick).

Sigmoid top-k routing whose weight scales each chosen expert's input, one shared expert as
wide as the routed ones, MoE layers placed by `moe_layers` / `interleave_moe_layer_step` with
dense layers of their own width (`intermediate_size_mlp`), and interleaved RoPE / NoPE
attention (`ModelConfig.irope`): NoPE layers by `no_rope_layers` (or every
`no_rope_layer_interval`-th layer), chunked attention on the RoPE layers, query temperature
tuning on the NoPE layers, and weightless L2 q/k norms on the RoPE layers (`use_qk_norm`).

transformers rotates adjacent pairs of each head's dimensions (complex multiplication);
moekit rotates halves, so each head's query and key rows are reordered (evens, then odds)
on import and back on export: attention scores are unchanged. Checkpoints store the experts
as transformers holds them: `feed_forward.experts.gate_up_proj` (E, D, 2F), gate then up,
and `down_proj` (E, F, D), both input-major.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.interop.architecture import Architecture
from moekit.interop.fields import (
    DECODER_FIELDS,
    NO_ATTENTION_BIAS,
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
    placed_by_step,
    placement,
    plain_routing,
    swiglu,
    unsupported,
)
from moekit.interop.tensors import (
    DECODER,
    GQA,
    LAYER,
    Binding,
    Spec,
    TensorMap,
    Weights,
    at_layer,
    mlp,
)
from moekit.irope import every_nth_nope


def _layer_list(hf: HFConfig, name: str) -> list[int] | None:
    value = hf.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise unsupported(name, value, "it must be a list of integers")
    return value


class Placement(Entry):
    """Which layers are MoE: `moe_layers` (a list), else every `interleave_moe_layer_step`-th
    layer (layer i is MoE when `(i + 1) % step == 0`, moekit's `layer_step`). Export writes
    both: the step when that is the layout (else 1), and the list."""

    def hf_names(self) -> tuple[str, ...]:
        return ("moe_layers", "interleave_moe_layer_step")

    def ours_paths(self) -> tuple[str, ...]:
        return ("moe.first_dense_layers", "moe.layer_step", "moe.dense_layers")

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        layers = int(hf_value(hf, "num_hidden_layers"))
        step = int(hf.get("interleave_moe_layer_step") or 1)
        listed = _layer_list(hf, "moe_layers")
        if listed is not None and not all(0 <= i < layers for i in listed):
            raise unsupported("moe_layers", listed, f"it must list layer indices below {layers}")
        if listed is None:
            dense = [i for i in range(layers) if (i + 1) % step]
        else:
            dense = [i for i in range(layers) if i not in listed]
        ours.update(placement(dense, layers, step))

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        assert cfg.moe is not None
        hf["interleave_moe_layer_step"] = cfg.moe.layer_step if placed_by_step(cfg) else 1
        hf["moe_layers"] = cfg.moe_layers


_IROPE_HF = (
    "no_rope_layers", "no_rope_layer_interval", "attention_chunk_size", "layer_types",
    "attn_temperature_tuning", "floor_scale", "attn_scale", "use_qk_norm",
)  # fmt: skip


class InterleavedRoPE(Entry):
    """Llama 4's attention settings as `ModelConfig.irope`. transformers' defaults apply to
    absent fields (a NoPE layer every 4th, chunks of 8192, temperature tuning and q/k norms
    on). `layer_types`, when stated, must be what the other settings imply (chunked attention
    exactly on the RoPE layers)."""

    def hf_names(self) -> tuple[str, ...]:
        return _IROPE_HF

    def ours_paths(self) -> tuple[str, ...]:
        return ("irope",)

    def limits(self) -> list[str]:
        return ["layer_types: only chunked attention on the RoPE layers (as transformers sets)"]

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        layers = int(hf_value(hf, "num_hidden_layers"))
        flags = _layer_list(hf, "no_rope_layers")
        if not flags:  # transformers: absent or empty means "every interval-th layer"
            interval = int(hf.get("no_rope_layer_interval") or 4)
            nope = every_nth_nope(layers, interval)
        elif len(flags) < layers or any(f not in (0, 1) for f in flags[:layers]):
            raise unsupported(
                "no_rope_layers", flags, f"it must hold a 1 (RoPE) or 0 (NoPE) for each of the "
                f"{layers} layers",
            )  # fmt: skip
        else:
            nope = [i for i in range(layers) if not flags[i]]
        chunk = hf.get("attention_chunk_size", 8192)
        implied = [
            "chunked_attention" if i not in nope and chunk is not None else "full_attention"
            for i in range(layers)
        ]
        stated = hf.get("layer_types")
        if stated is not None and list(stated)[:layers] != implied:
            raise unsupported(
                "layer_types", stated,
                "moekit chunks attention exactly on the RoPE layers, which here would be "
                f"{implied}",
            )  # fmt: skip
        irope = {
            "nope_layers": nope,
            "chunk_size": None if chunk is None else int(chunk),
            "temperature_tuning": bool(hf.get("attn_temperature_tuning", True)),
            "floor_scale": int(hf.get("floor_scale") or 8192),
            "attn_scale": float(hf.get("attn_scale", 0.1)),
            "qk_l2_norm": bool(hf.get("use_qk_norm", True)),
        }
        # Without NoPE layers, chunks or q/k norms (the temperature only acts on NoPE layers)
        # this is plain attention.
        plain = not nope and chunk is None and not irope["qk_l2_norm"]
        ours["irope"] = None if plain else irope

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        irope, layers = cfg.irope, cfg.num_layers
        nope = irope.nope_layers if irope else []
        chunk = irope.chunk_size if irope else None
        hf["no_rope_layers"] = [0 if i in nope else 1 for i in range(layers)]
        hf["no_rope_layer_interval"] = 4  # unused beside an explicit list
        hf["attention_chunk_size"] = chunk
        hf["layer_types"] = [
            "chunked_attention" if i not in nope and chunk is not None else "full_attention"
            for i in range(layers)
        ]
        hf["attn_temperature_tuning"] = bool(irope and irope.temperature_tuning)
        hf["floor_scale"] = irope.floor_scale if irope else 8192
        hf["attn_scale"] = irope.attn_scale if irope else 0.1
        hf["use_qk_norm"] = bool(irope and irope.qk_l2_norm)


def _shared_as_wide(cfg: ModelConfig) -> bool:
    return cfg.moe is not None and cfg.moe.shared_hidden_total == cfg.moe.expert_hidden


CONFIG = (
    *DECODER_FIELDS,
    HeadDim(),
    NO_ATTENTION_BIAS,
    Field("intermediate_size", "moe.expert_hidden"),
    Field("intermediate_size_mlp", "ffn_hidden", default=16384, get=lambda c: c.dense_hidden),
    Field("num_local_experts", "moe.num_experts"),
    Field("num_experts_per_tok", "moe.top_k", default=1),
    Field("router_aux_loss_coef", "moe.aux_loss_weight", default=0.001, cast=float),
    Const("router_jitter_noise", 0.0),  # transformers' Llama 4 router adds no noise
    Const("output_router_logits", False),
    Placement(),
    InterleavedRoPE(),
    Fixed(
        {
            "moe.router": "topk",
            "moe.score_func": "sigmoid",
            "moe.norm_topk_prob": False,
        },
        "Llama 4 routes by sigmoid top-k without renormalisation (router='topk', "
        "score_func='sigmoid', norm_topk_prob=false)",
    ),
    Fixed(
        {"moe.num_shared_experts": 1, "moe.shared_expert_gate": False},
        "Llama 4 has exactly one shared expert, ungated",
    ),
    Check(
        "Llama 4's shared expert is as wide as a routed expert (intermediate_size)",
        _shared_as_wide,
        ("moe.shared_expert_hidden",),
    ),
    dropless("Llama 4", input_weighted=True),
    plain_routing("Llama 4"),
    Fixed(
        {"attention.kind": "gqa", "attention.qk_norm": "none", "attention.qkv_bias": False},
        "Llama 4 attention is grouped-query attention without biases or learned q/k norms",
    ),
    swiglu("Llama 4"),
)


def _pairs_to_halves(hd: int) -> Tensor:
    """Row order taking a head's adjacent-pair layout to the rotate-half one."""
    return torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])


def _reorder_heads(w: Tensor, hd: int, order: Tensor) -> Tensor:
    return w.view(-1, hd, *w.shape[1:])[:, order].reshape(w.shape)


@dataclass(frozen=True)
class PairRows(Spec):
    """A query or key projection: each head's rows in adjacent-pair RoPE order in the
    checkpoint, rotate-half order in moekit."""

    theirs: str

    def bind(self, ours: tuple[str, ...], layer: int | None, ctx: Binding) -> TensorMap:
        hd = ctx.cfg.head_dim
        order = _pairs_to_halves(hd)
        inverse = torch.argsort(order)
        return TensorMap(
            ours,
            (at_layer(self.theirs, layer),),
            lambda ts: [_reorder_heads(ts[0], hd, order)],
            lambda ts: [_reorder_heads(ts[0], hd, inverse)],
        )


@dataclass(frozen=True)
class InputMajorExperts(Spec):
    """Stacked experts stored input-major: gate and up as one (E, D, 2F) tensor, or down as
    (E, F, D); moekit holds (E, F, D) and (E, D, F)."""

    theirs: str

    def bind(self, ours: tuple[str, ...], layer: int | None, ctx: Binding) -> TensorMap:
        sizes = [ctx.shapes[name][1] for name in ours]
        return TensorMap(
            ours,
            (at_layer(self.theirs, layer),),
            lambda ts: [t.contiguous() for t in ts[0].transpose(1, 2).split(sizes, dim=1)],
            lambda ts: [torch.cat(ts, dim=1).transpose(1, 2).contiguous()],
        )


_FF = f"{LAYER}.feed_forward"
_EX = "layers.{i}.ffn.experts"

WEIGHTS: Weights = {
    **DECODER,
    **GQA,
    "layers.{i}.attn.wq.weight": PairRows(f"{LAYER}.self_attn.q_proj.weight"),
    "layers.{i}.attn.wk.weight": PairRows(f"{LAYER}.self_attn.k_proj.weight"),
    **mlp("layers.{i}.ffn", _FF),  # the dense layers
    "layers.{i}.ffn.router.weight": f"{_FF}.router.weight",
    (f"{_EX}.w_gate", f"{_EX}.w_up"): InputMajorExperts(f"{_FF}.experts.gate_up_proj"),
    f"{_EX}.w_down": InputMajorExperts(f"{_FF}.experts.down_proj"),
    **mlp("layers.{i}.ffn.shared", f"{_FF}.shared_expert"),
}

ARCH = Architecture(
    name="Llama4ForCausalLM",
    model_type="llama4_text",
    label="Llama 4",
    config=CONFIG,
    weights=WEIGHTS,
    live_weights=WEIGHTS,  # transformers holds them as its checkpoints store them
)


# ---- the text model of Llama4ForConditionalGeneration ------------------------------------


def _text_config(hf: HFConfig) -> HFConfig:
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise unsupported("text_config", text, "Llama 4's language model is configured there")
    return text


@dataclass(frozen=True)
class InTextConfig(Entry):
    """An entry of the text model's table, read from (and written to) `text_config`."""

    inner: Entry

    def hf_names(self) -> tuple[str, ...]:
        if isinstance(self.inner, Fixed | Check | Const | Only):  # nothing carried
            return ()
        return tuple(f"text_config.{n}" for n in self.inner.hf_names())

    def writes_hf(self) -> bool:
        return self.inner.writes_hf()

    def ours_paths(self) -> tuple[str, ...]:
        return self.inner.ours_paths()

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        self.inner.read(_text_config(hf), ours)

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        self.inner.write(cfg, hf.setdefault("text_config", {}))

    def problems(self, cfg: ModelConfig) -> list[str]:
        return self.inner.problems(cfg)

    def limits(self) -> list[str]:
        return self.inner.limits()


def _in_language_model(table: Weights) -> Weights:
    """`table` with every checkpoint name under `language_model.`."""
    out: Weights = {}
    for ours, theirs in table.items():
        if isinstance(theirs, str):
            out[ours] = f"language_model.{theirs}"
        else:
            assert isinstance(theirs, PairRows | InputMajorExperts)
            out[ours] = replace(theirs, theirs=f"language_model.{theirs.theirs}")
    return out


def _vision(key: str, cfg: ModelConfig) -> bool:
    return key.startswith(("vision_model.", "multi_modal_projector."))


_MULTIMODAL_WEIGHTS = _in_language_model(WEIGHTS)

MULTIMODAL = Architecture(
    name="Llama4ForConditionalGeneration",
    model_type="llama4",
    label="Llama 4 (text model of the multimodal checkpoint)",
    config=(
        *(InTextConfig(e) for e in CONFIG),
        Check(
            "the text model of a multimodal Llama 4 checkpoint is imported alone, and written "
            "as Llama4ForCausalLM (the vision tower is not carried)",
            lambda cfg: False,
            (),
        ),
    ),
    weights=_MULTIMODAL_WEIGHTS,
    live_weights=_MULTIMODAL_WEIGHTS,
    ignore=_vision,
)
