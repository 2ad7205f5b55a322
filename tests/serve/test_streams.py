"""Clients that leave: their generations stop, streaming or not."""

import json
import socket
import time

import httpx


def test_client_disconnect_stops_generation(server):
    url, engine = server
    cancelled = engine.stats.finished["cancelled"]
    body = {"model": "tiny", "prompt": "go", "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)
    deadline = time.monotonic() + 30
    while engine.stats.finished["cancelled"] == cancelled:
        assert time.monotonic() < deadline, "generation did not stop"
        time.sleep(0.02)
    assert engine.active == 0 or engine.stats.finished["cancelled"] > cancelled


def test_a_non_streaming_client_that_leaves_frees_its_slots(long_server):
    url, engine = long_server
    host, port = url.removeprefix("http://").split(":")
    cancelled = engine.stats.finished["cancelled"]
    body = json.dumps({"model": "tiny", "prompt": "go", "max_tokens": 3000, "n": 3,
                       "ignore_eos": True}).encode()  # fmt: skip
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while engine.active < 3:
            assert time.monotonic() < deadline, "the request did not start"
            time.sleep(0.01)
    left = time.monotonic()  # the client closed its connection without reading the answer
    while engine.active or engine.queue_depth:
        assert time.monotonic() - left < 60, "generation did not stop"
        time.sleep(0.01)
    assert engine.stats.finished["cancelled"] - cancelled == 3  # not run to max_tokens
    assert time.monotonic() - left < 3
