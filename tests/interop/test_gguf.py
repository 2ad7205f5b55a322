"""GGUF files in and out, on tiny random models of each family llama.cpp runs.

Each model is built by transformers, imported into moekit with a moekit-trained tokenizer, and
written as GGUF with the `gguf` package. The file is checked against the package's own
tables (the names llama.cpp's converter gives the same transformers checkpoint), read back
(float32: the same logits exactly; quantised types: within stated tolerances) and refused by
name where llama.cpp would compute something else.
"""

import json
import math
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from moekit.data.tokenizer import Tokenizer  # noqa: E402
from moekit.interop.fields import UnsupportedError  # noqa: E402
from moekit.interop.gguf import export_gguf, import_gguf  # noqa: E402
from moekit.interop.hf import export_hf, import_hf  # noqa: E402
from moekit.model_dir import load_model  # noqa: E402

TEXT = "def add(a, b):\n    return a + b\n" * 20 + "The quick brown fox jumps over the dog. " * 20
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False)  # fmt: skip
FAMILIES = {  # name: (transformers config class, fields, the GGUF architecture)
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, intermediate_size=64,
                                      num_local_experts=4, num_experts_per_tok=2), "llama"),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_key_value_heads=2, intermediate_size=96,
                                         moe_intermediate_size=32, num_experts=4,
                                         shared_expert_intermediate_size=64,
                                         num_experts_per_tok=2, norm_topk_prob=False),
                  "qwen2moe"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=32,
                                         intermediate_size=96, moe_intermediate_size=32,
                                         num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True), "qwen3moe"),
    "olmoe": ("OlmoeConfig", dict(num_key_value_heads=4, intermediate_size=32, num_experts=4,
                                  num_experts_per_tok=2), "olmoe"),
    # Multi-head latent attention, a leading dense layer, shared experts; V3 with expert groups
    # and a selection bias, V2 with softmax routing and full-rank queries.
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, intermediate_size=96,
                                             moe_intermediate_size=32, n_shared_experts=1,
                                             n_routed_experts=8, routed_scaling_factor=2.5,
                                             kv_lora_rank=16, q_lora_rank=24,
                                             qk_rope_head_dim=8, v_head_dim=16,
                                             qk_nope_head_dim=16, n_group=4, topk_group=2,
                                             num_experts_per_tok=2, first_k_dense_replace=1,
                                             norm_topk_prob=True), "deepseek2"),
    "deepseek_v2": ("DeepseekV2Config", dict(num_key_value_heads=4, intermediate_size=96,
                                             moe_intermediate_size=32, n_shared_experts=2,
                                             n_routed_experts=8, routed_scaling_factor=1.5,
                                             kv_lora_rank=16, q_lora_rank=None,
                                             qk_rope_head_dim=8, v_head_dim=16,
                                             qk_nope_head_dim=16, topk_method="greedy",
                                             num_experts_per_tok=2, first_k_dense_replace=1,
                                             norm_topk_prob=False), "deepseek2"),
    "dots1": ("Dots1Config", dict(num_key_value_heads=4, head_dim=32, intermediate_size=96,
                                  moe_intermediate_size=32, n_shared_experts=1,
                                  n_routed_experts=8, routed_scaling_factor=2.0, n_group=4,
                                  topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
                                  norm_topk_prob=True), "dots1"),
    # Attention sinks, q/k/v/o biases, sliding-window layers, router and expert biases, the
    # clamped SwiGLU; unscaled RoPE (gpt-oss's published YaRN is refused, see below).
    "gpt_oss": ("GptOssConfig", dict(num_key_value_heads=2, head_dim=16, intermediate_size=32,
                                     num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                     rope_parameters={"rope_type": "default",
                                                      "rope_theta": 150000.0}), "gpt-oss"),
    # Llama 4 as llama.cpp fixes it: MoE every other layer (1, 3) with dense layers between, a
    # NoPE layer every fourth (3), chunks of 8192 and temperature tuning from position 8192 on,
    # L2 q/k norms; the routing weight scales the expert's input; a shared expert.
    "llama4_text": ("Llama4TextConfig", dict(num_hidden_layers=4, num_key_value_heads=2,
                                             intermediate_size=32, intermediate_size_mlp=96,
                                             num_local_experts=4, num_experts_per_tok=2,
                                             interleave_moe_layer_step=2,
                                             no_rope_layer_interval=4, attention_chunk_size=8192,
                                             attn_temperature_tuning=True, floor_scale=8192,
                                             attn_scale=0.1, use_qk_norm=True,
                                             rope_parameters={"rope_type": "default",
                                                              "rope_theta": 5e5}), "llama4"),
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT], 300)


def make_model(name, root, tokenizer, vocab=None, **overrides):
    """A moekit model directory imported from a tiny random transformers model `name`."""
    cls, fields, _ = FAMILIES[name]
    config = getattr(transformers, cls)(
        vocab_size=vocab or tokenizer.vocab_size, **{**COMMON, **fields, **overrides}
    )
    random_model(config).save_pretrained(root / "hf")
    tokenizer.save(root / "hf")
    import_hf(root / "hf", root / "moekit")
    return root / "moekit"


