"""Prefix caching: the block store on its own (hits, block boundaries, eviction under its bound,
what keeps two prompts apart), the engine with and without it on every attention kind (the same
tokens, the same logprobs), and the server as the openai client sees it."""

import threading

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.data.tokenizer import Tokenizer
from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.nn.kv_cache import KVCache
from moekit.serve.engine import Engine, EngineRequest, TokenEvent
from moekit.serve.prefix_cache import PrefixCache, kv_bytes_per_token, may_reuse, may_store

from ..infer.test_gpt_oss_paths import _model as gpt_oss_model
from .test_engine import Inbox

CFG = ModelConfig.from_dict(
    dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
)


def filled(ids, seed=0):
    """A one-row cache holding `len(ids)` positions of random keys and values."""
    cache = KVCache(CFG, 1, len(ids))
    gen = torch.Generator().manual_seed(seed)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=gen))
    cache.valid[0] = True
    cache.end[0] = len(ids)
    return cache


def loaded(store, ids, namespace=None):
    """A fresh cache for `ids` with the store's blocks loaded: (tokens found, cache)."""
    cache = KVCache(CFG, 1, len(ids))
    return store.load(ids, namespace, cache), cache


def assert_same_positions(a, b, n):
    for x, y in zip((*a.k, *a.v), (*b.k, *b.v), strict=True):
        assert torch.equal(x[0, :, :n], y[0, :, :n])


def test_a_stored_prompt_is_found_in_whole_blocks_leaving_its_last_token():
    store = PrefixCache(CFG, 64, block_tokens=4)
    ids = list(range(1, 11))  # 10 tokens: 2 whole blocks
    source = filled(ids)
    assert store.store(ids, None, source) == 2
    # The same prompt: both blocks. Longer: both. One token into the 2nd block: one block.
    for prompt, want in ((ids, 8), ([*ids, 40, 41], 8), (ids[:5], 4), (ids[:4], 0)):
        n, cache = loaded(store, prompt)
        assert n == want and cache.length(0) == want
        assert_same_positions(cache, source, n)
        assert cache.valid[0].sum() == n
    # A prompt of exactly 2 blocks keeps its last token to compute: 1 block.
    assert loaded(store, ids[:8])[0] == 4
    # A changed token in the 2nd block ends the match there; in the 1st, nothing matches.
    assert loaded(store, [*ids[:5], 63, *ids[6:]])[0] == 4
    assert loaded(store, [63, *ids[1:]])[0] == 0
    s = store.stats
    assert (s.queries, s.hits, s.stored_blocks) == (7, 5, 2)
    assert s.hit_tokens == 8 + 8 + 4 + 4 + 4 and store.stored_tokens == 8


def test_a_block_is_found_only_after_the_same_blocks():
    """The same tokens at the same place after different earlier blocks are different keys."""
    store = PrefixCache(CFG, 64, block_tokens=4)
    a, b = [1, 2, 3, 4, 9, 9, 9, 9, 5], [7, 7, 7, 7, 9, 9, 9, 9, 5]
    store.store(a, None, filled(a, seed=1))
    assert loaded(store, b)[0] == 0
    store.store(b, None, filled(b, seed=2))
    n, cache = loaded(store, b)
    assert n == 8
    assert_same_positions(cache, filled(b, seed=2), 8)  # b's keys, not a's


def test_different_experts_per_token_never_share():
    store = PrefixCache(CFG, 64, block_tokens=4)
    ids = list(range(1, 10))
    store.store(ids, 2, filled(ids, seed=1))
    assert loaded(store, ids, None)[0] == 0
    assert loaded(store, ids, 1)[0] == 0
    assert loaded(store, ids, 2)[0] == 8
    store.store(ids, 1, filled(ids, seed=2))
    n, cache = loaded(store, ids, 1)
    assert n == 8
    assert_same_positions(cache, filled(ids, seed=2), 8)


