"""Our model against transformers' own, on tiny random checkpoints transformers writes itself.

Each architecture: build with transformers from a config, save_pretrained (no download),
import, and compare logits, greedy continuations and parameter counts; then export back and
check the round trip, and that transformers loads the export with no custom code.
"""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.data.tokenizer import Tokenizer  # noqa: E402
from moekit.infer.generate import Generator  # noqa: E402
from moekit.infer.sampling import SamplingParams  # noqa: E402
from moekit.interop.hf import UnsupportedError, export_hf, import_hf  # noqa: E402
from moekit.model_dir import load_model, load_weights  # noqa: E402
from moekit.params import count_params  # noqa: E402

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, initializer_range=0.15, tie_word_embeddings=False)  # fmt: skip


# YaRN as DeepSeek-V2 (mscale = mscale_all_dim), DeepSeek-V3 (factor 40) and Qwen3 state it,
# stretched 8x, 8x and 4x from a short pretrained context.
YARN_V2 = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=8.0,
    original_max_position_embeddings=16,
    beta_fast=32,
    beta_slow=1,
    mscale=0.707,
    mscale_all_dim=0.707,
)
YARN_V3 = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=40.0,
    beta_fast=32,
    beta_slow=1,
    original_max_position_embeddings=16,
    mscale=1.0,
    mscale_all_dim=1.0,
)
YARN_QWEN = dict(
    rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=32
)

LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=16)  # fmt: skip