def random_model(config):
    """A transformers model of `config` with seeded random weights (gpt-oss's biases and
    sinks, which start at 0, random too, so they matter)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if config.model_type == "gpt_oss":
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith(("bias", "sinks")):
                    param.copy_(torch.randn_like(param) * 0.3)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tokenizer):
    name = request.param
    root = tmp_path_factory.mktemp(f"gguf-{name}")
    model_dir = make_model(name, root, tokenizer)
    result = export_gguf(model_dir, root / "model-f32.gguf", type="f32")
    return name, root, model_dir, result


def logits(model_dir, tokens):
    with torch.no_grad():
        return load_model(model_dir).eval()(tokens).logits


TOKENS = torch.randint(2, 250, (2, 20), generator=torch.Generator().manual_seed(1))


def test_float32_round_trip_is_exact(family):
    name, root, model_dir, result = family
    assert result.architecture == FAMILIES[name][2]
    back = import_gguf(root / "model-f32.gguf", root / "back-f32")
    assert back.architecture == result.architecture and back.tensors == result.tensors
    assert torch.equal(logits(back.path, TOKENS), logits(model_dir, TOKENS))
    # The architecture is the same; training-only settings (the balance loss weight, jitter,
    # initialisation scale) are not in a GGUF file and come back at their defaults.
    assert inference_fields(back.path) == inference_fields(model_dir)


def inference_fields(model_dir):
    data = load_model(model_dir).cfg.to_dict()
    data.pop("init_std")
    for key in ("aux_loss_weight", "router_jitter", "z_loss_weight"):
        data["moe"].pop(key)
    return data


def test_names_and_metadata_are_llama_cpps(family, tmp_path):
    """Every tensor carries the name llama.cpp's converter gives the same transformers
    checkpoint, found through the gguf package's own name map (per-expert tensors stacked
    under the merged name, as the converter stacks them), and the hyperparameters sit under
    the keys llama.cpp reads."""
    name, root, model_dir, _ = family
    arch = FAMILIES[name][2]
    reader = gguf.GGUFReader(root / "model-f32.gguf")
    written = {t.name for t in reader.tensors}
    export_hf(model_dir, tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        hf_names = set(f.keys())
    layers = load_model(model_dir).cfg.num_layers
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper().replace("-", "_")], layers)
    expected = set()
    for hf_name in hf_names:
        for renamed in converter_names(hf_name):
            mapped = tmap.get_name(renamed, try_suffixes=(".weight", ".bias"))
            assert mapped is not None, hf_name
            expected.add(mapped)
    assert written == expected

    fields = {k: f.contents() for k, f in reader.fields.items()}
    cfg = load_model(model_dir).cfg
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == cfg.num_layers
    assert fields[f"{arch}.embedding_length"] == cfg.dim
    latent = arch == "deepseek2"  # every head reads one shared latent
    assert fields[f"{arch}.attention.head_count_kv"] == (1 if latent else cfg.kv_heads)
    assert fields[f"{arch}.expert_count"] == cfg.moe.num_experts
    assert fields[f"{arch}.expert_used_count"] == cfg.moe.top_k
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == 0 and not fields["tokenizer.ggml.add_bos_token"]
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size


def converter_names(hf_name):
    """The names llama.cpp's converter gives a transformers tensor before its name map: experts
    stacked under one name, DeepSeek's key/value up-projection split in two, its correction
    bias named as a bias."""
    name = re.sub(r"\.experts\.\d+\.", ".experts.", hf_name)
    name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    if "kv_b_proj" in name:
        return [name.replace("kv_b_proj", "k_b_proj"), name.replace("kv_b_proj", "v_b_proj")]
    # gpt-oss: the stacked experts' gate and up split apart, suffixes made .weight / .bias.
    if name.endswith("gate_up_proj_bias"):
        return [name.replace("gate_up_proj_bias", f"{p}_proj.bias") for p in ("gate", "up")]
    if name.endswith("gate_up_proj"):
        return [name.replace("gate_up_proj", f"{p}_proj.weight") for p in ("gate", "up")]
    if name.endswith("experts.down_proj"):
        return [name + ".weight"]
    if name.endswith("down_proj_bias"):
        return [name.replace("down_proj_bias", "down_proj.bias")]
    if name.endswith("sinks"):
        return [name + ".weight"]
    return [name]


def test_the_tokenizer_comes_back(family):
    _, root, model_dir, _ = family
    back = root / "back-f32"
    if not back.exists():
        import_gguf(root / "model-f32.gguf", back)
    ours, theirs = Tokenizer.load(model_dir), Tokenizer.load(back)
    for text in (TEXT[:200], "  Ünïcödé, emoji 🦙 and\ttabs", ""):
        assert theirs.encode(text) == ours.encode(text)
        assert theirs.decode(theirs.encode(text)) == text
    assert (theirs.eos_id, theirs.bos_id, theirs.vocab_size) == (0, None, ours.vocab_size)


# What each type costs after a round trip on these tiny random models: the relative error of
# every weight (measured: f16 0.02%, q8_0 0.53-0.54%, q4_0 8.8%) and of the logits, mean
# absolute error over mean absolute logit (f16 0.06%, q8_0 1.6%: random experts make routing
# flip easily). q4_0 is checked on the weights only: on random weights its logits move
# 20%, which says more about random models than about the format.
WEIGHT_ERROR = {"f16": 0.001, "q8_0": 0.01, "q4_0": 0.15}
LOGIT_ERROR = {"f16": 0.002, "q8_0": 0.04}


@pytest.mark.parametrize("type", ["f16", "q8_0", "q4_0"])
def test_quantised_types_stay_close(tmp_path, tokenizer, type):
    from moekit.model_dir import load_weights

    model_dir = make_model("qwen3_moe", tmp_path, tokenizer)
    result = export_gguf(model_dir, tmp_path / f"m-{type}.gguf", type=type)
    reader = gguf.GGUFReader(result.path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.ffn_gate_inp.weight"] == "F32"  # routers stay float32
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["blk.0.ffn_gate_exps.weight"] == type.upper()
    assert kinds["output.weight"] == ("Q8_0" if type == "q4_0" else type.upper())
    back = import_gguf(result.path, tmp_path / "back")
    ours, theirs = load_weights(model_dir), load_weights(back.path)
    for name, weight in ours.items():
        error = ((theirs[name] - weight).norm() / weight.norm()).item()
        assert error <= WEIGHT_ERROR[type], name
    if type in LOGIT_ERROR:
        expected, got = logits(model_dir, TOKENS), logits(back.path, TOKENS)
        error = (got - expected).abs().mean() / expected.abs().mean()
        assert error <= LOGIT_ERROR[type]
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_tokenizer_shorter_than_the_embedding_is_padded(tmp_path, tokenizer):
    model_dir = make_model("mixtral", tmp_path, tokenizer, vocab=tokenizer.vocab_size + 6)
    export_gguf(model_dir, tmp_path / "m.gguf", type="f32")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == tokenizer.vocab_size + 6 and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    back = import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    assert Tokenizer.load(back.path).vocab_size == tokenizer.vocab_size


# ---- refusals ------------------------------------------------------------------------------------


def test_models_llama_cpp_would_compute_differently_are_refused(tmp_path, tokenizer):
    renormalised = make_model("qwen2_moe", tmp_path / "a", tokenizer, norm_topk_prob=True)
    with pytest.raises(UnsupportedError, match=r"qwen2moe \(Qwen2-MoE\): llama.cpp's qwen2moe graph does not "
                                               r"renormalise"):  # fmt: skip
        export_gguf(renormalised, tmp_path / "out.gguf")
    dense = make_model("qwen3_moe", tmp_path / "b", tokenizer, mlp_only_layers=[1])
    with pytest.raises(UnsupportedError, match="qwen3moe graph has no dense layers"):
        export_gguf(dense, tmp_path / "out.gguf")
    yarn = dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32,
                beta_fast=16.0, truncate=False)  # fmt: skip
    scaled = make_model("qwen3_moe", tmp_path / "c", tokenizer, rope_parameters=yarn)
    with pytest.raises(UnsupportedError, match=r"\(truncate must be true\); llama.cpp uses "
                                               r"YaRN's beta_fast 32"):  # fmt: skip
        export_gguf(scaled, tmp_path / "out.gguf")
    grouped = make_model("dots1", tmp_path / "e", tokenizer, num_key_value_heads=2)
    with pytest.raises(UnsupportedError, match=r"dots1 graph gives keys and values as many heads"):
        export_gguf(grouped, tmp_path / "out.gguf")
    llama3 = dict(rope_type="llama3", rope_theta=1e6, factor=4.0, low_freq_factor=1.0,
                  high_freq_factor=4.0, original_max_position_embeddings=32)  # fmt: skip
    scaled = make_model("qwen3_moe", tmp_path / "d", tokenizer, rope_parameters=llama3)
    with pytest.raises(UnsupportedError, match=r"qwen3moe graph reads no per-dimension RoPE "
                                               r"factors, which Llama 3 scaling needs"):  # fmt: skip
        export_gguf(scaled, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.gguf")]


def test_gpt_oss_sliding_layers_travel_and_its_published_yarn_is_refused(tmp_path, tokenizer):
    """Sliding layers other than llama.cpp's default (every even layer) are written as a
    per-layer list and read back; gpt-oss's published YaRN (no truncation) and other SwiGLU
    constants than llama.cpp's are refused by name."""
    types = ["full_attention", "sliding_attention", "full_attention"]
    model_dir = make_model("gpt_oss", tmp_path / "a", tokenizer, num_hidden_layers=3,
                           layer_types=types)  # fmt: skip
    export_gguf(model_dir, tmp_path / "a.gguf", type="f32")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "a.gguf").fields.items()}
    assert fields["gpt-oss.attention.sliding_window_pattern"] == [False, True, False]
    back = import_gguf(tmp_path / "a.gguf", tmp_path / "back")
    assert load_model(back.path).cfg.attention.sliding_layers == [1]
    assert torch.equal(logits(back.path, TOKENS), logits(model_dir, TOKENS))
    # The default layout writes no list (as llama.cpp's converter).
    export_gguf(make_model("gpt_oss", tmp_path / "b", tokenizer), tmp_path / "b.gguf")
    keys = set(gguf.GGUFReader(tmp_path / "b.gguf").fields)
    assert "gpt-oss.attention.sliding_window_pattern" not in keys
    # No sliding layer (llama.cpp's graph cannot run that): the default layout with a window as
    # wide as the context, which hides nothing, read back as full attention.
    full = make_model("gpt_oss", tmp_path / "f", tokenizer, layer_types=["full_attention"] * 2)
    export_gguf(full, tmp_path / "f.gguf", type="f32")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "f.gguf").fields.items()}
    assert "gpt-oss.attention.sliding_window_pattern" not in fields
    assert fields["gpt-oss.attention.sliding_window"] == fields["gpt-oss.context_length"] == 128
    back = import_gguf(tmp_path / "f.gguf", tmp_path / "back-f")
    assert load_model(back.path).cfg.attention.sliding_layers is None
    assert torch.equal(logits(back.path, TOKENS), logits(full, TOKENS))
    # A window stated but used by no layer is written as wide as the context too.
    cfg = load_model(full).cfg
    cfg.attention.sliding_window, cfg.attention.sliding_layers = 8, []
    from moekit.interop.gguf_arch import GPT_OSS

    assert GPT_OSS.meta_of(cfg) == {"{arch}.attention.sliding_window": 128}

    yarn = dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                beta_slow=1.0, truncate=False, original_max_position_embeddings=16)  # fmt: skip
    published = make_model("gpt_oss", tmp_path / "c", tokenizer, rope_parameters=yarn,
                           swiglu_limit=1.5)  # fmt: skip
    with pytest.raises(UnsupportedError, match=r"gpt-oss \(gpt-oss\): llama.cpp's gpt-oss graph "
                                               r"fixes the clamped SwiGLU at swiglu_alpha 1.702 "
                                               r"and swiglu_limit 7 \(not 1.702 and 1.5\); "
                                               r"llama.cpp rounds YaRN's ramp"):  # fmt: skip
        export_gguf(published, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_llama4_settings_llama_cpp_fixes_are_refused_by_name(tmp_path, tokenizer):
    """llama.cpp's llama4 graph fixes the NoPE layers, the chunk size within the context, the
    temperature tuning and the q/k norms; Llama 4 models that differ are refused, naming each."""
    odd = make_model("llama4_text", tmp_path / "a", tokenizer, attention_chunk_size=5,
                     use_qk_norm=False, moe_layers=[0, 3])  # fmt: skip
    with pytest.raises(UnsupportedError) as refused:
        export_gguf(odd, tmp_path / "out.gguf")
    reason = str(refused.value).split("llama4 (Llama 4): ")[1]
    assert (
        "places MoE layers every interleave_moe_layer_step-th layer (not at layers [0, 3])"
        in reason
    )
    assert "chunks attention by 8192 positions (chunk_size 5 acts within" in reason
    assert "L2 q/k norms exactly when there are not 128 experts (qk_l2_norm must be true)" in reason
    nope = make_model("llama4_text", tmp_path / "b", tokenizer, no_rope_layers=[1, 0, 1, 1])
    with pytest.raises(UnsupportedError, match=r"NoPE layers exactly every 4th layer \(\[3\]; "
                                               r"this model: \[1\]\)"):  # fmt: skip
        export_gguf(nope, tmp_path / "out.gguf")
    # Within a context shorter than 8192 neither chunks nor the temperature act: written.
    short = make_model("llama4_text", tmp_path / "c", tokenizer, attention_chunk_size=None,
                       attn_temperature_tuning=False)  # fmt: skip
    assert export_gguf(short, tmp_path / "short.gguf").architecture == "llama4"
    assert not (tmp_path / "out.gguf").exists()


def test_a_hierarchical_model_is_refused_by_name(tmp_path, tokenizer):
    from moekit import build_model
    from moekit.config import ModelConfig
    from moekit.model_dir import save_model

    cfg = ModelConfig.from_dict(
        dict(vocab_size=tokenizer.vocab_size, dim=32, num_layers=1, num_heads=2, num_kv_heads=1,
             ffn_hidden=64, max_seq_len=64,
             moe=dict(num_experts=4, top_k=2, expert_hidden=32, router="hierarchical",
                      router_groups=2, group_top_k=1))
    )  # fmt: skip
    save_model(build_model(cfg, seed=0), cfg, tmp_path / "m")
    tokenizer.save(tmp_path / "m")
    with pytest.raises(UnsupportedError, match=r"moe.router='hierarchical' has a learned group "
                                               r"router"):  # fmt: skip
        export_gguf(tmp_path / "m", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def foreign_gguf(path, arch, strings=None):
    """A GGUF file written by the gguf package alone: architecture `arch`, string metadata
    `strings`, one small embedding."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in (strings or {}).items():
        writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unreadable_and_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        import_gguf(bad, tmp_path / "out")
    foreign_gguf(tmp_path / "gemma.gguf", "gemma")
    with pytest.raises(UnsupportedError, match=r"GGUF architecture 'gemma' is not supported: "
                                               r"moekit reads and writes llama"):  # fmt: skip
        import_gguf(tmp_path / "gemma.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    foreign_gguf(tmp_path / "yarn.gguf", "qwen3moe", {"qwen3moe.rope.scaling.type": "longrope"})
    with pytest.raises(UnsupportedError, match=r"qwen3moe\.rope\.scaling\.type='longrope' is "
                                               r"not supported: moekit reads yarn and linear"):  # fmt: skip
        import_gguf(tmp_path / "yarn.gguf", tmp_path / "out")


def test_the_command_line(tmp_path, tokenizer):
    """`moekit convert --to-gguf / --from-gguf / --list` in a subprocess, with a refusal that
    is one line naming the problem."""
    import json
    import subprocess
    import sys

    model_dir = make_model("olmoe", tmp_path, tokenizer)
    run = lambda *a: subprocess.run([sys.executable, "-m", "moekit.cli", "convert", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)  # fmt: skip
    out = tmp_path / "m.gguf"
    proc = run("--to-gguf", str(model_dir), "--out", str(out), "--type", "q8_0", "--json")
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)
    assert (done["architecture"], done["type"], done["out"]) == ("olmoe", "q8_0", str(out))
    proc = run("--from-gguf", str(out), "--out", str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr
    assert "imported olmoe" in proc.stdout and (tmp_path / "back" / "config.json").exists()
    proc = run("--from-gguf", str(out), "--out", str(tmp_path / "back"))  # never overwrites
    assert proc.returncode != 0 and "already holds a model" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("--list", "--json")
    listed = {e["name"]: e for e in json.loads(proc.stdout)}
    assert listed["OlmoeForCausalLM"]["gguf"] == "olmoe"
    assert listed["DeepseekV3ForCausalLM"]["gguf"] == "deepseek2"
    assert "num_experts" in listed["OlmoeForCausalLM"]["carried"][0]
    proc = run("--to-gguf", str(model_dir))
    assert proc.returncode != 0 and "--out is required" in proc.stderr
    (tmp_path / "gguf").mkdir()  # a directory: the file is named after the model
    proc = run("--to-gguf", str(model_dir), "--out", str(tmp_path / "gguf"), "--type", "f32")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "gguf" / f"{model_dir.name}-f32.gguf").is_file()


def test_a_quantised_model_is_written_from_its_dequantised_weights(tmp_path, tokenizer):
    from moekit.interop.quantize import quantize

    model_dir = make_model("mixtral", tmp_path, tokenizer)
    quantize(model_dir, tmp_path / "int8", bits=8)
    export_gguf(tmp_path / "int8", tmp_path / "m.gguf", type="f32")
    back = import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    assert torch.allclose(logits(back.path, TOKENS), logits(tmp_path / "int8", TOKENS), atol=1e-5)


def split_tokenizer(name):
    """A tokenizer trained with the pre-tokenizer llama.cpp calls `name` (qwen2, llama-bpe,
    gpt-4o, deepseek-v3, olmo), laid out as those families' tokenizer.json files are."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, trainers

    from moekit.interop.gguf_tokenizer import pre_tokenizer_of

    # Llama 3's tokenizer takes a piece that is a token before merging (as llama.cpp does).
    backend = Backend(models.BPE(ignore_merges=name == "llama-bpe"))
    normalizer, backend.pre_tokenizer = pre_tokenizer_of(name)
    if normalizer is not None:
        backend.normalizer = normalizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers_alphabet(),
                                  show_progress=False)  # fmt: skip
    extra = "I'll pay 12345 dollars.\n\nWe'VE 3.14 cafés. 数字和日本語テキスト HÉLLO ÉCOLE" * 3
    backend.train_from_iterator([TEXT, extra], trainer)
    return Tokenizer(backend)


def pre_tokenizers_alphabet():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt-4o", "deepseek-v3", "olmo"])
def test_split_pre_tokenizers_are_named_and_rebuilt(tmp_path, pre):
    """Byte-level tokenizers with Qwen's, Llama 3's, the o200k or DeepSeek-V3's split are written
    under llama.cpp's name for it, and read back into a pipeline that encodes every text the
    same way."""
    tok = split_tokenizer(pre)
    model_dir = make_model("qwen3_moe", tmp_path, tok)
    export_gguf(model_dir, tmp_path / "m.gguf", type="f32")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert fields["tokenizer.ggml.pre"] == pre
    back = Tokenizer.load(import_gguf(tmp_path / "m.gguf", tmp_path / "back").path)
    ours = Tokenizer.load(model_dir)
    for text in ("I'll pay 12345 dollars.\n\n  We'VE 3.14 cafés", "a\r\nb\tc   d", TEXT[:300]):
        assert back.encode(text) == ours.encode(text), text
    rebuilt = json.loads((tmp_path / "back" / "tokenizer.json").read_text())["model"]
    assert rebuilt["ignore_merges"] == (pre == "llama-bpe")  # as llama.cpp reads the name
    pieces = back.backend.pre_tokenizer.pre_tokenize_str("12345")  # digits: 1 or up to 3
    assert len(pieces) == {"qwen2": 5, "olmo": 1}.get(pre, 2)
    if pre == "deepseek-v3":  # runs of CJK ideographs and kana split from their neighbours
        words = back.backend.pre_tokenizer.pre_tokenize_str("ab世界cd")
        assert len(words) == 3
    if pre == "gpt-4o":  # words split by letter case, contractions kept on their word
        words = back.backend.pre_tokenizer.pre_tokenize_str("HelloWorld we'LL")
        assert [w for w, _ in words] == ["Hello", "World", "Ġwe'LL"]


# The pre-tokenizers of published tokenizer.json files, as the files spell them (JSON text):
# gpt-oss's (o200k) and DeepSeek-V3's, whose normaliser is an empty sequence.
_BYTES = (
    '{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}'
)
_SPLIT = '{"type": "Split", "pattern": {"Regex": %s}, "behavior": "Isolated", "invert": false}'
_O200K = r'''"[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"'''
_DEEPSEEK_WORDS = r'''"[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"'''
PUBLISHED = {
    "gpt-4o": (
        '{"type": "Sequence", "pretokenizers": [' + _SPLIT % _O200K + ", " + _BYTES + "]}",
        "null",
    ),
    "deepseek-v3": (
        '{"type": "Sequence", "pretokenizers": ['
        + ", ".join([_SPLIT % r'"\\p{N}{1,3}"', _SPLIT % '"[一-龥぀-ゟ゠-ヿ]+"',
                     _SPLIT % _DEEPSEEK_WORDS, _BYTES])
        + "]}",
        '{"type": "Sequence", "normalizers": []}',
    ),
    # OLMoE's (GPT-NeoX's): GPT-2's byte-level split after NFC.
    "olmo": ('{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, '
             '"use_regex": true}', '{"type": "NFC"}'),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_pre_tokenizers_are_named(name):
    """The published files' own spelling (not moekit's table) is recognised."""
    from moekit.interop.gguf_tokenizer import pre_tokenizer_name

    pre, normalizer = PUBLISHED[name]
    spec = {"pre_tokenizer": json.loads(pre), "normalizer": json.loads(normalizer)}
    assert pre_tokenizer_name(spec, "tokenizer.json") == name


def test_a_merge_rule_llama_cpp_would_not_follow_is_refused(tmp_path):
    """llama.cpp takes whole-word tokens before merging exactly after "llama-bpe": a Llama
    3-split tokenizer that merges them anyway is refused by name."""
    model_dir = make_model("qwen3_moe", tmp_path, split_tokenizer("llama-bpe"))
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["model"]["ignore_merges"] = False
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UnsupportedError, match=r"llama.cpp takes whole-word tokens before "
                                               r"merging after the 'llama-bpe'"):  # fmt: skip
        export_gguf(model_dir, tmp_path / "m.gguf")


def test_other_pre_tokenizers_are_refused_by_name(tmp_path, tokenizer):
    from tokenizers import pre_tokenizers

    model_dir = make_model("olmoe", tmp_path, tokenizer)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = json.loads(pre_tokenizers.Whitespace().__getstate__())
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UnsupportedError, match=r"Whitespace.*none moekit names in GGUF files"):
        export_gguf(model_dir, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


SCALED = [  # (family, its RoPE scaling, the GGUF keys that state it)
    ("qwen3_moe", dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                       original_max_position_embeddings=32), {"rope.scaling.type": "yarn"}),
    ("qwen3_moe", dict(rope_type="yarn", rope_theta=1e6, factor=4.0, attention_factor=1.0,
                       original_max_position_embeddings=32), {"rope.scaling.attn_factor": None}),
    ("mixtral", dict(rope_type="linear", rope_theta=1e6, factor=2.0),
     {"rope.scaling.type": "linear"}),
    ("deepseek_v3", dict(rope_type="yarn", rope_theta=1e4, factor=4.0, mscale=0.707,
                         mscale_all_dim=0.707, original_max_position_embeddings=32),
     {"rope.scaling.yarn_log_multiplier": None}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "scaling", "keys"), SCALED, ids=lambda v: str(v)[:20])
