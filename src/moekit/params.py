"""Parameter, FLOP and memory accounting computed from a `ModelConfig` alone (no weights needed).

Conventions, chosen to match how published MoE models state their sizes:
- *total* counts every parameter tensor the model holds (every routed expert); buffers such as
  the aux-loss-free selection bias are not parameters and are not counted.
- *active* counts what one token uses: everything outside the MoE layers, the router, the shared
  experts and `top_k` routed experts (`capacity_factor` experts on average for expert choice).
  Embedding tables count in full in both, as model cards do.
- FLOPs are forward multiply-adds x 2 for one token: the matmuls of its active weights (the
  input embedding is a lookup and costs none; the LM head does) plus attention scores and
  values against `context` earlier positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moekit.config import ModelConfig

CATEGORIES = (
    "embeddings",
    "lm_head",
    "attention",
    "dense_mlp",
    "routed_experts",
    "shared_experts",
    "router",
    "norms",
)

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass
class ParamCount:
    """Parameter counts by category: `total[c]` held by the model, `active[c]` used per token."""

    total_by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    active_by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    @property
    def total(self) -> int:
        return sum(self.total_by.values())

    @property
    def active(self) -> int:
        return sum(self.active_by.values())

    def add(self, category: str, total: int, active: int | None = None) -> None:
        self.total_by[category] += total
        self.active_by[category] += total if active is None else active


def attention_params(cfg: ModelConfig) -> int:
    """Parameters of one attention block (projections and any norms inside attention)."""
    a, d, h = cfg.attention, cfg.dim, cfg.num_heads
    if a.kind == "mla":
        qk_head = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank is None:
            q = d * h * qk_head
        else:
            q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * h * qk_head
        kv = (
            d * (a.kv_lora_rank + a.qk_rope_head_dim)  # compressed latent + shared rope key
            + a.kv_lora_rank  # latent norm
            + a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
        )
        return q + kv + h * a.v_head_dim * d
    hd, hkv = cfg.head_dim, cfg.kv_heads
    n = d * h * hd + 2 * d * hkv * hd + h * hd * d
    if a.qkv_bias:
        n += h * hd + 2 * hkv * hd
    if a.o_bias:
        n += d
    if a.sinks:
        n += h  # one sink logit per query head
    if a.qk_norm == "head":
        n += 2 * hd
    elif a.qk_norm == "full":
        n += h * hd + hkv * hd
    return n


def mlp_params(cfg: ModelConfig, hidden: int) -> int:
    return (3 if cfg.gated else 2) * cfg.dim * hidden


def count_params(cfg: ModelConfig) -> ParamCount:
    """Total and per-token active parameters of `cfg`, broken down by category."""
    pc = ParamCount()
    d, v = cfg.dim, cfg.vocab_size
    pc.add("embeddings", v * d)
    if not cfg.tie_embeddings:
        pc.add("lm_head", v * d)
    pc.add("norms", (2 * cfg.num_layers + 1) * d)
    pc.add("attention", cfg.num_layers * attention_params(cfg))
    moe = cfg.moe
    for layer in range(cfg.num_layers):
        if moe is None or not moe.is_moe_layer(layer):
            pc.add("dense_mlp", mlp_params(cfg, cfg.dense_hidden))
            continue
        per_expert = mlp_params(cfg, moe.expert_hidden)
        if moe.expert_bias:  # b_gate and b_up (F each), b_down (D)
            per_expert += (2 if cfg.gated else 1) * moe.expert_hidden + d
        if moe.router == "expert_choice":
            assert moe.capacity_factor is not None  # validated by MoEConfig
            active_experts = round(moe.capacity_factor * per_expert)
        else:
            active_experts = moe.top_k * per_expert
        pc.add("routed_experts", moe.num_experts * per_expert, active_experts)
        pc.add("router", moe.num_experts * (d + 1 if moe.router_bias else d))
        if moe.router == "hierarchical":  # the group router; every logit of both is computed
            pc.add("router", moe.router_groups * d)
        if moe.num_shared_experts:
            pc.add(
                "shared_experts",
                mlp_params(cfg, moe.shared_hidden_total) + (d if moe.shared_expert_gate else 0),
            )
    return pc


def attention_flops_per_token(cfg: ModelConfig, context: int) -> int:
    """Forward FLOPs of attention scores and weighted values for one token over `context` keys
    (layers with chunked attention see at most a chunk of them)."""
    a = cfg.attention
    if a.kind == "mla":
        qk, vd = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
    else:
        qk = vd = cfg.head_dim
    irope = cfg.irope
    keys = [context] * cfg.num_layers
    if irope is not None and irope.chunk_size is not None:
        chunk = min(context, irope.chunk_size)
        keys = [chunk if irope.chunked(i) else context for i in range(cfg.num_layers)]
    return 2 * cfg.num_heads * (qk + vd) * sum(keys)


def flops_per_token(cfg: ModelConfig, context: int = 2048) -> int:
    """Forward FLOPs for one token that attends to `context` positions."""
    pc = count_params(cfg)
    # Matmul weights: everything active except the embedding lookup and the norm gains; a tied
    # LM head reuses the embedding matrix as a matmul.
    matmul = pc.active - pc.active_by["embeddings"] - pc.active_by["norms"]
    if cfg.tie_embeddings:
        matmul += cfg.vocab_size * cfg.dim
    return 2 * matmul + attention_flops_per_token(cfg, context)


def weight_memory_bytes(num_params: int) -> dict[str, int]:
    """Bytes needed to hold `num_params` weights in each storage dtype (no quantisation scales)."""
    return {name: int(num_params * b) for name, b in BYTES_PER_PARAM.items()}


KV_DTYPES = {"fp32": 4, "bf16": 2}


def kv_cache_elements_per_token(cfg: ModelConfig) -> int:
    """Numbers moekit's KV cache holds per token of context, over all layers: keys and values
    of every key/value head (grouped-query attention), or of every head for multi-head latent
    attention, whose keys and values moekit caches decompressed."""
    if cfg.attention.kind == "mla":
        per_layer = cfg.num_heads * (cfg.head_dim + cfg.attention.v_head_dim)
    else:
        per_layer = cfg.kv_heads * 2 * cfg.head_dim
    return cfg.num_layers * per_layer


def kv_latent_elements_per_token(cfg: ModelConfig) -> int | None:
    """For multi-head latent attention, the numbers a latent cache holds per token (the
    compressed key/value latent and the shared rotary key, per layer: what DeepSeek-V3's
    inference stores); None for other attention."""
    a = cfg.attention
    if a.kind != "mla":
        return None
    return cfg.num_layers * (a.kv_lora_rank + a.qk_rope_head_dim)


def kv_cache_bytes(cfg: ModelConfig, tokens: int = 1000) -> dict[str, int]:
    """Bytes of moekit's KV cache for `tokens` positions of one sequence, per cache dtype."""
    n = kv_cache_elements_per_token(cfg) * tokens
    return {name: n * size for name, size in KV_DTYPES.items()}