TINY = {  # name: (transformers config class, its fields besides COMMON)
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, intermediate_size=96,
                                      num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_key_value_heads=2, intermediate_size=128,
                                         moe_intermediate_size=48,
                                         shared_expert_intermediate_size=96, num_experts=4,
                                         num_experts_per_tok=2, mlp_only_layers=[0],
                                         norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=32,
                                         intermediate_size=128, moe_intermediate_size=48,
                                         num_experts=8, num_experts_per_tok=3,
                                         norm_topk_prob=True)),
    # A dense layer in the middle (mlp_only_layers=[1]).
    "qwen3_moe-dense-middle": ("Qwen3MoeConfig", dict(num_key_value_heads=2,
                                                      intermediate_size=128,
                                                      moe_intermediate_size=48, num_experts=4,
                                                      num_experts_per_tok=2,
                                                      mlp_only_layers=[1])),
    "olmoe": ("OlmoeConfig", dict(num_key_value_heads=4, intermediate_size=48, num_experts=4,
                                  num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, intermediate_size=128,
                                             moe_intermediate_size=32, n_shared_experts=1,
                                             n_routed_experts=8, routed_scaling_factor=2.5,
                                             kv_lora_rank=16, q_lora_rank=24,
                                             qk_rope_head_dim=8, v_head_dim=16,
                                             qk_nope_head_dim=16, n_group=4, topk_group=2,
                                             num_experts_per_tok=2, first_k_dense_replace=1,
                                             norm_topk_prob=True)),
    # dots.llm1: Qwen3's attention with DeepSeek-V3's routing (groups, correction bias).
    "dots1": ("Dots1Config", dict(num_key_value_heads=2, head_dim=32, intermediate_size=128,
                                  moe_intermediate_size=32, n_shared_experts=1,
                                  n_routed_experts=8, routed_scaling_factor=2.0, n_group=4,
                                  topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
                                  norm_topk_prob=True)),
    # rope_interleave=false: transformers rotates halves, as moekit does (and full-rank queries).
    "deepseek_v3-rotate-half": ("DeepseekV3Config", dict(num_key_value_heads=4,
                                                         intermediate_size=128,
                                                         moe_intermediate_size=32,
                                                         n_shared_experts=1, n_routed_experts=4,
                                                         kv_lora_rank=16, q_lora_rank=None,
                                                         qk_rope_head_dim=8, v_head_dim=16,
                                                         qk_nope_head_dim=16, n_group=1,
                                                         topk_group=1, num_experts_per_tok=2,
                                                         first_k_dense_replace=1,
                                                         rope_interleave=False)),
    # Softmax routing in groups scored by their best expert; YaRN whose mscale and
    # mscale_all_dim cancel in the cos/sin tables but sharpen the softmax.
    "deepseek_v2": ("DeepseekV2Config", dict(num_key_value_heads=4, intermediate_size=128,
                                             moe_intermediate_size=32, n_shared_experts=1,
                                             n_routed_experts=8, routed_scaling_factor=2.0,
                                             kv_lora_rank=16, q_lora_rank=24,
                                             qk_rope_head_dim=8, v_head_dim=16,
                                             qk_nope_head_dim=16, n_group=4, topk_group=2,
                                             topk_method="group_limited_greedy",
                                             num_experts_per_tok=2, first_k_dense_replace=1,
                                             rope_parameters=YARN_V2)),
    # V2-Lite: full-rank queries, greedy routing over all experts, two shared experts.
    "deepseek_v2_lite": ("DeepseekV2Config", dict(num_key_value_heads=4, intermediate_size=128,
                                                  moe_intermediate_size=32, n_shared_experts=2,
                                                  n_routed_experts=8, kv_lora_rank=16,
                                                  q_lora_rank=None, qk_rope_head_dim=8,
                                                  v_head_dim=16, qk_nope_head_dim=16,
                                                  topk_method="greedy", num_experts_per_tok=3,
                                                  first_k_dense_replace=1)),
    "deepseek_v3-yarn": ("DeepseekV3Config", dict(num_key_value_heads=4, intermediate_size=128,
                                                  moe_intermediate_size=32, n_shared_experts=1,
                                                  n_routed_experts=8, routed_scaling_factor=2.5,
                                                  kv_lora_rank=16, q_lora_rank=24,
                                                  qk_rope_head_dim=8, v_head_dim=16,
                                                  qk_nope_head_dim=16, n_group=4, topk_group=2,
                                                  num_experts_per_tok=2,
                                                  first_k_dense_replace=1, norm_topk_prob=True,
                                                  rope_parameters=YARN_V3)),
    "qwen3_moe-yarn": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=32,
                                              intermediate_size=128, moe_intermediate_size=48,
                                              num_experts=8, num_experts_per_tok=3,
                                              norm_topk_prob=True, rope_parameters=YARN_QWEN)),
    # Layers 0 and 2 slide over 8 tokens (the tests run 16-30), layer 1 sees everything; a
    # low swiglu_limit makes the clamp bite.
    "gpt_oss": ("GptOssConfig", dict(num_key_value_heads=2, head_dim=16, intermediate_size=48,
                                     num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=8, swiglu_limit=1.5, swiglu_alpha=1.6,
                                     rope_parameters={"rope_type": "default",
                                                      "rope_theta": 150000.0})),
    # gpt-oss's published RoPE: YaRN without truncation.
    "gpt_oss-yarn": ("GptOssConfig", dict(num_key_value_heads=2, head_dim=16, intermediate_size=48,
                                     num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=8, swiglu_limit=1.5, swiglu_alpha=1.6,
                                     rope_parameters={"rope_type": "yarn", "factor": 32.0,
                                                      "beta_fast": 32.0, "beta_slow": 1.0,
                                                      "truncate": False,
                                                      "original_max_position_embeddings": 16,
                                                      "rope_theta": 150000.0})),
    # Interleaved MoE layers (1, 3) with dense ones of their own width, a NoPE layer (1) with
    # temperature tuning, chunks of 5 positions on the RoPE layers, L2 q/k norms, llama3 RoPE
    # scaling.
    "llama4_text": ("Llama4TextConfig", dict(num_hidden_layers=4, num_key_value_heads=2,
                                             intermediate_size=48, intermediate_size_mlp=96,
                                             num_local_experts=4, num_experts_per_tok=2,
                                             interleave_moe_layer_step=2,
                                             no_rope_layers=[1, 0, 1, 1], attention_chunk_size=5,
                                             attn_temperature_tuning=True, floor_scale=4,
                                             attn_scale=0.5, use_qk_norm=True,
                                             rope_parameters=LLAMA3)),
}  # fmt: skip


def tiny_config(name, **overrides):
    """A fresh transformers config for tiny model `name`, with `overrides` applied."""
    cls, fields = TINY[name]
    return getattr(transformers, cls)(**{**COMMON, **fields, **overrides})


ARCHS = list(TINY)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    text = (
        "def add(a, b):\n    return a + b\n" * 20
        + "The quick brown fox jumps over the lazy dog. " * 20
    )
    return Tokenizer.train([text], 300)


def make_hf(name, directory, tokenizer, config_kw=None, **save_kw):
    torch.manual_seed(0)
    config = tiny_config(name, **(config_kw or {}))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():  # a non-zero correction bias exercises the bias path
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(
                    torch.randn_like(module.e_score_correction_bias) * 0.1
                )
        if config.model_type == "gpt_oss":  # its biases start at 0: make them matter
            for param_name, param in model.named_parameters():
                if param_name.endswith("bias"):
                    param.copy_(torch.randn_like(param) * 0.3)
    model.save_pretrained(directory, **save_kw)
    tokenizer.save(directory)
    return model


@pytest.fixture(scope="module", params=ARCHS)
def converted(request, tmp_path_factory, tokenizer):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf = make_hf(name, root / "hf", tokenizer)
    cfg = import_hf(root / "hf", root / "moekit")
    return name, root, hf, cfg


