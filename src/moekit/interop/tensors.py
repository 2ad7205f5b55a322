"""Weight tables: where each moekit tensor lives in a Hugging Face checkpoint, and how it is
stored there.

A weight table maps moekit state-dict names to Hugging Face ones. `{i}` stands for a layer
index on both sides, `{e}` for an expert index on the Hugging Face side:

```python
{
    "embed.weight": "model.embed_tokens.weight",                        # a plain copy
    "layers.{i}.ffn.router.weight": "model.layers.{i}.mlp.gate.weight",
    "layers.{i}.ffn.experts.w_gate": PerExpert("model.layers.{i}.mlp.experts.{e}.gate_proj.weight"),
    ("layers.{i}.ffn.experts.w_gate", "layers.{i}.ffn.experts.w_up"):  # two of ours in one
        Fused("model.layers.{i}.mlp.experts.gate_up_proj", dim=1),
}
```

A value is a Hugging Face name (copied as it is) or a `Spec` saying how the tensors are stored:
one per expert (`PerExpert`), several moekit tensors concatenated into one (`Fused`), or
anything an architecture defines itself by subclassing `Spec` (DeepSeek-V3's RoPE rows).

Which entries apply is decided by the model itself: `bind` builds the moekit model of a config
on the meta device (no memory) and maps exactly the tensors it has, so biases, q/k norms,
shared experts, dense layers and the LM head need no conditions in the table. A tensor of the
model that no entry maps is an error, as is an entry that maps only part of its tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.interop.fields import UnsupportedError

Convert = Callable[[list[Tensor]], list[Tensor]]


def _same(ts: list[Tensor]) -> list[Tensor]:
    return ts


@dataclass(frozen=True)
class TensorMap:
    """The moekit tensors `ours` are `to_ours(theirs)`, and the Hugging Face tensors `theirs`
    are `to_theirs(ours)`, each list in the order of the names. `optional`: a checkpoint may
    lack `theirs`, and then `ours` are zeros (DeepSeek-V3's correction bias). `shapes` are the
    shapes the model gives `ours` (filled in by `bind`)."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_ours: Convert = _same
    to_theirs: Convert = _same
    optional: bool = False
    shapes: tuple[torch.Size, ...] = ()


@dataclass(frozen=True)
class Binding:
    """What a Spec may depend on: the moekit config, the Hugging Face config on the other side
    (the checkpoint's on import, the one being written on export) and the shapes of the moekit
    tensors."""

    cfg: ModelConfig
    hf: Mapping[str, Any]
    shapes: Mapping[str, torch.Size]


class Spec:
    """How the moekit tensors of one table entry are stored in a checkpoint."""

    def bind(self, ours: tuple[str, ...], layer: int | None, ctx: Binding) -> TensorMap:
        """The map of the moekit tensors `ours` of layer `layer` (None: not per layer)."""
        raise NotImplementedError


def at_layer(name: str, layer: int | None) -> str:
    """`name` with its `{i}` filled in (names outside the layers have none)."""
    return name if layer is None else name.replace("{i}", str(layer))


@dataclass(frozen=True)
class Copy(Spec):
    """One tensor, the same on both sides. `optional`: a checkpoint may lack it (zeros)."""

    theirs: str
    optional: bool = False

    def bind(self, ours: tuple[str, ...], layer: int | None, ctx: Binding) -> TensorMap:
        return TensorMap(ours, (at_layer(self.theirs, layer),), optional=self.optional)


@dataclass(frozen=True)
class PerExpert(Spec):
    """A stacked [E, ...] moekit tensor stored as one tensor per expert, `theirs` naming the
    expert `{e}`."""

    theirs: str

    def bind(self, ours: tuple[str, ...], layer: int | None, ctx: Binding) -> TensorMap:
        experts = ctx.shapes[ours[0]][0]
        name = at_layer(self.theirs, layer)
        return TensorMap(
            ours,
            tuple(name.replace("{e}", str(e)) for e in range(experts)),
            lambda ts: [torch.stack(ts)],
            lambda ts: [t.contiguous() for t in ts[0].unbind(0)],
        )


@dataclass(frozen=True)
class Fused(Spec):
    """Several moekit tensors concatenated along `dim` into one Hugging Face tensor, in the
    order of the table's key (transformers' fused `gate_up_proj` of stacked experts)."""

    theirs: str
    dim: int

    def bind(self, ours: tuple[str, ...], layer: int | None, ctx: Binding) -> TensorMap:
        sizes = [ctx.shapes[name][self.dim] for name in ours]
        return TensorMap(
            ours,
            (at_layer(self.theirs, layer),),
            lambda ts: [t.contiguous() for t in ts[0].split(sizes, dim=self.dim)],
            lambda ts: [torch.cat(ts, dim=self.dim)],
        )


# Keys are one moekit name or several (a Spec that stores several tensors as one).
WeightTable = Mapping[str | tuple[str, ...], str | Spec]
Weights = dict[str | tuple[str, ...], str | Spec]  # a table being put together


def model_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every tensor of the moekit model `cfg` describes, with its shape, in the model's order
    (built on the meta device: no memory, no initialisation)."""
    from moekit.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: t.shape for name, t in model.state_dict().items()}


def bind(
    table: WeightTable, cfg: ModelConfig, hf: Mapping[str, Any], owner: str
) -> list[TensorMap]:
    """The maps of every tensor of the moekit model `cfg`, by `table`, in the model's order.
    `hf` is the Hugging Face config on the other side; `owner` names the table in errors."""
    shapes = model_shapes(cfg)
    ctx = Binding(cfg, hf, shapes)
    layers = range(cfg.num_layers)
    found: dict[str, TensorMap] = {}
    for key, value in table.items():
        names = (key,) if isinstance(key, str) else key
        spec = Copy(value) if isinstance(value, str) else value
        for layer in layers if "{i}" in names[0] else [None]:
            ours = tuple(at_layer(n, layer) for n in names)
            present = [n in shapes for n in ours]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"{owner}: the model has only some of {', '.join(ours)}")
            m = replace(spec.bind(ours, layer, ctx), shapes=tuple(shapes[n] for n in ours))
            for name in ours:
                if name in found:
                    raise ValueError(f"{owner}: {name} is mapped twice")
                found[name] = m
    unmapped = [n for n in shapes if n not in found]
    if unmapped:
        raise UnsupportedError(f"{owner} has no place for {', '.join(unmapped[:4])}")
    maps: list[TensorMap] = []
    for name in shapes:  # each map once, where its first tensor comes in the model
        if found[name].ours[0] == name:
            maps.append(found[name])
    return maps


# ---- fragments shared by the tables ------------------------------------------------------------

LAYER = "model.layers.{i}"  # where transformers' decoder layers live


def mlp(
    ours: str, theirs: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
) -> Weights:
    """A dense SwiGLU MLP (a dense layer, or shared experts): moekit's w_gate / w_up / w_down
    as `theirs`.{gate,up,down}.weight."""
    gate, up, down = names
    return {
        f"{ours}.w_gate.weight": f"{theirs}.{gate}.weight",
        f"{ours}.w_up.weight": f"{theirs}.{up}.weight",
        f"{ours}.w_down.weight": f"{theirs}.{down}.weight",
    }


def per_expert(
    theirs: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
) -> Weights:
    """The routed experts of a layer stored one by one, `theirs` naming expert `{e}`'s module
    and `names` its (gate, up, down) projections."""
    gate, up, down = names
    ours = "layers.{i}.ffn.experts"
    return {
        f"{ours}.w_gate": PerExpert(f"{theirs}.{gate}.weight"),
        f"{ours}.w_up": PerExpert(f"{theirs}.{up}.weight"),
        f"{ours}.w_down": PerExpert(f"{theirs}.{down}.weight"),
    }


def stacked_experts(theirs: str) -> Weights:
    """The routed experts of a layer as transformers holds them in memory: gate and up stacked
    and fused into `theirs`.gate_up_proj (E, 2F, D), down as `theirs`.down_proj (E, D, F)."""
    ours = "layers.{i}.ffn.experts"
    return {
        (f"{ours}.w_gate", f"{ours}.w_up"): Fused(f"{theirs}.gate_up_proj", dim=1),
        f"{ours}.w_down": f"{theirs}.down_proj",
    }


# Embeddings, the final norm, the LM head (absent when tied) and each layer's two norms.
DECODER: Weights = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": f"{LAYER}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": f"{LAYER}.post_attention_layernorm.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# Grouped-query attention: q/k/v/o, their biases and q/k norms when the model has them.
GQA: Weights = {
    **{f"layers.{{i}}.attn.w{p}.weight": f"{LAYER}.self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"layers.{{i}}.attn.w{p}.bias": f"{LAYER}.self_attn.{p}_proj.bias" for p in "qkv"},
    "layers.{i}.attn.q_norm.weight": f"{LAYER}.self_attn.q_norm.weight",
    "layers.{i}.attn.k_norm.weight": f"{LAYER}.self_attn.k_norm.weight",
}
