"""Helpers for the tests that time a stream: when its chunks arrive, and a stream kept running
in the background while something else happens."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx


def stream_chunks(
    url: str, body: dict[str, Any], *, timeout: float = 300
) -> list[tuple[float, dict]]:
    """(arrival time, chunk) for every chunk of a streamed completion (no [DONE])."""
    out = []
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=timeout
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append((time.monotonic(), json.loads(line[6:])))
    return out


class Background:
    """A streamed completion read in a thread until `close()` (which disconnects it, and so
    cancels it) or until it ends; `first` is set once its first chunk arrived."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.first, self.closing = threading.Event(), threading.Event()
        self.chunks: list[tuple[float, dict]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self.thread.start()

    def _read(self, url: str, body: dict[str, Any]) -> None:
        try:
            with httpx.stream(
                "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=300
            ) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        self.chunks.append((time.monotonic(), json.loads(line[6:])))
                        self.first.set()
                    if self.closing.is_set():
                        return
        except BaseException as e:  # reported by close()
            self.error = e
        finally:
            self.first.set()

    def wait_first(self, timeout: float = 60) -> None:
        assert self.first.wait(timeout), "the background stream never started"
        assert self.error is None, self.error

    def wait_chunks(self, n: int, timeout: float = 120) -> None:
        """Until `n` chunks arrived. Sleeps between looks: the server under test runs in this
        process, and a busy wait would take the interpreter lock from it."""
        deadline = time.monotonic() + timeout
        while len(self.chunks) < n:
            assert self.thread.is_alive() or len(self.chunks) >= n, "the stream ended early"
            assert time.monotonic() < deadline, f"{len(self.chunks)} of {n} chunks arrived"
            time.sleep(0.01)

    def wait_end(self, timeout: float = 120) -> list[tuple[float, dict]]:
        """Every chunk, once the stream has ended by itself."""
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), "the background stream did not end"
        assert self.error is None, self.error
        return self.chunks

    def close(self) -> list[tuple[float, dict]]:
        self.closing.set()
        self.thread.join(timeout=60)
        assert self.error is None, self.error
        return self.chunks


def engine_cpu_s(engine: Any) -> float:
    """The CPU time the engine's thread has used: what a decode step costs, unlike wall-clock
    time untouched by whatever else keeps the machine busy."""
    assert engine._thread is not None, "the engine runs in the main thread"
    return time.clock_gettime(time.pthread_getcpuclockid(engine._thread.ident))