def test_rope_scaling_round_trips(tmp_path, tokenizer, name, scaling, keys):
    """YaRN (with its default or an explicit attention factor, and DeepSeek's magnitude
    correction) and linear scaling are stated in the file and read back: the same logits at
    positions past the pretrained context."""
    model_dir = make_model(name, tmp_path, tokenizer, rope_parameters=scaling)
    result = export_gguf(model_dir, tmp_path / "m.gguf", type="f32")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(result.path).fields.items()}
    for key, value in keys.items():
        assert f"{result.architecture}.{key}" in fields
        if value is not None:
            assert fields[f"{result.architecture}.{key}"] == value
    back = import_gguf(result.path, tmp_path / "back")
    assert load_model(back.path).cfg.rope_scaling == load_model(model_dir).cfg.rope_scaling
    long = torch.randint(2, 250, (1, 100), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits(back.path, long), logits(model_dir, long), rtol=0, atol=1e-6)


LLAMA3 = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=64)  # fmt: skip


def llama3_factors(head_dim, theta, s):
    """Llama 3's per-dimension factors as llama.cpp's converter computes them (in double
    precision, from the published formula): the oracle for the rope_freqs tensor."""
    out = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        original = s["original_max_position_embeddings"]
        if wavelength < original / s["high_freq_factor"]:
            out.append(1.0)
        elif wavelength > original / s["low_freq_factor"]:
            out.append(s["factor"])
        else:
            smooth = (original / wavelength - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("name", ["mixtral", "llama4_text"])
def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path, tokenizer, name):
    """Llama 3 scaling is written as llama.cpp reads it, a rope_freqs tensor of per-dimension
    factors (equal to the converter's formula), with its settings under moekit's keys; read
    back, the same scaling and the same logits past the pretrained context. A file with bare
    factors (no settings) is refused by name."""
    model_dir = make_model(name, tmp_path, tokenizer, rope_parameters=LLAMA3)
    result = export_gguf(model_dir, tmp_path / "m.gguf", type="f32")
    reader = gguf.GGUFReader(result.path)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    head_dim = load_model(model_dir).cfg.head_dim
    expected = llama3_factors(head_dim, LLAMA3["rope_theta"], LLAMA3)
    stored = torch.tensor(freqs.data.copy())
    torch.testing.assert_close(stored, expected, rtol=1e-6, atol=0)
    assert expected.min() == 1.0 and expected.max() == 8.0  # both ends and a blend
    assert ((expected > 1) & (expected < 8)).any()
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["moekit.rope.llama3.original_context_length"] == 64
    back = import_gguf(result.path, tmp_path / "back")
    assert load_model(back.path).cfg.rope_scaling == load_model(model_dir).cfg.rope_scaling
    long = torch.randint(2, 250, (1, 100), generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits(back.path, long), logits(model_dir, long))

    rewrite(result.path, tmp_path / "bare.gguf", drop=("moekit.rope",))
    with pytest.raises(UnsupportedError, match=r"rope_freqs.weight holds per-dimension RoPE "
                                               r"factors without the Llama 3 settings"):  # fmt: skip
        import_gguf(tmp_path / "bare.gguf", tmp_path / "back-bare")
    assert not (tmp_path / "back-bare").exists()
    # The settings without the factors: llama.cpp would run the file unscaled.
    rewrite(result.path, tmp_path / "settings.gguf", drop=("rope_freqs.weight",))
    with pytest.raises(UnsupportedError, match=r"states Llama 3 RoPE scaling .* but llama.cpp "
                                               r"would run this \w+ file unscaled"):  # fmt: skip
        import_gguf(tmp_path / "settings.gguf", tmp_path / "back-settings")


