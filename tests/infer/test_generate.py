import json
import subprocess
import sys

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.infer.generate import ContextLengthError, Generator
from moekit.infer.sampling import SamplingParams
from moekit.nn.kv_cache import KVCache

BASE = dict(vocab_size=97, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
            max_seq_len=64)  # fmt: skip
MOE = dict(num_experts=4, top_k=2, expert_hidden=16)
VARIANTS = {
    "gqa-moe": dict(BASE, moe=MOE),
    "dense": dict(BASE),
    "qk-norm-shared": dict(BASE, attention=dict(qk_norm="head"), moe=dict(MOE, num_shared_experts=1)),
    "mla-sigmoid": dict(
        BASE, num_kv_heads=4,
        attention=dict(kind="mla", q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                       qk_rope_head_dim=4, v_head_dim=8),
        moe=dict(MOE, score_func="sigmoid", num_groups=2, topk_groups=1, first_dense_layers=1),
    ),
    "expert-choice": dict(BASE, moe=dict(MOE, router="expert_choice", capacity_factor=2.0)),
    "hierarchical": dict(BASE, moe=dict(MOE, router="hierarchical", router_groups=2)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_equals_the_full_forward(name):
    model = build_model(ModelConfig.from_dict(VARIANTS[name])).eval()
    tokens = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(tokens, causal_routing=True).logits
        cache = KVCache(model.cfg, 3, 24)
        parts = [model(tokens[:, :7], cache=cache, causal_routing=True).logits]
        parts += [
            model(tokens[:, t : t + 1], cache=cache, causal_routing=True).logits
            for t in range(7, 20)
        ]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_is_invisible():
    model = build_model(ModelConfig.from_dict(VARIANTS["gqa-moe"])).eval()
    seq = torch.randint(2, 97, (1, 9))
    with torch.no_grad():
        alone = model(seq).logits
        padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), seq], 1)
        valid = torch.cat(
            [torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)], 1
        )
        cache = KVCache(model.cfg, 1, 13)
        out = model(padded, cache=cache, valid=valid).logits
    torch.testing.assert_close(out[:, 4:], alone, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return Generator.from_dir(tiny_model_dir)


def test_batch_equals_each_prompt_alone_under_greedy(generator):
    prompts = ["def f(x):", "The", "12 + 30 = 42\n7 * 8 =", '{"name": "Ada"']
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    batch = generator.generate(prompts, params)
    for prompt, completion in zip(prompts, batch, strict=True):
        alone = generator.generate(prompt, params)[0]
        assert completion.token_ids == alone.token_ids and len(alone.token_ids) == 12
        assert completion.text == alone.text
        assert completion.prompt_tokens == len(generator.tokenizer.encode_prompt(prompt))


def test_stop_strings_end_the_output(generator):
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    free = generator.generate("The", params)[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    first = free.text.find(stop)
    stopped = generator.generate("The", SamplingParams(**{**params.__dict__, "stop": [stop]}))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:first]
    # Streaming releases the same text, never any part of the stop string.
    chunks = list(generator.stream("The", SamplingParams(**{**params.__dict__, "stop": [stop]})))
    assert "".join(c.text for c in chunks) == stopped.text
    assert chunks[-1].finish_reason == "stop"


def test_stop_token_ids(generator):
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    free = generator.generate("def", params)[0]
    stop_id = free.token_ids[4]
    cut = generator.generate(
        "def", SamplingParams(**{**params.__dict__, "stop_token_ids": [stop_id]})
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.token_ids == free.token_ids[: free.token_ids.index(stop_id)]


def test_seeded_sampling_is_reproducible(generator):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=7, ignore_eos=True)
    a = generator.generate("The", params)[0]
    b = generator.generate("The", params)[0]
    c = generator.generate("The", SamplingParams(**{**params.__dict__, "seed": 8}))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_streaming_adds_up_to_the_completion(generator):
    params = SamplingParams(temperature=0.9, seed=3, max_new_tokens=15, ignore_eos=True)
    chunks = list(generator.stream("x = ", params))
    completion = generator.generate("x = ", params)[0]
    assert "".join(c.text for c in chunks) == completion.text
    assert [c.token.id for c in chunks if c.token] == completion.token_ids
    assert chunks[-1].finish_reason == "length"


def test_routing_trace_and_experts_per_token(generator):
    params = SamplingParams(temperature=0, max_new_tokens=5, return_routing=True, ignore_eos=True)
    completion = generator.generate("hello", params)[0]
    assert len(completion.tokens) == 5
    for token in completion.tokens:
        assert sorted(token.routing) == [0, 1]
        for pairs in token.routing.values():
            assert len(pairs) == 2 and all(0 <= e < 8 for e, _ in pairs)
            assert abs(sum(w for _, w in pairs) - 1.0) < 1e-3
    one = generator.generate(
        "hello", SamplingParams(**{**params.__dict__, "experts_per_token": 1})
    )[0]
    assert all(len(pairs) == 1 for t in one.tokens for pairs in t.routing.values())
    with pytest.raises(ValueError, match=r"top_k=9 is invalid for this model: must be in 1\.\.8"):
        generator.generate("hello", SamplingParams(experts_per_token=9))


def test_context_length_is_checked(generator):
    with pytest.raises(ContextLengthError, match="maximum context length is 128 tokens"):
        generator.generate([5] * 120, SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="prompt is empty"):
        generator.generate("", SamplingParams())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        generator.generate([600], SamplingParams())


def test_generate_cli_json(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "moekit.cli", "generate", str(tiny_model_dir), "def", "--json",
         "--temperature", "0", "--max-new-tokens", "6", "--routing"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    expected = Generator.from_dir(tiny_model_dir).generate(
        "def", SamplingParams(temperature=0, max_new_tokens=6)
    )[0]
    assert data["token_ids"] == expected.token_ids and data["text"] == expected.text
    assert len(data["routing"]) == len(data["token_ids"])
    streamed = subprocess.run(
        [sys.executable, "-m", "moekit.cli", "generate", str(tiny_model_dir), "def",
         "--temperature", "0", "--max-new-tokens", "6"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert streamed.stdout == "def" + expected.text + "\n"


def test_idle_cache_rows_do_not_grow():
    model = build_model(ModelConfig.from_dict(VARIANTS["gqa-moe"])).eval()
    cache = KVCache(model.cfg, 2, 16)
    tokens = torch.randint(2, 97, (2, 3))
    valid = torch.tensor([[True] * 3, [False] * 3])
    with torch.no_grad():
        model(tokens, cache=cache, valid=valid)
    assert cache.end.tolist() == [3, 0]
    other = KVCache(model.cfg, 1, 16)
    with torch.no_grad():
        model(tokens[1:], cache=other)
    cache.load_row(1, other)
    assert cache.end.tolist() == [3, 3]
    with torch.no_grad():
        nxt = torch.randint(2, 97, (2, 1))
        both = model(nxt, cache=cache).logits[:, -1]
        alone = model(nxt[1:], cache=other).logits[:, -1]
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
