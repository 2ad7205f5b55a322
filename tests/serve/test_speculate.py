"""Speculative decoding in the serving engine (prompt-lookup drafts checked in the batch's
decode pass): every request gets the tokens, logprobs and finish reasons plain decoding gives,
greedy or seeded, alone or batched with requests that cannot speculate."""

import pytest

from moekit.infer.generate import Generator
from moekit.infer.sampling import SamplingParams
from moekit.serve.engine import Engine, EngineRequest, TokenEvent
from tests.serve.test_engine import Inbox

PROMPTS = [
    "def f(x):\n    return x + 1\n\ndef g(x):\n    return",
    "The cat sat on the mat. The cat",
    "a b a b a b a",
]
SETTINGS = [
    dict(temperature=0.0, max_new_tokens=40, ignore_eos=True),
    dict(temperature=0.9, top_k=20, seed=11, max_new_tokens=40, ignore_eos=True),
    dict(temperature=0.0, max_new_tokens=30, stop=["x"], repetition_penalty=1.3),
    dict(temperature=0.0, max_new_tokens=25, experts_per_token=1),
    # The routing trace is read per token: this one decodes a token at a time, in passes
    # where the others check their drafts.
    dict(temperature=0.0, max_new_tokens=25, return_routing=True),
]


def run(engine, generator, settings):
    """Every (prompt, setting) request submitted at once; their events."""
    inboxes, reqs = [], []
    for prompt in PROMPTS:
        for params in settings:
            inbox = Inbox()
            ids = generator.tokenizer.encode_prompt(prompt)
            req = EngineRequest(ids, SamplingParams(**params), inbox.emit, logprobs=2)
            inboxes.append(inbox)
            reqs.append(req)
    engine.submit(*reqs)
    out = []
    for inbox in inboxes:
        done = inbox.finish
        tokens = [e for e in inbox.events if isinstance(e, TokenEvent)]
        out.append((done.finish_reason, done.text, tokens))
    return out


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return Generator.from_dir(tiny_model_dir, device="cpu")


def test_speculation_changes_no_token(generator):
    results = {}
    for k in (0, 4):
        engine = Engine(generator, max_batch=4, max_queue=64, speculative_tokens=k)
        engine.start()
        try:
            results[k] = run(engine, generator, SETTINGS)
        finally:
            engine.stop()
        if k:
            assert engine.stats.accepted_tokens > 0, "no draft was ever kept: nothing tested"
            # Fewer passes than tokens: drafts were kept.
            assert engine.stats.decode_steps < engine.stats.generated_tokens
    for (reason0, text0, tokens0), (reason4, text4, tokens4) in zip(
        results[0], results[4], strict=True
    ):
        assert (reason4, text4) == (reason0, text0)
        assert [t.id for t in tokens4] == [t.id for t in tokens0]
        for a, b in zip(tokens0, tokens4, strict=True):
            if a.logprob is not None:
                assert b.logprob.logprob == pytest.approx(a.logprob.logprob, abs=1e-4)
            assert (a.routing is None) == (b.routing is None)
            if a.routing is not None:  # the routing trace is the same too
                assert {k: [e for e, _ in v] for k, v in a.routing.items()} == {
                    k: [e for e, _ in v] for k, v in b.routing.items()
                }


def test_speculation_stays_within_the_context(long_model_dir):
    """Drafts never push a slot past max_context: a request that fills it exactly ends on
    length, as without speculation."""
    generator = Generator.from_dir(long_model_dir, device="cpu")
    ids = generator.tokenizer.encode_prompt("a b a b a b a b")
    engine = Engine(generator, max_batch=2, max_context=len(ids) + 20, speculative_tokens=8)
    engine.start()
    try:
        inbox = Inbox()
        engine.submit(
            EngineRequest(
                ids, SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True), inbox.emit
            )
        )
        assert inbox.finish.finish_reason == "length"
        assert inbox.finish.completion_tokens == 20
    finally:
        engine.stop()


def test_bad_draft_counts_are_refused(generator):
    with pytest.raises(ValueError, match=r"speculative_tokens=17 is invalid: must be in \[0, 16\]"):
        Engine(generator, speculative_tokens=17)
    with pytest.raises(TypeError, match="speculative_tokens must be an int"):
        Engine(generator, speculative_tokens=2.0)


def test_the_server_speculates_and_answers_as_without(tiny_model_dir):
    """Through the real server and the openai client: greedy chat and completion answers with
    --speculative ngram equal those without, and /metrics counts the kept drafts."""
    openai = pytest.importorskip("openai")
    import httpx

    from tests.serve.conftest import running_server

    answers = {}
    for k in (0, 4):
        with running_server(tiny_model_dir, speculative_tokens=k) as (url, _):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            chat = client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": PROMPTS[1]}],
                max_tokens=40,
                temperature=0,
            )
            text = client.completions.create(
                model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, seed=1
            )
            answers[k] = (chat.choices[0].message.content, text.choices[0].text)
            metrics = httpx.get(f"{url}/metrics").text
        accepted = next(
            line
            for line in metrics.splitlines()
            if line.startswith("moekit_speculative_accepted_tokens_total ")
        )
        assert (int(accepted.split()[1]) > 0) == bool(k)
    assert answers[4] == answers[0]


def test_serve_flags_for_speculation_name_the_problem(tiny_model_dir, capsys):
    from moekit.cli.commands import main
    from moekit.serve import build
    from moekit.serve.config import SettingError

    assert main(["serve", str(tiny_model_dir), "--port", "0", "--num-draft-tokens", "3"]) == 2
    assert "--num-draft-tokens needs --speculative" in capsys.readouterr().err
    with pytest.raises(SettingError, match="speculative_tokens=-1 is invalid"):
        build(tiny_model_dir, speculative_tokens=-1)
