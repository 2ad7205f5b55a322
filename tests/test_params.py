import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.params import (
    attention_flops_per_token,
    count_params,
    flops_per_token,
    kv_cache_bytes,
    kv_cache_elements_per_token,
    kv_latent_elements_per_token,
    summary,
    weight_memory_bytes,
)
from moekit.presets import PRESETS, get_preset

PUBLISHED = [p for p in PRESETS.values() if p.published_total is not None]


@pytest.mark.parametrize("preset", PUBLISHED, ids=lambda p: p.name)
def test_published_counts_within_three_percent(preset):
    pc = count_params(preset.build())
    assert pc.total == pytest.approx(preset.published_total, rel=0.03)
    if preset.published_active is not None:  # None: the release counts it differently
        assert pc.active == pytest.approx(preset.published_active, rel=0.03)


def tiny_variants():
    """Small configs that exercise every counted feature."""
    base = dict(vocab_size=97, dim=64, num_layers=3, num_heads=4, ffn_hidden=96)
    moe = dict(num_experts=4, top_k=2, expert_hidden=48)
    yield "dense", dict(base)
    yield "tied-gelu", dict(base, tie_embeddings=True, activation="gelu", moe=moe)
    yield (
        "gqa-bias-headnorm",
        dict(
            base,
            num_kv_heads=2,
            attention=dict(qkv_bias=True, qk_norm="head", head_dim=32),
            moe=moe,
        ),
    )
    yield (
        "fullnorm-shared-gate",
        dict(
            base,
            attention=dict(qk_norm="full"),
            moe=dict(moe, num_shared_experts=2, shared_expert_hidden=24, shared_expert_gate=True),
        ),
    )
    yield "mla-lora-deepseek", dict(
        base,
        attention=dict(kind="mla", q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                       qk_rope_head_dim=4, v_head_dim=12),
        moe=dict(moe, score_func="sigmoid", num_groups=2, topk_groups=1, bias_update_rate=0.01,
                 num_shared_experts=1, first_dense_layers=1),
    )  # fmt: skip
    yield "mla-fullq-interleaved", dict(
        base,
        attention=dict(kind="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                       v_head_dim=8),
        moe=dict(moe, layer_step=2),
    )  # fmt: skip
    yield "dense-in-the-middle", dict(base, moe=dict(moe, dense_layers=[1]))
    yield "expert-choice", dict(base, moe=dict(moe, router="expert_choice", capacity_factor=1.5))
    yield "gpt-oss-biases-sinks", dict(
        base, activation="clamped_swiglu", num_kv_heads=2,
        attention=dict(qkv_bias=True, o_bias=True, sinks=True, sliding_window=8),
        moe=dict(moe, router_bias=True, expert_bias=True, first_dense_layers=1),
    )  # fmt: skip
    yield "gelu-expert-bias", dict(base, activation="gelu", moe=dict(moe, expert_bias=True))
    yield (
        "hierarchical",
        dict(
            base,
            moe=dict(moe, router="hierarchical", router_groups=2, group_top_k=1, router_bias=True),
        ),
    )


@pytest.mark.parametrize(
    ("name", "data"), list(tiny_variants()), ids=[n for n, _ in tiny_variants()]
)
def test_count_equals_the_built_model(name, data):
    cfg = ModelConfig.from_dict(data)
    model = build_model(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    pc = count_params(cfg)
    assert pc.total == sum(pc.total_by.values())
    assert pc.active <= pc.total


@pytest.mark.parametrize("name", ["debug", "tiny", "small"])
def test_count_equals_the_built_model_for_small_presets(name):
    cfg = get_preset(name)
    assert count_params(cfg).total == sum(p.numel() for p in build_model(cfg).parameters())


def test_active_by_hand():
    cfg = ModelConfig.from_dict(
        dict(vocab_size=10, dim=8, num_layers=1, num_heads=2, tie_embeddings=True,
             moe=dict(num_experts=4, top_k=2, expert_hidden=6, num_shared_experts=1))
    )  # fmt: skip
    per_expert = 3 * 8 * 6
    attention = 4 * 8 * 8
    expected_total = 10 * 8 + 3 * 8 + attention + 4 * per_expert + 4 * 8 + per_expert
    expected_active = expected_total - 2 * per_expert
    assert count_params(cfg).total == expected_total
    assert count_params(cfg).active == expected_active
    # Forward FLOPs: 2 x (active weights - embedding lookup - norms + the tied head's matmul),
    # plus scores and values: 2 * heads * (qk + v head dims) * context per layer.
    matmul = expected_active - 10 * 8 - 3 * 8 + 10 * 8
    assert attention_flops_per_token(cfg, 16) == 2 * 2 * (4 + 4) * 16
    assert flops_per_token(cfg, 16) == 2 * matmul + 2 * 2 * (4 + 4) * 16


def test_chunked_layers_attend_to_one_chunk_at_most():
    """Llama 4: the RoPE layers see at most `chunk_size` keys; the NoPE layers all of them."""
    base = dict(vocab_size=10, dim=8, num_layers=4, num_heads=2)
    chunked = ModelConfig.from_dict({**base, "irope": dict(nope_layers=[3], chunk_size=4)})
    per_key = 2 * 2 * (4 + 4)
    assert attention_flops_per_token(chunked, 16) == per_key * (3 * 4 + 16)
    assert attention_flops_per_token(chunked, 2) == per_key * 4 * 2
    assert count_params(chunked).total == count_params(ModelConfig.from_dict(base)).total


def test_expert_choice_counts_the_capacity_factor_as_active():
    cfg = ModelConfig.from_dict(
        dict(vocab_size=10, dim=8, num_layers=1, num_heads=2,
             moe=dict(num_experts=4, top_k=1, expert_hidden=6, router="expert_choice",
                      capacity_factor=1.5))
    )  # fmt: skip
    pc = count_params(cfg)
    assert pc.active_by["routed_experts"] == round(1.5 * 3 * 8 * 6)


def test_memory_and_summary():
    assert weight_memory_bytes(1000) == {"fp32": 4000, "bf16": 2000, "int8": 1000, "int4": 500}
    s = summary(get_preset("mixtral-8x7b"))
    assert isinstance(s.total_params, int) and isinstance(s.active_params, int)
    assert 0 < s.active_fraction < 1
    assert s.weight_memory_bytes["bf16"] == 2 * s.total_params
    assert s.kv_latent_cache_bytes_per_1k_tokens is None
    assert "kv_latent_cache_bytes_per_1k_tokens" not in s.to_dict()
    mla = summary(get_preset("deepseek-v3")).to_dict()
    assert mla["kv_latent_cache_bytes_per_1k_tokens"]["bf16"] == 61 * (512 + 64) * 1000 * 2


def test_model_parameters_are_float32_and_buffers_not_counted():
    cfg = get_preset("deepseek-v3")
    small = ModelConfig.from_dict(
        {**cfg.to_dict(), "vocab_size": 64, "dim": 32, "num_layers": 4, "num_heads": 2,
         "num_kv_heads": None,
         "ffn_hidden": 48,
         "attention": dict(kind="mla", q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                           qk_rope_head_dim=4, v_head_dim=8),
         "moe": {**cfg.moe.to_dict(), "num_experts": 8, "num_groups": 4, "topk_groups": 2,
                 "top_k": 2, "expert_hidden": 16}}
    )  # fmt: skip
    model = build_model(small)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(b.numel() for b in model.buffers())  # the selection biases exist ...
    assert count_params(small).total == sum(p.numel() for p in model.parameters())  # ... uncounted


@pytest.mark.parametrize(
    ("name", "data"), list(tiny_variants()), ids=[n for n, _ in tiny_variants()]
)
def test_kv_cache_figure_is_what_the_cache_allocates(name, data):
    from moekit.nn.kv_cache import KVCache

    cfg = ModelConfig.from_dict({**data, "max_seq_len": 64})
    cache = KVCache(cfg, batch=1, max_len=10, dtype=torch.bfloat16)
    allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert kv_cache_bytes(cfg, 10)["bf16"] == allocated
    assert kv_cache_bytes(cfg, 10)["fp32"] == 2 * allocated
    assert summary(cfg).kv_cache_bytes_per_1k_tokens["bf16"] == 100 * allocated


def test_published_kv_cache_sizes():
    # Mixtral 8x7B: 32 layers x 8 key/value heads x 128 dims x (key + value) = 64Ki numbers per
    # token; DeepSeek-V3's latent cache: 61 layers x (512 latent + 64 rotary key) per token.
    assert kv_cache_elements_per_token(get_preset("mixtral-8x7b")) == 32 * 8 * 128 * 2
    assert kv_latent_elements_per_token(get_preset("deepseek-v3")) == 61 * (512 + 64)
    assert kv_latent_elements_per_token(get_preset("mixtral-8x7b")) is None
