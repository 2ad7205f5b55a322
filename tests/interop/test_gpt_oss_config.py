"""gpt-oss-20b's published config.json through the config table: the `gpt-oss-20b` preset,
its YaRN RoPE (without truncation) included."""

from moekit.interop.hf import architecture_of
from moekit.params import count_params
from moekit.presets import get_preset

# The fields of openai/gpt-oss-20b's config.json.
PUBLISHED = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
    "attention_dropout": 0.0, "eos_token_id": 200002, "pad_token_id": 199999,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 150000,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn",
                     "truncate": False},
    "quantization_config": {"quant_method": "mxfp4",
                            "modules_to_not_convert": ["model.layers.*.self_attn",
                                                       "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"]},
    "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
    "use_cache": True, "vocab_size": 201088,
}  # fmt: skip


def test_the_published_config_is_the_preset():
    arch = architecture_of(PUBLISHED)
    cfg = arch.config_from_hf(PUBLISHED)
    preset = get_preset("gpt-oss-20b")
    for field in (
        "attention",
        "activation",
        "swiglu_alpha",
        "swiglu_limit",
        "num_layers",
        "dim",
        "num_heads",
        "num_kv_heads",
        "vocab_size",
        "rope_theta",
        "rope_scaling",
        "max_seq_len",
    ):
        assert getattr(cfg, field) == getattr(preset, field), field  # fmt: skip
    assert count_params(cfg).total == count_params(preset).total == 20_914_757_184
    assert arch.problems(cfg) == []