def test_least_recently_used_blocks_go_first_and_the_bound_holds():
    store = PrefixCache(CFG, 12, block_tokens=4)  # 3 blocks
    a = [1] * 8 + [2]
    b = [3] * 8 + [4]
    store.store(a, None, filled(a))
    store.store(b, None, filled(b))  # 4 blocks wanted: a's last block goes, not its first
    assert store.stored_tokens == 12 and store.stats.evicted_blocks == 1
    assert loaded(store, a)[0] == 4 and loaded(store, b)[0] == 8
    assert loaded(store, a)[0] == 4  # a used last
    c = [5] * 8 + [6]
    store.store(c, None, filled(c))  # b's blocks go, the later one first
    assert store.stored_tokens == 12
    assert loaded(store, b)[0] == 0
    assert loaded(store, a)[0] == 4 and loaded(store, c)[0] == 8
    # A prompt longer than the whole store keeps what fits, never evicting its own blocks.
    long = list(range(20, 41))
    assert store.store(long, None, filled(long)) == 3
    n, cache = loaded(store, long)
    assert n == 12
    assert_same_positions(cache, filled(long), 12)


def test_a_failed_store_leaves_nothing_half_stored():
    """Keys and values of another model's layout cannot go in: no block of that prompt is
    findable afterwards, and the store keeps its whole capacity."""
    store = PrefixCache(CFG, 12, block_tokens=4)
    ids = list(range(1, 10))
    other = KVCache(ModelConfig.from_dict({**CFG.to_dict(), "num_kv_heads": 4}), 1, len(ids))
    other.end[0] = len(ids)
    with pytest.raises(RuntimeError):
        store.store(ids, None, other)
    assert loaded(store, ids)[0] == 0 and store.stored_tokens == 0
    long = list(range(20, 33))
    assert store.store(long, None, filled(long)) == 3


def test_the_store_costs_one_kv_cache_position_per_token():
    store = PrefixCache(CFG, 100, block_tokens=16)  # whole blocks: 96 tokens
    assert store.capacity_tokens == 96
    per_token = 2 * 2 * (8 + 8) * 4  # layers x kv heads x (k + v dims) x float32
    assert kv_bytes_per_token(CFG, torch.float32) == per_token
    used = store.k.element_size() * store.k.nelement() + store.v.element_size() * store.v.nelement()
    assert used == 96 * per_token
    with pytest.raises(ValueError, match="capacity_tokens=8"):
        PrefixCache(CFG, 8, block_tokens=16)


def test_requests_that_need_every_prompt_position_bypass_the_lookup():
    params = SamplingParams()
    plain = EngineRequest([1, 2], params, print)
    echo = EngineRequest([1, 2], params, print, logprobs=0, echo_logprobs=True)
    scoring = EngineRequest([1, 2], params, print, prompt_only=True, echo_logprobs=True)
    assert may_reuse(plain) and may_store(plain)
    assert not may_reuse(echo) and may_store(echo)
    assert not may_reuse(scoring) and may_store(scoring)
    forced = EngineRequest([1, 2], params, print)
    forced.routed_experts = [[[0, 1]]]  # as routing replay sets it
    assert not may_reuse(forced) and not may_store(forced)


# ---- the engine, with and without the cache ------------------------------------------------


def run(engine, prompts, **params):
    """Each prompt through `engine` in turn (greedy, with logprobs): (token ids, logprobs,
    cached tokens) per prompt."""
    out = []
    for ids in prompts:
        inbox = Inbox()
        sampling = SamplingParams(temperature=0, ignore_eos=True, max_new_tokens=6, **params)
        engine.submit(EngineRequest(ids, sampling, inbox.emit, logprobs=2))
        done = inbox.finish
        assert done.finish_reason == "length", done
        tokens = [e for e in inbox.events if isinstance(e, TokenEvent) and e.id >= 0]
        out.append(
            ([t.id for t in tokens], [t.logprob.logprob for t in tokens], done.cached_tokens)
        )
    return out


def with_and_without(generator, prompts, block_tokens, **params):
    """The prompts through an engine with a prefix cache of `block_tokens`-token blocks and
    through one without; the answers of each."""
    answers = []
    for cached in (True, False):
        engine = Engine(generator, max_batch=2, prefill_chunk=5, prefix_cache_tokens=0)
        if cached:
            engine.prefix_cache = PrefixCache(generator.model.cfg, 256, block_tokens=block_tokens)
        engine.start()
        try:
            answers.append(run(engine, prompts, **params))
        finally:
            engine.stop()
    return answers


