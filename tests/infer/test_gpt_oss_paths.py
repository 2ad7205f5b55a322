"""gpt-oss's options (sinks, sliding windows, biased clamped-SwiGLU experts, a router bias)
through generation, and the paths that do not compute them refusing by name: the compiled
decode step (falls back to eager), quantised and paged experts (errors)."""

import copy

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig, QuantizationConfig
from moekit.data.tokenizer import Tokenizer
from moekit.infer.compiled import decode_support
from moekit.infer.generate import Generator
from moekit.infer.offload import OffloadConfig, load_paged_model
from moekit.infer.sampling import SamplingParams
from moekit.model_dir import save_model
from moekit.quant.build import quantize_model

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


def test_quantised_and_paged_experts_refuse_biased_clamped_experts(tmp_path):
    with pytest.raises(ValueError, match=r"experts cannot be quantised"):
        quantize_model(_model(), QuantizationConfig(bits=8))
    model = _model({"activation": "swiglu"})
    save_model(model, model.cfg, tmp_path / "m")
    with pytest.raises(ValueError, match=r"paged experts .* experts with biases"):
        load_paged_model(tmp_path / "m", OffloadConfig(max_memory=1 << 30))
