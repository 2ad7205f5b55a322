"""Scoring a prompt: `echo` with `max_tokens: 0` and `logprobs` returns the prompt's
log-probabilities and generates nothing, as the legacy OpenAI API and vLLM do."""

import json

import httpx
import pytest
import torch

from .conftest import running_server

PROMPT = "def add(a, b):\n    return a + b"


def direct_logprobs(reference, ids):
    """Each prompt token's log-probability given the ones before it, from one forward pass."""
    with torch.no_grad():
        logits = reference.model(torch.tensor([ids]), causal_routing=True).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist(), logp


def test_echo_with_max_tokens_0_scores_the_prompt(client, reference):
    out = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, n=2
    )
    ids = reference.tokenizer.encode(PROMPT)
    expected, logp = direct_logprobs(reference, ids)
    for choice in out.choices:
        assert choice.text == PROMPT and choice.finish_reason == "length"
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
        assert "".join(lp.tokens) == PROMPT and lp.text_offset[0] == 0
        assert lp.top_logprobs[0] is None
        for i, top in enumerate(lp.top_logprobs[1:]):
            [(token, value)] = top.items()
            best = int(logp[i].argmax())
            assert token == reference.tokenizer.decode([best])
            assert value == pytest.approx(float(logp[i, best]), abs=1e-4)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == 2 * len(ids)


def test_scoring_streams_too(server, reference):
    url, _ = server
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    choices = [e["choices"][0] for e in events if e["choices"]]
    assert "".join(c["text"] for c in choices) == PROMPT
    assert choices[-1]["finish_reason"] == "length"
    token_logprobs = [v for c in choices if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
    ids = reference.tokenizer.encode(PROMPT)
    expected, _ = direct_logprobs(reference, ids)
    assert token_logprobs[0] is None and token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert events[-1]["usage"]["completion_tokens"] == 0


def test_echo_with_max_tokens_0_and_no_logprobs_is_the_prompt(server):
    url, _ = server
    body = {"model": "tiny", "prompt": ["a b", "c d e"], "max_tokens": 0, "echo": True}
    out = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in out["choices"]] == ["a b", "c d e"]
    assert all(c["logprobs"] is None for c in out["choices"])
    assert [c["finish_reason"] for c in out["choices"]] == ["length", "length"]
    assert out["usage"]["completion_tokens"] == 0


def test_a_prompt_that_fills_the_context_can_be_scored(server):
    url, engine = server
    ids = [5] * engine.max_context  # no room for a new token, none needed
    body = {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == len(ids)
    too_long = {**body, "prompt": [*ids, 5]}
    r = httpx.post(f"{url}/v1/completions", json=too_long, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_max_tokens_0_without_echo_is_refused_clearly(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 0})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "max_tokens"
    assert "at least 1" in error["message"] and "echo" in error["message"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_scoring_keeps_its_place_in_the_queue(tiny_model_dir):
    """Scoring requests go through the engine's queue like the others: a burst of them is
    answered whole while a generation runs."""
    with running_server(tiny_model_dir, max_batch=2, max_queue=8) as (url, _):
        body = {"model": "tiny", "prompt": ["x y"] * 8, "max_tokens": 0, "echo": True,
                "logprobs": 0}  # fmt: skip
        out = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert len(out["choices"]) == 8
        assert all(c["logprobs"]["token_logprobs"][0] is None for c in out["choices"])