def assert_same_answers(with_cache, without):
    for (ids_a, lp_a, _), (ids_b, lp_b, cached) in zip(with_cache, without, strict=True):
        assert ids_a == ids_b
        assert lp_a == pytest.approx(lp_b, abs=1e-5)
        assert cached == 0


SMALL = dict(vocab_size=300, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=64,
             init_std=0.2,
             moe=dict(num_experts=4, top_k=2, expert_hidden=16))  # fmt: skip
MLA = dict(kind="mla", q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
           v_head_dim=8)  # fmt: skip
IROPE = dict(nope_layers=[1], chunk_size=3, temperature_tuning=True, floor_scale=2,
             attn_scale=0.5, qk_l2_norm=True)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["a b c d e f g h"], 300)


@pytest.mark.parametrize("kind", ["gqa", "sliding window and sinks", "mla", "chunked irope"])
def test_the_engine_answers_the_same_with_and_without_the_cache(kind, tokenizer):
    """A shared start, crossing block, window and chunk boundaries: each later prompt reuses
    blocks and gets the tokens and logprobs it gets computed from scratch."""
    if kind == "sliding window and sinks":
        model = gpt_oss_model()  # windows of 4 on layers 0 and 2
    else:
        extra = {
            "mla": {"attention": MLA, "num_kv_heads": 4},
            "chunked irope": {"irope": IROPE},
        }.get(kind, {})
        model = build_model(ModelConfig.from_dict({**SMALL, **extra}), seed=0).eval()
    generator = Generator(model, tokenizer)
    shared = [5, 9, 17, 33, 2, 41, 7, 8, 120, 64, 12, 60, 3]
    prompts = [[*shared, 77], [*shared, 5, 6, 7, 8, 9, 10], [*shared, 77], shared[:9]]
    with_cache, without = with_and_without(generator, prompts, block_tokens=4)
    assert [c for _, _, c in with_cache] == [0, 12, 12, 8]
    assert_same_answers(with_cache, without)


def test_other_experts_per_token_compute_their_own_prefix(tokenizer):
    model = build_model(ModelConfig.from_dict(SMALL), seed=0).eval()
    generator = Generator(model, tokenizer)
    prompt = list(range(3, 20))
    engine = Engine(generator, max_batch=2, prefix_cache_tokens=0)
    engine.prefix_cache = PrefixCache(model.cfg, 256, block_tokens=4)
    engine.start()
    try:
        [(_, _, first)] = run(engine, [prompt], experts_per_token=1)
        [(ids_k2, lp_k2, cached_k2)] = run(engine, [prompt], experts_per_token=2)
        [(_, _, again)] = run(engine, [prompt], experts_per_token=1)
    finally:
        engine.stop()
    assert (first, cached_k2, again) == (0, 0, 16)
    [(ids_ref, lp_ref, _)] = with_and_without(generator, [prompt], 4, experts_per_token=2)[1]
    assert ids_k2 == ids_ref and lp_k2 == pytest.approx(lp_ref, abs=1e-5)


def test_requests_admitted_together_reuse_what_the_first_stored(tokenizer):
    """The lookup waits for a request's first chunk: of requests sharing a start admitted at
    once, the later ones find the blocks the first one's prefill stored."""
    model = build_model(ModelConfig.from_dict(SMALL), seed=0).eval()
    generator = Generator(model, tokenizer)
    engine = Engine(generator, max_batch=4, prefill_chunk=0, prefix_cache_tokens=0)
    engine.prefix_cache = PrefixCache(model.cfg, 256, block_tokens=4)
    shared = list(range(3, 20))
    inboxes = [Inbox() for _ in range(4)]
    params = SamplingParams(temperature=0, ignore_eos=True, max_new_tokens=3)
    engine.submit(*[EngineRequest([*shared, i], params, b.emit) for i, b in enumerate(inboxes)])
    engine.start()  # all four are admitted in the engine's first turn
    try:
        cached = [b.finish.cached_tokens for b in inboxes]
    finally:
        engine.stop()
    assert cached == [0, 16, 16, 16]


