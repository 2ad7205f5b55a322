"""Stopping without dropping: SIGTERM refuses new requests but lets the running ones finish
within a grace period, then `moekit serve` exits 0."""

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from moekit.infer.generate import Generator
from moekit.serve.engine import Engine, EngineStoppedError

from .pace import Background
from .test_engine import Inbox, request


def start_serving(model_dir, *flags):
    """`moekit serve` in a subprocess on a free port, once it answers: (process, url)."""
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "moekit.cli", "serve", str(model_dir), "--port", str(port),
               "--model-name", "tiny", *flags]  # fmt: skip
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:  # poll until it answers
        assert server.poll() is None, server.stderr.read() if server.stderr else ""
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_lets_a_running_stream_finish_and_refuses_new_requests(long_model_dir):
    grace = 180  # generous: 800 tokens on a machine under load take a while
    server, url = start_serving(long_model_dir, "--shutdown-grace", str(grace))
    try:
        stream = Background(url, {"model": "tiny", "prompt": "a", "max_tokens": 800,
                                  "ignore_eos": True})  # fmt: skip
        stream.wait_first()
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        deadline = signalled + 30
        while httpx.get(f"{url}/health", timeout=30).status_code != 503:  # draining now
            assert time.monotonic() < deadline, "/health never said it was draining"
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a"}, timeout=30)
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "shutting_down" and error["type"] == "server_error"
        assert set(error) == {"message", "type", "param", "code"}
        assert stream.thread.is_alive(), "the stream ended before the drain was seen"
        chunks = stream.wait_end()
        assert chunks[-1][1]["choices"][0]["finish_reason"] == "length"
        tokens = sum(
            1 for _, c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None
        )
        assert tokens >= 800
        assert server.wait(timeout=grace + 30) == 0
        assert time.monotonic() - signalled < grace
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_drain_ends_what_is_left_after_the_grace_period(long_model_dir):
    generator = Generator.from_dir(long_model_dir)
    engine = Engine(generator, max_batch=1, max_queue=4)
    engine.start()
    short, long, waiting = Inbox(), Inbox(), Inbox()
    engine.submit(request(generator, short, max_new_tokens=5, ignore_eos=True))
    engine.submit(request(generator, long, max_new_tokens=4000, ignore_eos=True))
    engine.submit(request(generator, waiting, max_new_tokens=5, ignore_eos=True))
    deadline = time.monotonic() + 30
    while not long.events:  # the short one is done, the long one generating
        assert time.monotonic() < deadline
        time.sleep(0.01)
    start = time.monotonic()
    engine.drain(0.5)
    with pytest.raises(EngineStoppedError):
        engine.submit(request(generator, Inbox(), max_new_tokens=4))
    assert short.finish.finish_reason == "length"
    assert long.finish.finish_reason == "abort" and waiting.finish.finish_reason == "abort"
    engine._thread.join(timeout=30)
    assert not engine._thread.is_alive() and time.monotonic() - start < 10


def test_a_drain_with_nothing_to_do_ends_at_once(tiny_model_dir):
    engine = Engine(Generator.from_dir(tiny_model_dir))
    engine.start()
    start = time.monotonic()
    engine.drain(30)
    engine._thread.join(timeout=30)
    assert not engine._thread.is_alive() and time.monotonic() - start < 5
