"""moekit's routing against transformers' own on the same checkpoint: a tiny moekit model is
exported with export_hf (or a tiny checkpoint is written by transformers and imported), the
real transformers library runs the checkpoint, and `compare_routing` checks that both pick the
same experts for every token (near ties, which float rounding may flip, are set apart)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit import build_model, compare_routing, export_hf, import_hf  # noqa: E402
from moekit.config import ModelConfig  # noqa: E402
from moekit.data.tokenizer import Tokenizer  # noqa: E402
from moekit.model_dir import save_model  # noqa: E402

BASE = dict(vocab_size=512, dim=64, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden=128,
            max_seq_len=128)  # fmt: skip
MODELS = {  # the architecture export_hf picks: the moekit config
    "MixtralForCausalLM": dict(BASE, moe=dict(num_experts=8, top_k=2, expert_hidden=64)),
    "Qwen3MoeForCausalLM": dict(
        BASE,
        attention=dict(head_dim=16, qk_norm="head"),
        moe=dict(num_experts=8, top_k=3, expert_hidden=32, norm_topk_prob=False),
    ),
    "OlmoeForCausalLM": dict(
        BASE,
        ffn_hidden=64,
        attention=dict(qk_norm="full"),
        moe=dict(num_experts=4, top_k=2, expert_hidden=64),
    ),
    "Qwen2MoeForCausalLM": dict(
        BASE,
        attention=dict(qkv_bias=True),
        moe=dict(num_experts=6, top_k=2, expert_hidden=32, num_shared_experts=1,
                 shared_expert_gate=True, first_dense_layers=1),
    ),
    # Multi-head latent attention routed by softmax in groups scored by their best expert,
    # with YaRN.
    "DeepseekV2ForCausalLM": dict(
        BASE, num_kv_heads=4,
        rope_scaling=dict(factor=4.0, original_max_seq_len=32, mscale=1.0, mscale_all_dim=1.0),
        attention=dict(kind="mla", kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                       v_head_dim=16),
        moe=dict(num_experts=8, top_k=2, expert_hidden=32, num_shared_experts=1,
                 norm_topk_prob=False, num_groups=4, topk_groups=2, group_score="max",
                 routed_scaling_factor=2.0, first_dense_layers=1),
    ),
    "GptOssForCausalLM": dict(
        BASE, activation="clamped_swiglu",
        attention=dict(head_dim=16, qkv_bias=True, o_bias=True, sinks=True, sliding_window=16,
                       sliding_layers=[0, 2]),
        moe=dict(num_experts=4, top_k=2, expert_hidden=64, router_bias=True, expert_bias=True),
    ),
    # Sigmoid top-1 on the experts' inputs, MoE every other layer, a NoPE layer, chunks.
    "Llama4ForCausalLM": dict(
        BASE, num_layers=4, attention=dict(head_dim=16),
        irope=dict(nope_layers=[3], chunk_size=16, temperature_tuning=True, floor_scale=8,
                   qk_l2_norm=True),
        moe=dict(num_experts=4, top_k=1, expert_hidden=32, num_shared_experts=1,
                 score_func="sigmoid", norm_topk_prob=False, scale_expert_input=True,
                 layer_step=2),
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from moekit.data.corpus import builtin_corpus

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join(d.text for d in builtin_corpus(max_chars_per_domain=3_000)))
    return path


def _agrees_with_transformers(result, moe_layers):
    ag = result.agreement
    assert [row.layer for row in ag.layers] == moe_layers
    assert ag.first_divergent_layer is None
    for row in ag.layers:
        # Every token chosen with a clear margin picks the same experts on both sides.
        assert row.set_match_decisive == 1.0 and row.diverging == 0, row
        assert row.near_ties < 0.05 * ag.tokens, row
        assert row.set_match >= 0.97 and row.top1 >= 0.97, row
    assert ag.never_diverging == ag.tokens


@pytest.mark.parametrize("arch", list(MODELS))
def test_moekit_and_transformers_route_an_export_alike(arch, tiny_model_dir, text_file, tmp_path):
    cfg = ModelConfig.from_dict(MODELS[arch])
    ours = tmp_path / "moekit"
    Tokenizer.load(tiny_model_dir).save(ours)
    save_model(build_model(cfg, seed=0), cfg, ours)
    assert export_hf(ours, tmp_path / "hf") == arch
    result = compare_routing(ours, tmp_path / "hf", text=text_file, tokens=512, progress=False)
    assert (result.a.kind, result.b.kind) == ("moekit", "transformers")
    _agrees_with_transformers(result, cfg.moe_layers)
    # The other way round: the text is tokenized with B's tokenizer, the result is the same.
    back = compare_routing(tmp_path / "hf", ours, text=text_file, tokens=512, progress=False)
    assert [r.set_match for r in back.agreement.layers] == [
        r.set_match for r in result.agreement.layers
    ]


def test_sigmoid_routing_with_a_selection_bias_matches_transformers(
    tiny_model_dir, text_file, tmp_path
):
    """DeepSeek-V3: sigmoid scores, a correction bias used only for choosing, and
    group-limited routing, written by transformers itself and imported."""
    config = transformers.DeepseekV3Config(
        vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
        n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=16,
        q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=2,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True,
        rope_interleave=False, max_position_embeddings=128, initializer_range=0.15,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(
                    torch.randn_like(module.e_score_correction_bias) * 0.1
                )
    model.save_pretrained(tmp_path / "hf")
    Tokenizer.load(tiny_model_dir).save(tmp_path / "hf")
    cfg = import_hf(tmp_path / "hf", tmp_path / "moekit")
    result = compare_routing(
        tmp_path / "moekit", tmp_path / "hf", text=text_file, tokens=512, progress=False
    )
    _agrees_with_transformers(result, cfg.moe_layers)


def test_a_transformers_model_with_other_experts_is_refused(tiny_model_dir, text_file, tmp_path):
    cfg = ModelConfig.from_dict(MODELS["MixtralForCausalLM"])
    ours = tmp_path / "moekit"
    Tokenizer.load(tiny_model_dir).save(ours)
    save_model(build_model(cfg, seed=0), cfg, ours)
    four = dict(num_experts=4, top_k=2, expert_hidden=64)
    other = ModelConfig.from_dict({**MODELS["MixtralForCausalLM"], "moe": four})
    Tokenizer.load(tiny_model_dir).save(tmp_path / "other")
    save_model(build_model(other, seed=0), other, tmp_path / "other")
    export_hf(tmp_path / "other", tmp_path / "hf")
    with pytest.raises(ValueError, match="number of experts 8 in A, 4 in B"):
        compare_routing(ours, tmp_path / "hf", text=text_file, progress=False)