def test_engine_default_size_and_setting(tiny_model_dir):
    generator = Generator.from_dir(tiny_model_dir)  # max_seq_len 128
    engine = Engine(generator, max_batch=8)
    assert engine.prefix_cache is not None
    assert engine.prefix_cache.capacity_tokens == 8 * 128 // 4
    assert Engine(generator, prefix_cache_tokens=0).prefix_cache is None
    assert Engine(generator, max_batch=1, max_context=32).prefix_cache is None  # < one block
    with pytest.raises(ValueError, match="prefix_cache_tokens=-1"):
        Engine(generator, prefix_cache_tokens=-1)
    with pytest.raises(ValueError, match="prefix_cache_tokens=5"):
        Engine(generator, prefix_cache_tokens=5)


def test_concurrent_lookups_are_safe_while_streams_decode(tokenizer):
    """Requests with a shared start arriving while others decode: every answer is the one a
    server without the cache gives."""
    model = build_model(ModelConfig.from_dict(SMALL), seed=0).eval()
    generator = Generator(model, tokenizer)
    shared = list(range(3, 30))
    prompts = [[*shared, *range(40, 40 + i)] for i in range(1, 7)]
    results = {}
    for cached in (True, False):
        engine = Engine(generator, max_batch=3, prefill_chunk=4, prefix_cache_tokens=0)
        if cached:
            engine.prefix_cache = PrefixCache(model.cfg, 256, block_tokens=4)
        engine.start()
        try:
            boxes = [Inbox() for _ in prompts]

            def send(i, boxes=boxes, engine=engine):
                params = SamplingParams(temperature=0, ignore_eos=True, max_new_tokens=5)
                engine.submit(EngineRequest(prompts[i], params, boxes[i].emit, logprobs=0))

            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            done = [b.finish for b in boxes]  # waits for each
            results[cached] = [
                ([e.id for e in b.events if isinstance(e, TokenEvent)], d.cached_tokens)
                for b, d in zip(boxes, done, strict=True)
            ]
        finally:
            engine.stop()
    assert [ids for ids, _ in results[True]] == [ids for ids, _ in results[False]]
    assert sum(c for _, c in results[True]) > 0


# ---- the server, as the openai client sees it ----------------------------------------------

SYSTEM = (
    "You are a helpful assistant for a small shop that sells tea, coffee and biscuits. "
    "Answer in one short sentence."
)


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    """Two servers of the tiny model: with the prefix cache (its default size) and without."""
    from .conftest import running_server

    with (
        running_server(tiny_model_dir, max_batch=4) as cached,
        running_server(tiny_model_dir, max_batch=4, prefix_cache_tokens=0) as plain,
    ):
        yield cached, plain


def clients(servers):
    openai = pytest.importorskip("openai")
    return [openai.OpenAI(base_url=f"{url}/v1", api_key="unused") for url, _ in servers]


def chat(client, question, **options):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=2, **options,
    )  # fmt: skip


def assert_same_chat(a, b):
    assert a.choices[0].message.content == b.choices[0].message.content
    got, want = a.choices[0].logprobs.content, b.choices[0].logprobs.content
    assert [t.token for t in got] == [t.token for t in want]
    assert [t.logprob for t in got] == pytest.approx([t.logprob for t in want], abs=1e-5)


