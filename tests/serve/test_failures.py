"""Bad bodies, bugs and abandoned uploads on the real server over loopback: JSON Python cannot
decode cheaply is a 400, every 500 is logged with its traceback, and a client that leaves in
the middle of its upload is counted as a disconnect, not as a 500 with a latency."""

import logging
import socket
import time

import httpx
import pytest

from .loopback import address, metric


@pytest.mark.parametrize(
    "body, problem",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"model": "tiny", "prompt": "a", "max_tokens": ' + b"7" * 5000 + b"}", "5000 digits"),
    ],
    ids=["deep-nesting", "5000-digit-integer"],
)
def test_json_python_cannot_decode_cheaply_is_a_400(server, body, problem):
    url, _ = server
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", content=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and problem in error["message"]
    assert time.monotonic() - t0 < 5  # refused, not ground through
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize("crash", ["bug", "api-error"])
def test_every_500_is_logged_with_its_traceback(server, monkeypatch, caplog, crash):
    from moekit.serve import responses
    from moekit.serve.protocol import APIError

    url, _ = server

    def broken(*args, **kwargs):
        if crash == "bug":
            raise RuntimeError("a planted bug")
        raise APIError(500, "a planted failure", type="server_error")

    monkeypatch.setattr(responses, "completion_body", broken)
    with caplog.at_level(logging.ERROR, logger="moekit.serve"):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a",
                                                       "max_tokens": 2}, timeout=30)  # fmt: skip
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    logged = [rec for rec in caplog.records if rec.name == "moekit.serve"]
    assert len(logged) == 1, [rec.getMessage() for rec in logged]  # once, not once per layer
    assert "/v1/completions" in logged[0].getMessage()
    assert logged[0].exc_info is not None and "planted" in str(logged[0].exc_info[1])
    assert httpx.get(f"{url}/health").status_code == 200


def test_an_abandoned_upload_is_a_disconnect_not_a_500(server):
    url, _ = server
    endpoint = '{endpoint="/v1/completions"}'
    left = metric(url, f"moekit_client_disconnects_total{endpoint}")
    latencies = metric(url, f"moekit_request_latency_seconds_count{endpoint}")
    failures = metric(url, 'moekit_requests_total{endpoint="/v1/completions",status="500"}')
    with socket.create_connection(address(url)) as sock:
        # "Expect: 100-continue" makes the server say when the endpoint starts reading.
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
                     b"Expect: 100-continue\r\n\r\n")  # fmt: skip
        sock.settimeout(10)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b'{"model": "tiny", "prompt": "')  # then the client goes away
    deadline = time.monotonic() + 10
    while metric(url, f"moekit_request_latency_seconds_count{endpoint}") == latencies:
        if metric(url, f"moekit_client_disconnects_total{endpoint}") > left:
            break
        assert time.monotonic() < deadline, "the request was never counted"
    assert metric(url, 'moekit_requests_total{endpoint="/v1/completions",status="500"}') == failures
    assert metric(url, f"moekit_request_latency_seconds_count{endpoint}") == latencies
    assert metric(url, f"moekit_client_disconnects_total{endpoint}") == left + 1
