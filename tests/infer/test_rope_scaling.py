"""Generation with YaRN-scaled RoPE: decoding through the KV cache (and the compiled decode
step's static cache) gives, token for token, what a full forward pass over the whole text
gives, for grouped-query and multi-head latent attention."""

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.data.tokenizer import Tokenizer
from moekit.infer.compiled import CompiledDecoder
from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams

YARN = dict(factor=8.0, original_max_seq_len=16, mscale=1.0, mscale_all_dim=0.8)
BASE = dict(vocab_size=300, dim=32, num_layers=2, num_heads=4, max_seq_len=128,
            rope_scaling=YARN, moe=dict(num_experts=4, top_k=2, expert_hidden=16))  # fmt: skip
CONFIGS = {
    "gqa": dict(BASE, num_kv_heads=2, attention=dict(qk_norm="head")),
    "mla": dict(BASE, attention=dict(kind="mla", kv_lora_rank=16, qk_nope_head_dim=8,
                                     qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=12)),
}  # fmt: skip
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
# Three lengths (left padding) whose continuations run past the pretrained 16 positions.
PROMPTS = [[5, 9, 17, 33, 2, 80, 11, 12, 13], [40, 41, 42], [7] * 14]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["a b c d e f g h"], 300)


def _full_forward_agrees(model, prompts, completions):
    for prompt, done in zip(prompts, completions, strict=True):
        text = torch.tensor([prompt + done.token_ids])
        with torch.no_grad():
            logprobs = model(text).logits[0].log_softmax(-1)
        steps = logprobs[len(prompt) - 1 : -1]  # the prediction of each generated token
        assert steps.argmax(-1).tolist() == done.token_ids
        got = torch.tensor([t.logprob for t in done.tokens])
        want = steps.gather(1, torch.tensor(done.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_cached_decoding_with_yarn_equals_the_full_forward(tokenizer, kind):
    model = build_model(ModelConfig.from_dict(CONFIGS[kind]), seed=3).eval()
    completions = Generator(model, tokenizer).generate(PROMPTS, GREEDY)
    _full_forward_agrees(model, PROMPTS, completions)
    if kind == "gqa":  # the compiled step's arithmetic, uncompiled: the same tables
        gen = Generator(model, tokenizer, compile=True)
        gen._decoder = CompiledDecoder(model, compiler=lambda fn: fn)
        stepped = gen.generate(PROMPTS, GREEDY)
        assert gen._decoder.active
        assert [c.token_ids for c in stepped] == [c.token_ids for c in completions]
        _full_forward_agrees(model, PROMPTS, stepped)
