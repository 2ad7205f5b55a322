"""gpt-oss's options (sinks, sliding windows, biased clamped-SwiGLU experts, a router bias)
through generation, paged and quantised experts; the compiled decode step, which does not
compute them, names why and falls back to eager."""

import copy

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.data.tokenizer import Tokenizer
from moekit.infer.compiled import decode_support
from moekit.infer.generate import Generator
from moekit.infer.offload import OffloadConfig, offload_report, plan_budget
from moekit.infer.sampling import SamplingParams
from moekit.model import meta_model
from moekit.model_dir import save_model

CFG = dict(
    vocab_size=300, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=64,
    init_std=0.2, activation="clamped_swiglu",
    attention=dict(qkv_bias=True, o_bias=True, sinks=True, sliding_window=4,
                   sliding_layers=[0, 2]),
    moe=dict(num_experts=4, top_k=2, expert_hidden=16, router_bias=True, expert_bias=True),
)  # fmt: skip


def _model(changes=None):
    data = copy.deepcopy(CFG)
    for path, value in (changes or {}).items():
        *parents, leaf = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
    model = build_model(ModelConfig.from_dict(data), seed=0).eval()
    with torch.no_grad():  # biases and sinks start at 0: make them matter
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks", "b_gate", "b_up", "b_down")):
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({}, "attention sinks"),
        ({"attention.sinks": False}, "sliding-window attention"),
        ({"attention.sinks": False, "attention.sliding_window": None,
          "attention.sliding_layers": None}, "experts with biases (moe.expert_bias)"),
        ({"attention.sinks": False, "attention.sliding_window": None,
          "attention.sliding_layers": None, "moe.expert_bias": False},
         "clamped SwiGLU experts (activation='clamped_swiglu')"),
        ({"attention.sinks": False, "attention.sliding_window": None,
          "attention.sliding_layers": None, "moe.expert_bias": False, "activation": "swiglu"},
         "a router other than plain token choice (no adapter, no logit bias)"),
    ],
)  # fmt: skip
def test_the_compiled_step_names_what_it_does_not_compute(changes, reason):
    assert reason in str(decode_support(_model(changes)))


def test_greedy_generation_is_the_full_forwards_argmax_with_compile_on():
    """Batched, left-padded prompts through the KV cache (sliding-window layers, sinks): each
    new token is the argmax of a full forward over everything before it."""
    model = _model()
    tokenizer = Tokenizer.train(["a b c d e f g h"], 300)
    generator = Generator(model, tokenizer, compile=True)
    prompts = [[5, 9, 17, 33, 2, 41, 7], [12, 60, 3]]
    params = SamplingParams(temperature=0.0, max_new_tokens=9, ignore_eos=True)
    outs = generator.generate(prompts, params)
    assert generator._decoder is not None and not generator._decoder.active  # eager fallback
    for prompt, out in zip(prompts, outs, strict=True):
        tokens = list(prompt)
        for _ in range(9):
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0, -1]
            tokens.append(int(logits.argmax()))
        assert out.token_ids == tokens[len(prompt) :]


@pytest.mark.parametrize(("bits", "slots"), [(8, 2), (4, 1)])
def test_quantised_biased_experts_load_page_and_match_their_dequantised_weights(
    tmp_path, bits, slots
):
    """Quantised experts keep their biases in float and compute the clamped SwiGLU: the
    quantised model equals the float model holding the dequantised weights, loads from its
    directory, and pages (biases with their expert) with the same outputs."""
    from moekit import quantize
    from moekit.quant.build import meta_model as qmeta_model

    model = _model({"moe.expert_hidden": 32})  # int4 groups of 32 divide every input
    save_model(model, model.cfg, tmp_path / "m")
    Tokenizer.train(["a b c d e f g h"], 300).save(tmp_path / "m")
    quantize(tmp_path / "m", tmp_path / "q", bits=bits)
    full = Generator.from_dir(tmp_path / "q")
    oracle = copy.deepcopy(full.model)
    for layer in oracle.moe_layers().values():
        assert layer.experts.b_down is not None and layer.experts.activation == "clamped_swiglu"
        layer.experts = layer.experts.dequantized()
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = full.model(tokens, causal_routing=True).logits
        torch.testing.assert_close(oracle(tokens, causal_routing=True).logits, want)
        plan = plan_budget(qmeta_model(full.model.cfg), 1 << 40)
        budget = plan.resident + slots * sum(plan.expert.values())
        paged = Generator.from_dir(tmp_path / "q", offload=OffloadConfig(max_memory=budget))
        torch.testing.assert_close(paged.model(tokens, causal_routing=True).logits, want)
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    prompts = [[5, 9, 17, 33, 2, 41, 7], [12, 60, 3]]
    want_ids = [c.token_ids for c in full.generate(prompts, params)]
    assert [c.token_ids for c in paged.generate(prompts, params)] == want_ids
    from moekit.infer.compiled import _ffn_support

    assert _ffn_support(full.model.blocks()[0].ffn) == (
        "quantised experts with biases (moe.expert_bias)"
    )


@pytest.mark.parametrize("slots", [1, 3])
def test_paged_biased_experts_give_the_resident_models_logits_and_tokens(tmp_path, slots):
    """Each expert's biases are paged with its weights (fewer slots than experts: the experts
    a prompt needs are computed in rounds)."""
    model = _model()
    save_model(model, model.cfg, tmp_path / "m")
    Tokenizer.train(["a b c d e f g h"], 300).save(tmp_path / "m")
    plan = plan_budget(meta_model(model.cfg), 1 << 40)
    budget = plan.resident + slots * sum(plan.expert.values())
    paged = Generator.from_dir(tmp_path / "m", offload=OffloadConfig(max_memory=budget))
    full = Generator.from_dir(tmp_path / "m")
    assert offload_report(paged.model)["slots_per_layer"] == slots  # type: ignore[index]
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = full.model(tokens, causal_routing=True).logits
        torch.testing.assert_close(paged.model(tokens, causal_routing=True).logits, want)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    prompts = [[5, 9, 17, 33, 2, 41, 7], [12, 60, 3]]
    want_ids = [c.token_ids for c in full.generate(prompts, params)]
    assert [c.token_ids for c in paged.generate(prompts, params)] == want_ids