@pytest.mark.parametrize(
    ("name", "low", "high"), [("llama4_text", 1.0, 1.0), ("mixtral", 1.0, 4.0)]
)
def test_bare_rope_freqs_of_published_llama3_settings_are_recognised(
    tmp_path, tokenizer, name, low, high
):
    """A file from llama.cpp's converter has rope_freqs without moekit's keys: Llama 4 Scout's
    settings (low = high = 1) and Llama 3.1's (1 and 4, pretrained context 8192) are
    recognised from the factors and read back exactly."""
    scaling = dict(LLAMA3, factor=16.0, low_freq_factor=low, high_freq_factor=high,
                   original_max_position_embeddings=8192)  # fmt: skip
    model_dir = make_model(name, tmp_path, tokenizer, rope_parameters=scaling)
    export_gguf(model_dir, tmp_path / "m.gguf", type="f32")
    rewrite(tmp_path / "m.gguf", tmp_path / "bare.gguf", drop=("moekit.rope",))
    back = import_gguf(tmp_path / "bare.gguf", tmp_path / "back")
    assert load_model(back.path).cfg.rope_scaling == load_model(model_dir).cfg.rope_scaling
    assert torch.equal(logits(back.path, TOKENS), logits(model_dir, TOKENS))


def rewrite(src, dst, drop=(), add=None):
    """Copy the GGUF file `src` to `dst` without the metadata keys and tensors whose names
    start with one of `drop`, with the metadata `add` (key -> (value, GGUF type))."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture", *drop)):
            continue
        sub = field.types[-1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for key, (value, kind) in (add or {}).items():
        writer.add_key_value(key, value, kind)
    for t in reader.tensors:
        if not t.name.startswith(drop):
            writer.add_tensor(t.name, t.data.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llama4_and_gpt_oss_files_that_move_llama_cpps_layout_are_refused(tmp_path, tokenizer):
    """Metadata llama.cpp acts on and moekit cannot carry: a llama4 file without chunked
    attention (sliding_window 0) or with chunks on other layers, a RoPE base of the sliding
    layers' own; a gpt-oss file's sliding layers stated as a period come back as layers."""
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    model_dir = make_model("llama4_text", tmp_path / "l4", tokenizer)
    export_gguf(model_dir, tmp_path / "l4.gguf", type="f32")
    cases = {
        "llama4.attention.sliding_window": ((0, u32), r"sliding_window=0 is not supported"),
        "llama4.attention.sliding_window_pattern": (
            (2, u32), r"chunks attention exactly on the RoPE layers"),
        "llama4.rope.freq_base_swa": ((1e4, f32), r"freq_base_swa=10000.0 is not supported"),
    }  # fmt: skip
    for key, (value, message) in cases.items():
        rewrite(tmp_path / "l4.gguf", tmp_path / "x.gguf", add={key: value})
        with pytest.raises(UnsupportedError, match=message):
            import_gguf(tmp_path / "x.gguf", tmp_path / "back")
        assert not (tmp_path / "back").exists()

    oss = make_model("gpt_oss", tmp_path / "oss", tokenizer, num_hidden_layers=3)
    export_gguf(oss, tmp_path / "oss.gguf", type="f32")
    for period, sliding in ((3, [0, 1]), (0, [0, 1, 2]), (1, None)):
        key = "gpt-oss.attention.sliding_window_pattern"
        rewrite(tmp_path / "oss.gguf", tmp_path / f"p{period}.gguf", add={key: (period, u32)})
        back = import_gguf(tmp_path / f"p{period}.gguf", tmp_path / f"back{period}")
        assert load_model(back.path).cfg.attention.sliding_layers == sliding


def test_a_gpt_oss_file_with_mxfp4_experts_is_read(tmp_path, tokenizer):
    """gpt-oss GGUF files keep the experts in MXFP4 (as llama.cpp's converter writes OpenAI's
    checkpoints): they are read through the gguf package's own dequantisation, exactly."""
    model_dir = make_model("gpt_oss", tmp_path, tokenizer)
    export_gguf(model_dir, tmp_path / "f32.gguf", type="f32")
    reader = gguf.GGUFReader(tmp_path / "f32.gguf")
    mxfp4 = gguf.GGMLQuantizationType.MXFP4
    writer = gguf.GGUFWriter(tmp_path / "mxfp4.gguf", "gpt-oss")
    for key, field in reader.fields.items():
        if not key.startswith(("GGUF.", "general.architecture")):
            sub = field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    expected = {}
    for t in reader.tensors:
        data = t.data.copy()
        if t.name.endswith("_exps.weight"):
            packed = gguf.quants.quantize(data, mxfp4)
            expected[t.name] = torch.from_numpy(gguf.quants.dequantize(packed, mxfp4))
            writer.add_tensor(t.name, packed, raw_dtype=mxfp4)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "mxfp4.gguf").tensors}
    assert kinds["blk.0.ffn_down_exps.weight"] == mxfp4
    back = import_gguf(tmp_path / "mxfp4.gguf", tmp_path / "back")
    from moekit.model_dir import load_weights

    weights = load_weights(back.path)
    assert torch.equal(
        weights["layers.0.ffn.experts.w_gate"], expected["blk.0.ffn_gate_exps.weight"]
    )
    assert torch.equal(
        weights["layers.1.ffn.experts.w_down"], expected["blk.1.ffn_down_exps.weight"]
    )
    original = load_weights(model_dir)["layers.0.ffn.experts.w_up"]
    assert not torch.equal(weights["layers.0.ffn.experts.w_up"], original)  # 4 bits, not f32