def test_logits_match_transformers(converted):
    _, root, hf, _ = converted
    ours = load_model(root / "moekit").eval()
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_continuations_match(converted):
    _, root, hf, _ = converted
    generator = Generator.from_dir(root / "moekit")
    prompt = torch.randint(2, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    ours = generator.generate(
        [prompt[0].tolist()], SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    )
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                             do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert ours[0].token_ids == theirs[0, 10:].tolist()


def test_parameter_counts_match(converted):
    _, _, hf, cfg = converted
    assert count_params(cfg).total == sum(p.numel() for p in hf.parameters())


def test_export_round_trip_and_transformers_loads_it(converted, tokenizer):
    name, root, hf, _ = converted
    arch = export_hf(root / "moekit", root / "exported")
    # The imported checkpoint's own class comes back (each tiny model is plain enough that
    # nothing simpler represents it).
    assert arch == type(hf).__name__
    assert json.loads((root / "hf" / "config.json").read_text())["architectures"] == [arch]
    exported = json.loads((root / "exported" / "config.json").read_text())
    assert exported["model_type"] == tiny_config(name).model_type
    assert exported["architectures"] == [arch]
    import_hf(root / "exported", root / "again")
    a, b = load_weights(root / "moekit"), load_weights(root / "again")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(root / "exported").eval()
    ours = load_model(root / "moekit").eval()
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (reloaded(tokens).logits - ours(tokens).logits).abs().max().item() <= 1e-4
    auto = transformers.AutoTokenizer.from_pretrained(root / "exported")
    text = "def add(a, b): return a + b <|endoftext|>"
    assert auto(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert auto(text)["input_ids"] == tokenizer.encode_prompt(text)  # no BOS in ours
    assert auto.eos_token_id == tokenizer.eos_id
    assert exported["bos_token_id"] is None and exported["eos_token_id"] == tokenizer.eos_id


def test_in_memory_tables_fill_transformers_models(converted):
    """Each architecture's in-memory weight table (what the benchmarks and the PEFT export name
    weights by) fills transformers' model of it completely, and that model computes our logits."""
    from moekit.interop import live
    from moekit.interop.hf import architectures

    _, root, hf, cfg = converted
    arch = architectures()[type(hf).__name__]
    ours = load_model(root / "moekit").eval()
    theirs = live.to_hf_model(arch, ours, cfg)  # refuses a missing or unexpected weight
    assert type(theirs) is type(hf)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (theirs(tokens).logits - ours(tokens).logits).abs().max().item() <= 1e-4


def test_tokenizer_is_carried_over(converted, tokenizer):
    _, root, _, _ = converted
    carried = Tokenizer.load(root / "moekit")
    assert carried.encode("The quick brown fox") == tokenizer.encode("The quick brown fox")
    assert carried.eos_id == tokenizer.eos_id


def test_sharded_checkpoints_and_dtype(tmp_path, tokenizer):
    hf = make_hf("qwen2_moe", tmp_path / "hf", tokenizer, max_shard_size="200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    import_hf(tmp_path / "hf", tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=300_000)
    weights = load_weights(tmp_path / "bf16")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").exists()
    assert weights["layers.1.ffn.experts.w_up"].dtype == torch.bfloat16
    assert weights["layers.1.ffn.router.weight"].dtype == torch.float32
    model = load_model(tmp_path / "bf16", dtype=torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        diff = (model(tokens).logits.float() - hf(tokens).logits).abs().max().item()
    assert diff < 0.1  # bf16 weights: close, not equal


def test_export_states_its_dtype_and_keeps_routing_float32(tmp_path, tokenizer):
    from safetensors import safe_open

    make_hf("deepseek_v3", tmp_path / "hf", tokenizer)  # a router and a correction bias
    import_hf(tmp_path / "hf", tmp_path / "fp32")
    import_hf(tmp_path / "hf", tmp_path / "bf16", dtype="bfloat16")
    for src, out, dtype in [("fp32", "to-bf16", "bfloat16"), ("bf16", "kept", None)]:
        export_hf(tmp_path / src, tmp_path / out, dtype=dtype)
        with safe_open(str(tmp_path / out / "model.safetensors"), framework="pt") as f:
            stored = {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
        assert stored["model.layers.1.mlp.gate.weight"] == torch.float32
        assert stored["model.layers.1.mlp.gate.e_score_correction_bias"] == torch.float32
        assert stored["model.layers.1.mlp.experts.0.up_proj.weight"] == torch.bfloat16
        assert stored["model.embed_tokens.weight"] == torch.bfloat16
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert config["dtype"] == config["torch_dtype"] == "bfloat16"  # what is stored
        assert transformers.AutoConfig.from_pretrained(tmp_path / out).dtype == torch.bfloat16
    export_hf(tmp_path / "fp32", tmp_path / "fp32-hf")
    assert json.loads((tmp_path / "fp32-hf" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe"])
def test_attention_bias_is_refused_by_name(tmp_path, tokenizer, name):
    """transformers' attention_bias gives o_proj a bias too, which moekit does not have."""
    make_hf(name, tmp_path / "hf", tokenizer, config_kw=dict(attention_bias=True))
    with pytest.raises(UnsupportedError, match=r"attention_bias=True is not supported.*o_proj"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize(
    "name, config_kw, message",
    [("deepseek_v2", dict(norm_topk_prob=True), r"norm_topk_prob=True is not supported"),
     ("deepseek_v2_lite", dict(mlp_bias=True), r"mlp_bias=True is not supported"),
     ("deepseek_v2", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)),
      r"rope_parameters\.rope_type='dynamic' is not supported")],
)  # fmt: skip
def test_deepseek_v2_settings_moekit_cannot_carry_are_refused(tmp_path, tokenizer, name,
                                                              config_kw, message):  # fmt: skip
    make_hf(name, tmp_path / "hf", tokenizer, config_kw=config_kw)
    with pytest.raises(UnsupportedError, match=message):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, window",
    [("mixtral", {}), ("qwen2_moe", dict(use_sliding_window=True, max_window_layers=3)),
     ("qwen3_moe", dict(use_sliding_window=True))],
)  # fmt: skip
def test_sliding_windows_as_wide_as_the_context_are_full_attention(tmp_path, tokenizer, name,
                                                                   window):  # fmt: skip
    """A window that hides no key within max_position_embeddings is full attention and is
    imported; a narrower one is refused, naming the field."""
    hf = make_hf(name, tmp_path / "wide", tokenizer, config_kw=dict(window, sliding_window=128))
    import_hf(tmp_path / "wide", tmp_path / "ours")
    tokens = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (load_model(tmp_path / "ours")(tokens).logits - hf(tokens).logits).abs().max()
    assert diff.item() <= 1e-4
    make_hf(name, tmp_path / "narrow", tokenizer, config_kw=dict(window, sliding_window=16))
    with pytest.raises(
        UnsupportedError,
        match=r"sliding_window=16 is not supported: it is narrower than max_position_embeddings",
    ):
        import_hf(tmp_path / "narrow", tmp_path / "refused")


def test_unsupported_fields_are_named(tmp_path, tokenizer):
    make_hf("mixtral", tmp_path / "hf", tokenizer)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedError, match=r"rope_parameters\.rope_type='dynamic' is not supported"
    ):
        import_hf(tmp_path / "hf", tmp_path / "out")
    config["architectures"], config["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedError, match="is not supported; moekit converts MixtralForCausalLM"
    ):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_unmapped_tensors_are_not_dropped_silently(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    make_hf("olmoe", tmp_path / "hf", tokenizer)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["model.layers.0.mlp.mystery.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedError, match=r"1 tensor.*mlp\.mystery.*refusing to drop them"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_convert_cli(tmp_path, tokenizer):
    make_hf("mixtral", tmp_path / "hf", tokenizer)
    run = lambda *a: subprocess.run([sys.executable, "-m", "moekit.cli", "convert", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)  # fmt: skip
    proc = run("--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["architecture"] == "MixtralForCausalLM"
    proc = run("--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "back" / "config.json").exists()
    proc = run("--from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "has no config.json" in proc.stderr


def test_llama4_multimodal_checkpoints_import_their_text_model(tmp_path, tokenizer):
    """Llama4ForConditionalGeneration: the language model (under text_config and
    language_model.) is imported, the vision tower left behind; the logits are those of the
    multimodal model's language model on text (its own forward fails on text alone in this
    transformers), and the export is a Llama4ForCausalLM."""
    text = tiny_config("llama4_text").to_dict()
    vision = transformers.Llama4VisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
        projector_output_dim=64,
    )  # fmt: skip
    config = transformers.Llama4Config(text_config=text, vision_config=vision.to_dict())
    torch.manual_seed(0)
    hf = transformers.Llama4ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    cfg = import_hf(tmp_path / "hf", tmp_path / "ours")
    assert cfg.irope is not None and cfg.irope.chunk_size == 5
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (
            load_model(tmp_path / "ours")(tokens).logits - hf.language_model(tokens).logits
        ).abs()
    assert diff.max().item() <= 1e-4
    assert export_hf(tmp_path / "ours", tmp_path / "text") == "Llama4ForCausalLM"
