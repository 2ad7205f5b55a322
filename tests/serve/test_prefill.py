"""Chunked prefill: a long prompt runs through the model a chunk at a time between the decode
steps of the running requests, with the answers of a single pass."""

import itertools

import httpx
import pytest

from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.serve.engine import Engine, EngineRequest, PromptEvent, TokenEvent

from .conftest import running_server
from .pace import Background
from .test_engine import Inbox


def run_engine(generator, prompt_ids, prefill_chunk, **params):
    """One greedy request with logprobs and echo through an engine: its events."""
    engine = Engine(generator, max_batch=2, prefill_chunk=prefill_chunk)
    engine.start()
    try:
        box = Inbox()
        sampling = SamplingParams(temperature=0, ignore_eos=True, **params)
        engine.submit(EngineRequest(prompt_ids, sampling, box.emit, logprobs=3, echo_logprobs=True))
        assert box.finish.finish_reason == "length"
        return box.events
    finally:
        engine.stop()


def test_chunked_prefill_answers_as_a_single_pass(tiny_model_dir):
    generator = Generator.from_dir(tiny_model_dir)
    prompt = generator.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n" * 3)
    assert 60 < len(prompt) < 100
    whole = run_engine(generator, prompt, 0, max_new_tokens=20)
    for chunk in (1, 7, 64):
        chunked = run_engine(generator, prompt, chunk, max_new_tokens=20)
        [echo_whole] = [e.logprobs for e in whole if isinstance(e, PromptEvent)]
        [echo_chunked] = [e.logprobs for e in chunked if isinstance(e, PromptEvent)]
        assert len(echo_chunked) == len(prompt) and echo_chunked[0] is None
        for a, b in zip(echo_whole[1:], echo_chunked[1:], strict=True):
            assert (a.id, [t.id for t in a.top]) == (b.id, [t.id for t in b.top])
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        tokens_whole = [e for e in whole if isinstance(e, TokenEvent)]
        tokens_chunked = [e for e in chunked if isinstance(e, TokenEvent)]
        assert [t.id for t in tokens_chunked] == [t.id for t in tokens_whole]
        assert [t.text for t in tokens_chunked] == [t.text for t in tokens_whole]
        assert [t.logprob.logprob for t in tokens_chunked] == pytest.approx(
            [t.logprob.logprob for t in tokens_whole], abs=1e-5
        )


def test_prefill_chunk_must_be_a_count(tiny_model_dir):
    generator = Generator.from_dir(tiny_model_dir)
    with pytest.raises(ValueError, match="prefill_chunk=-1"):
        Engine(generator, prefill_chunk=-1)
    with pytest.raises(TypeError, match="prefill_chunk"):
        Engine(generator, prefill_chunk=1.5)
    assert Engine(generator).prefill_chunk == 512


def longest_gap_while_prefilling(url, engine, prompt_len):
    """The longest wait between two tokens of a running stream while a prompt of
    `prompt_len` tokens is admitted next to it."""
    running = Background(url, {"model": "tiny", "prompt": "a", "max_tokens": 7000,
                               "ignore_eos": True})  # fmt: skip
    running.wait_first()
    running.wait_chunks(20)  # decoding at its pace
    before = len(running.chunks)
    body = {"model": "tiny", "prompt": [7] * prompt_len, "max_tokens": 1}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200
    after = len(running.chunks)
    running.wait_chunks(after + 5)  # and a few tokens after it
    times = [t for t, _ in running.close()[before - 1 :]]
    return max(b - a for a, b in itertools.pairwise(times))


@pytest.mark.slow
def test_a_long_prompt_does_not_stall_a_running_stream(long_model_dir):
    """A running stream's longest gap between tokens while an 8k-token prompt is admitted:
    with prefill in chunks, a fraction of the gap it has when the prompt is prefilled whole
    (measured on the same server, the least of three rounds each: beside other work on a
    2-core machine, one round's chunked gap can take a scheduling stall of 0.1-0.2 s)."""
    # Without the prefix cache: the same prompt again would be prefilled from its last block.
    with running_server(long_model_dir, max_context=8192, prefix_cache_tokens=0) as (url, engine):
        rounds = []
        for _ in range(3):
            engine.prefill_chunk = 0
            whole = longest_gap_while_prefilling(url, engine, 8000)
            engine.prefill_chunk = 512
            chunked = longest_gap_while_prefilling(url, engine, 8000)
            rounds.append((whole, chunked))
    whole, chunked = min(r[0] for r in rounds), min(r[1] for r in rounds)
    assert chunked < whole / 2, rounds