def test_llama4_context_boundaries_of_chunks_and_temperature(tmp_path, tokenizer):
    """llama.cpp's chunks act from position 8192 and its temperature from 8191: a model without
    them is written up to a context of 8192 (chunks) and 8191 (temperature), and refused past
    it; a temperature tuned otherwise is refused where it acts."""
    from moekit.config import ModelConfig
    from moekit.interop.gguf_llama4 import LLAMA4

    base = load_model(make_model("llama4_text", tmp_path, tokenizer)).cfg.to_dict()

    def problems(max_seq_len, **irope):
        cfg = dict(base, max_seq_len=max_seq_len, irope={**base["irope"], **irope})
        return " ".join(LLAMA4.problems(ModelConfig.from_dict(cfg)))

    assert problems(128) == ""
    assert problems(8192, chunk_size=None, temperature_tuning=True) == ""
    assert "chunks attention by 8192" in problems(8193, chunk_size=None)
    assert "chunks attention by 8192" not in problems(20000)  # 8192 itself
    assert problems(8191, temperature_tuning=False, chunk_size=None) == ""
    assert "query temperature" in problems(8192, temperature_tuning=False, chunk_size=None)
    assert "query temperature" in problems(128, floor_scale=64)  # acts at position 63
    assert "query temperature" not in problems(64, floor_scale=65, attn_scale=2.0)


def test_the_chat_template_travels(tmp_path, tokenizer):
    """tokenizer_config.json's Jinja chat template is written as tokenizer.chat_template and
    comes back as the template chat and serve render."""
    from moekit.infer.jinja_chat import JinjaChatTemplate, load_chat_template

    model_dir = make_model("qwen3_moe", tmp_path, tokenizer)
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    config_file = model_dir / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "chat_template": template}))  # fmt: skip
    export_gguf(model_dir, tmp_path / "m.gguf", type="f16")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert fields["tokenizer.chat_template"] == template
    back = import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    chat = load_chat_template(back.path)
    assert isinstance(chat, JinjaChatTemplate) and chat.source == template
    assert chat.format([{"role": "user", "content": "hi"}]) == "<|user|>hi"
