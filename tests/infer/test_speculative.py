"""Speculative decoding: greedy output is plain greedy output, token for token; sampled output
keeps the target's distribution; bad settings and foreign draft models are refused."""

import shutil

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.data.tokenizer import Tokenizer
from moekit.infer.generate import ContextLengthError, Generator
from moekit.infer.sampling import SamplingParams
from moekit.infer.speculative import (
    SpeculativeConfig,
    SpeculativeStats,
    Speculator,
    accept_sampled,
    ngram_draft,
)
from moekit.model_dir import save_model

PROMPTS = [
    "The cat sat on the mat. The cat sat on",
    "def add(a, b):\n    return a + b\n\ndef",
    "one two three one two three one",
    "Mixture of experts",
]


def small_cfg(vocab: int, **extra) -> ModelConfig:
    return ModelConfig.from_dict(
        dict(vocab_size=vocab, dim=32, num_layers=1, num_heads=2, num_kv_heads=2, ffn_hidden=64,
             max_seq_len=128, moe=dict(num_experts=4, top_k=1, expert_hidden=32), **extra)
    )  # fmt: skip


@pytest.fixture(scope="module")
def draft_dir(tiny_model_dir, tmp_path_factory):
    """A smaller random model with the target's tokenizer."""
    out = tmp_path_factory.mktemp("draft")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, out / name)
    cfg = small_cfg(512)
    save_model(build_model(cfg, seed=3), cfg, out)
    return out


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return Generator.from_dir(tiny_model_dir, device="cpu")


def speculating(target, config, stats=None):
    gen = Generator(target.model, target.tokenizer, defaults=target.defaults)
    gen.speculative = Speculator(gen, config, stats=stats)
    return gen


def drafters(tiny_model_dir, draft_dir):
    return {  # (draft_dir None: only "draft-self" is usable)
        "ngram": SpeculativeConfig(method="ngram", num_draft_tokens=4),
        "ngram-k1": SpeculativeConfig(method="ngram", num_draft_tokens=1, ngram=1),
        "draft-small": SpeculativeConfig(method="draft", draft_dir=str(draft_dir)),
        # The target as its own draft model: every draft is accepted.
        "draft-self": SpeculativeConfig(
            method="draft", draft_dir=str(tiny_model_dir), num_draft_tokens=5
        ),
    }


GREEDY = {
    "plain": SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True),
    "stops": SamplingParams(temperature=0, max_new_tokens=40, stop=["e t", "\n\n"]),
    "penalty-1-expert": SamplingParams(
        temperature=0, max_new_tokens=30, repetition_penalty=1.3, experts_per_token=1
    ),
    "stop-token": SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=[300, 301]),
}


@pytest.mark.parametrize("drafter", ["ngram", "ngram-k1", "draft-small", "draft-self"])
@pytest.mark.parametrize("setting", list(GREEDY))
def test_greedy_speculation_is_plain_greedy_token_for_token(
    target, tiny_model_dir, draft_dir, drafter, setting
):
    params = GREEDY[setting]
    stats = SpeculativeStats()
    spec = speculating(target, drafters(tiny_model_dir, draft_dir)[drafter], stats)
    plain = target.generate(PROMPTS, params)
    fast = spec.generate(PROMPTS, params)
    for want, got in zip(plain, fast, strict=True):
        assert got.token_ids == want.token_ids
        assert got.text == want.text
        assert got.finish_reason == want.finish_reason
        assert got.prompt_tokens == want.prompt_tokens
        torch.testing.assert_close(
            [t.logprob for t in got.tokens], [t.logprob for t in want.tokens], atol=1e-4, rtol=0
        )
    # The verify path ran (a repetition penalty leaves prompt lookup nothing to match).
    assert stats.drafted > 0 or (drafter.startswith("ngram") and setting.startswith("penalty"))
    if drafter == "draft-self" and params.experts_per_token is None:  # (it routes to top_k)
        assert stats.accepted == stats.drafted
    assert stats.tokens_per_step >= 1.0


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7])
def test_ends_inside_an_accepted_run_of_drafts(target, tiny_model_dir, max_new_tokens):
    """With the target drafting for itself, every step accepts 5 drafts: a stop token, a stop
    string or max_new_tokens that falls inside such a run ends the output exactly there."""
    spec = speculating(target, drafters(tiny_model_dir, None)["draft-self"])
    free = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    ids = target.generate(PROMPTS[3], free)[0].token_ids
    stop_at = max(i for i in range(1, 20) if ids[i] not in ids[:i])  # its first occurrence
    settings = [
        SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True),
        SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[ids[stop_at]]),
        SamplingParams(temperature=0, max_new_tokens=20, stop=[target.tokenizer.decode(ids[6:8])]),
    ]
    for params in settings:
        want, got = target.generate(PROMPTS[3], params)[0], spec.generate(PROMPTS[3], params)[0]
        assert (got.token_ids, got.text, got.finish_reason) == (
            want.token_ids,
            want.text,
            want.finish_reason,
        )
    assert len(spec.generate(PROMPTS[3], settings[1])[0].token_ids) == stop_at


