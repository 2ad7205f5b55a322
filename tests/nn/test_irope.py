"""Interleaved RoPE / NoPE attention (ModelConfig.irope): the KV cache, padding, validation,
and the compiled decode step. Parity with transformers' Llama 4 is in
tests/parity/test_hf.py."""

import pytest
import torch

from moekit.config import ModelConfig
from moekit.infer.compiled import decode_support
from moekit.model import build_model
from moekit.nn.kv_cache import KVCache

IROPE = dict(nope_layers=[1, 3], chunk_size=3, temperature_tuning=True, floor_scale=2,
             attn_scale=0.5, qk_l2_norm=True)  # fmt: skip


def config(**irope):
    return ModelConfig(
        vocab_size=64, dim=32, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=32,
        irope={**IROPE, **irope},
        moe=dict(num_experts=4, top_k=1, expert_hidden=16, num_shared_experts=1,
                 score_func="sigmoid", norm_topk_prob=False, scale_expert_input=True,
                 layer_step=2),
    )  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return build_model(config(), seed=1).eval()


def test_cached_decoding_equals_the_full_forward_across_chunks(model):
    """Prefill 4 tokens, then one at a time past several chunk boundaries (chunks of 3)."""
    tokens = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens, causal_routing=True).logits
        cache = KVCache(model.cfg, 2, 16)
        steps = [model(tokens[:, :4], cache=cache, causal_routing=True).logits]
        for i in range(4, 11):
            steps.append(model(tokens[:, i : i + 1], cache=cache, causal_routing=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_left_padded_rows_decode_as_they_would_alone(model):
    """A row left-padded by 3 in a batch: its chunks and temperatures follow its own real
    positions, so its logits are those of the row run alone."""
    gen = torch.Generator().manual_seed(1)
    long, short = (
        torch.randint(0, 64, (9,), generator=gen),
        torch.randint(0, 64, (6,), generator=gen),
    )
    prompt = torch.stack([long[:7], torch.cat([torch.zeros(3, dtype=torch.long), short[:4]])])
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False
    with torch.no_grad():
        alone = model(short[None], causal_routing=True).logits[0]
        cache = KVCache(model.cfg, 2, 16)
        got = [model(prompt, cache=cache, valid=valid, causal_routing=True).logits[1, 3:]]
        for i in range(2):
            step = torch.stack([long[7 + i], short[4 + i]])[:, None]
            got.append(model(step, cache=cache, causal_routing=True).logits[1])
    torch.testing.assert_close(torch.cat(got), alone, atol=1e-5, rtol=0)


def test_each_option_changes_the_function_and_training_reaches_every_weight(model):
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(tokens).logits
    for change in [dict(chunk_size=None), dict(temperature_tuning=False),
                   dict(qk_l2_norm=False), dict(nope_layers=[3])]:  # fmt: skip
        other = build_model(config(**change), seed=1).eval()
        with torch.no_grad():
            assert (other(tokens).logits - base).abs().max() > 1e-5, change
    trained = build_model(config(), seed=1)
    out = trained(tokens)
    (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
    missing = [n for n, p in trained.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def _generators(model, tiny_model_dir, compiler):
    from moekit.data.tokenizer import Tokenizer
    from moekit.infer.compiled import CompiledDecoder
    from moekit.infer.generate import Generator

    tokenizer = Tokenizer.load(tiny_model_dir)
    compiled = Generator(model, tokenizer, compile=True)
    compiled._decoder = CompiledDecoder(model, compiler=compiler)
    return Generator(model, tokenizer), compiled


def _llama4_like(seed=3):
    cfg = ModelConfig.from_dict({**config().to_dict(), "vocab_size": 512, "max_seq_len": 64})
    return build_model(cfg, seed=seed).eval()


def test_the_decode_step_as_written_gives_the_eager_tokens(tiny_model_dir):
    """The compiled step's arithmetic, uncompiled (fast): chunked masks, NoPE layers, query
    temperatures, L2 q/k norms and input-weighted experts, with left padding."""
    from moekit.infer.sampling import SamplingParams

    model = _llama4_like()
    assert decode_support(model) is None
    eager, step = _generators(model, tiny_model_dir, lambda fn: fn)
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    prompts = [[5, 17, 99, 3, 42, 7, 8], [11, 12, 13]]
    want, got = eager.generate(prompts, params), step.generate(prompts, params)
    assert step._decoder.active
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in g.tokens]),
            torch.tensor([t.logprob for t in w.tokens]),
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip


@pytest.mark.slow  # compiles a graph (tens of seconds on a small CPU)
def test_compiled_decoding_gives_the_eager_tokens(tiny_model_dir):
    import torch._dynamo

    from moekit.infer.sampling import SamplingParams

    torch._dynamo.reset()
    model = _llama4_like()
    eager, compiled = _generators(model, tiny_model_dir, lambda fn: torch.compile(fn))
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    prompts = [[5, 17, 99, 3, 42, 7, 8], [11, 12, 13]]
    got = [c.token_ids for c in compiled.generate(prompts, params)]
    assert got == [c.token_ids for c in eager.generate(prompts, params)]
    assert compiled._decoder.active


def test_quantised_input_weighted_experts_decode_eagerly_and_say_why():
    from moekit.config import QuantizationConfig
    from moekit.quant.build import quantize_model

    model = quantize_model(_llama4_like(), QuantizationConfig(bits=8))
    assert "scale_expert_input" in decode_support(model)


@pytest.mark.parametrize(
    "change, message",
    [(dict(irope=dict(nope_layers=[4])), r"irope\.nope_layers.*names layer\(s\) \[4\]"),
     (dict(irope=dict(nope_layers=[1, 1])), "names a layer twice"),
     (dict(irope=dict(nope_layers=[], chunk_size=0)), "chunk_size=0"),
     (dict(irope=dict(nope_layers=[]), attention=dict(qk_norm="head")),
      r"qk_norm='head'.*must be 'none' with irope"),
     (dict(irope=dict(nope_layers=[], floor_scale=0)), "floor_scale=0")],
)  # fmt: skip
def test_bad_settings_are_refused_by_name(change, message):
    base = dict(vocab_size=64, dim=32, num_layers=4, num_heads=4)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**base, **change})


def test_generation_in_a_batch_gives_each_prompt_its_own_tokens(tiny_model_dir):
    """Greedy generation of a left-padded batch equals each prompt alone."""
    from moekit.infer.sampling import SamplingParams

    eager, _ = _generators(_llama4_like(), tiny_model_dir, lambda fn: fn)
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    prompts = [[5, 17, 99, 3, 42, 7, 8], [11, 12, 13]]
    batch = eager.generate(prompts, params)
    for prompt, got in zip(prompts, batch, strict=True):
        assert eager.generate([prompt], params)[0].token_ids == got.token_ids


def test_the_settings_in_words():
    from moekit.presets import get_preset

    assert get_preset("llama4-scout").irope.describe() == (
        "NoPE layers 3, 7, 11, 15, 19, 23, ... (12 of them); chunks of 8192; temperature "
        "tuning; L2 q/k norms"
    )
