"""Hugging Face configs of tiny checkpoints of every supported architecture, written by hand as
config.json would state them (no transformers needed). Each field a config table reads is
given a value other than its default, so a rule that ignored its field would be noticed."""

COMMON = dict(vocab_size=288, hidden_size=32, num_attention_heads=4, max_position_embeddings=64,
              rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")  # fmt: skip

HF = {
    "MixtralForCausalLM": dict(
        COMMON, model_type="mixtral", num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
        rope_theta=500000.0, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.03, router_jitter_noise=0.1, sliding_window=None,
    ),
    "Qwen2MoeForCausalLM": dict(
        COMMON, model_type="qwen2_moe", num_hidden_layers=3, num_key_value_heads=2,
        head_dim=16, rope_theta=1000000.0, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, router_aux_loss_coef=0.02, qkv_bias=False, mlp_only_layers=[0],
        decoder_sparse_step=1, use_sliding_window=False, sliding_window=32,
    ),
    "Qwen3MoeForCausalLM": dict(
        COMMON, model_type="qwen3_moe", num_hidden_layers=3, num_key_value_heads=2,
        head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True, router_aux_loss_coef=0.02, mlp_only_layers=[0, 1],
        attention_bias=False,
    ),
    "OlmoeForCausalLM": dict(
        COMMON, model_type="olmoe", num_hidden_layers=2, num_key_value_heads=2,
        rope_theta=500000.0, intermediate_size=24, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, router_aux_loss_coef=0.02, clip_qkv=None, attention_bias=False,
    ),
    "DeepseekV3ForCausalLM": dict(
        COMMON, model_type="deepseek_v3", num_hidden_layers=3, num_key_value_heads=4,
        rope_theta=10000.0, intermediate_size=48, q_lora_rank=24, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
        first_k_dense_replace=1, norm_topk_prob=False, routed_scaling_factor=2.5, n_group=4,
        topk_group=2, topk_method="noaux_tc", rope_interleave=True, attention_bias=False,
    ),
    # transformers 4's spelling of YaRN (rope_scaling with "type"); group-limited routing.
    "DeepseekV2ForCausalLM": dict(
        COMMON, model_type="deepseek_v2", num_hidden_layers=3, num_key_value_heads=4,
        rope_theta=10000.0, intermediate_size=48, q_lora_rank=24, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
        first_k_dense_replace=1, norm_topk_prob=False, routed_scaling_factor=2.0, n_group=4,
        topk_group=2, topk_method="group_limited_greedy", aux_loss_alpha=0.003,
        attention_bias=False, mlp_bias=False,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    "Dots1ForCausalLM": dict(
        COMMON, model_type="dots1", num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
        rope_theta=10000.0, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4, topk_group=2,
        attention_bias=False, sliding_window=None,
    ),
    "GptOssForCausalLM": dict(
        COMMON, model_type="gpt_oss", num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0}, intermediate_size=32,
        num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
        swiglu_alpha=1.5, swiglu_limit=5.0, attention_bias=False, sliding_window=16,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
    ),
    # MoE every other layer, NoPE layers by interval, llama3 RoPE scaling.
    "Llama4ForCausalLM": dict(
        COMMON, model_type="llama4_text", num_hidden_layers=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=16, intermediate_size_mlp=40, num_local_experts=4,
        num_experts_per_tok=2, router_aux_loss_coef=0.02, interleave_moe_layer_step=2,
        no_rope_layer_interval=2, attention_chunk_size=8, attn_temperature_tuning=True,
        floor_scale=16, attn_scale=0.2, use_qk_norm=False, attention_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16},
    ),
}  # fmt: skip
for _name, _hf in HF.items():
    _hf["architectures"] = [_name]

# Variants that exercise other weight layouts: q/k/v biases, untied embeddings, full-rank
# DeepSeek queries in the rotate-half layout, gpt-oss's attention biases and default layers.
VARIANTS = {
    **{name: (name, {}) for name in HF},
    "qwen2-biases-untied": ("Qwen2MoeForCausalLM", dict(qkv_bias=True, tie_word_embeddings=False)),
    "deepseek-rotate-half": ("DeepseekV3ForCausalLM", dict(q_lora_rank=None, rope_interleave=False)),
    "deepseek-v2-lite": ("DeepseekV2ForCausalLM", dict(q_lora_rank=None, topk_method="greedy",
                                                       rope_scaling=None)),
    "qwen3-yarn": ("Qwen3MoeForCausalLM", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
        "original_max_position_embeddings": 16, "truncate": False, "attention_factor": 0.9})),
    "gpt-oss-biases-untied": ("GptOssForCausalLM", dict(attention_bias=True, layer_types=None,
                                                        tie_word_embeddings=False)),
    "llama4-listed": ("Llama4ForCausalLM", dict(moe_layers=[0, 3], no_rope_layers=[1, 1, 0, 1],
                                                use_qk_norm=True, tie_word_embeddings=False)),
}  # fmt: skip


def hf_config(variant):
    """The Hugging Face config of `variant` (a key of VARIANTS), a fresh dict."""
    name, overrides = VARIANTS[variant]
    return {**HF[name], **overrides}