def test_streamed_speculation_adds_up_to_the_completion(target, tiny_model_dir, draft_dir):
    spec = speculating(target, drafters(tiny_model_dir, draft_dir)["ngram"])
    params = GREEDY["stops"]
    chunks = list(spec.stream(PROMPTS[0], params))
    completion = target.generate(PROMPTS[0], params)[0]
    assert "".join(c.text for c in chunks) == completion.text
    assert [c.token.id for c in chunks if c.token is not None] == completion.token_ids
    assert chunks[-1].finish_reason == completion.finish_reason


def test_ngram_draft_proposes_what_followed_the_latest_match():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2, 3) == [7, 8]
    assert ngram_draft([1, 2, 3, 4, 5, 3], 3, 3) == [4, 5, 3]  # falls back to one token
    assert ngram_draft([1, 2, 3], 4, 3) == []  # no earlier occurrence
    assert ngram_draft([5], 4, 3) == []


# ---- sampling keeps the target's distribution -------------------------------------------------

V = 8  # a vocabulary small enough to enumerate every continuation
PROMPT = [0, 1, 2, 3, 4, 5, 6, 7, 2, 5]  # every token occurs: prompt lookup always drafts


def peaked_model(seed: int):
    model = build_model(small_cfg(V, tie_embeddings=False), seed=seed).eval()
    with torch.no_grad():  # logits a few units apart, so that p and q differ clearly
        model.lm_head.weight.mul_(60.0)
    return model


def exact_pair_distribution(model, params: SamplingParams) -> torch.Tensor:
    """P(t2, t3), the 2nd and 3rd new tokens, under plain sampling: by enumerating every
    t1, t2, t3 and multiplying the processed next-token probabilities."""
    from moekit.infer.speculative import processed_probs

    seqs = torch.tensor([[*PROMPT, a, b] for a in range(V) for b in range(V)])
    with torch.no_grad():
        logits = model(seqs, causal_routing=True).logits.float()
    joint = torch.zeros(V, V)
    p1 = processed_probs(logits[0, len(PROMPT) - 1], params, PROMPT)
    for row, (a, b) in enumerate((a, b) for a in range(V) for b in range(V)):
        p2 = processed_probs(logits[row, len(PROMPT)], params, [*PROMPT, a])
        p3 = processed_probs(logits[row, len(PROMPT) + 1], params, [*PROMPT, a, b])
        joint[b] += p1[a] * p2[b] * p3
    return joint


def sampled_pairs(gen: Generator, params: SamplingParams, n: int) -> torch.Tensor:
    counts = torch.zeros(V, V)
    for seed in range(n):
        params.seed = seed
        ids = gen.generate([PROMPT], params)[0].token_ids
        counts[ids[1], ids[2]] += 1
    return counts / n


SAMPLED = {
    "ngram": dict(temperature=1.0),
    "draft": dict(temperature=0.7, top_k=5, repetition_penalty=1.5),
}


@pytest.mark.slow  # 2000 generations each (tens of seconds on a small CPU)
@pytest.mark.parametrize("method", list(SAMPLED))
def test_speculative_sampling_keeps_the_target_distribution(tmp_path, method):
    """Total variation between 2000 seeded samples of (t2, t3) and the exact distribution.
    Measured: 0.027 (ngram) and 0.018 (draft model) with the rule; drawing from p instead of
    the normalised max(0, p - q) after a rejection gives 0.097 and 0.080, and accepting every
    draft 0.998 and 0.896: the 0.05 bound tells them apart."""
    target = peaked_model(seed=0)
    tokenizer = Tokenizer.train(["a b c"], 300)
    gen = Generator(target, tokenizer)
    config = SpeculativeConfig(method="ngram", num_draft_tokens=2, ngram=1)
    if method == "draft":
        tokenizer.save(tmp_path)
        draft = peaked_model(seed=1)
        save_model(draft, draft.cfg, tmp_path)
        config = SpeculativeConfig(method="draft", draft_dir=str(tmp_path), num_draft_tokens=2)
    stats = SpeculativeStats()
    gen.speculative = Speculator(gen, config, stats=stats)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True, **SAMPLED[method])
    exact = exact_pair_distribution(target, params)
    empirical = sampled_pairs(gen, params, 2000)
    tv = 0.5 * float((empirical - exact).abs().sum())
    assert tv < 0.05, f"total variation {tv:.3f}"
    assert 0.02 < stats.acceptance_rate < 0.95  # both accepting and rejecting were exercised


