"""Slow and surplus connections on the real server over loopback: a client that sends its
request too slowly is cut off within its deadline, connections past the limit are refused,
and a well-formed stream on the same server keeps its pace throughout."""

import socket
import threading
import time

import httpx
import pytest

from .conftest import running_server
from .loopback import address, answer_within, error_of, metric

HEAD_S = BODY_S = 1.0  # the test servers' deadlines; the default is 10 s and 30 s
SLACK_S = 3.0  # for a loaded machine: a deadline is met within this much more
STREAM_TOKENS = 300  # about a second of streaming on the long test model


@pytest.fixture(scope="module")
def strict(long_model_dir):
    from moekit.serve.config import ConnectionLimits

    limits = ConnectionLimits(header_timeout_s=HEAD_S, body_timeout_s=BODY_S)
    with running_server(long_model_dir, max_batch=4, limits=limits) as s:
        yield s


def stream_seconds(url, started=None):
    """How long a streamed completion of STREAM_TOKENS tokens takes, start to [DONE]; sets
    the event `started` once the first event has arrived."""
    body = {"model": "tiny", "prompt": "go", "max_tokens": STREAM_TOKENS, "stream": True,
            "ignore_eos": True}  # fmt: skip
    t0, events = time.monotonic(), []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line)
                if started is not None:
                    started.set()
    assert len(events) > STREAM_TOKENS and events[-1] == "data: [DONE]"  # it ran to the end
    return time.monotonic() - t0


def timed_out(url, phase):
    return metric(url, f'moekit_timed_out_connections_total{{phase="{phase}"}}')


class Slowloris:
    """`count` connections that send a request head a byte at a time and never finish it;
    records how long each stayed open."""

    def __init__(self, url, count, every_s=0.05):
        self.socks = [socket.create_connection(address(url)) for _ in range(count)]
        self.every_s, self.t0 = every_s, time.monotonic()
        self.open_for: list[float] = []
        self.thread = threading.Thread(target=self.drip, daemon=True)
        self.thread.start()

    def drip(self):
        live = list(self.socks)
        for s in live:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            s.setblocking(False)
        while live and time.monotonic() - self.t0 < 30:
            for s in list(live):
                try:
                    closed = s.recv(4096) == b""
                    if not closed:
                        continue  # an answer: the close follows
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if not closed:
                    try:
                        s.send(b"a")
                    except OSError:
                        closed = True
                if closed:
                    self.open_for.append(time.monotonic() - self.t0)
                    live.remove(s)
            time.sleep(self.every_s)  # the attacker's pace

    def join(self):
        self.thread.join(timeout=60)
        for s in self.socks:
            s.close()


def test_a_slowloris_is_cut_off_while_a_stream_keeps_its_pace(strict):
    url, _ = strict
    alone = stream_seconds(url)
    attack = Slowloris(url, 30)
    under_attack = stream_seconds(url)
    attack.join()
    assert len(attack.open_for) == 30
    assert max(attack.open_for) < HEAD_S + SLACK_S, attack.open_for
    assert under_attack < 3 * alone + 1.0, (alone, under_attack)
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(strict):
    url, _ = strict
    before = timed_out(url, "head")
    with socket.create_connection(address(url)) as sock:
        data, seconds = answer_within(sock, HEAD_S + SLACK_S)
    assert data == b""  # a browser's pre-opened connection must not read an answer
    assert seconds >= HEAD_S * 0.9
    assert timed_out(url, "head") == before + 1


def test_a_half_sent_head_gets_a_408_in_the_api_shape(strict):
    url, _ = strict
    with socket.create_connection(address(url)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        data, seconds = answer_within(sock, HEAD_S + SLACK_S)
    status, error = error_of(data)
    assert status == 408 and error["code"] == "request_timeout" and "head" in error["message"]
    assert seconds < HEAD_S + SLACK_S


def test_a_half_sent_body_gets_a_408_and_counts_as_a_client_that_left(strict):
    url, engine = strict
    before = timed_out(url, "body")
    prompts = engine.stats.prompt_tokens
    with socket.create_connection(address(url)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
                     b'{"model": "tiny", ')  # fmt: skip
        data, seconds = answer_within(sock, BODY_S + SLACK_S)
    status, error = error_of(data)
    assert status == 408 and "body" in error["message"] and seconds < BODY_S + SLACK_S
    assert timed_out(url, "body") == before + 1
    text = httpx.get(f"{url}/metrics").text
    assert 'status="500"' not in text
    assert engine.stats.prompt_tokens == prompts


def test_a_body_the_server_does_not_read_has_its_deadline_and_one_answer(strict):
    url, _ = strict
    with socket.create_connection(address(url)) as sock:
        sock.sendall(b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
        data, seconds = answer_within(sock, BODY_S + SLACK_S)  # answered at once: 405
    assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 405 ")
    assert seconds < BODY_S + SLACK_S


def test_a_malformed_request_gets_a_400_in_the_api_shape(strict):
    url, _ = strict
    with socket.create_connection(address(url)) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data, _ = answer_within(sock, SLACK_S)
    status, error = error_of(data)
    assert status == 400 and error["type"] == "invalid_request_error"


def test_connections_past_the_limit_are_refused_and_streams_go_on(long_model_dir):
    from moekit.serve.config import ConnectionLimits

    limits = ConnectionLimits(max_connections=4)  # the default deadlines: idle sockets stay
    with running_server(long_model_dir, max_batch=4, limits=limits) as (url, _):
        alone = stream_seconds(url)
        streamed: list[float] = []
        started = threading.Event()
        stream = threading.Thread(target=lambda: streamed.append(stream_seconds(url, started)))
        stream.start()
        assert started.wait(timeout=30)
        idle = [socket.create_connection(address(url)) for _ in range(3)]  # 4 with the stream
        t0 = time.monotonic()
        refused = httpx.get(f"{url}/v1/models", timeout=10)
        refused_in = time.monotonic() - t0
        stream.join(timeout=60)
        assert refused.status_code == 503 and refused_in < 2.0
        error = refused.json()["error"]
        assert error["code"] == "too_many_connections" and refused.headers["retry-after"]
        assert streamed and streamed[0] < 3 * alone + 1.0, (alone, streamed)
        for s in idle:
            s.close()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").status_code != 200:  # served again once they close
            assert time.monotonic() < deadline
        assert metric(url, "moekit_refused_connections_total") == 1
