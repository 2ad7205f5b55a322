"""Streamed answers: server-sent events as the OpenAI clients read them."""

import json

import httpx

from .conftest import greedy


def test_streaming_completion(client, reference):
    chunks = list(
        client.completions.create(
            model="tiny", prompt="The", max_tokens=10, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == greedy(reference, "The", 10)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_sse_wire_format(server):
    url, _ = server
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        assert json.loads(e[6:])["object"] == "text_completion"
