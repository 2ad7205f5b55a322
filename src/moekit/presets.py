"""Named model configurations, as data.

Small presets (`debug`, `tiny`, `demo`, `small`) run on a laptop CPU. The published architectures
describe the text model of each release (no vision tower, no multi-token-prediction head) with
the shapes of its Hugging Face config, and carry the total / active parameter counts stated by
the model card so the accounting can be checked against them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from moekit.config import ModelConfig
from moekit.irope import every_nth_nope


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict[str, Any]
    published_total: float | None = None  # parameters, as stated by the release
    published_active: float | None = None
    source: str = ""

    def build(self) -> ModelConfig:
        return ModelConfig.from_dict(copy.deepcopy(self.config))


_PRESETS: list[Preset] = [
    Preset(
        name="debug",
        description="2 layers, 64 dims, 8 experts top-2: for unit tests",
        config=dict(
            vocab_size=512, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=192,
            max_seq_len=256,
            moe=dict(num_experts=8, top_k=2, expert_hidden=96, z_loss_weight=0.001),
        ),
    ),
    Preset(
        name="tiny",
        description="4 layers, 128 dims, 8 experts top-2 plus a shared expert",
        config=dict(
            vocab_size=2048, dim=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden=384,
            max_seq_len=512,
            moe=dict(
                num_experts=8, top_k=2, expert_hidden=192, num_shared_experts=1,
                z_loss_weight=0.001,
            ),
        ),
    ),
    Preset(
        name="demo",
        description="4 layers, 192 dims, 8 experts top-2: the README demo (~10 min on 2 CPU cores)",
        config=dict(
            vocab_size=4096, dim=192, num_layers=4, num_heads=6, num_kv_heads=2, ffn_hidden=768,
            max_seq_len=512,
            moe=dict(num_experts=8, top_k=2, expert_hidden=384, z_loss_weight=0.001),
        ),
    ),
    Preset(
        name="demo-hierarchical",
        description="the demo model with hierarchical routing: 2 groups of 4 experts, top-1 "
        "group then top-2 experts inside it",
        config=dict(
            vocab_size=4096, dim=192, num_layers=4, num_heads=6, num_kv_heads=2, ffn_hidden=768,
            max_seq_len=512,
            moe=dict(
                num_experts=8, top_k=2, expert_hidden=384, z_loss_weight=0.001,
                router="hierarchical", router_groups=2, group_top_k=1,
            ),
        ),
    ),
    Preset(
        name="small",
        description="6 layers, 256 dims, 16 fine-grained experts top-4, first layer dense",
        config=dict(
            vocab_size=8192, dim=256, num_layers=6, num_heads=8, num_kv_heads=4, ffn_hidden=768,
            max_seq_len=1024,
            moe=dict(
                num_experts=16, top_k=4, expert_hidden=192, first_dense_layers=1,
                z_loss_weight=0.001,
            ),
        ),
    ),
    Preset(
        name="mixtral-8x7b",
        description="Mistral AI Mixtral 8x7B: 8 experts, top-2, softmax router",
        config=dict(
            vocab_size=32000, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
            ffn_hidden=14336, rope_theta=1e6, norm_eps=1e-5, max_seq_len=32768,
            moe=dict(num_experts=8, top_k=2, expert_hidden=14336, aux_loss_weight=0.02),
        ),
        published_total=46.7e9, published_active=12.9e9,
        source="mistral.ai/news/mixtral-of-experts (46.7B total, 12.9B per token)",
    ),
    Preset(
        name="mixtral-8x22b",
        description="Mistral AI Mixtral 8x22B: 8 experts, top-2, softmax router",
        config=dict(
            vocab_size=32768, dim=6144, num_layers=56, num_heads=48, num_kv_heads=8,
            ffn_hidden=16384, rope_theta=1e6, norm_eps=1e-5, max_seq_len=65536,
            moe=dict(num_experts=8, top_k=2, expert_hidden=16384, aux_loss_weight=0.001),
        ),
        published_total=141e9, published_active=39e9,
        source="mistral.ai/news/mixtral-8x22b (141B total, 39B active)",
    ),
    Preset(
        name="qwen3-30b-a3b",
        description="Qwen3-30B-A3B: 128 fine-grained experts, top-8, q/k norm",
        config=dict(
            vocab_size=151936, dim=2048, num_layers=48, num_heads=32, num_kv_heads=4,
            ffn_hidden=6144, rope_theta=1e6, max_seq_len=40960,
            attention=dict(head_dim=128, qk_norm="head"),
            moe=dict(num_experts=128, top_k=8, expert_hidden=768, aux_loss_weight=0.001),
        ),
        published_total=30.5e9, published_active=3.3e9,
        source="huggingface.co/Qwen/Qwen3-30B-A3B (30.5B total, 3.3B activated)",
    ),
    Preset(
        name="qwen3-235b-a22b",
        description="Qwen3-235B-A22B: 128 fine-grained experts, top-8, q/k norm",
        config=dict(
            vocab_size=151936, dim=4096, num_layers=94, num_heads=64, num_kv_heads=4,
            ffn_hidden=12288, rope_theta=1e6, max_seq_len=40960,
            attention=dict(head_dim=128, qk_norm="head"),
            moe=dict(num_experts=128, top_k=8, expert_hidden=1536, aux_loss_weight=0.001),
        ),
        published_total=235e9, published_active=22e9,
        source="huggingface.co/Qwen/Qwen3-235B-A22B (235B total, 22B activated)",
    ),
    Preset(
        name="deepseek-v3",
        description=(
            "DeepSeek-V3: multi-head latent attention, 256 routed experts top-8 + 1 shared, "
            "sigmoid router with aux-loss-free bias, group-limited routing, 3 dense layers"
        ),
        config=dict(
            vocab_size=129280, dim=7168, num_layers=61, num_heads=128, ffn_hidden=18432,
            rope_theta=10000.0, max_seq_len=163840,
            rope_scaling=dict(
                factor=40.0, original_max_seq_len=4096, mscale=1.0, mscale_all_dim=1.0
            ),
            attention=dict(
                kind="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                qk_rope_head_dim=64, v_head_dim=128,
            ),
            moe=dict(
                num_experts=256, top_k=8, expert_hidden=2048, num_shared_experts=1,
                score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                num_groups=8, topk_groups=4, group_score="top2_sum", bias_update_rate=0.001,
                aux_loss_weight=0.0001, first_dense_layers=3,
            ),
        ),
        published_total=671e9, published_active=37e9,
        source="DeepSeek-V3 technical report (671B total, 37B activated; excludes the MTP module)",
    ),
    Preset(
        name="deepseek-v2-lite",
        description=(
            "DeepSeek-V2-Lite: multi-head latent attention (full-rank queries), 64 routed "
            "experts top-6 + 2 shared, softmax router, 1 dense layer, YaRN to 160k positions"
        ),
        config=dict(
            vocab_size=102400, dim=2048, num_layers=27, num_heads=16, ffn_hidden=10944,
            rope_theta=10000.0, max_seq_len=163840,
            rope_scaling=dict(
                factor=40.0, original_max_seq_len=4096, mscale=0.707, mscale_all_dim=0.707
            ),
            attention=dict(
                kind="mla", kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                v_head_dim=128,
            ),
            moe=dict(
                num_experts=64, top_k=6, expert_hidden=1408, num_shared_experts=2,
                norm_topk_prob=False, group_score="max", aux_loss_weight=0.001,
                first_dense_layers=1,
            ),
        ),
        # The report's 2.4B activated leaves out the 0.2B embedding table (2.66B with it), so
        # only the total is checked.
        published_total=15.7e9,
        source="DeepSeek-V2 technical report (V2-Lite: 15.7B total, 2.4B activated per token "
        "without the embeddings)",
    ),
    Preset(
        name="llama4-scout",
        description=(
            "Llama 4 Scout (text): 16 experts, top-1 sigmoid router on the expert input + a "
            "shared expert; NoPE every 4th layer, chunked attention, L2 q/k norms"
        ),
        config=dict(
            vocab_size=202048, dim=5120, num_layers=48, num_heads=40, num_kv_heads=8,
            ffn_hidden=16384, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=10485760,
            rope_scaling=dict(kind="llama3", factor=16.0, original_max_seq_len=8192,
                              low_freq_factor=1.0, high_freq_factor=1.0),
            attention=dict(head_dim=128),
            irope=dict(nope_layers=every_nth_nope(48, 4), chunk_size=8192,
                       temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
                       qk_l2_norm=True),
            moe=dict(
                num_experts=16, top_k=1, expert_hidden=8192, num_shared_experts=1,
                score_func="sigmoid", norm_topk_prob=False, scale_expert_input=True,
                aux_loss_weight=0.001,
            ),
        ),
        published_total=109e9, published_active=17e9,
        source="huggingface.co/meta-llama/Llama-4-Scout-17B-16E (109B total, 17B active)",
    ),
    Preset(
        name="llama4-maverick",
        description=(
            "Llama 4 Maverick (text): 128 experts top-1 on the expert input + shared expert, "
            "MoE every other layer; NoPE every 4th layer, chunked attention"
        ),
        config=dict(
            vocab_size=202048, dim=5120, num_layers=48, num_heads=40, num_kv_heads=8,
            ffn_hidden=16384, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=1048576,
            attention=dict(head_dim=128),
            irope=dict(nope_layers=every_nth_nope(48, 4), chunk_size=8192,
                       temperature_tuning=True, floor_scale=8192, attn_scale=0.1),
            moe=dict(
                num_experts=128, top_k=1, expert_hidden=8192, num_shared_experts=1,
                score_func="sigmoid", norm_topk_prob=False, scale_expert_input=True,
                layer_step=2, aux_loss_weight=0.001,
            ),
        ),
        published_total=400e9, published_active=17e9,
        source="huggingface.co/meta-llama/Llama-4-Maverick-17B-128E (400B total, 17B active)",
    ),
    Preset(
        name="gpt-oss-20b",
        description=(
            "OpenAI gpt-oss-20b: 32 biased experts top-4 with clamped SwiGLU, attention sinks, "
            "sliding window 128 every other layer, YaRN x32 from 4096 positions"
        ),
        config=dict(
            vocab_size=201088, dim=2880, num_layers=24, num_heads=64, num_kv_heads=8,
            ffn_hidden=2880, rope_theta=150000.0, norm_eps=1e-5, max_seq_len=131072,
            rope_scaling=dict(factor=32.0, original_max_seq_len=4096, truncate=False),
            activation="clamped_swiglu",
            attention=dict(
                head_dim=64, qkv_bias=True, o_bias=True, sinks=True, sliding_window=128,
                sliding_layers=list(range(0, 24, 2)),
            ),
            moe=dict(
                num_experts=32, top_k=4, expert_hidden=2880, router_bias=True,
                expert_bias=True, aux_loss_weight=0.001,
            ),
        ),
        # The card's 3.61B active leaves out the 0.58B input embedding, which moekit counts.
        published_total=20.91e9, published_active=3.61e9 + 201088 * 2880,
        source="OpenAI gpt-oss-120b & gpt-oss-20b model card (20.91B total, 3.61B active "
        "without the embedding table)",
    ),
    Preset(
        name="olmoe-1b-7b",
        description="AllenAI OLMoE-1B-7B: 64 experts, top-8, q/k norm over all heads",
        config=dict(
            vocab_size=50304, dim=2048, num_layers=16, num_heads=16, ffn_hidden=1024,
            norm_eps=1e-5, max_seq_len=4096,
            attention=dict(qk_norm="full"),
            moe=dict(
                num_experts=64, top_k=8, expert_hidden=1024, norm_topk_prob=False,
                aux_loss_weight=0.01, z_loss_weight=0.001,
            ),
        ),
        published_total=6.9e9, published_active=1.3e9,
        source="OLMoE paper, arXiv:2409.02060 (6.9B total, 1.3B active)",
    ),
]  # fmt: skip

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


def list_presets() -> list[str]:
    """Names of every preset, small ones first."""
    return list(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The `ModelConfig` of preset `name` (a fresh copy each call)."""
    try:
        return PRESETS[name].build()
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}"
        ) from None
