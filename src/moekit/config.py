"""Model configuration: keyword-only dataclasses, validated on construction, JSON round-trip.

A `ModelConfig` fully describes a decoder-only language model: its attention (`AttentionConfig`)
and, when some feed-forward layers are Mixture-of-Experts layers, their routing and experts
(`MoEConfig`). Configs hold plain data only (no devices, process groups or modules); pass those
to the function that builds or applies the model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from moekit.files import atomic_write_text
from moekit.hier_config import check_hierarchical
from moekit.irope import IRoPEConfig
from moekit.quant_config import QuantizationConfig
from moekit.rope_scaling import RopeScalingConfig
from moekit.validate import (
    ConfigBase,
    check_choice,
    check_field_types,
    check_non_negative,
    check_positive,
    fail,
)
from moekit.version import __version__

FORMAT_VERSION = 1
FILE_NAME = "config.json"  # its name in a model directory (moekit.model_dir.ModelDir.CONFIG)

ROUTERS = ("topk", "switch", "expert_choice", "hierarchical")
SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
CAPACITY_PRIORITIES = ("weight", "position")
ACTIVATIONS = ("swiglu", "gelu", "clamped_swiglu")
GATED_ACTIVATIONS = ("swiglu", "clamped_swiglu")  # with a gate projection
ATTENTION_KINDS = ("gqa", "mla")
QK_NORMS = ("none", "head", "full")


@dataclass(kw_only=True)
class AttentionConfig(ConfigBase):
    """Self-attention options.

    `kind="gqa"` is grouped-query attention (multi-head when `num_kv_heads == num_heads`,
    multi-query when it is 1). `kind="mla"` is DeepSeek's multi-head latent attention: queries
    optionally through a low-rank bottleneck (`q_lora_rank`), keys and values from a shared
    compressed latent of size `kv_lora_rank`, and a decoupled RoPE part of `qk_rope_head_dim`
    per head shared by all heads for the keys.
    """

    kind: str = "gqa"
    head_dim: int | None = None  # gqa: None means dim // num_heads
    qk_norm: str = "none"  # "head": RMSNorm per head (Qwen3); "full": over all heads (OLMoE)
    qkv_bias: bool = False
    o_bias: bool = False  # a bias on the output projection (gpt-oss)
    # A learned logit per query head added to each softmax's denominator, so a head can put
    # weight on "no key at all" (attention sinks, gpt-oss). gqa only.
    sinks: bool = False
    # Sliding-window attention: a query sees itself and the `sliding_window - 1` keys before
    # it, on the layers `sliding_layers` lists (None: every layer); the others see the whole
    # context. None: no window.
    sliding_window: int | None = None
    sliding_layers: list[int] | None = None
    # Multi-head latent attention (kind="mla") only.
    q_lora_rank: int | None = None  # None: a full-rank query projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        owner = "AttentionConfig"
        check_choice(owner, "kind", self.kind, ATTENTION_KINDS)
        check_choice(owner, "qk_norm", self.qk_norm, QK_NORMS)
        if self.head_dim is not None:
            check_positive(owner, head_dim=self.head_dim)
            if self.head_dim % 2:
                raise fail(owner, "head_dim", self.head_dim, "must be even for RoPE")
        if self.kind == "mla":
            check_positive(
                owner,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
            )
            if self.qk_rope_head_dim % 2:
                raise fail(owner, "qk_rope_head_dim", self.qk_rope_head_dim, "must be even")
            if self.q_lora_rank is not None:
                check_positive(owner, q_lora_rank=self.q_lora_rank)
            if self.qk_norm != "none":
                raise fail(owner, "qk_norm", self.qk_norm, "must be 'none' with kind='mla'")
            if self.head_dim is not None:
                raise fail(
                    owner, "head_dim", self.head_dim,
                    "must be None with kind='mla' (use qk_nope_head_dim, qk_rope_head_dim, "
                    "v_head_dim)",
                )  # fmt: skip
        else:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name):
                    raise fail(owner, name, getattr(self, name), "is only used with kind='mla'")
            if self.q_lora_rank is not None:
                raise fail(owner, "q_lora_rank", self.q_lora_rank, "is only used with kind='mla'")
        self._check_window()

    def _check_window(self) -> None:
        owner = "AttentionConfig"
        if self.kind == "mla":
            for name in ("o_bias", "sinks"):
                if getattr(self, name):
                    raise fail(owner, name, True, "is only used with kind='gqa'")
        if self.sliding_window is not None:
            check_positive(owner, sliding_window=self.sliding_window)
        layers = self.sliding_layers
        if layers is None:
            return
        if self.sliding_window is None:
            raise fail(owner, "sliding_layers", layers, "needs sliding_window")
        if not isinstance(layers, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
        ):
            raise fail(owner, "sliding_layers", layers, "must be a list of layer indices >= 0")
        if len(set(layers)) != len(layers):
            raise fail(owner, "sliding_layers", layers, "lists a layer twice")

    def is_sliding_layer(self, layer: int) -> bool:
        """Whether layer `layer` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.sliding_layers is None or layer in self.sliding_layers