def test_a_rejected_point_mass_draft_is_never_redrawn():
    p_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    outcomes = [accept_sampled(p_logits, [0], None, params, [], gen) for _ in range(400)]
    rejected = [o for o in outcomes if len(o) == 1]
    assert rejected and all(o[0] != 0 for o in rejected)
    accepted = sum(o[0] == 0 and len(o) == 2 for o in outcomes) / len(outcomes)
    assert abs(accepted - float(p_logits[0].softmax(-1)[0])) < 0.08


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_draft_tokens=0), r"num_draft_tokens=0 is invalid: must be in \[1, 16\]"),
        (dict(num_draft_tokens=17), "num_draft_tokens=17"),
        (dict(ngram=0), r"ngram=0 is invalid"),
        (dict(method="medusa"), "method='medusa' is invalid: must be one of 'ngram', 'draft'"),
        (dict(method="draft"), "method 'draft' needs a draft model"),
        (dict(method="ngram", draft_dir="x"), "only method 'draft' takes a draft model"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**kwargs)


def test_a_draft_model_with_another_tokenizer_is_refused(target, tmp_path):
    other = Tokenizer.train(["completely different text, another vocabulary"] * 3, 300)
    other.save(tmp_path)
    cfg = small_cfg(512)
    save_model(build_model(cfg, seed=0), cfg, tmp_path)
    gen = Generator(target.model, target.tokenizer)
    with pytest.raises(ValueError, match="has another tokenizer than the target: "):
        Speculator(gen, SpeculativeConfig(method="draft", draft_dir=str(tmp_path)))


def test_a_draft_model_with_another_vocab_size_is_refused(target, tiny_model_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    cfg = small_cfg(640)
    save_model(build_model(cfg, seed=0), cfg, tmp_path)
    gen = Generator(target.model, target.tokenizer)
    with pytest.raises(ValueError, match="has vocab_size 640, the target 512"):
        Speculator(gen, SpeculativeConfig(method="draft", draft_dir=str(tmp_path)))


def test_routing_traces_are_refused_with_speculation(target):
    spec = speculating(target, SpeculativeConfig())
    with pytest.raises(ValueError, match="return_routing is not available"):
        spec.generate("hi", SamplingParams(return_routing=True))


# ---- other architectures ----------------------------------------------------------------------

BASE = dict(vocab_size=97, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
            max_seq_len=96)  # fmt: skip
MOE = dict(num_experts=4, top_k=2, expert_hidden=16)
VARIANTS = {
    "dense": dict(BASE),
    "mla-sigmoid-shared": dict(
        BASE, num_kv_heads=4,
        attention=dict(kind="mla", q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                       qk_rope_head_dim=4, v_head_dim=8),
        moe=dict(MOE, score_func="sigmoid", num_groups=2, topk_groups=1, first_dense_layers=1,
                 num_shared_experts=1),
    ),
    "expert-choice": dict(BASE, moe=dict(MOE, router="expert_choice", capacity_factor=2.0)),
    "sliding-window": dict(BASE, attention=dict(sliding_window=6), moe=MOE),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_speculation_on_other_architectures(name):
    model = build_model(ModelConfig.from_dict(VARIANTS[name]), seed=0).eval()
    tokenizer = Tokenizer.train(["a b c"], 300)
    plain = Generator(model, tokenizer)
    spec = Generator(model, tokenizer)
    stats = SpeculativeStats()
    spec.speculative = Speculator(spec, SpeculativeConfig(num_draft_tokens=3), stats=stats)
    prompts = [[5, 6, 7, 8, 5, 6, 7], [40, 41, 42, 43, 44, 40, 41, 42, 43, 44, 40, 41]]
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    want, got = plain.generate(prompts, params), spec.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert stats.accepted > 0


def test_a_request_longer_than_the_draft_models_context_is_refused(
    target, tiny_model_dir, tmp_path
):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    cfg = ModelConfig.from_dict({**small_cfg(512).to_dict(), "max_seq_len": 32})
    save_model(build_model(cfg, seed=0), cfg, tmp_path)
    spec = speculating(target, SpeculativeConfig(method="draft", draft_dir=str(tmp_path)))
    with pytest.raises(ContextLengthError, match="the draft model's maximum context length is 32"):
        spec.generate(["hi", "there"], SamplingParams(max_new_tokens=40))
