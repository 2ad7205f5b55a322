"""Talking to a test server over raw loopback sockets, and reading its /metrics."""

import json
import time

import httpx
import pytest


def address(url):
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def answer_within(sock, seconds):
    """Everything the server sends until it closes the connection, and how long that took;
    fails if it is still open after `seconds`."""
    t0, data = time.monotonic(), b""
    sock.settimeout(seconds)
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the connection was still open after {seconds} s")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


def error_of(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def metric(url, row):
    """The value of the /metrics row that starts with `row` (0 when it is absent)."""
    text = httpx.get(f"{url}/metrics").text
    return next((int(r.split()[-1]) for r in text.splitlines() if r.startswith(row + " ")), 0)
