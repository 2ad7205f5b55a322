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
from moekit.io import load_model, load_weights  # noqa: E402

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, initializer_range=0.15, tie_word_embeddings=False)  # fmt: skip


def tiny_configs():
    t = transformers
    return {
        "mixtral": t.MixtralConfig(**COMMON, num_key_value_heads=2, intermediate_size=96,
                                   num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": t.Qwen2MoeConfig(**COMMON, num_key_value_heads=2, intermediate_size=128,
                                      moe_intermediate_size=48, shared_expert_intermediate_size=96,
                                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0],
                                      norm_topk_prob=False),
        "qwen3_moe": t.Qwen3MoeConfig(**COMMON, num_key_value_heads=2, head_dim=32,
                                      intermediate_size=128, moe_intermediate_size=48,
                                      num_experts=8, num_experts_per_tok=3, norm_topk_prob=True),
        "olmoe": t.OlmoeConfig(**COMMON, num_key_value_heads=4, intermediate_size=48,
                               num_experts=4, num_experts_per_tok=2),
        "deepseek_v3": t.DeepseekV3Config(**COMMON, num_key_value_heads=4, intermediate_size=128,
                                          moe_intermediate_size=32, n_shared_experts=1,
                                          n_routed_experts=8, routed_scaling_factor=2.5,
                                          kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                          v_head_dim=16, qk_nope_head_dim=16, n_group=4,
                                          topk_group=2, num_experts_per_tok=2,
                                          first_k_dense_replace=1, norm_topk_prob=True),
    }  # fmt: skip


ARCHS = list(tiny_configs())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    text = (
        "def add(a, b):\n    return a + b\n" * 20
        + "The quick brown fox jumps over the lazy dog. " * 20
    )
    return Tokenizer.train([text], 300)


def make_hf(name, directory, tokenizer, **save_kw):
    torch.manual_seed(0)
    config = tiny_configs()[name]
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():  # a non-zero correction bias exercises the bias path
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(
                    torch.randn_like(module.e_score_correction_bias) * 0.1
                )
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
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())


def test_export_round_trip_and_transformers_loads_it(converted, tokenizer):
    name, root, _, _ = converted
    arch = export_hf(root / "moekit", root / "exported")
    assert (
        arch == tiny_configs()[name].architectures[0]
        if tiny_configs()[name].architectures
        else True
    )
    assert json.loads((root / "exported" / "config.json").read_text())["model_type"] == name
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
    assert auto.eos_token_id == tokenizer.eos_id


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


def test_unsupported_fields_are_named(tmp_path, tokenizer):
    make_hf("mixtral", tmp_path / "hf", tokenizer)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedError, match=r"rope_parameters\.rope_type='yarn' is not supported"
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


def test_export_chooses_the_plainest_architecture_or_explains(tmp_path):
    from moekit import build_model, get_preset
    from moekit.io import save_model

    cfg = get_preset("debug")  # softmax top-k, no shared experts: Mixtral
    save_model(build_model(cfg), cfg, tmp_path / "debug")
    assert export_hf(tmp_path / "debug", tmp_path / "debug-hf") == "MixtralForCausalLM"
    cfg = get_preset("tiny")  # a shared expert without a gate, softmax routing: nothing fits
    save_model(build_model(cfg), cfg, tmp_path / "tiny")
    with pytest.raises(
        UnsupportedError,
        match=r"no Hugging Face architecture represents this model exactly(.|\n)*Qwen2MoeForCausalLM: .*one shared expert with a sigmoid gate",
    ):
        export_hf(tmp_path / "tiny", tmp_path / "tiny-hf")


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