@dataclass(kw_only=True)
class MoEConfig(ConfigBase):
    """Mixture-of-Experts feed-forward options, and which layers use them.

    Routers (`router`):
      - "topk": token choice, each token picks its `top_k` best-scoring experts (Mixtral, Qwen,
        OLMoE with `score_func="softmax"`; DeepSeek-V3 with `score_func="sigmoid"`).
      - "switch": top-1 token choice with capacity (Switch Transformer); requires `top_k=1`.
      - "expert_choice": each expert picks its top-C tokens, C = capacity_factor * T / E, so a
        token gets 0..E experts. Over a batch this lets a token's routing depend on *later*
        tokens, which leaks the future in a causal LM. The causal mode (always used when
        generating and evaluating, and in training with `expert_choice_causal=True`) routes
        each token to its `ceil(capacity_factor)` best-scoring experts instead.
      - "hierarchical": a group router picks `group_top_k` of `router_groups` equal groups of
        experts, a router inside each chosen group picks `top_k // group_top_k` experts; an
        expert's weight is its group's probability times its probability within the group
        (checks in `moekit.hier_config`; see docs/moe-layer.md, "Hierarchical routing").

    Capacity (`capacity_factor`, token choice): each expert keeps at most
    `ceil(capacity_factor * T * top_k / E)` copies of a batch of T tokens; the rest are dropped
    (the token keeps its residual path). `capacity_priority="weight"` drops the lowest-weight
    copies; the choice then depends on the whole batch, later tokens included.
    `capacity_priority="position"` drops the latest tokens' copies, which keeps every token's
    output independent of the tokens after it. Capacity applies in training only: in causal
    routing mode (generation, serving, evaluation) token choice is dropless.

    Layer placement: `dense_layers` lists the layers that keep a dense MLP (any set, e.g.
    `[1]` for a dense layer in the middle, as Qwen's `mlp_only_layers` allows); every other
    layer is an MoE layer. Two shorthands cover the common patterns when `dense_layers` is not
    given: layers `0 .. first_dense_layers-1` are dense, and after them every `layer_step`-th
    layer is an MoE layer (layer i is MoE when `(i - first_dense_layers + 1) % layer_step ==
    0`): `layer_step=2` interleaves dense and MoE layers as Llama 4 Maverick does,
    `first_dense_layers=3` is DeepSeek-V3. `dense_layers` replaces the shorthands, which must
    then keep their defaults.
    """

    num_experts: int
    top_k: int
    expert_hidden: int
    num_shared_experts: int = 0
    shared_expert_hidden: int | None = None  # None: expert_hidden
    shared_expert_gate: bool = False  # a learned sigmoid gate on the shared output (Qwen2-MoE)
    router: str = "topk"
    score_func: str = "softmax"
    norm_topk_prob: bool = True  # renormalise the chosen K weights to sum to 1
    capacity_factor: float | None = None  # None: dropless
    capacity_priority: str = "weight"  # over capacity, drop the lightest or the latest copies
    aux_loss_weight: float = 0.01  # Switch/GShard load-balancing loss
    z_loss_weight: float = 0.0  # router z-loss
    bias_update_rate: float = 0.0  # > 0: aux-loss-free balancing with a selection-only bias
    selection_bias: bool = False  # hold a selection-only bias even without updates (imports)
    num_groups: int = 1  # group-limited routing: experts split into groups ...
    topk_groups: int = 1  # ... and each token picks from its best `topk_groups` groups only
    group_score: str = "top2_sum"  # how a group is scored: its best score, or its best two summed
    router_groups: int = 1  # router="hierarchical": the groups the group router chooses from
    group_top_k: int = 1  # ... how many of them each token takes
    group_aux_loss_weight: float = 0.01  # ... the group-level load-balancing loss
    group_bias_update_rate: float = 0.0  # ... > 0: aux-loss-free balancing of the groups
    routed_scaling_factor: float = 1.0
    router_bias: bool = False  # a learned bias on the router logits (choice and weights; gpt-oss)
    expert_bias: bool = False  # biases on each expert's projections (gpt-oss)
    router_jitter: float = 0.0  # multiplicative input noise in [1-eps, 1+eps] while training
    expert_choice_causal: bool = False
    # The routing weight multiplies each chosen expert's input instead of its output (Llama 4).
    scale_expert_input: bool = False
    first_dense_layers: int = 0
    layer_step: int = 1
    dense_layers: list[int] | None = None  # None: placed by first_dense_layers and layer_step
    backend: str = "auto"  # expert computation backend, see moekit.moe.experts.BACKENDS

    def __post_init__(self) -> None:
        check_field_types(self)
        owner = "MoEConfig"
        check_positive(
            owner, num_experts=self.num_experts, top_k=self.top_k, expert_hidden=self.expert_hidden
        )
        check_non_negative(
            owner,
            num_shared_experts=self.num_shared_experts,
            aux_loss_weight=self.aux_loss_weight,
            z_loss_weight=self.z_loss_weight,
            bias_update_rate=self.bias_update_rate,
            router_jitter=self.router_jitter,
            first_dense_layers=self.first_dense_layers,
        )
        check_positive(
            owner,
            num_groups=self.num_groups,
            topk_groups=self.topk_groups,
            routed_scaling_factor=self.routed_scaling_factor,
            layer_step=self.layer_step,
        )
        check_choice(owner, "router", self.router, ROUTERS)
        check_choice(owner, "score_func", self.score_func, SCORE_FUNCS)
        check_choice(owner, "group_score", self.group_score, GROUP_SCORES)
        check_choice(owner, "capacity_priority", self.capacity_priority, CAPACITY_PRIORITIES)
        if self.shared_expert_hidden is not None:
            check_positive(owner, shared_expert_hidden=self.shared_expert_hidden)
        if self.top_k > self.num_experts:
            raise fail(
                owner, "top_k", self.top_k,
                f"must be <= num_experts ({self.num_experts}): a token cannot pick more experts "
                "than there are",
            )  # fmt: skip
        if self.router_bias and self.router == "expert_choice":
            raise fail(owner, "router_bias", True, "is only used with token choice routers")
        if self.router_jitter >= 1:
            raise fail(owner, "router_jitter", self.router_jitter, "must be in [0, 1)")
        if self.capacity_factor is not None:
            check_positive(owner, capacity_factor=self.capacity_factor)
        if self.router == "switch" and self.top_k != 1:
            raise fail(owner, "top_k", self.top_k, "must be 1 with router='switch'")
        if self.router == "expert_choice":
            self._check_expert_choice()
        elif self.expert_choice_causal:
            raise fail(
                owner, "expert_choice_causal", True, "is only used with router='expert_choice'"
            )
        self._check_groups()
        check_hierarchical(self)
        if self.shared_expert_gate and not self.num_shared_experts:
            raise fail(owner, "shared_expert_gate", True, "needs num_shared_experts >= 1")
        self._check_dense_layers()

    def _check_dense_layers(self) -> None:
        """An explicit list of dense layers: distinct layer indices, and no shorthand beside."""
        owner, layers = "MoEConfig", self.dense_layers
        if layers is None:
            return
        if not isinstance(layers, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
        ):
            raise fail(owner, "dense_layers", layers, "must be a list of layer indices (>= 0)")
        if len(set(layers)) != len(layers):
            raise fail(owner, "dense_layers", layers, "names a layer twice")
        if self.first_dense_layers or self.layer_step != 1:
            raise fail(
                owner, "dense_layers", layers,
                "replaces first_dense_layers and layer_step, which must keep their defaults "
                "(0 and 1) beside it",
            )  # fmt: skip

    def _check_expert_choice(self) -> None:
        """Expert choice needs a capacity factor and is balanced without biases or scaling."""
        owner = "MoEConfig"
        if self.capacity_factor is None:
            raise fail(
                owner, "capacity_factor", None,
                "router='expert_choice' needs a capacity factor (the mean number of "
                "experts per token), e.g. 2.0",
            )  # fmt: skip
        if self.capacity_factor > self.num_experts:
            raise fail(
                owner, "capacity_factor", self.capacity_factor,
                f"must be <= num_experts ({self.num_experts}) with router='expert_choice'",
            )  # fmt: skip
        if self.bias_update_rate or self.selection_bias:
            raise fail(
                owner, "bias_update_rate" if self.bias_update_rate else "selection_bias",
                self.bias_update_rate or self.selection_bias,
                "must be off with router='expert_choice' (it is balanced by construction)",
            )  # fmt: skip
        if self.score_func != "softmax":
            raise fail(
                owner,
                "score_func",
                self.score_func,
                "must be 'softmax' with router='expert_choice'",
            )
        if self.routed_scaling_factor != 1.0:
            raise fail(
                owner, "routed_scaling_factor", self.routed_scaling_factor,
                "must be 1.0 with router='expert_choice'",
            )  # fmt: skip

    def _check_groups(self) -> None:
        """Group-limited routing: the groups split the experts evenly and can hold top_k."""
        owner = "MoEConfig"
        if self.num_experts % self.num_groups:
            raise fail(
                owner, "num_groups", self.num_groups,
                f"must divide num_experts ({self.num_experts})",
            )  # fmt: skip
        if self.topk_groups > self.num_groups:
            raise fail(
                owner, "topk_groups", self.topk_groups, f"must be <= num_groups ({self.num_groups})"
            )
        if self.num_groups > 1:
            if self.router == "expert_choice":
                raise fail(
                    owner, "num_groups", self.num_groups, "must be 1 with router='expert_choice'"
                )
            per_group = self.num_experts // self.num_groups
            if self.topk_groups * per_group < self.top_k:
                raise fail(
                    owner, "topk_groups", self.topk_groups,
                    f"the {self.topk_groups} chosen group(s) hold {self.topk_groups * per_group} "
                    f"experts, fewer than top_k={self.top_k}",
                )  # fmt: skip
            if self.group_score == "top2_sum" and per_group < 2:
                raise fail(
                    owner, "group_score", self.group_score,
                    "needs at least 2 experts per group; use 'max'",
                )  # fmt: skip

    @property
    def shared_hidden_total(self) -> int:
        """Hidden size of all shared experts together (they act as one dense MLP)."""
        return self.num_shared_experts * (self.shared_expert_hidden or self.expert_hidden)

    def is_moe_layer(self, layer: int) -> bool:
        if self.dense_layers is not None:
            return layer not in self.dense_layers
        if layer < self.first_dense_layers:
            return False
        return (layer - self.first_dense_layers + 1) % self.layer_step == 0

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for `num_tokens` tokens, or None when dropless."""
        if self.capacity_factor is None:
            return None
        copies = num_tokens * (1 if self.router == "expert_choice" else self.top_k)
        return max(1, math.ceil(self.capacity_factor * copies / self.num_experts))


@dataclass(kw_only=True)
class ModelConfig(ConfigBase):
    """A decoder-only transformer language model, dense or Mixture-of-Experts.

    Every layer is `x + attn(norm(x))` then `x + ffn(norm(x))`; the feed-forward `ffn` is a
    dense MLP of `ffn_hidden` units, or an MoE layer where `moe.is_moe_layer(i)` holds.
    `moe=None` gives a dense model from the same code.
    """

    _nested: ClassVar[dict[str, type]] = {
        "attention": AttentionConfig,
        "moe": MoEConfig,
        "quantization": QuantizationConfig,
        "rope_scaling": RopeScalingConfig,
        "irope": IRoPEConfig,
    }

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None: num_heads (multi-head attention)
    ffn_hidden: int | None = None  # dense MLP hidden size; None: a SwiGLU-sized 8/3 * dim
    activation: str = "swiglu"
    # activation="clamped_swiglu" (gpt-oss): gate clamped above and up clamped on both sides at
    # `swiglu_limit`, then (up + 1) * gate * sigmoid(swiglu_alpha * gate).
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig | None = None  # None: RoPE as pretrained, unscaled
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig | None = None
    quantization: QuantizationConfig | None = None  # a quantised model (moekit.quant)
    irope: IRoPEConfig | None = None  # None: RoPE on every layer, full causal attention

    def __post_init__(self) -> None:
        owner = "ModelConfig"
        if isinstance(self.quantization, dict):
            self.quantization = QuantizationConfig.from_dict(self.quantization)
        if isinstance(self.attention, dict):
            self.attention = AttentionConfig.from_dict(self.attention)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScalingConfig.from_dict(self.rope_scaling)
        if not isinstance(self.rope_scaling, RopeScalingConfig | None):
            raise fail(owner, "rope_scaling", self.rope_scaling, "must be an object or null")
        if isinstance(self.irope, dict):
            self.irope = IRoPEConfig.from_dict(self.irope)
        check_field_types(self)
        check_positive(
            owner,
            vocab_size=self.vocab_size,
            dim=self.dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            max_seq_len=self.max_seq_len,
            init_std=self.init_std,
        )
        check_choice(owner, "activation", self.activation, ACTIVATIONS)
        self._check_activation()
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        check_positive(owner, num_kv_heads=self.num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise fail(
                owner, "num_kv_heads", self.num_kv_heads,
                f"must divide num_heads ({self.num_heads}) so query heads share K/V heads evenly",
            )  # fmt: skip
        if self.attention.kind == "gqa" and self.attention.head_dim is None:
            if self.dim % self.num_heads:
                raise fail(
                    owner, "num_heads", self.num_heads,
                    f"must divide dim ({self.dim}), or set attention.head_dim explicitly",
                )  # fmt: skip
            if (self.dim // self.num_heads) % 2:
                raise fail(
                    owner, "num_heads", self.num_heads,
                    f"gives an odd head dim {self.dim // self.num_heads}; RoPE needs an even one",
                )  # fmt: skip
        if self.ffn_hidden is None:
            self.ffn_hidden = 256 * math.ceil(8 * self.dim / 3 / 256)
        check_positive(owner, ffn_hidden=self.ffn_hidden)
        if self.moe is not None and self.moe.dense_layers is not None:
            beyond = [i for i in self.moe.dense_layers if i >= self.num_layers]
            if beyond:
                raise fail(
                    owner, "moe.dense_layers", self.moe.dense_layers,
                    f"names layer(s) {beyond} of a model with num_layers={self.num_layers}",
                )  # fmt: skip
        if self.irope is not None:
            self._check_irope(self.irope)
        if self.attention.kind == "mla" and self.num_kv_heads != self.num_heads:
            raise fail(
                owner, "num_kv_heads", self.num_kv_heads,
                "must equal num_heads with multi-head latent attention",
            )  # fmt: skip
        outside = [i for i in self.attention.sliding_layers or [] if i >= self.num_layers]
        if outside:
            raise fail(
                "AttentionConfig", "sliding_layers", self.attention.sliding_layers,
                f"lists layer(s) {outside} of a model with {self.num_layers} layers",
            )  # fmt: skip

    def _check_activation(self) -> None:
        owner = "ModelConfig"
        check_positive(owner, swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit)
        if self.activation != "clamped_swiglu":
            for name, default in (("swiglu_alpha", 1.702), ("swiglu_limit", 7.0)):
                if getattr(self, name) != default:
                    raise fail(
                        owner, name, getattr(self, name),
                        "is only used with activation='clamped_swiglu'",
                    )  # fmt: skip

    def _check_irope(self, irope: IRoPEConfig) -> None:
        owner = "ModelConfig"
        beyond = [i for i in irope.nope_layers if i >= self.num_layers]
        if beyond:
            raise fail(
                owner, "irope.nope_layers", irope.nope_layers,
                f"names layer(s) {beyond} of a model with num_layers={self.num_layers}",
            )  # fmt: skip
        if self.attention.kind != "gqa":
            raise fail(owner, "irope", "set", "needs attention.kind='gqa'")
        if self.attention.qk_norm != "none":
            raise fail(
                owner, "attention.qk_norm", self.attention.qk_norm,
                "must be 'none' with irope (which has its own, irope.qk_l2_norm)",
            )  # fmt: skip

    # ---- derived -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        if self.attention.kind == "mla":
            return self.attention.qk_nope_head_dim + self.attention.qk_rope_head_dim
        return self.attention.head_dim or self.dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        assert self.num_kv_heads is not None  # set in __post_init__
        return self.num_kv_heads

    @property
    def dense_hidden(self) -> int:
        assert self.ffn_hidden is not None  # set in __post_init__
        return self.ffn_hidden

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(layer)

    @property
    def gated(self) -> bool:
        """Whether feed-forwards have a gate projection (the SwiGLU activations)."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @property
    def dense_layer_indices(self) -> list[int]:
        """The layers with a dense MLP (every layer of a dense model)."""
        return [i for i in range(self.num_layers) if not self.is_moe_layer(i)]

    @property
    def leading_dense_layers(self) -> int | None:
        """n when the dense layers are exactly the first n (0: none), else None: the layout
        architectures with a `first_k_dense_replace` setting can state."""
        dense = self.dense_layer_indices
        return len(dense) if dense == list(range(len(dense))) else None

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in ("quantization", "rope_scaling", "irope"):  # config.json as it was without
            if data[name] is None:
                del data[name]
        return {"format_version": FORMAT_VERSION, "moekit_version": __version__, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        data.pop("moekit_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"config format_version={version!r} is not supported by this moekit "
                f"(it reads format_version {FORMAT_VERSION})"
            )
        result: ModelConfig = super().from_dict(data)
        return result

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config as JSON, atomically (a temporary file renamed into place)."""
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelConfig:
        """Read a config.json file, or the config.json inside a model directory."""
        p = Path(path)
        if p.is_dir():
            p = p / FILE_NAME
        if not p.exists():
            raise FileNotFoundError(f"no moekit config at {p}")
        try:
            return cls.from_json(p.read_text())
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p}: {e}") from e
