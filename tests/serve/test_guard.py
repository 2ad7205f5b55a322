"""The guard in front of every request, around a bare ASGI stand-in for the app: checks come
first, a crash is a 500 in the API's shape, every API request is counted."""

import pytest
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

from moekit.serve.config import ServerConfig
from moekit.serve.guard import Guard
from moekit.serve.metrics import Metrics


async def stand_in(scope, receive, send):
    if scope["path"] == "/v1/completions":  # crashes
        raise RuntimeError("boom")
    if scope["path"] == "/v1/chat/completions":  # fails after the answer has started
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        raise RuntimeError("late")
    await PlainTextResponse("ok")(scope, receive, send)


# TestClient's default Host, "testserver", is a name the Host check refuses.
LOCAL = "http://127.0.0.1:8000"


def guarded(**config):
    metrics = Metrics()
    app = Guard(stand_in, config=ServerConfig("tiny", **config), metrics=metrics)
    return app, metrics


def test_a_crash_costs_one_request_and_answers_in_the_api_shape():
    app, metrics = guarded()
    client = TestClient(app, base_url=LOCAL)
    r = client.get("/v1/completions")
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "boom" in r.json()["error"]["message"]
    assert client.get("/v1/models").text == "ok"
    assert metrics.requests == {("/v1/completions", 500): 1, ("/v1/models", 200): 1}


def test_a_crash_after_the_answer_started_is_not_answered_twice():
    app, metrics = guarded()
    with pytest.raises(RuntimeError, match="late"):  # left to the server, which drops it
        TestClient(app, base_url=LOCAL).get("/v1/chat/completions")
    assert metrics.requests == {("/v1/chat/completions", 200): 1}


def test_checks_run_in_order_before_the_app():
    app, metrics = guarded(api_key="sesame", max_body_bytes=4)
    client = TestClient(app, base_url=LOCAL)
    r = client.post("/v1/models", content=b"too long")
    assert r.status_code == 401  # the key first: a stranger learns nothing about limits
    r = client.post("/v1/models", content=b"too long", headers={"Authorization": "Bearer sesame"})
    assert r.status_code == 413 and "larger than 4 bytes" in r.json()["error"]["message"]
    assert client.get("/health").text == "ok"  # open, and not counted
    assert metrics.requests == {("/v1/models", 401): 1, ("/v1/models", 413): 1}