def test_a_shared_system_prompt_is_reused_and_changes_no_token(servers):
    cached, plain = clients(servers)
    first = chat(cached, "Do you sell green tea?")
    second = chat(cached, "What does coffee cost?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    reused = second.usage.prompt_tokens_details.cached_tokens
    assert 16 <= reused < second.usage.prompt_tokens and reused % 16 == 0
    assert_same_chat(first, chat(plain, "Do you sell green tea?"))
    assert_same_chat(second, chat(plain, "What does coffee cost?"))
    assert chat(plain, "What does coffee cost?").usage.prompt_tokens_details.cached_tokens == 0


def test_a_later_turn_of_a_chat_reuses_the_earlier_turns(servers):
    cached, plain = clients(servers)
    system = "You sell tea, coffee and biscuits. Be brief."
    turn = [{"role": "system", "content": system}, {"role": "user", "content": "Any oolong?"}]
    first = cached.chat.completions.create(model="tiny", messages=turn, max_tokens=3,
                                           temperature=0)  # fmt: skip
    assert first.usage.prompt_tokens >= 16
    turn += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And black tea?"}]  # fmt: skip
    options = dict(model="tiny", messages=turn, max_tokens=6, temperature=0)
    second = cached.chat.completions.create(**options)
    reused = second.usage.prompt_tokens_details.cached_tokens
    assert reused >= first.usage.prompt_tokens // 16 * 16 - 16 and reused > 0
    assert second.choices[0].message.content == (
        plain.chat.completions.create(**options).choices[0].message.content
    )


def test_streamed_usage_reports_cached_tokens(servers):
    cached, plain = clients(servers)
    prompt = "The tea shop opens at nine and closes at five, every day but Sunday. It sells"
    options = dict(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    cached.completions.create(**options)  # stores the prompt's blocks
    stream = cached.completions.create(**options, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16 > 0
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.completions.create(**options).choices[0].text
    system = {"role": "system", "content": "Biscuits: shortbread, ginger nuts, digestives."}
    cached.chat.completions.create(model="tiny", messages=[system], max_tokens=1)  # stores it
    stream = cached.chat.completions.create(
        model="tiny", messages=[system, {"role": "user", "content": "hi"}],
        max_tokens=4, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    assert list(stream)[-1].usage.prompt_tokens_details.cached_tokens >= 16


def test_echoed_prompt_logprobs_are_computed_not_reused(servers):
    cached, plain = clients(servers)
    prompt = "Biscuits come in tins of twelve, and a tin of shortbread costs four pounds. A"
    options = dict(model="tiny", prompt=prompt, max_tokens=2, temperature=0, echo=True,
                   logprobs=1)  # fmt: skip
    cached.completions.create(model="tiny", prompt=prompt, max_tokens=1)  # stores it
    out = cached.completions.create(**options)
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    want = plain.completions.create(**options).choices[0].logprobs.token_logprobs
    got = out.choices[0].logprobs.token_logprobs
    assert got[0] is None and None not in got[1:] and len(got) == len(want)
    assert got[1:] == pytest.approx(want[1:], abs=1e-5)


def test_concurrent_requests_with_a_common_prefix(servers):
    """Six requests sharing a start, sent at once: each answer is the uncached server's, and
    /metrics counts the hits."""
    import concurrent.futures

    import httpx

    cached, plain = clients(servers)
    start = "Opening hours of the tea shop on the corner of the market square, by day: "
    prompts = [start + day for day in ("Monday", "Tuesday", "Wednesday", "Thursday",
                                       "Friday", "Saturday")]  # fmt: skip
    url = servers[0][0]
    before = metric(httpx.get(f"{url}/metrics").text, "moekit_prefix_cache_hits_total")

    def ask(client, prompt):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                        logprobs=1)  # fmt: skip
        lp = out.choices[0].logprobs.token_logprobs
        return out.choices[0].text, lp, out.usage.prompt_tokens_details.cached_tokens

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: ask(cached, p), prompts))
    want = [ask(plain, p) for p in prompts]
    for (text, lp, _), (text_ref, lp_ref, _) in zip(got, want, strict=True):
        assert text == text_ref
        assert lp == pytest.approx(lp_ref, abs=1e-5)
    hits = sum(c > 0 for _, _, c in got)
    assert hits >= len(prompts) - 1  # all but the first to be prefilled
    page = httpx.get(f"{url}/metrics").text
    assert metric(page, "moekit_prefix_cache_hits_total") - before == hits
    assert metric(page, "moekit_prefix_cache_capacity_tokens") == 4 * 128 // 4
    assert "moekit_prefix_cache" not in httpx.get(f"{servers[1][0]}/metrics").text


def metric(page, name):
    [line] = [line for line in page.splitlines() if line.startswith(name + " ")]
    return int(line.split()[1])


def test_a_bad_setting_is_named(tiny_model_dir):
    from moekit.serve import build
    from moekit.serve.config import SettingError

    for bad in (-1, 5, 1.5, True):
        with pytest.raises(SettingError, match=f"prefix_cache_tokens={bad!r} is invalid"):
            build(tiny_model_dir, prefix_cache_tokens=bad)


def test_the_command_line_names_the_flag(tiny_model_dir):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "moekit.cli", "serve", str(tiny_model_dir), "--port", "0",
         "--prefix-cache-tokens", "5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "prefix_cache_tokens=5 is invalid" in done.stderr
    assert "(--prefix-cache-tokens)" in done.stderr
    assert "Traceback" not in done.stderr
