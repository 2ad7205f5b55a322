"""Bad requests get OpenAI-style errors with the right status, and the server keeps
serving."""

import json

import httpx
import pytest


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (json.dumps({"model": "tiny"}).encode(), 400, "missing required parameter 'prompt'"),
        (json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, "invalid value for 'prompt'"),
        (json.dumps({"model": "gpt-9", "prompt": "a"}).encode(), 404, "does not exist"),
        (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 0}).encode(), 400, "at least 1"),
        (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 101}).encode(), 400, "at most 100"),
        (json.dumps({"model": "tiny", "prompt": "a", "temperature": 3}).encode(), 400, "'temperature'"),
        (json.dumps({"model": "tiny", "prompt": "a", "presence_penalty": 1}).encode(), 400, "not supported"),
        (json.dumps({"model": "tiny", "prompt": [9999]}).encode(), 400, "token ids must be in"),
        (json.dumps({"model": "tiny", "prompt": "word " * 200, "max_tokens": 10}).encode(), 400, "maximum context length"),
        (json.dumps({"model": "tiny", "prompt": "a", "stop": list("abcdefghijklmnopq")}).encode(), 400, "at most 16"),
        (b"{" + b" " * (1 << 20) + b"}", 413, "larger than"),
        (json.dumps({"model": "tiny", "prompt": "a", "seed": 2**64}).encode(), 400, "'seed'"),
        (json.dumps({"model": "tiny", "prompt": "a", "seed": -1}).encode(), 400, "'seed'"),
        (json.dumps({"model": "tiny", "prompt": "a", "seed": 2**63 - 1, "n": 2}).encode(), 400, "seed + n - 1"),
        (json.dumps({"model": "tiny", "prompt": "a", "logit_bias": {"5": 10}}).encode(), 400, "'logit_bias'"),
        (json.dumps({"model": "tiny", "prompt": "a", "response_format": {"type": "xml"}}).encode(), 400, "'response_format'"),
        (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": True}).encode(), 400, "'max_tokens'"),
        (json.dumps({"model": "tiny", "prompt": "a", "n": True}).encode(), 400, "'n'"),
        (json.dumps({"model": "tiny", "prompt": [True, False]}).encode(), 400, "'prompt'"),
        (json.dumps({"model": "tiny", "prompt": "a", "temperature": "0.5"}).encode(), 400, "'temperature'"),
        (b'{"model": "tiny", "prompt": "a\\ud800b"}', 400, "surrogate"),
        (b'{"model": "tiny", "prompt": "a", "stop": ["\\udc00"]}', 400, "'stop'"),
        (json.dumps({"model": "tiny", "prompt": "a", "stop_token_ids": [512]}).encode(), 400, "stop_token_ids"),
    ],
    ids=["malformed", "not-object", "missing", "wrong-type", "unknown-model", "max-tokens-0",
         "max-tokens-limit", "temperature", "penalty", "token-id", "too-long", "stops", "oversize",
         "seed-too-big", "seed-negative", "seed-plus-n", "logit-bias", "response-format",
         "max-tokens-bool", "n-bool", "prompt-bools", "temperature-string", "surrogate",
         "surrogate-stop", "stop-token-id"],
)  # fmt: skip
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, needle):
    url, _ = server
    r = httpx.post(
        f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and {"type", "param", "code"} <= set(error)
    assert (
        httpx.post(
            f"{url}/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 2}
        ).status_code
        == 200
    )


def test_chat_errors(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
    )
    assert r.status_code == 400
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "w " * 300}]},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