@dataclass(frozen=True)
class ModelSummary:
    """Every accounting figure of a config (what `moekit info` shows): total and per-token
    active parameters with their breakdown by part, forward FLOPs per token at a context of
    `flops_context`, weight memory per storage dtype, and KV cache memory per 1,000 tokens of
    context per cache dtype (plus the latent cache of multi-head latent attention)."""

    total_params: int
    active_params: int
    active_fraction: float
    flops_per_token: int
    flops_context: int
    weight_memory_bytes: dict[str, int]
    kv_cache_bytes_per_1k_tokens: dict[str, int]
    total_params_by: dict[str, int]
    active_params_by: dict[str, int]
    num_layers: int
    moe_layers: int
    num_experts: int
    top_k: int
    kv_latent_cache_bytes_per_1k_tokens: dict[str, int] | None = None
    routing: str | None = None  # hierarchical routing, in words

    def to_dict(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict (the latent cache and the routing only where there
        is one)."""
        out = dataclasses.asdict(self)
        for name in ("kv_latent_cache_bytes_per_1k_tokens", "routing"):
            if out[name] is None:
                del out[name]
        return out


def routing_words(cfg: ModelConfig) -> str | None:
    """Hierarchical routing in words ("hierarchical: 1 of 2 groups x 2 of 4 experts"); None
    for the other routers (the experts and top-k say it all)."""
    moe = cfg.moe
    if moe is None or moe.router != "hierarchical":
        return None
    per_group, k2 = moe.num_experts // moe.router_groups, moe.top_k // moe.group_top_k
    groups = f"{moe.group_top_k} of {moe.router_groups} groups"
    return f"hierarchical: {groups} x {k2} of {per_group} experts"


def summary(cfg: ModelConfig, context: int = 2048) -> ModelSummary:
    """Every accounting figure of `cfg`: total and active parameters with their breakdown,
    FLOPs per token attending to `context` positions, weight memory, and KV cache memory per
    1,000 tokens of context."""
    pc = count_params(cfg)
    latent = kv_latent_elements_per_token(cfg)
    return ModelSummary(
        total_params=pc.total,
        active_params=pc.active,
        active_fraction=pc.active / pc.total,
        flops_per_token=flops_per_token(cfg, context),
        flops_context=context,
        weight_memory_bytes=weight_memory_bytes(pc.total),
        kv_cache_bytes_per_1k_tokens=kv_cache_bytes(cfg, 1000),
        total_params_by=dict(pc.total_by),
        active_params_by=dict(pc.active_by),
        num_layers=cfg.num_layers,
        moe_layers=len(cfg.moe_layers),
        num_experts=cfg.moe.num_experts if cfg.moe else 0,
        top_k=cfg.moe.top_k if cfg.moe else 0,
        kv_latent_cache_bytes_per_1k_tokens=None
        if latent is None
        else {name: latent * 1000 * size for name, size in KV_DTYPES.items()},
        routing=routing_words(cfg),
    )
