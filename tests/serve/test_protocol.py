"""Request bodies: what the API accepts and how it reads it."""

import httpx
import pytest

from moekit.serve.protocol import APIError, CompletionRequest, parse


def test_chat_top_logprobs_need_logprobs(server):
    url, _ = server
    messages = [{"role": "user", "content": "hello"}]
    r = httpx.post(f"{url}/v1/chat/completions",
                   json={"model": "tiny", "messages": messages, "top_logprobs": 2})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_explicit_null_means_the_default(server):
    url, _ = server
    nulls = dict.fromkeys(["temperature", "top_p", "n", "max_tokens", "stop", "seed", "stream",
                           "stream_options", "logprobs", "echo", "presence_penalty", "best_of",
                           "suffix", "top_k", "min_p", "logit_bias", "moekit"])  # fmt: skip
    body = {"model": "tiny", "prompt": "The", "ignore_eos": True, **nulls}
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["choices"]) == 1 and out["choices"][0]["logprobs"] is None
    assert out["usage"]["completion_tokens"] == 16  # the default max_tokens
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            **dict.fromkeys(["temperature", "n", "logprobs", "top_logprobs", "seed", "stop",
                             "max_completion_tokens", "tools", "response_format"])}  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text


def test_up_to_16_stop_sequences(server):
    url, _ = server
    stops = [f"<stop {i}>" for i in range(16)]
    body = {"model": "tiny", "prompt": "The", "max_tokens": 3, "stop": stops}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200


def test_parse_names_the_field_inside_the_extension_objects():
    with pytest.raises(APIError) as bad:
        parse(CompletionRequest, {"model": "m", "prompt": "a", "moekit": {"top_k": 0}})
    assert bad.value.status == 400 and bad.value.param == "moekit.top_k"
    with pytest.raises(APIError) as bad:
        parse(CompletionRequest, ["not", "an", "object"])
    assert "must be a JSON object" in bad.value.message
    req = parse(CompletionRequest, {"model": "m", "prompt": "a", "stop": "x", "n": None})
    assert req.stop == ["x"] and req.n == 1
